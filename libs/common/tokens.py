"""Access-token verification shared by the gateway and every service behind it.

The algorithm is pinned (Ed25519), never taken from the token; issuer, audience and expiry are
checked with a small leeway. Public keys come from the ``auth.jwks`` stream, which the auth
service republishes on every key change and whenever the stream lost them (a Redis restarted
empty); an unknown ``kid`` triggers a refetch at a bounded rate, at once while no keys are known,
so a verifier recovers within seconds. Requests waiting on one refetch share it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from joserfc.jwt import JWTClaimsRegistry

from libs.common.bus import Bus
from libs.common.events import Envelope, JwksPublished

# RFC 9864's fully specified name for Ed25519 signatures (the polymorphic "EdDSA" is deprecated).
ALGORITHM = "Ed25519"


class InvalidToken(Exception):
    """The token is missing, malformed, expired, or not ours. The message is safe to return."""


@dataclass(frozen=True)
class Identity:
    sub: str
    roles: tuple[str, ...]
    mailboxes: frozenset[str]
    scopes: frozenset[str]
    client_id: str
    jti: str
    exp: int
    claims: dict[str, Any] = field(hash=False, compare=False)

    @property
    def is_agent(self) -> bool:
        return "agent" in self.roles or "admin" in self.roles

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles


@dataclass
class TokenVerifier:
    bus: Bus
    issuer: str
    audience: str
    leeway_s: int = 30
    min_refetch_s: float = 5.0
    _keys: KeySet | None = None
    _kids: set[str] = field(default_factory=set)
    _fetched_at: float = 0.0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def refresh(self) -> None:
        entries: Any = await self.bus.redis.xrevrange(self.bus.stream("auth.jwks"), count=1)
        self._fetched_at = time.monotonic()
        if not entries:
            return
        env = Envelope.from_json(entries[0][1][b"e"])
        keys = env.payload_as(JwksPublished).keys
        self._keys = KeySet.import_key_set({"keys": keys})
        self._kids = {k["kid"] for k in keys}

    async def _keyset_for(self, kid: str) -> KeySet:
        if kid not in self._kids:
            asked = time.monotonic()
            async with self._lock:
                # A refetch that ran while we waited for the lock answers us too: a burst of
                # requests before the keys are back costs one XREVRANGE at a time, not one each.
                if (
                    kid not in self._kids
                    and self._fetched_at < asked
                    and asked - self._fetched_at >= (self.min_refetch_s if self._keys else 0)
                ):
                    await self.refresh()
        if self._keys is None or kid not in self._kids:
            raise InvalidToken("unknown signing key")
        return self._keys

    async def verify(self, token: str) -> Identity:
        if not token or token.count(".") != 2:
            raise InvalidToken("malformed token")
        try:
            header = _header(token)
        except Exception as exc:
            raise InvalidToken("malformed token") from exc
        if header.get("alg") != ALGORITHM:
            raise InvalidToken("unexpected algorithm")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise InvalidToken("token has no kid")
        keys = await self._keyset_for(kid)
        try:
            tok = jwt.decode(token, keys, algorithms=[ALGORITHM])
            JWTClaimsRegistry(
                leeway=self.leeway_s,
                iss={"essential": True, "value": self.issuer},
                aud={"essential": True, "value": self.audience},
                exp={"essential": True},
                sub={"essential": True},
            ).validate(tok.claims)
        except (JoseError, ValueError) as exc:
            raise InvalidToken(f"invalid token: {getattr(exc, 'error', 'rejected')}") from exc
        c = tok.claims
        if "nbf" in c and c["nbf"] > time.time() + self.leeway_s:
            raise InvalidToken("token not yet valid")
        if "iat" in c and c["iat"] > time.time() + self.leeway_s:
            raise InvalidToken("token not yet valid")
        return Identity(
            sub=str(c["sub"]),
            roles=tuple(c.get("roles", [])),
            mailboxes=frozenset(c.get("mailboxes", [])),
            scopes=frozenset(str(c.get("scope", "")).split()),
            client_id=str(c.get("client_id", "")),
            jti=str(c.get("jti", "")),
            exp=int(c["exp"]),
            claims=dict(c),
        )


def _header(token: str) -> dict[str, Any]:
    import base64
    import json

    head = token.split(".", 1)[0]
    return dict(json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4))))


def bearer_from_subprotocols(protocols: list[str]) -> str | None:
    """The browser-friendly WebSocket credential: a ``bearer.<token>`` subprotocol."""
    for p in protocols:
        if p.startswith("bearer."):
            return p[len("bearer.") :]
    return None
