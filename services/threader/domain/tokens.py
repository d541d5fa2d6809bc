"""Conversation tokens that can't be forged, and the places a reply carries them.

Our outbound mail carries ``<number>-<mac>`` in its Message-ID (``<hex.TOKEN@domain>``) and in
its Reply-To (``support+TOKEN@domain``), the mac an HMAC-SHA256 of the number under a server
secret. A customer's answer that lost every References header still names its conversation
through either, and nobody can name another customer's conversation by guessing numbers.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable

_MAC_LEN = 10
_TOKEN = rf"(\d{{1,18}})-([a-z2-7]{{{_MAC_LEN}}})"
_IN_ADDRESS = re.compile(r"\+" + _TOKEN + r"@", re.I)
_IN_MSGID = re.compile(r"\." + _TOKEN + r"@", re.I)
_SUBJECT_NUMBER = re.compile(r"\[#(\d{1,18})\]")


_B32 = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648 base32, lower-cased


def _mac(number: int, secret: bytes) -> str:
    """The first _MAC_LEN base32 characters of the HMAC: its first 5 * _MAC_LEN bits, read
    directly (``base64.b32encode`` of the whole digest is pure Python, 7 us per event)."""
    digest = hmac.digest(secret, f"conversation:{number}".encode(), hashlib.sha256)
    bits = int.from_bytes(digest[:7], "big") >> (56 - 5 * _MAC_LEN)
    return "".join(_B32[(bits >> (5 * (_MAC_LEN - 1 - i))) & 31] for i in range(_MAC_LEN))


def sign(number: int, secret: bytes) -> str:
    return f"{number}-{_mac(number, secret)}"


def verify(number: str, mac: str, secret: bytes) -> int | None:
    n = int(number)
    return n if hmac.compare_digest(_mac(n, secret), mac.lower()) else None


def numbers_named(addresses: Iterable[str], ids: Iterable[str], secret: bytes) -> list[int]:
    """Conversation numbers whose valid token appears in these addresses or Message-IDs."""
    found: list[int] = []
    for pattern, values in ((_IN_ADDRESS, addresses), (_IN_MSGID, ids)):
        for value in values:
            for m in pattern.finditer(value or ""):
                n = verify(m.group(1), m.group(2), secret)
                if n is not None and n not in found:
                    found.append(n)
    return found


def subject_number(subject: str) -> int | None:
    """The ``[#1042]`` number of a subject; honoured only from the conversation's participants."""
    m = _SUBJECT_NUMBER.search(subject or "")
    return int(m.group(1)) if m else None
