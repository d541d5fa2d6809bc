"""What an address we send to must be: one rule for the REST API (a 422 before anything is
queued) and for the sender's composer (which checks again before the message leaves).

RFC 5321/5322 as SMTP relays take them: a dot-atom local part of ASCII (no SMTPUTF8: the
relays we send through may not offer it), at most 64 octets, no encoded word, and a domain of
at least two LDH labels, IDNA-encoded (UTS 46), whose last label is not all digits.
"""

from __future__ import annotations

import functools
import re

import idna

__all__ = ["AddressError", "ascii_domain", "check_address"]

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
_DOT_ATOM_RE = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_LABEL_RE = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


class AddressError(ValueError):
    """Why an address cannot be sent to (the text names the address)."""


@functools.lru_cache(maxsize=4096)
def ascii_domain(domain: str) -> str:
    """The domain in A-labels, or AddressError."""
    try:
        encoded = idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        raise AddressError(f"invalid domain {domain!r}: {exc}") from None
    labels = encoded.split(".")
    if (
        len(encoded) > 253
        or len(labels) < 2
        or not all(_LABEL_RE.fullmatch(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise AddressError(f"invalid domain {domain!r}")
    return encoded


def check_address(spec: str) -> tuple[str, str]:
    """``local@domain`` split, the domain in A-labels; AddressError says what is wrong."""
    spec = spec.strip()
    local, at, domain = spec.rpartition("@")
    if not at or not local or not domain:
        raise AddressError(f"{spec!r} is not an address (need local@domain)")
    if not local.isascii():
        raise AddressError(f"non-ASCII local part needs SMTPUTF8, unsupported: {spec!r}")
    if len(local) > 64 or not _DOT_ATOM_RE.fullmatch(local) or "=?" in local:
        raise AddressError(f"invalid local part in {spec!r}")
    return local, ascii_domain(domain)
