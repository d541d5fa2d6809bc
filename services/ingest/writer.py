"""Group commit: the deliveries of every session waiting in DATA, in one transaction, one fsync.

Why: a durable commit is a WAL flush, and one delivery was four to six statements (blob,
message, attachments, outbox), each a round trip with its own parse and plan. With twenty
sessions in DATA at once, committing them together pays the flush and the statements once per
batch instead of once per message (bench numbers in the README).

How: ``IngestHandler.store`` hands a :class:`Job` (everything to store and announce, ids made in
advance) to :meth:`Writer.write` and waits. A writer task takes every job waiting (up to
``max_jobs`` and ``max_bytes``), inserts all blobs, messages, attachments and outbox rows in one
statement (``storage.write_batch``: one round trip, its own transaction), and only once that has
committed resolves each job; the session answers 250 after that. Nothing about the promise changes: a job is answered only from a committed
transaction that holds its raw bytes and its ``mail.received`` row. The rows are staged
(``libs.common.outbox.stage``): the writer publishes them itself right after the commit, and the
relay publishes them only if that did not happen.

- **Isolation.** If the batch fails (a bad row, a refused COMMIT, a lost connection), the
  transaction keeps nothing and each job is committed again alone, so one bad delivery costs only
  its own session a 451.
- **Retries inside one batch.** Two jobs with the same raw bytes for the same mailbox are one
  message: the first is inserted, the later ones get its id as "already have it", as if they had
  arrived after it.
- **No deadlocks.** Blobs and messages are inserted in key order, so two writers (this one's
  other task, another replica) that touch the same keys wait for each other in one order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg

from libs.common.outbox import Staged
from services.ingest import storage

log = logging.getLogger("chatflow.ingest.writer")

Key = tuple[str, str]  # (mailbox_id, raw_sha256): what makes a delivery "the same message"


@dataclass
class Copy:
    """One mailbox's copy of a message: its row, its attachment rows and, if it was read, its
    event as the outbox stores it (stream type, envelope JSON), encoded before it gets here."""

    row: storage.MessageRow
    attachments: list[storage.AttachmentRow]
    event: tuple[str, str] | None

    @property
    def key(self) -> Key:
        return (self.row.mailbox_id, self.row.raw_sha256)


@dataclass
class Job:
    """What one ``store`` call commits, all or nothing: its copies and the blobs they use."""

    copies: list[Copy]
    blobs: dict[str, bytes]
    future: asyncio.Future[list[tuple[str, bool]]] = field(init=False)

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.blobs.values())


class Writer:
    """Commits jobs in batches; ``tasks`` batches may be in flight at once (on their own
    connections), so one batch is gathered while the previous one waits for its flush."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        committed: Callable[[Staged], Awaitable[None]],
        *,
        tasks: int = 2,
        max_jobs: int = 200,
        max_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.pool = pool
        self.committed = committed  # the outbox relay's publish
        self.max_jobs = max_jobs
        self.max_bytes = max_bytes
        self._n_tasks = tasks
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self.batches = 0
        self.jobs = 0
        self.fallbacks = 0

    async def write(self, job: Job) -> list[tuple[str, bool]]:
        """Commit ``job``; its ``(id, new)`` per copy, in order. Raises if it was not committed."""
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._run(), name=f"ingest-writer-{i}")
                for i in range(self._n_tasks)
            ]
        job.future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(job)
        return await job.future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            size = batch[0].size
            while not self._queue.empty() and len(batch) < self.max_jobs and size < self.max_bytes:
                batch.append(self._queue.get_nowait())
                size += batch[-1].size
            try:
                await self._commit(batch)
            except Exception as exc:  # a bug here must cost this batch a 451, not stop the writer
                log.exception("ingest writer failed a batch")
                for job in batch:
                    _fail(job, exc)
            except BaseException:
                for job in batch:
                    _fail(job, RuntimeError("the ingest writer stopped before committing"))
                raise

    async def _commit(self, batch: list[Job]) -> None:
        self.batches += 1
        self.jobs += len(batch)
        try:
            results, staged = await self._write(batch)
        except Exception as exc:
            if len(batch) == 1:
                _fail(batch[0], exc)
                return
            self.fallbacks += 1
            log.warning(
                "group commit failed; committing its deliveries one by one",
                extra={"jobs": len(batch), "error": f"{type(exc).__name__}: {exc}"},
            )
            staged = Staged()
            for job in batch:
                try:
                    (result,), one_staged = await self._write([job])
                except Exception as one:
                    _fail(job, one)
                else:
                    _done(job, result)
                    staged += one_staged
            await self.committed(staged)
            return
        for job, result in zip(batch, results, strict=True):
            _done(job, result)
        await self.committed(staged)

    async def _write(self, batch: list[Job]) -> tuple[list[list[tuple[str, bool]]], Staged]:
        """One transaction for ``batch``; per job, per copy: ``(id, new)``; its staged events."""
        blobs: dict[str, bytes] = {}
        firsts: dict[Key, Copy] = {}
        for job in batch:
            blobs.update(job.blobs)
            for copy in job.copies:
                firsts.setdefault(copy.key, copy)
        copies = list(firsts.values())
        async with self.pool.acquire() as conn:
            ids, staged = await storage.write_batch(
                conn,
                blobs,
                [c.row for c in copies],
                {c.row.id: c.attachments for c in copies if c.attachments},
                {c.row.id: c.event for c in copies if c.event is not None},
            )
        return [
            [(str(ids[c.key][0]), ids[c.key][1] and firsts[c.key] is c) for c in job.copies]
            for job in batch
        ], staged


def _done(job: Job, result: list[tuple[str, bool]]) -> None:
    if not job.future.done():
        job.future.set_result(result)


def _fail(job: Job, exc: BaseException) -> None:
    if not job.future.done():
        job.future.set_exception(exc)
