"""Disabled accounts: a token whose ``sub`` auth has disabled is refused before it expires.

Why the effect goes through a stream of the gateway's own rather than straight from the group:
``user.changed`` is consumed by the consumer group ``gateway`` (one replica handles each event,
idempotently, into ``disabled_users``), but every replica must refuse the user at once. So the
handler also writes a ``gateway.access`` event through the outbox, in the same transaction, and
every replica reads that stream with a BroadcastReader and updates its in-memory set (and closes
the user's bridged WebSockets). A replica resolves its cursor on that stream *before* it loads
``disabled_users``: a change missing from the loaded rows committed after the load began, so its
``gateway.access`` entry was published after the cursor and the reader sees it. Per-replica
consumer groups on ``user.changed`` would work too, but leave a group and inbox rows behind for
every replica that ever ran, and have no such clean start point.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

import asyncpg
from pydantic import BaseModel, ConfigDict

from libs.common import inbox, outbox
from libs.common.bus import Bus
from libs.common.events import Envelope, EventError, UserChanged, register
from libs.common.outbox import OutboxRelay
from services.gateway import storage

log = logging.getLogger("chatflow.gateway.access")

ACCESS_TYPE = "gateway.access"
CONSUMER = "gateway"
TYPES = ("user.changed",)


@register(ACCESS_TYPE)
class AccessChanged(BaseModel):
    """A user's account was disabled or re-enabled; every gateway replica applies it."""

    model_config = ConfigDict(extra="ignore")

    user_id: str
    active: bool
    changed_at: datetime


class Access:
    """The in-memory set of disabled users, its consumer-group handler and broadcast handler."""

    def __init__(self, pool: asyncpg.Pool, relay: OutboxRelay, bus: Bus) -> None:
        self.pool = pool
        self.relay = relay
        self.bus = bus
        self.stream = bus.stream(ACCESS_TYPE)
        self.disabled: dict[str, datetime] = {}
        # The newest change applied per user: the group's own apply and the broadcast can come in
        # either order (and relays of two replicas may publish out of order), the newest wins.
        self._versions: dict[str, datetime] = {}
        self._on_disable: list[Callable[[str], None]] = []

    def is_disabled(self, sub: str) -> bool:
        return sub in self.disabled

    def on_disable(self, fn: Callable[[str], None]) -> None:
        """``fn(user_id)`` runs on every replica when a user is disabled (close their sockets)."""
        self._on_disable.append(fn)

    async def start(self) -> str:
        """Load the disabled set; returns the ``gateway.access`` id to read broadcasts after."""
        last: Any = await self.bus.redis.xrevrange(self.stream, count=1)
        cursor = last[0][0].decode() if last else "0-0"
        self.disabled, self._versions = await storage.load(self.pool)
        if self.disabled:
            log.info("disabled users loaded", extra={"count": len(self.disabled)})
        return cursor

    def apply(self, user_id: str, active: bool, since: datetime) -> None:
        seen = self._versions.get(user_id)
        if seen is not None and since < seen:
            return
        self._versions[user_id] = since
        if active:
            self.disabled.pop(user_id, None)
            return
        self.disabled.setdefault(user_id, since)
        for fn in self._on_disable:
            try:
                fn(user_id)
            except Exception:
                log.exception("disable listener failed")

    # ---- consumer group: user.changed -> disabled_users + gateway.access -------------------------
    async def handle(self, env: Envelope, entry_id: str) -> None:
        change = env.payload_as(UserChanged)
        async with self.pool.acquire() as conn, conn.transaction():
            if not await inbox.first_time(conn, CONSUMER, env.id):
                return
            if not await storage.apply_user_change(
                conn, change.user_id, change.active, env.occurred_at
            ):
                return  # no change of access, or a newer change was applied already
            out = AccessChanged(
                user_id=change.user_id, active=change.active, changed_at=env.occurred_at
            )
            await outbox.add(
                conn, Envelope.of(out, producer=CONSUMER, correlation_id=env.correlation_id)
            )
        self.relay.wake()
        # This replica need not wait for its own broadcast; applying twice changes nothing.
        self.apply(change.user_id, change.active, env.occurred_at)

    # ---- every replica: gateway.access -> memory --------------------------------------------------
    async def on_entry(self, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> None:
        try:
            change = Envelope.from_entry(fields).payload_as(AccessChanged)
        except EventError as exc:
            log.warning("skipping invalid access entry", extra={"error": str(exc)})
            return
        self.apply(change.user_id, change.active, change.changed_at)
