"""What an agent's upload is stored as: a filename and a media type that are safe to keep.

Pure. The name ends up in a MIME header of our mail and in a Content-Disposition of downloads,
the type in a Content-Type: whatever the browser sent, only a plain base name and a plain
``type/subtype`` leave here.
"""

from __future__ import annotations

import mimetypes
import re
import unicodedata
import uuid

from services.sender.domain import compose

PREFIX = "up_"
FALLBACK_NAME = "attachment"
OCTET_STREAM = "application/octet-stream"
MAX_NAME_BYTES = 200
_ID_RE = re.compile(rf"{PREFIX}[0-9a-f]{{32}}")
_MIME_NAME = r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}"
_CONTENT_TYPE_RE = re.compile(rf"({_MIME_NAME})/({_MIME_NAME})")


def new_id() -> str:
    """Upload ids carry a prefix: the gateway routes ``/api/attachments/up_*`` to the sender."""
    return f"{PREFIX}{uuid.uuid4().hex}"


def is_upload_id(value: str) -> bool:
    return bool(_ID_RE.fullmatch(value))


def _drop_unsafe(text: str) -> str:
    """Controls (C0, C1) and format characters (bidi overrides like U+202E that make
    ``invoice\u202egpj.exe`` read as a picture, zero-width joiners) go; separators become spaces."""
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat in ("Zl", "Zp") or ch in "\t\r\n\x0b\x0c\x85":
            out.append(" ")
        elif cat not in ("Cc", "Cf", "Cs", "Co", "Cn"):
            out.append(ch)
    return "".join(out)


def _trim(name: str, limit: int) -> str:
    """At most ``limit`` UTF-8 bytes, keeping a short extension."""
    if len(name.encode()) <= limit:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or len(ext.encode()) > 16:
        stem, ext = name, ""
    keep = limit - (len(ext.encode()) + 1 if ext else 0)
    cut = stem.encode()[:keep].decode("utf-8", "ignore").rstrip()
    return f"{cut}.{ext}" if ext else cut


def safe_filename(raw: str | None) -> str:
    """A base name (no directories), NFC, without controls or bidi tricks, at most 200 bytes,
    as our mail will carry it; ``attachment`` when nothing usable is left."""
    text = unicodedata.normalize("NFC", raw or "")
    text = text.replace("\\", "/").rsplit("/", 1)[-1]
    text = " ".join(_drop_unsafe(text).split())
    try:
        text = compose.header_text(text, "filename")
    except ValueError:
        return FALLBACK_NAME
    text = text.lstrip(". ")  # no hidden or relative-looking names
    text = _trim(text, MAX_NAME_BYTES).strip()
    return text if any(ch.isalnum() for ch in text) else FALLBACK_NAME


def safe_content_type(declared: str | None, filename: str) -> str:
    """``type/subtype`` without parameters; a container type or junk becomes octet-stream.

    When the client said nothing useful, the extension's well-known type is used (only to label
    the MIME part: downloads are always served as octet-stream).
    """
    bare = (declared or "").split(";", 1)[0].strip().lower()
    match = _CONTENT_TYPE_RE.fullmatch(bare)
    if match is None or bare == OCTET_STREAM:
        guessed = mimetypes.guess_type(filename, strict=True)[0]
        match = _CONTENT_TYPE_RE.fullmatch(guessed or "")
        if match is None:
            return OCTET_STREAM
    if match.group(1) in ("multipart", "message"):
        return OCTET_STREAM
    return match.group(0)
