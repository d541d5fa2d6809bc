"""A short memory of verified tokens, so a busy SPA does not pay an Ed25519 check per request.

The SPA sends the same access token for its whole lifetime (15 minutes) and the signature check
is the gateway's largest CPU cost per request. Only successes are remembered, never past the
token's own expiry and at most ``ttl_s``; the services behind verify the token again anyway.

What is remembered is the signature check only, never the decision: whether the account is
disabled is asked on every call, cached or not, so a disabled user's cached token is refused on
the very next request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from libs.common.tokens import Identity, InvalidToken

DISABLED = "account disabled"


class Verifier(Protocol):
    async def verify(self, token: str) -> Identity: ...


def _never(sub: str) -> bool:
    return False


class CachingVerifier:
    def __init__(
        self,
        verifier: Verifier,
        ttl_s: float,
        leeway_s: float,
        max_entries: int = 10_000,
        is_disabled: Callable[[str], bool] = _never,
    ) -> None:
        self.verifier = verifier
        self.ttl_s = ttl_s
        self.leeway_s = leeway_s
        self.max_entries = max_entries
        self.is_disabled = is_disabled
        self._seen: dict[str, tuple[Identity, float]] = {}

    async def verify(self, token: str) -> Identity:
        identity = await self._verified(token)
        if self.is_disabled(identity.sub):
            raise InvalidToken(DISABLED)
        return identity

    async def _verified(self, token: str) -> Identity:
        now = time.time()
        hit = self._seen.get(token)
        if hit is not None:
            if now < hit[1]:
                return hit[0]
            del self._seen[token]
        identity = await self.verifier.verify(token)
        if self.ttl_s > 0:
            if len(self._seen) >= self.max_entries:
                del self._seen[next(iter(self._seen))]  # the oldest entry
            self._seen[token] = (identity, min(now + self.ttl_s, identity.exp + self.leeway_s))
        return identity
