"""What a bounce says about the message it reports on: RFC 3464 DSNs and the common plain ones.

Pure: bytes in, a :class:`Dsn` (or None) out, never an exception. The sender uses the result to
mark its send failed, so the one fact that must be right is *which* message bounced; we take the
original Message-ID from, in this order:

1. the returned message (``message/rfc822`` / ``message/global``) or its headers
   (``text/rfc822-headers`` / ``message/global-headers``), the RFC 3462/3464 way;
2. ``Original-Message-ID`` / ``X-Original-Message-ID`` in the report's fields or top headers
   (Exchange and several ESPs);
3. ``In-Reply-To`` of the report (Office 365 sets it to the bounced message);
4. for plain-text bounces (Gmail's old format, qmail, Exim without DSN), the first ``Message-ID:``
   line in the body after a "copy of the original message" marker.

Per-recipient facts (``Final-Recipient``, ``Action``, ``Status``, ``Diagnostic-Code``,
``Remote-MTA``) come from the ``message/delivery-status`` part; a plain bounce has only
``X-Failed-Recipients``, or qmail's ``<user@host>:`` lines (action ``failed``, status from the
first ``4.x.x``/``5.x.x`` code in its text); a plain bounce that names no recipient is None.
A delayed-delivery DSN (``Action: delayed``) is still returned: the caller decides what to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email import policy
from email.message import Message
from email.parser import BytesParser, HeaderParser

__all__ = ["Dsn", "DsnRecipient", "parse_dsn"]

MAX_RECIPIENTS = 200
MAX_FIELD = 1000
_ID_RE = re.compile(r"<([^<>\s@]+@[^<>\s]+)>")
_BARE_ID_RE = re.compile(r"^\s*([^<>\s@]+@[^<>\s]+)\s*$")
# An RFC 3463 code, not a piece of an IP address or version number ("10.4.5.6", "v2.0.1").
_STATUS_RE = re.compile(r"(?<![\w.])([245])\.(\d{1,3})\.(\d{1,3})(?![\w.]*\d)")
_ADDR_RE = re.compile(r"[^\s<>;,\"]+@[^\s<>;,\"]+")
_REPORT_TYPES = ("message/delivery-status", "message/global-delivery-status")
_ORIGINAL_TYPES = ("message/rfc822", "message/global")
_HEADER_TYPES = ("text/rfc822-headers", "message/global-headers")
_ORIGINAL_MARKERS = re.compile(
    r"^.*(original message|copy of the message|message headers follow|undelivered message|"
    r"returned message|original headers).*$",
    re.IGNORECASE | re.MULTILINE,
)
_MSGID_LINE_RE = re.compile(r"^message-id:[ \t]*(.*(?:\r?\n[ \t]+.*)*)", re.IGNORECASE | re.M)
_PER_MESSAGE = ("reporting-mta", "arrival-date", "received-from-mta", "original-envelope-id")
_QMAIL_RCPT_RE = re.compile(r"^<([^<>\s@]+@[^<>\s]+)>:[ \t]*$", re.MULTILINE)
_ACTIONS = {"failed", "delayed", "delivered", "relayed", "expanded"}


@dataclass(frozen=True)
class DsnRecipient:
    address: str  # Final-Recipient (or Original-Recipient), the bare address
    action: str  # failed | delayed | delivered | relayed | expanded
    status: str = ""  # RFC 3463 code, e.g. "5.1.1"
    diagnostic: str = ""  # Diagnostic-Code without its type, e.g. "550 5.1.1 no such user"
    remote_mta: str = ""


@dataclass(frozen=True)
class Dsn:
    original_message_id: str | None  # "<id@host>", or None when the report does not say
    recipients: list[DsnRecipient] = field(default_factory=list)
    reporting_mta: str = ""
    structured: bool = True  # False: guessed from a plain-text bounce

    @property
    def failed(self) -> list[DsnRecipient]:
        return [r for r in self.recipients if r.action == "failed"]


def _one_line(value: object, limit: int = MAX_FIELD) -> str:
    return " ".join(str(value or "").split())[:limit]


def _msgid(value: str | None) -> str | None:
    """The first ``<local@domain>`` in ``value`` (or a bare ``local@domain``), normalized."""
    if not value:
        return None
    text = _one_line(value, 4 * MAX_FIELD)
    m = _ID_RE.search(text)
    if m:
        return f"<{m.group(1)}>"
    bare = _BARE_ID_RE.match(text)
    return f"<{bare.group(1)}>" if bare else None


def _typed_value(value: str) -> str:
    """``rfc822; a@b`` → ``a@b``; ``smtp; 550 5.1.1 ...`` → ``550 5.1.1 ...``."""
    text = _one_line(value)
    kind, sep, rest = text.partition(";")
    if sep and re.fullmatch(r"[A-Za-z0-9.+-]{1,40}", kind.strip()):
        return rest.strip()
    return text


def _address(value: str) -> str:
    text = _typed_value(value)
    m = _ADDR_RE.search(text)
    return (m.group(0) if m else text).strip("<>").lower()[:320]


def _blocks(text: str) -> list[dict[str, str]]:
    """Field blocks separated by blank lines; names lower-cased, continuation lines unfolded.

    Tolerates what mimekit's corpus shows MTAs send: no blank line after the per-message block,
    several blank lines, CRLF or LF.
    """
    blocks: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    last: str | None = None
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line.strip():
            if cur:
                blocks.append(cur)
            cur, last = {}, None
            continue
        if line[:1] in (" ", "\t") and last is not None:
            cur[last] = f"{cur[last]} {line.strip()}"[: 4 * MAX_FIELD]
            continue
        name, sep, value = line.partition(":")
        name = name.strip().lower()
        if not sep or not re.fullmatch(r"[a-z0-9-]{1,60}", name):
            continue
        # A recipient field inside the per-message block starts a recipient block (no blank line).
        if name in ("final-recipient", "original-recipient") and (
            name in cur or any(f in cur for f in _PER_MESSAGE)
        ):
            blocks.append(cur)
            cur = {}
        cur.setdefault(name, value.strip())
        last = name
    if cur:
        blocks.append(cur)
    return blocks


def _part_text(part: Message) -> str:
    """A part's body as text, whether the parser made sub-messages of it or left it a string."""
    payload = part.get_payload()
    if isinstance(payload, list):  # message/delivery-status parsed into header blocks
        texts: list[str] = []
        for block in payload:
            if not isinstance(block, Message):
                continue
            texts.append("\n".join(f"{k}: {_one_line(v, 4 * MAX_FIELD)}" for k, v in block.items()))
            if not block.is_multipart() and str(block.get_payload() or "").strip():
                texts.append(_part_text(block))  # a block with a body (seen base64-encoded)
        return "\n\n".join(texts)
    data = part.get_payload(decode=True)
    if isinstance(data, bytes):
        return data.decode(part.get_content_charset() or "utf-8", "replace")
    return str(payload or "")


