"""Login throttling in Redis: failed attempts in a fixed window, per account from one client IP,
per client IP, and per account from everywhere.

Counting failures (not attempts) keeps legitimate users unaffected. The account-and-IP counter
stops online guessing of one password from one place without letting anyone else lock the
account's owner out (found by a trial: ten wrong passwords from anywhere locked an agent out
for the window); the IP counter stops spraying many accounts from one place; the account counter,
far higher, caps guessing one password from many places. Keys hold a hash of the email, never
the address itself.
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
        max_account_anywhere: int | None = None,
    ) -> None:
        """``max_account``: per account from one IP; ``max_account_anywhere``: per account from
        every IP together (ten times ``max_account`` unless given)."""
        self.redis = redis
        self.prefix = f"{prefix}auth:login-failures:"
        self.limits = (
            max_account,
            max_ip,
            max_account_anywhere if max_account_anywhere is not None else 10 * max_account,
        )
        self.window_s = window_s

    def _keys(self, email: str, ip: str) -> tuple[str, str, str]:
        """(account from this IP, this IP, account from everywhere)."""
        account = hashlib.sha256(email.encode()).hexdigest()[:32]
        return (
            f"{self.prefix}account-ip:{account}:{ip}",
            f"{self.prefix}ip:{ip}",
            f"{self.prefix}account:{account}",
        )

    async def blocked_for(self, email: str, ip: str) -> int:
        """Seconds until another attempt is allowed; 0 if it is allowed now."""
        keys = self._keys(email, ip)
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        for key in keys:
            pipe.ttl(key)
        got = await pipe.execute()
        counts, ttls = got[: len(keys)], got[len(keys) :]
        waits = [
            int(ttl)
            for n, ttl, limit in zip(counts, ttls, self.limits, strict=True)
            if int(n or 0) >= limit
        ]
        return max([w if w > 0 else 1 for w in waits], default=0)

    async def failed(self, email: str, ip: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        for key in self._keys(email, ip):
            pipe.incr(key)
            pipe.expire(key, self.window_s, nx=True)
        await pipe.execute()

    async def succeeded(self, email: str, ip: str) -> None:
        """A correct password clears the account's counts (not the IP's: sprayers also win)."""
        acct_ip, _, acct = self._keys(email, ip)
        await self.redis.delete(acct_ip, acct)
