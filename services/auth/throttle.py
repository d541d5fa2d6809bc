"""Login throttling in Redis: failed attempts per account and per client IP in a fixed window.

Counting failures (not attempts) keeps legitimate users unaffected; the account counter stops
online guessing of one password, the IP counter stops spraying many accounts from one place.
Keys hold a hash of the email, never the address itself.
"""

from __future__ import annotations

import hashlib

import redis.asyncio as aioredis


class LoginThrottle:
    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        max_account: int,
        max_ip: int,
        window_s: int,
    ) -> None:
        self.redis = redis
        self.prefix = f"{prefix}auth:login-failures:"
        self.max_account = max_account
        self.max_ip = max_ip
        self.window_s = window_s

    def _keys(self, email: str, ip: str) -> tuple[str, str]:
        account = hashlib.sha256(email.encode()).hexdigest()[:32]
        return f"{self.prefix}account:{account}", f"{self.prefix}ip:{ip}"

    async def blocked_for(self, email: str, ip: str) -> int:
        """Seconds until another attempt is allowed; 0 if it is allowed now."""
        acct, addr = self._keys(email, ip)
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(acct)
        pipe.get(addr)
        pipe.ttl(acct)
        pipe.ttl(addr)
        n_acct, n_ip, ttl_acct, ttl_ip = await pipe.execute()
        waits = []
        if int(n_acct or 0) >= self.max_account:
            waits.append(int(ttl_acct))
        if int(n_ip or 0) >= self.max_ip:
            waits.append(int(ttl_ip))
        return max([w if w > 0 else 1 for w in waits], default=0)

    async def failed(self, email: str, ip: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        for key in self._keys(email, ip):
            pipe.incr(key)
            pipe.expire(key, self.window_s, nx=True)
        await pipe.execute()

    async def succeeded(self, email: str, ip: str) -> None:
        """A correct password clears the account's count (not the IP's: sprayers also win)."""
        await self.redis.delete(self._keys(email, ip)[0])
