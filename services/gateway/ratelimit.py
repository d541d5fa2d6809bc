"""Fixed-window rate limits per client IP and per token subject, one Redis round trip each.

INCR and EXPIRE for both keys go in one non-transactional pipeline, so a request costs one round
trip whatever it is limited by. Redis trouble lets the request in (logged, rate-limited): an
outage of the limiter must not become an outage of the product.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.gateway import metrics

log = logging.getLogger("chatflow.gateway.ratelimit")


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

    async def check(self, ip: str, user: str | None) -> float | None:
        """Count this request; seconds until the window ends when it is over a limit."""
        now = time.time()
        window = int(now // self.window_s)
        keys: list[tuple[str, str, int]] = []
        if self.per_ip > 0:
            keys.append(("ip", f"{self.prefix}ip:{ip}:{window}", self.per_ip))
        if user is not None and self.per_user > 0:
            keys.append(("user", f"{self.prefix}user:{user}:{window}", self.per_user))
        if not keys:
            return None
        pipe = self.redis.pipeline(transaction=False)
        for _, key, _ in keys:
            pipe.incr(key)
            pipe.expire(key, self.window_s + 1)
        try:
            results = await asyncio.wait_for(pipe.execute(), self.timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            if now - self._last_warning > 10:
                self._last_warning = now
                log.warning(
                    "rate limiter unavailable; letting requests in", extra={"error": repr(exc)}
                )
            return None
        for (by, _, limit), count in zip(keys, results[0::2], strict=True):
            if int(count) > limit:
                metrics.RATE_LIMITED.labels(by=by).inc()
                return (window + 1) * self.window_s - now
        return None
