"""Redis Streams bus: publish, consumer groups with reclaim and dead-lettering, broadcast readers.

One stream per event type (``<prefix><type>``). A consumer acks an entry only after its handler
returned; a crashed consumer's pending entries are reclaimed by XAUTOCLAIM once idle long enough;
an entry delivered ``max_deliveries`` times, or one that can never validate, moves to the
dead-letter stream with its error, so nothing is dropped in silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from libs.common import metrics
from libs.common.events import Envelope, EventError
from libs.common.logs import correlation_id

log = logging.getLogger("chatflow.bus")

Handler = Callable[[Envelope, str], Awaitable[None]]
# Several entries of one stream, in order, whose effects commit together (one transaction).
BatchHandler = Callable[[list[tuple[Envelope, str]]], Awaitable[None]]
DEAD_LETTER = "deadletter"
PARSE_SLICE = 16  # envelopes of a batch parsed between two turns of the loop


REDIS_MAX_CONNECTIONS = 200
REDIS_POOL_WAIT_S = 20.0


def connect(url: str, ca: str | None = None) -> aioredis.Redis:
    """A client for ``redis://`` or ``rediss://`` (TLS, verified against ``ca``)."""
    # Blocking reads wait up to consumer_block_ms; the socket timeout must outlast them.
    kwargs: dict[str, Any] = {
        "decode_responses": False,
        "health_check_interval": 30,
        "socket_timeout": 60,
        "socket_connect_timeout": 5,
        # A restarted Redis leaves every pooled connection stale, and the pool's check on
        # checkout does not always see it: without a retry the first command on each one fails
        # (a trial's first login after a restart answered 500). One retry on a new connection
        # costs no request; a write retried after a lost reply may land twice, which the
        # consumers' idempotency absorbs as it does any redelivery.
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 1),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
    }
    if url.startswith("rediss://") and ca:
        kwargs["ssl_ca_certs"] = ca
    # A burst (a thousand WebSocket upgrades, a thousand disconnects) must wait for a connection,
    # not fail: redis-py's default pool raises MaxConnectionsError when it runs out, and a
    # consumer whose XACK raises stops its service.
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=REDIS_MAX_CONNECTIONS, timeout=REDIS_POOL_WAIT_S, **kwargs
    )
    return aioredis.Redis(connection_pool=pool)


# XADD of every entry (KEYS[i], ARGV[i + 1]) in order, capped like one XADD; their ids.
_XADD_MANY = """
local ids = {}
for i = 1, #KEYS do
    ids[i] = redis.call('XADD', KEYS[i], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[i + 1])
end
return ids
"""


