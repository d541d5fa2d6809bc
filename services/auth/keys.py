"""Signing keys: Ed25519 (JOSE alg "Ed25519", RFC 9864), published as ``auth.jwks`` through the outbox.

Rotation never makes a valid token fail: ``rotate`` publishes the new key at once but lets it
sign only ``key_publish_lead_s`` later (``signs_from``), longer than verifiers wait between JWKS
refetches, so every verifier can know a kid before it sees a token signed with it. The old key
signs until then, is retired at that moment and stays published for ``retired_key_grace_s``
(longer than any token lives). Each replica caches the key schedule for ``key_cache_s`` and
switches keys by the clock, so the switch does not wait for the cache; a replica that loaded its
schedule before the rotation keeps signing with the old key until its cache expires, which is
harmless because that key stays published.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from joserfc import jwt
from joserfc.jwk import OKPKey

from libs.common import outbox
from libs.common.bus import Bus
from libs.common.events import Envelope, JwksPublished
from libs.common.tokens import ALGORITHM
from services.auth import storage
from services.auth.domain.keys import Scheduled, signing
from services.auth.settings import AuthSettings

# RFC 9068 §2.1 media type; explicit typing per RFC 8725 §3.11.
TOKEN_TYPE = "at+jwt"  # noqa: S105
JWKS = "auth.jwks"
LOCK = "SELECT pg_advisory_xact_lock(hashtext('auth.signing_keys'))"


def generate() -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A new key as (kid, private JWK, public JWK); the kid is its RFC 7638 thumbprint."""
    key = OKPKey.generate_key("Ed25519", private=True)
    kid = key.thumbprint()
    extra = {"kid": kid, "use": "sig", "alg": ALGORITHM}
    return kid, {**key.as_dict(private=True), **extra}, {**key.as_dict(private=False), **extra}


async def ensure_active(conn: Any) -> bool:
    """Create a key that signs at once if none signs now; call in a transaction.

    True if one was created. Only for bootstrap: with no signing key nothing verifies anyway.
    """
    # Replicas starting together must not each create one.
    await conn.execute(LOCK)
    if await storage.signing_key_now(conn) is not None:
        return False
    kid, private, public = generate()
    await storage.insert_key(conn, kid, private, public, lead_s=0.0)
    return True


async def rotate(conn: Any, lead_s: float) -> tuple[str, datetime]:
    """Add a key that signs ``lead_s`` from now and retire the others at that moment.

    Call in a transaction, together with ``publish``, so the new key is announced at once.
    Returns the new kid and when it starts signing.
    """
    await conn.execute(LOCK)
    kid, private, public = generate()
    signs_from = await storage.insert_key(conn, kid, private, public, lead_s=lead_s)
    await storage.retire_keys_at(conn, kid, signs_from)
    return kid, signs_from


async def publish(conn: Any, settings: AuthSettings, correlation_id: str | None = None) -> None:
    """Write an ``auth.jwks`` event with every public key verifiers may need: the signing one,
    any that will sign, and retired ones whose tokens may still be alive."""
    keys = await storage.published_keys(conn, settings.retired_key_grace_s)
    await outbox.add(conn, Envelope.of(JwksPublished(keys=keys), "auth", correlation_id))


async def republish_if_missing(pool: Any, bus: Bus, settings: AuthSettings) -> bool:
    """Queue ``auth.jwks`` again when the stream's newest entry no longer lists the keys
    verifiers need (Redis restarted empty, or its stream was trimmed); True if it queued one.

    Without this, every verifier that started after such a restart refused every token until
    auth was restarted: the keys were published only on start and on rotation. Cheap enough to
    run every few seconds: one XREVRANGE COUNT 1 and one small query. A row already waiting in
    the outbox (a rotation's) is the relay's to publish: nothing is added then.
    """
    entries: Any = await bus.redis.xrevrange(bus.stream(JWKS), count=1)
    streamed: set[str] = set()
    if entries:
        env = Envelope.from_json(entries[0][1][b"e"])
        streamed = {k["kid"] for k in env.payload_as(JwksPublished).keys}
    async with pool.acquire() as conn, conn.transaction():
        if await conn.fetchval("SELECT 1 FROM outbox WHERE stream_type = $1 LIMIT 1", JWKS):
            return False
        current = await storage.published_keys(conn, settings.retired_key_grace_s)
        if {k["kid"] for k in current} == streamed:
            return False
        await conn.execute(LOCK)  # in order with a rotation's own publish
        await publish(conn, settings)
    return True


def sign(key: OKPKey, claims: dict[str, Any]) -> str:
    header = {"alg": ALGORITHM, "kid": key.kid, "typ": TOKEN_TYPE}
    return jwt.encode(header, claims, key, algorithms=[ALGORITHM])


class KeyRing:
    """This replica's copy of the key schedule, reloaded from the database every few seconds.

    Times are compared on the database's clock (the offset is measured at each load), so a
    replica whose own clock runs ahead cannot start signing with a key before it is due.
    """

    def __init__(self, pool: Any, settings: AuthSettings) -> None:
        self.pool = pool
        self.cache_s = settings.key_cache_s
        self._schedule: list[Scheduled[OKPKey]] = []
        self._offset = 0.0  # database clock minus ours
        self._loaded_at: float | None = None

    async def _load(self) -> None:
        rows = await storage.key_schedule(self.pool)
        self._schedule = [
            Scheduled(
                r["kid"],
                OKPKey.import_key(dict(r["private_jwk"])),
                r["signs_from"],
                r["retired_at"],
            )
            for r in rows
        ]
        self._offset = (rows[0]["db_now"] - time.time()) if rows else 0.0
        self._loaded_at = time.monotonic()

    def invalidate(self) -> None:
        """Forget the cached schedule (the next ``active`` reloads it)."""
        self._loaded_at = None

    async def active(self) -> OKPKey:
        if self._loaded_at is None or time.monotonic() - self._loaded_at > self.cache_s:
            await self._load()
        found = signing(self._schedule, time.time() + self._offset)
        if found is None:  # the cache may predate a key created since: look once more
            await self._load()
            found = signing(self._schedule, time.time() + self._offset)
        if found is None:
            raise RuntimeError("no signing key (the service creates one on start)")
        return found.key

    async def mint(self, claims: dict[str, Any]) -> str:
        return sign(await self.active(), claims)
