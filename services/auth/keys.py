"""Signing keys: Ed25519 (alg EdDSA), published as ``auth.jwks`` through the outbox.

One key is active (the newest unretired); retired keys stay published for
``retired_key_grace_s`` so tokens they signed keep verifying until they expire. Each replica
caches the active key briefly, so a rotation reaches every replica within ``key_cache_s``.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

from joserfc import jwt
from joserfc.jwk import OKPKey

from libs.common import outbox
from libs.common.events import Envelope, JwksPublished
from libs.common.tokens import ALGORITHM
from services.auth import storage
from services.auth.settings import AuthSettings

# RFC 9068 §2.1 media type; explicit typing per RFC 8725 §3.11.
TOKEN_TYPE = "at+jwt"  # noqa: S105


def generate() -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A new key as (kid, private JWK, public JWK); the kid is its RFC 7638 thumbprint."""
    key = OKPKey.generate_key("Ed25519", private=True)
    kid = key.thumbprint()
    extra = {"kid": kid, "use": "sig", "alg": ALGORITHM}
    return kid, {**key.as_dict(private=True), **extra}, {**key.as_dict(private=False), **extra}


async def ensure_active(conn: Any) -> bool:
    """Create a key if none is active; call in a transaction. True if one was created."""
    # Replicas starting together must not each create one.
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('auth.signing_keys'))")
    if await storage.active_key(conn) is not None:
        return False
    kid, private, public = generate()
    await storage.insert_key(conn, kid, private, public)
    return True


async def rotate(conn: Any) -> str:
    """Make a new key active and retire the others; call in a transaction."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('auth.signing_keys'))")
    kid, private, public = generate()
    await storage.insert_key(conn, kid, private, public)
    await storage.retire_keys_except(conn, kid)
    return kid


async def publish(conn: Any, settings: AuthSettings, correlation_id: str | None = None) -> None:
    """Write an ``auth.jwks`` event with every public key verifiers may still need."""
    keys = await storage.published_keys(conn, settings.retired_key_grace_s)
    await outbox.add(conn, Envelope.of(JwksPublished(keys=keys), "auth", correlation_id))


def sign(key: OKPKey, claims: dict[str, Any]) -> str:
    header = {"alg": ALGORITHM, "kid": key.kid, "typ": TOKEN_TYPE}
    with warnings.catch_warnings():
        # joserfc flags "EdDSA" as superseded by RFC 9864's "Ed25519"; the verifiers pin EdDSA.
        warnings.filterwarnings("ignore", message=".*EdDSA.*")
        return jwt.encode(header, claims, key, algorithms=[ALGORITHM])


class KeyRing:
    """The active private key of this replica, reloaded from the database every few seconds."""

    def __init__(self, pool: Any, settings: AuthSettings) -> None:
        self.pool = pool
        self.cache_s = settings.key_cache_s
        self._key: OKPKey | None = None
        self._loaded_at = 0.0

    async def active(self) -> OKPKey:
        if self._key is None or time.monotonic() - self._loaded_at > self.cache_s:
            row = await storage.active_key(self.pool)
            if row is None:
                raise RuntimeError("no active signing key (the service creates one on start)")
            self._key = OKPKey.import_key(dict(row["private_jwk"]))
            self._loaded_at = time.monotonic()
        return self._key

    async def mint(self, claims: dict[str, Any]) -> str:
        return sign(await self.active(), claims)