class Bus:
    def __init__(self, redis: aioredis.Redis, prefix: str, maxlen: int = 1_000_000) -> None:
        self.redis = redis
        self.prefix = prefix
        self.maxlen = maxlen
        self._xadd_many: AsyncScript | None = None

    def stream(self, type_: str) -> str:
        return f"{self.prefix}{type_}"

    @property
    def dead_letter(self) -> str:
        return self.stream(DEAD_LETTER)

    async def publish(self, env: Envelope) -> str:
        ids = await self.publish_raw([(self.stream(env.type), env.to_json())])
        return ids[0]

    async def publish_raw(self, entries: Sequence[tuple[str, str]]) -> list[str]:
        """XADD pre-serialized envelopes in one round trip; returns the entry ids.

        Several go in one script call: redis-py's pipeline packed and parsed each XADD in
        Python, 15 us of the publisher's CPU per entry (the script: 4 us), and Redis parses
        one command instead of one per entry."""
        if len(entries) == 1:
            [(stream, data)] = entries
            one: Any = await self.redis.xadd(
                stream, {"e": data}, maxlen=self.maxlen, approximate=True
            )
            return [one.decode()]
        if not entries:
            return []
        if self._xadd_many is None:
            self._xadd_many = self.redis.register_script(_XADD_MANY)
        ids = await self._xadd_many(
            keys=[stream for stream, _ in entries], args=[self.maxlen, *(d for _, d in entries)]
        )
        return [i.decode() for i in ids]

    async def dead_letter_entry(
        self, stream: str, entry_id: str, data: bytes | None, reason: str, group: str
    ) -> None:
        fields = {
            "stream": stream,
            "entry_id": entry_id,
            "group": group,
            "reason": reason[:2000],
            "e": data or b"",
            "at": str(time.time()),
        }
        await self.redis.xadd(self.dead_letter, fields, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
        metrics.DEAD_LETTERED.labels(stream=stream, group=group).inc()
        log.warning(
            "dead-lettered entry",
            extra={"stream": stream, "entry_id": entry_id, "group": group, "reason": reason[:300]},
        )

    async def ensure_group(self, stream: str, group: str, start: str = "0") -> None:
        try:
            await self.redis.xgroup_create(stream, group, id=start, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise


class _ReadLoop:
    """What both readers share: their streams, a stop signal and the liveness /readyz reads."""

    bus: Bus
    types: Iterable[str]
    block_ms: int

    def _init_loop(self) -> None:
        self.streams = [self.bus.stream(t) for t in self.types]
        self._stopping = asyncio.Event()
        self.last_loop_at = 0.0

    @property
    def healthy(self) -> bool:
        """The read loop came round recently."""
        return time.monotonic() - self.last_loop_at < max(5.0, 3 * self.block_ms / 1000)

    def stop(self) -> None:
        self._stopping.set()


class Turns:
    """Handler calls run their ordered part in the order of their tickets.

    The threader runs more than one consumer of ``mail.received`` so that one batch's Python
    work (reading the events, working out each message's keys, subject key and search document,
    reading ahead) is done while PostgreSQL works on the batch before it. From its first
    statement to its publish, a batch waits for its turn (``wait``): a process places its mail
    in stream order, as with one consumer. (Replicas still interleave, as ADR 0001 says; the
    mailbox lock keeps each placement whole.) ``Ordered`` consumers take the tickets as their
    reads return, one read at a time.
    """

    def __init__(self) -> None:
        self._taken = 0  # the next ticket
        self._serving = 0  # whose turn it is
        self._finished: set[int] = set()
        self._waiting: dict[int, asyncio.Future[None]] = {}

    def take(self) -> int:
        ticket, self._taken = self._taken, self._taken + 1
        return ticket

    async def wait(self, ticket: int) -> None:
        if ticket <= self._serving:
            return
        turn = self._waiting[ticket] = asyncio.get_running_loop().create_future()
        try:
            await turn
        finally:
            del self._waiting[ticket]

    def finish(self, ticket: int) -> None:
        """Done or failed (before its turn too); again is nothing (the consumer that took a
        ticket finishes it after its handler, which may have)."""
        if ticket < self._serving or ticket in self._finished:
            return
        self._finished.add(ticket)
        while self._serving in self._finished:
            self._finished.remove(self._serving)
            self._serving += 1
        turn = self._waiting.get(self._serving)
        if turn is not None and not turn.done():
            turn.set_result(None)


@dataclass
class Ordered:
    """Shared by a process's consumers of one stream whose handlers need stream order for part
    of their work: they read one at a time, and each handler call's ticket is taken as its read
    returns, before the next read (``take_turn`` hands it to the handler).

    The order the handlers started in was not enough: of two consumers blocked on the stream,
    a burst gives the first the first ``batch`` entries and the other the rest, and the shorter
    answer is read first; a yield in the parse let a later read overtake too (found by a
    review, with a test each).
    """

    turns: Turns = field(default_factory=Turns)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


_TURN: contextvars.ContextVar[int | None] = contextvars.ContextVar("chatflow_turn", default=None)


def take_turn(turns: Turns) -> int:
    """The ticket an ``Ordered`` consumer took for the call being handled (once: a batch's
    entries handled again one by one after it failed take new ones), else a new one."""
    ticket = _TURN.get()
    if ticket is None:
        return turns.take()
    _TURN.set(None)
    return ticket


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class Consumer(_ReadLoop):
    """One consumer-group subscription: ``handler`` runs for each entry of ``types``.

    Entries are handled one at a time per stream in order; the handler must be idempotent (see
    ``libs.common.inbox``) because a reclaimed entry may already have had its effects.

    With ``batch_handler``, the entries one read returned for a stream (up to ``batch``) go to
    it together, still in order, so a busy consumer pays one commit for many events instead of
    one each; they are acked together after it returns. If it raises, each entry is handled
    again alone by ``handler``, so one bad entry costs only itself (its retries and
    dead-lettering as usual). A quiet stream gives batches of one: no latency is added.
    """

    bus: Bus
    group: str
    types: Iterable[str]
    handler: Handler
    name: str = field(default_factory=consumer_name)
    block_ms: int = 1000
    batch: int = 100
    claim_idle_ms: int = 30_000
    claim_interval_ms: int = 5_000
    max_deliveries: int = 5
    start: str = "0"
    batch_handler: BatchHandler | None = None
    ordered: Ordered | None = None

    def __post_init__(self) -> None:
        self._init_loop()

    async def run(self) -> None:
        for s in self.streams:
            await self.bus.ensure_group(s, self.group, self.start)
        reclaim = asyncio.create_task(self._reclaim_loop())
        try:
            await self._read_loop()
        finally:
            reclaim.cancel()
            await asyncio.gather(reclaim, return_exceptions=True)

    async def _read_loop(self) -> None:
        redis = self.bus.redis
        # Our own pending entries first (a restart with the same name), then new ones.
        cursor = dict.fromkeys(self.streams, "0")
        while not self._stopping.is_set():
            self.last_loop_at = time.monotonic()
            new_only = all(c == ">" for c in cursor.values())
            try:
                async with self.ordered.lock if self.ordered else contextlib.nullcontext():
                    resp: Any = await redis.xreadgroup(
                        self.group,
                        self.name,
                        cursor,  # type: ignore[arg-type]
                        count=self.batch,
                        block=self.block_ms if new_only else None,
                    )
                    calls = self._calls(resp, self.ordered.turns if self.ordered else None)
            except (ConnectionError, OSError, aioredis.ConnectionError) as exc:
                log.warning("redis read failed, retrying", extra={"error": str(exc)})
                await asyncio.sleep(0.5)
                continue
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    for s in self.streams:
                        await self.bus.ensure_group(s, self.group, self.start)
                    continue
                raise
            last: dict[str, str] = {}
            for stream_b, entries in resp or []:
                if entries:
                    last[stream_b.decode()] = entries[-1][0].decode()
            for i, (stream, entries, ticket) in enumerate(calls):
                token = _TURN.set(ticket)
                try:
                    if len(entries) > 1:
                        await self._handle_batch(stream, entries)
                    else:
                        entry_id_b, fields = entries[0]
                        await self._handle(stream, entry_id_b.decode(), fields)
                except BaseException:
                    for _, _, later in calls[i + 1 :]:  # their turns must not wait for ever
                        if later is not None and self.ordered is not None:
                            self.ordered.turns.finish(later)
                    raise
                finally:
                    _TURN.reset(token)
                    if ticket is not None and self.ordered is not None:
                        self.ordered.turns.finish(ticket)
            for s in self.streams:
                if cursor[s] != ">":
                    # Page through our own backlog once; failures there wait for the reclaimer.
                    cursor[s] = last.get(s, ">")

    def _calls(self, resp: Any, turns: Turns | None) -> list[tuple[str, list[Any], int | None]]:
        """The handler calls a read makes, in order: a stream's entries together (a batch
        handler) or one by one, each with its ticket when ``turns``."""
        calls: list[tuple[str, list[Any], int | None]] = []
        for stream_b, entries in resp or []:
            stream = stream_b.decode()
            if self.batch_handler is not None and len(entries) > 1:
                calls.append((stream, entries, turns.take() if turns else None))
            else:
                calls += [(stream, [e], turns.take() if turns else None) for e in entries]
        return calls

    async def _handle_batch(self, stream: str, entries: list[Any]) -> None:
        assert self.batch_handler is not None
        items: list[tuple[Envelope, str]] = []
        for n, (entry_id_b, fields) in enumerate(entries):
            if n and n % PARSE_SLICE == 0:
                # A hundred envelopes parse in ~6 ms: let other handlers' answers in between
                # (the threader's batch before this one holds a mailbox lock meanwhile).
                await asyncio.sleep(0)
            entry_id = entry_id_b.decode()
            try:
                items.append((Envelope.from_entry(fields), entry_id))
            except EventError:
                await self._handle(stream, entry_id, fields)  # dead-letters and acks it
        if not items:
            return
        started = time.perf_counter()
        try:
            await self.batch_handler(items)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning(
                "batch failed; handling its entries one by one",
                exc_info=True,
                extra={"stream": stream, "entries": len(items)},
            )
            for _, entry_id in items:
                fields = next(f for i, f in entries if i.decode() == entry_id)
                await self._handle(stream, entry_id, fields)
            return
        elapsed = (time.perf_counter() - started) / len(items)
        for env, _ in items:
            metrics.HANDLER_SECONDS.labels(group=self.group, type=env.type).observe(elapsed)
        await self.bus.redis.xack(stream, self.group, *(entry_id for _, entry_id in items))
        metrics.EVENTS_CONSUMED.labels(stream=stream, group=self.group).inc(len(items))

    async def _handle(self, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> bool:
        """Run the handler; ack on success or after dead-lettering. Returns True if acked."""
        data = fields.get(b"e")
        try:
            if data is None:
                raise EventError("entry has no 'e' field")
            env = Envelope.from_json(data)
        except EventError as exc:
            await self.bus.dead_letter_entry(stream, entry_id, data, str(exc), self.group)
            await self.bus.redis.xack(stream, self.group, entry_id)
            metrics.EVENTS_FAILED.labels(stream=stream, group=self.group).inc()
            return True
        started = time.perf_counter()
        token = correlation_id.set(env.correlation_id)
        try:
            await self.handler(env, entry_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            metrics.EVENTS_FAILED.labels(stream=stream, group=self.group).inc()
            log.exception(
                "handler failed; entry stays pending",
                extra={
                    "stream": stream,
                    "entry_id": entry_id,
                    "correlation_id": env.correlation_id,
                },
            )
            return False
        finally:
            correlation_id.reset(token)
        metrics.HANDLER_SECONDS.labels(group=self.group, type=env.type).observe(
            time.perf_counter() - started
        )
        await self.bus.redis.xack(stream, self.group, entry_id)
        metrics.EVENTS_CONSUMED.labels(stream=stream, group=self.group).inc()
        return True

    async def _reclaim_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), self.claim_interval_ms / 1000)
                return
            except TimeoutError:
                pass
            try:
                for s in self.streams:
                    await self.reclaim_once(s)
            except Exception:
                log.exception("reclaim pass failed")

    async def reclaim_once(self, stream: str) -> int:
        """Claim entries idle for ``claim_idle_ms`` (a dead consumer's, or failed ones) and retry."""
        redis = self.bus.redis
        handled = 0
        start = "0-0"
        while True:
            resp: Any = await redis.xautoclaim(
                stream, self.group, self.name, self.claim_idle_ms, start_id=start, count=self.batch
            )
            start = resp[0].decode() if isinstance(resp[0], bytes) else resp[0]
            entries = resp[1]
            for entry_id_b, fields in entries:
                entry_id = entry_id_b.decode()
                if fields is None:  # trimmed away while pending
                    await redis.xack(stream, self.group, entry_id)
                    continue
                info: Any = await redis.xpending_range(stream, self.group, entry_id, entry_id, 1)
                delivered = int(info[0]["times_delivered"]) if info else 1
                if delivered > self.max_deliveries:
                    await self.bus.dead_letter_entry(
                        stream,
                        entry_id,
                        fields.get(b"e"),
                        f"handler failed {delivered - 1} times (max_deliveries={self.max_deliveries})",
                        self.group,
                    )
                    await redis.xack(stream, self.group, entry_id)
                    continue
                metrics.RECLAIMED.labels(stream=stream, group=self.group).inc()
                if await self._handle(stream, entry_id, fields):
                    handled += 1
            if start in ("0-0", "0"):
                return handled


@dataclass
class BroadcastReader(_ReadLoop):
    """Every replica sees every entry (no group): for fan-out such as the notifier's frames."""

    bus: Bus
    types: Iterable[str]
    handler: Callable[[str, str, dict[bytes, bytes]], Awaitable[None]]
    start: str = "$"
    block_ms: int = 1000
    batch: int = 500

    def __post_init__(self) -> None:
        self._init_loop()
        self.cursor: dict[str, str] = {}

    async def run(self) -> None:
        redis = self.bus.redis
        if self.start == "$":
            # Resolve "$" to concrete ids so nothing between two reads is skipped.
            for s in self.streams:
                last: Any = await redis.xrevrange(s, count=1)
                self.cursor[s] = last[0][0].decode() if last else "0-0"
        else:
            self.cursor = dict.fromkeys(self.streams, self.start)
        while not self._stopping.is_set():
            self.last_loop_at = time.monotonic()
            try:
                resp: Any = await redis.xread(self.cursor, count=self.batch, block=self.block_ms)  # type: ignore[arg-type]
            except (ConnectionError, OSError, aioredis.ConnectionError) as exc:
                log.warning("redis read failed, retrying", extra={"error": str(exc)})
                await asyncio.sleep(0.5)
                continue
            for stream_b, entries in resp or []:
                stream = stream_b.decode()
                for entry_id_b, fields in entries:
                    entry_id = entry_id_b.decode()
                    self.cursor[stream] = entry_id
                    try:
                        await self.handler(stream, entry_id, fields)
                    except Exception:
                        log.exception("broadcast handler failed", extra={"entry_id": entry_id})
