"""Directory rules: how emails, addresses and roles are normalized before they are stored."""

from __future__ import annotations

import re

ROLES = ("agent", "admin")
# No whitespace and no control characters (NUL cannot even be stored in a PostgreSQL text).
_EMAIL = re.compile(r"^[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+\.[^@\s\x00-\x1f\x7f]+$")


def normalize_email(value: str) -> str:
    """Lower-case and trimmed, so uniqueness and login ignore case; rejects non-addresses."""
    email = value.strip().lower()
    if len(email) > 254 or not _EMAIL.match(email):
        raise ValueError(f"not an email address: {value!r}")
    return email


def normalize_roles(roles: list[str] | tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for r in roles:
        r = r.strip().lower()
        if r not in ROLES:
            raise ValueError(f"unknown role {r!r} (expected one of {', '.join(ROLES)})")
        if r not in out:
            out.append(r)
    return out