def _recipients(blocks: list[dict[str, str]]) -> list[DsnRecipient]:
    out: list[DsnRecipient] = []
    for b in blocks:
        addr_field = b.get("final-recipient") or b.get("original-recipient")
        if not addr_field:
            continue
        action = _one_line(b.get("action", "")).lower().split(" ")[0]
        status_m = _STATUS_RE.search(b.get("status", ""))
        diagnostic = _typed_value(b.get("diagnostic-code", ""))
        if not status_m:
            status_m = _STATUS_RE.search(diagnostic)
        out.append(
            DsnRecipient(
                address=_address(addr_field),
                action=action if action in _ACTIONS else "failed",
                status=status_m.group(0) if status_m else "",
                diagnostic=diagnostic,
                remote_mta=_typed_value(b.get("remote-mta", "")),
            )
        )
        if len(out) >= MAX_RECIPIENTS:
            break
    return out


def _original_id_of(part: Message) -> str | None:
    ctype = part.get_content_type()
    if ctype in _ORIGINAL_TYPES:
        payload = part.get_payload()
        if isinstance(payload, list) and payload and isinstance(payload[0], Message):
            return _msgid(payload[0].get("message-id"))
        return None
    headers = HeaderParser(policy=policy.compat32).parsestr(_part_text(part), headersonly=True)
    return _msgid(headers.get("message-id"))


