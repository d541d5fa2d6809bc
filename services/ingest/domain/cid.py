"""Link ``cid:`` images in a message's (already sanitized) HTML to the parts they name.

An HTML mail shows its inline images as ``<img src="cid:logo@x">`` (RFC 2392), the URL naming
the ``Content-ID`` of a sibling part. The part's attachment id only exists once ingest stores it,
so this runs when the ``mail.received`` event is built (``received.to_event``), after the
sanitizer, on its output: each ``cid:`` source that names a stored part becomes that
attachment's gateway URL, ``/api/attachments/<id>``, the tag gains
``data-attachment-id="<id>"``, and the event marks that attachment ``inline`` (shown in the
body, whatever its Content-Disposition said). The download needs the agent's bearer token,
which a browser does not send for ``<img>``: the agent app fetches the URL with its token and
shows the bytes (a blob URL); the attribute is how it finds those images. A ``cid:`` that names
no part is left as it is (it loads nothing). Remote images are untouched: the sanitizer already moved them to
``data-remote-src``, loaded only if the agent consents.

A part counts whether it came with ``Content-Disposition: inline``, ``attachment`` or none at
all (many clients send a bare ``Content-ID``): what matters is that the HTML names it.
"""

from __future__ import annotations

import html
import re
import uuid
from collections.abc import Iterable, Mapping
from urllib.parse import unquote

__all__ = ["ATTACHMENT_URL", "cid_map", "link_inline_images"]

ATTACHMENT_URL = "/api/attachments/{id}"
_IMG_RE = re.compile(r"<img\b[^>]*>", re.IGNORECASE)
_CID_SRC_RE = re.compile(r'(\s)src="\s*cid:([^"]*)"', re.IGNORECASE)


def _norm(content_id: str) -> str:
    return content_id.strip().strip("<>").strip()


def cid_map(parts: Iterable[tuple[str, str | None]]) -> dict[str, str]:
    """``{content_id: attachment_id}`` from ``(attachment_id, content_id)`` pairs; first wins."""
    out: dict[str, str] = {}
    for att_id, content_id in parts:
        if content_id and _norm(content_id):
            out.setdefault(_norm(content_id), att_id)
    return out


def link_inline_images(sanitized_html: str, by_cid: Mapping[str, str]) -> tuple[str, set[str]]:
    """``sanitized_html`` with each ``cid:`` image that names a part pointing at that part, and
    the ids of the attachments it now shows (the event marks those ``inline``).

    Only attachment ids that are UUIDs are written (they are ours; nothing else can end up in
    the attribute). Content-IDs compare exactly, then case-insensitively (some clients change
    the case between the header and the URL).
    """
    shown: set[str] = set()
    if not by_cid or "cid:" not in sanitized_html.lower():
        return sanitized_html, shown
    folded = {k.lower(): v for k, v in reversed(list(by_cid.items()))}

    def target(raw: str) -> str | None:
        cid = _norm(unquote(html.unescape(raw)))
        att = by_cid.get(cid) or folded.get(cid.lower())
        if att is None:
            return None
        try:
            return str(uuid.UUID(att))
        except ValueError:
            return None

    def one_src(m: re.Match[str]) -> str:
        att = target(m.group(2))
        if att is None:
            return m.group(0)
        shown.add(att)
        url = ATTACHMENT_URL.format(id=att)
        return f'{m.group(1)}src="{url}" data-attachment-id="{att}"'

    def one_img(m: re.Match[str]) -> str:
        return _CID_SRC_RE.sub(one_src, m.group(0), count=1)

    return _IMG_RE.sub(one_img, sanitized_html), shown
