"""Access-token claims (docs/architecture.md; RFC 9068 shape, RFC 8725 practices)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable


def access_claims(
    *,
    issuer: str,
    audience: str,
    sub: str,
    client_id: str,
    scope: str,
    roles: Iterable[str],
    mailboxes: Iterable[str],
    ttl_s: int,
    now: int,
) -> dict[str, object]:
    """Every claim verifiers rely on; ``jti`` is unique so a token can be traced or denied."""
    return {
        "iss": issuer,
        "aud": audience,
        "sub": sub,
        "iat": now,
        "nbf": now,
        "exp": now + ttl_s,
        "jti": uuid.uuid4().hex,
        "client_id": client_id,
        "scope": scope,
        "roles": sorted(set(roles)),
        "mailboxes": sorted(set(mailboxes)),
    }
