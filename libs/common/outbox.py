"""Transactional outbox: an event is written in the same transaction as the state it announces.

``add`` runs inside the caller's transaction. The relay moves committed rows to Redis: it takes a
batch with ``FOR UPDATE SKIP LOCKED`` (so replicas share the work), XADDs it, and deletes the rows
in the same transaction. A crash after XADD but before commit publishes the batch again, which the
consumers' idempotency absorbs; a crash before XADD loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg

from libs.common import metrics
from libs.common.bus import Bus
from libs.common.events import Envelope

log = logging.getLogger("chatflow.outbox")


async def add(conn: asyncpg.Connection, *envelopes: Envelope) -> None:
    await conn.executemany(
        "INSERT INTO outbox (stream_type, envelope) VALUES ($1, $2)",
        [(e.type, e.to_json()) for e in envelopes],
    )


class OutboxRelay:
    def __init__(
        self, pool: asyncpg.Pool, bus: Bus, schema: str, poll_ms: int = 500, batch: int = 500
    ) -> None:
        self.pool = pool
        self.bus = bus
        self.schema = schema
        self.poll_s = poll_ms / 1000
        self.batch = batch
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self.last_loop_at = 0.0

    def wake(self) -> None:
        """Call after committing outbox rows: publishes now instead of at the next poll."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    @property
    def healthy(self) -> bool:
        return time.monotonic() - self.last_loop_at < max(5.0, 5 * self.poll_s)

    async def run(self) -> None:
        while True:
            self.last_loop_at = time.monotonic()
            self._wake.clear()
            try:
                n = await self.publish_once(self.batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox relay pass failed; retrying")
                n = 0
                await asyncio.sleep(min(1.0, self.poll_s))
            if self._stopping.is_set() and n == 0:
                return
            if n >= self.batch:
                continue  # a full batch: there may be more behind it
            # Else the pass took everything committed before it; rows committed since woke us
            # (``wake`` after commit sets the event cleared above). No empty pass per publish:
            # at low rates that was a second transaction for every event of every service.
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except TimeoutError:
                pass

    async def publish_once(self, limit: int = 500) -> int:
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                """DELETE FROM outbox WHERE id IN (
                       SELECT id FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
                   RETURNING id, stream_type, envelope, created_at""",
                limit,
            )
            if not rows:
                metrics.OUTBOX_LAG.labels(schema=self.schema).set(0)
                return 0
            rows = sorted(rows, key=lambda r: r["id"])
            oldest = rows[0]["created_at"].timestamp()
            metrics.OUTBOX_LAG.labels(schema=self.schema).set(max(0.0, time.time() - oldest))
            await self.bus.publish_raw(
                [(self.bus.stream(r["stream_type"]), r["envelope"]) for r in rows]
            )
        metrics.OUTBOX_PUBLISHED.labels(schema=self.schema).inc(len(rows))
        return len(rows)