def _walk(msg: Message, limit: int = 200) -> list[Message]:
    out: list[Message] = []
    stack = [msg]
    while stack and len(out) < limit:
        node = stack.pop(0)
        out.append(node)
        if node.get_content_maintype() == "multipart" and node.is_multipart():
            payload = node.get_payload()
            if isinstance(payload, list):
                stack.extend(p for p in payload if isinstance(p, Message))
    return out


def _plain_bounce(msg: Message) -> Dsn | None:
    """A bounce without a delivery-status part: X-Failed-Recipients and the quoted original."""
    failed = [_address(a) for a in _ADDR_RE.findall(str(msg.get("x-failed-recipients", "")))]
    texts = [
        _part_text(p)
        for p in _walk(msg)
        if p.get_content_type() in ("text/plain", *_HEADER_TYPES)
        or p.get_content_type() in _ORIGINAL_TYPES
    ]
    body = "\n".join(t for t in texts if t)[:2_000_000]
    original: str | None = None
    for p in _walk(msg):
        if p is not msg and p.get_content_type() in (*_ORIGINAL_TYPES, *_HEADER_TYPES):
            original = _original_id_of(p)
            if original:
                break
    if original is None:
        marker = _ORIGINAL_MARKERS.search(body)
        if marker is not None:
            found = _MSGID_LINE_RE.search(body, marker.end())
            original = _msgid(found.group(1)) if found else None
    if original is None:
        original = _msgid(msg.get("x-original-message-id")) or _msgid(msg.get("in-reply-to"))
    if not failed:  # qmail: "<user@host>:" alone on a line, then the reason
        head = body[: marker.start()] if (marker := _ORIGINAL_MARKERS.search(body)) else body
        failed = [m.lower() for m in _QMAIL_RCPT_RE.findall(head)][:MAX_RECIPIENTS]
    if not failed:  # names no recipient: nothing anyone could act on
        return None
    status_m = _STATUS_RE.search(body) if body else None
    status = status_m.group(0) if status_m and status_m.group(1) in "45" else ""
    diag = ""
    if status_m:
        line_start = body.rfind("\n", 0, status_m.start()) + 1
        line_end = body.find("\n", status_m.end())
        diag = _one_line(body[line_start : line_end if line_end >= 0 else None])
    recips = [
        DsnRecipient(address=a, action="failed", status=status, diagnostic=diag) for a in failed
    ]
    return Dsn(original, recips[:MAX_RECIPIENTS], "", structured=False)


def _is_bounce_shaped(msg: Message) -> bool:
    sender = str(msg.get("from", "")).lower()
    return (
        "x-failed-recipients" in msg
        or "mailer-daemon@" in sender
        or "postmaster@" in sender
        or "mail delivery" in sender
    )


def parse_dsn(raw: bytes) -> Dsn | None:
    """The report in ``raw``, or None when it is not a bounce or names nothing we can use."""
    try:
        msg = BytesParser(policy=policy.compat32).parsebytes(raw[:50_000_000])
        return _parse(msg)
    except Exception:  # a hostile report is just not a report
        return None


def _parse(msg: Message) -> Dsn | None:
    parts = _walk(msg)
    reports = [p for p in parts if p.get_content_type() in _REPORT_TYPES]
    if not reports:
        return _plain_bounce(msg) if _is_bounce_shaped(msg) else None
    blocks = _blocks(_part_text(reports[0]))
    per_message = blocks[0] if blocks and "final-recipient" not in blocks[0] else {}
    original: str | None = None
    for p in parts:
        if p.get_content_type() in (*_ORIGINAL_TYPES, *_HEADER_TYPES):
            original = _original_id_of(p)
            if original:
                break
    original = (
        original
        or _msgid(per_message.get("original-message-id"))
        or _msgid(per_message.get("x-original-message-id"))
        or _msgid(msg.get("original-message-id"))
        or _msgid(msg.get("x-original-message-id"))
        or _msgid(msg.get("in-reply-to"))
    )
    return Dsn(
        original_message_id=original,
        recipients=_recipients(blocks),
        reporting_mta=_typed_value(per_message.get("reporting-mta", "")),
    )
