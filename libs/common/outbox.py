"""Transactional outbox: an event is written in the same transaction as the state it announces.

``add`` runs inside the caller's transaction. The relay moves committed rows to Redis: it takes a
batch with ``FOR UPDATE SKIP LOCKED`` (so replicas share the work), XADDs it, and deletes the rows
in the same transaction. A crash after XADD but before commit publishes the batch again, which the
consumers' idempotency absorbs; a crash before XADD loses nothing.

``stage`` is the direct path for events somebody waits for (a frame an agent sees): its caller
XADDs the rows itself once its transaction committed (``OutboxRelay.publish``), and the relay only
deletes them, right after and in bulk. Waiting for a relay pass cost each hop four more round trips
(BEGIN, DELETE, COMMIT and a turn of the loop), 2-3 ms on a two-core machine, and a pass. The
rows are still written in the transaction, so nothing is lost: a staged row its caller did not
publish (a crash) is published by a pass once it is ``direct_grace_s`` old. A row published
directly and again by such a pass is absorbed by the consumers' idempotency.

A direct publish that fails (Redis refused it or did not answer in ``direct_timeout_s``) hands
its rows to the relay at once, and so does every publish after it until a pass has caught up:
the relay publishes them in id order, so one conversation's events never overtake each other
(a later event went out directly while the failed one waited out the grace; found by a trial),
and writers stop waiting on a Redis that hangs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Staged:
    """Outbox rows of one transaction that its caller publishes once it committed."""

    ids: tuple[int, ...] = ()
    entries: tuple[tuple[str, str], ...] = ()  # (stream type, envelope JSON), in order

    def __add__(self, other: Staged) -> Staged:
        return Staged(self.ids + other.ids, self.entries + other.entries)


async def stage(conn: asyncpg.Connection, *envelopes: Envelope) -> Staged:
    """``add`` for the direct path: pass the result to ``OutboxRelay.publish`` after the commit."""
    return await stage_entries(conn, [(e.type, e.to_json()) for e in envelopes])


async def stage_entries(conn: asyncpg.Connection, entries: Sequence[tuple[str, str]]) -> Staged:
    """``stage`` for events already serialized: (stream type, envelope JSON) each."""
    if not entries:
        return Staged()
    rows = await conn.fetch(
        """INSERT INTO outbox (stream_type, envelope, direct)
           SELECT t, e, true FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u (t, e, n)
           ORDER BY n RETURNING id""",
        [t for t, _ in entries],
        [e for _, e in entries],
    )
    return Staged(tuple(r["id"] for r in rows), tuple(entries))


# A relay pass's batch. Staged rows are their writer's to publish, until they are older than the
# grace. ``= ANY(ARRAY(...))``, not ``IN (...)``: the ids are known before the DELETE looks for
# them, by key. With IN the planner, on a table without statistics, hashed the ids and read the
# whole table to find them (0.35 ms a pass with a few thousand rows).
BATCH_SQL = """DELETE FROM outbox WHERE id = ANY(ARRAY(
                  SELECT id FROM outbox
                  WHERE NOT direct OR created_at < clock_timestamp() - make_interval(secs => $2)
                  ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED))
              RETURNING id, stream_type, envelope, created_at"""


class OutboxRelay:
    def __init__(
        self,
        pool: asyncpg.Pool,
        bus: Bus,
        schema: str,
        poll_ms: int = 500,
        batch: int = 500,
        direct_grace_s: float = 5.0,
        direct_timeout_s: float = 2.0,
    ) -> None:
        self.pool = pool
        self.bus = bus
        self.schema = schema
        self.poll_s = poll_ms / 1000
        self.batch = batch
        self.direct_grace_s = direct_grace_s
        self.direct_timeout_s = direct_timeout_s
        self._wake = asyncio.Event()
        self._pass_due = True  # the first pass takes what an earlier process left
        self._published: list[int] = []  # staged rows published directly, to delete
        # Staged rows their writer could not publish: the relay's now, in id order. While any
        # wait (``_handoff``, or the pass that takes them has not caught up), publish hands
        # its rows over too.
        self._handoff: list[int] = []
        self._degraded = False
        self._in_flight = 0  # direct publishes under way: a stopping relay waits for them
        self._stopping = asyncio.Event()
        self.last_loop_at = 0.0

    def wake(self) -> None:
        """Call after committing outbox rows: publishes now instead of at the next poll."""
        self._pass_due = True
        self._wake.set()

    async def publish(self, staged: Staged) -> None:
        """XADD committed staged rows now; the relay deletes them afterwards, in bulk.

        Never raises for Redis, and waits on it at most once (``direct_timeout_s``; ingest's
        writer waits behind this): a failed publish hands its rows, and the next publishes',
        to the relay, which publishes them in id order.
        """
        if not staged.ids:
            return
        if self._degraded:
            self._hand_over(staged.ids)
            return
        entries = [(self.bus.stream(t), e) for t, e in staged.entries]
        self._in_flight += 1
        try:
            await asyncio.wait_for(self.bus.publish_raw(entries), self.direct_timeout_s)
        except Exception as exc:
            log.warning(
                "direct publish failed; the relay publishes the rows, and those after them",
                extra={"rows": len(staged.ids), "error": f"{type(exc).__name__}: {exc}"},
            )
            self._degraded = True
            self._hand_over(staged.ids)
            return
        finally:
            self._in_flight -= 1
            self._wake.set()
        metrics.OUTBOX_PUBLISHED.labels(schema=self.schema).inc(len(staged.ids))
        self._published.extend(staged.ids)
        # Deleted at the relay's next turn: until then a crash leaves them to be published
        # again after the grace, so the window stays a round trip, not a poll (found by a trial:
        # notifier.frame's broadcast readers have no processed_events to absorb a second copy).
        # Publishes while a DELETE is under way share the next one.
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
            n = 0
            try:
                await self._forget_published()
                await self._take_over()
                if self._pass_due or self._stopping.is_set():
                    self._pass_due = False
                    n = await self.publish_once(self.batch)
                    if n < self.batch and not self._handoff:
                        self._degraded = False  # caught up: writers publish directly again
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox relay pass failed; retrying")
                self._pass_due = True
                n = 0
                await asyncio.sleep(min(1.0, self.poll_s))
            # Stopping: not before the publishes under way have ended (``direct_timeout_s`` at
            # most) and their rows are deleted; left, they went out again after the grace.
            if (
                self._stopping.is_set()
                and n == 0
                and not self._published
                and not self._handoff
                and not self._in_flight
            ):
                return
            if n >= self.batch:
                self._pass_due = True
                continue  # a full batch: there may be more behind it
            # Else the pass took everything committed before it; rows committed since woke us
            # (``wake`` after commit sets the event cleared above). No empty pass per publish:
            # at low rates that was a second transaction for every event of every service.
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except TimeoutError:
                self._pass_due = True  # the poll: stale staged rows, rows of other processes

    def _hand_over(self, ids: tuple[int, ...]) -> None:
        self._handoff.extend(ids)
        self.wake()

    async def _take_over(self) -> None:
        """Rows handed over become the relay's at once (no grace): the pass after this takes
        them with the rest, in id order."""
        ids, self._handoff = self._handoff, []
        if not ids:
            return
        try:
            await self.pool.execute(
                "UPDATE outbox SET direct = false WHERE id = ANY($1::bigint[])", ids
            )
        except BaseException:
            self._handoff[:0] = ids
            raise

    async def _forget_published(self) -> None:
        """Delete the rows ``publish`` sent, in one autocommit statement."""
        ids, self._published = self._published, []
        if not ids:
            return
        try:
            await self.pool.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", ids)
        except BaseException:
            self._published[:0] = ids
            raise

    async def publish_once(self, limit: int = 500) -> int:
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                BATCH_SQL,
                limit,
                self.direct_grace_s,
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
