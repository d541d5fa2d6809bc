"""Outlook's Thread-Index (pure): a thread key for mail that carries no References.

Thread-Index is base64 of a 22-byte header (6 bytes of FILETIME + a 16-byte GUID) followed by
one 5-byte block per reply level.  Every message of one Outlook thread starts with the same 22
bytes, so those bytes name the thread the way a root Message-ID does; they become a key like
any other in the union (``<HEX@thread-index.invalid>``), which keeps the grouping independent of
the arrival order.  Thread-Topic is the thread's subject without prefixes: the subject fallback
prefers it.
"""

from __future__ import annotations

import base64
import binascii
import re

__all__ = ["thread_index_key", "thread_index_root", "thread_topic"]

_HEADER = 22
_BLOCK = 5
_MAX_LEVELS = 1000
_B64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
_WS = re.compile(r"\s+")


def thread_index_root(value: str | None) -> bytes | None:
    """The 22 bytes every reply shares, or None when the value is not a Thread-Index.

    Refused: bad base64, shorter than the header, a length that is not 22 + 5n, and a header of
    all zero bytes (some gateways write a blank index, which would join strangers).
    """
    if not value:
        return None
    text = _WS.sub("", value)
    if not text or len(text) > 4 * (_HEADER + _BLOCK * _MAX_LEVELS) or not _B64.match(text):
        return None
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) < _HEADER or (len(raw) - _HEADER) % _BLOCK:
        return None
    root = raw[:_HEADER]
    return None if not any(root) else root


def thread_index_key(value: str | None) -> str | None:
    """The thread key of a Thread-Index value (None if it has none)."""
    root = thread_index_root(value)
    return f"<{root.hex()}@thread-index.invalid>" if root is not None else None


def thread_topic(value: str | None) -> str:
    """Thread-Topic as one line (empty when absent)."""
    return _WS.sub(" ", value or "").strip()
