"""Fixed-window rate limits per client IP and per token subject, counted in Redis.

INCR for both keys (and EXPIRE for a key the window just created) runs as one small Lua script,
so a request costs one round trip and one command whatever it is limited by (a redis-py pipeline
of four commands cost the gateway more CPU than the round trip itself). Both keys go to one
script, so on a Redis Cluster they would have to share a slot.

A request need not wait for that round trip when the answer is known: the limiter remembers the
last count Redis returned for each key of the current window plus the increments it has sent
and not yet heard back about. While that sum stays under the limit the request goes on and its
INCR runs meanwhile; otherwise (a key's first request in a window, or close to the limit) it
waits for Redis's count and is refused when that or its own sum is over. Increments are never
skipped and this replica's own are all counted, so what other replicas can add unseen is what
they send within one round trip.

Redis trouble lets the request in (logged, rate-limited): an outage of the limiter must not
become an outage of the product.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.gateway import metrics

log = logging.getLogger("chatflow.gateway.ratelimit")

# INCR each key, give a new one its expiry; the counts come back in key order.
_COUNT = """
local out = {}
for i, key in ipairs(KEYS) do
  local n = redis.call('INCR', key)
  if n == 1 then redis.call('EXPIRE', key, ARGV[1]) end
  out[i] = n
end
return out
"""


@dataclass(slots=True)
class _Count:
    known: int = 0  # the highest count Redis returned for the key
    pending: int = 0  # increments sent whose count has not come back yet


Key = tuple[str, str, int]  # (limited by, Redis key, limit)


class RateLimiter:
    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        window_s: int,
        per_ip: int,
        per_user: int,
        timeout_s: float,
    ) -> None:
        self.redis = redis
        self.prefix = f"{prefix}gateway:rl:"
        self.window_s = max(1, window_s)
        self.per_ip = per_ip
        self.per_user = per_user
        self.timeout_s = timeout_s
        self._last_warning = 0.0
        self._window = -1
        self._counts: dict[str, _Count] = {}
        self._background: set[asyncio.Task[list[int] | None]] = set()

    async def check(self, ip: str, user: str | None) -> float | None:
        """Count this request; seconds until the window ends when it is over a limit."""
        now = time.time()
        window = int(now // self.window_s)
        if window != self._window:
            self._window, self._counts = window, {}
        keys: list[Key] = []
        if self.per_ip > 0:
            keys.append(("ip", f"{self.prefix}ip:{ip}:{window}", self.per_ip))
        if user is not None and self.per_user > 0:
            keys.append(("user", f"{self.prefix}user:{user}:{window}", self.per_user))
        if not keys:
            return None
        counts = [self._counts.setdefault(key, _Count()) for _, key, _ in keys]
        # This request's count as far as this replica knows: what Redis said last plus every
        # increment sent since, this one included. No await from here to ``pending += 1``, so
        # concurrent requests each see the others.
        estimates = [c.known + c.pending + 1 for c in counts]
        for c in counts:
            c.pending += 1
        if all(
            c.known > 0 and e <= limit
            for c, e, (_, _, limit) in zip(counts, estimates, keys, strict=True)
        ):
            task = asyncio.create_task(self._count(keys, counts, now))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return None
        results = await self._count(keys, counts, now)
        if results is None:
            return None
        for (by, _, limit), e, n in zip(keys, estimates, results, strict=True):
            # Redis's count alone could be low: increments let through just before may not
            # have reached it yet.
            if max(n, e) > limit:
                metrics.RATE_LIMITED.labels(by=by).inc()
                return (window + 1) * self.window_s - now
        return None

    async def _count(self, keys: list[Key], counts: list[_Count], now: float) -> list[int] | None:
        """INCR the keys; their new counts, or None when Redis could not say."""
        try:
            async with asyncio.timeout(self.timeout_s):
                raw = await self.redis.execute_command(
                    "EVAL", _COUNT, len(keys), *(k for _, k, _ in keys), self.window_s + 1
                )
            results = [int(n) for n in raw]
        except (RedisError, OSError, TimeoutError, ValueError, TypeError) as exc:
            if now - self._last_warning > 10:
                self._last_warning = now
                log.warning(
                    "rate limiter unavailable; letting requests in", extra={"error": repr(exc)}
                )
            return None
        finally:
            for c in counts:
                c.pending -= 1
        for c, n in zip(counts, results, strict=True):
            c.known = max(c.known, n)  # answers to concurrent increments may come in any order
        return results
