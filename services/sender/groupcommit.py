"""Group commit: many attempts' small writes in one database round trip.

Every send in flight writes twice around its SMTP transaction (the "end of data is being sent"
mark, then its outcome with its event) and gives its lock back. One at a time that is a
transaction, a pool round trip and a lock-session round trip per message. Here a write is
queued and the caller waits for it; a single flusher takes everything queued so far and writes
it in one statement or transaction. No timer: the first write goes at once, and whatever
arrives while it is in the database goes with the next one, so batches grow only with load.

Each caller still waits for *its own* write to commit before going on, so the order of events
that exactly-once depends on (mark committed before the '.', outcome committed before the lock
is released) is the same as writing alone. If a batch fails, its items are retried one by one,
so one bad row fails alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger("chatflow.sender.groupcommit")


class GroupCommit(Generic[T, R]):
    def __init__(
        self, name: str, flush: Callable[[list[T]], Awaitable[list[R]]], max_batch: int = 200
    ) -> None:
        self.name = name
        self._flush = flush
        self._max = max_batch
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.batches = 0
        self.items = 0

    async def submit(self, item: T) -> R:
        """Queue ``item`` and wait until the batch holding it was written; its result."""
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._run(), name=f"groupcommit-{self.name}")
        return await fut

    async def _run(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self._max], self._queue[self._max :]
            self.batches += 1
            self.items += len(batch)
            try:
                results = await self._flush([item for item, _ in batch])
            except Exception as exc:
                if len(batch) == 1:
                    if not batch[0][1].done():
                        batch[0][1].set_exception(exc)
                    continue
                log.warning("group write failed; writing its items one by one", exc_info=True)
                for entry in batch:
                    await self._alone(entry)
                continue
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)

    async def _alone(self, entry: tuple[T, asyncio.Future[R]]) -> None:
        item, fut = entry
        try:
            (result,) = await self._flush([item])
        except Exception as exc:
            if not fut.done():
                fut.set_exception(exc)
            return
        if not fut.done():
            fut.set_result(result)

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
