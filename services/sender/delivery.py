"""The delivery queue: like an MTA's, it retries 4xx replies and connection failures with backoff,
fails 5xx at once, and knows after a crash what each message's last attempt may have done.

Stages (one row of ``sends`` each, state in brackets):

1. ``mail.send`` is stored as it came [queued, no mime] and ``queued`` is published.
2. *prepare* composes it from our view of the conversation, signs it (DKIM) and stores the exact
   bytes [queued, mime]; or fails it with the reason [failed]. A command whose conversation (or
   mailbox) has not reached us waits up to ``unknown_conversation_wait_s`` without blocking the
   stream (its events wake it). A pass takes the commands this process has just queued (their
   ids handed over in memory, ``hint``), or else, and at least every ``delivery_poll_ms``, the
   ones the database says are due; and only as many as there are free attempt slots.
3. *claim*: attempt ``n`` is recorded and committed [sending, attempts = n] before any SMTP.
   A send composed while attempt slots are free is claimed by the prepare transaction itself
   (the same state and lock, taken before that transaction commits): with prepare passes sized
   to the free slots that is every send but a retry, not one write to store the bytes, one to
   claim them and a read of them back.
4. The SMTP transaction runs on a pooled relay connection. Just before the terminating ``.`` of
   the message we commit ``smtp_dot_at`` (end of data is being sent).
5. The outcome is committed with its ``mail.status`` event (outbox, same transaction):
   250 [sent]; 5xx [failed, the reply text as detail]; 4xx or a connection failure [deferred,
   ``next_attempt_at`` = now + exponential backoff with jitter] until ``max_queue_age_s``, then
   [failed]. A partly refused recipient list is sent to the accepted ones; the refusals go into
   the ``sent`` detail (``mail.status`` has one status per send, not per recipient).

The writes of steps 4 and 5 are group-committed with those of the other attempts in flight
(``groupcommit.py``): each attempt still waits for its own commit before it writes the ``.``, so
nothing below changes. Step 5 is one statement on the lock session (``storage.finish_many``):
the row, the attempt, the outbox row, and the unlock of each send once its row is updated (the
row stays locked until that statement commits, so a replica that takes the freed lock waits for
the commit and then finds the row no longer 'sending').

Ownership without timeouts: a process holds a PostgreSQL *session* advisory lock on every send
it has in [sending], taken by the claim statement itself on one dedicated connection. When the
process dies -- SIGKILL, OOM, power -- its session ends and the locks go with it, so "sending and
nobody holds its lock" means "orphaned", at once, with any number of replicas. Every outcome
update is conditional on ``state = 'sending' AND attempts = n``, so an attempt that lost its row
(say its lock session broke and another replica took over) cannot overwrite a newer state, and
it checks that before writing the final ``.``.

Exactly once across crashes -- the policy for an orphaned row of attempt ``n``:

* ``smtp_dot_at`` is NULL: the relay never received end-of-data for this attempt (the mark is
  committed *before* the ``.`` is written). An SMTP server must not deliver a transaction whose
  DATA did not end (RFC 5321 4.1.1.4, 3.8), so resending cannot duplicate: the row is
  [deferred] to now with "interrupted before end of data; retrying" and sent again.
* ``smtp_dot_at`` is set: the ``.`` was written, or was about to be, when the process died; the
  relay's reply, if any, went nowhere. The relay was up and had the whole message: relays commit
  a message before answering the ``.``, so we take it as accepted. The row becomes [sent] with
  detail "relay accepted before crash (unconfirmed)" and the ``sent`` event (so the conversation
  shows it); it is never resent. The rare wrong guess (the relay refused it at end of data, or
  the ``.`` never left our process in the instant between the mark and the write) loses
  that message *visibly*: the agent sees "unconfirmed". ``unconfirmed_policy = "resend"`` turns
  this around for relays or receivers that deduplicate by Message-ID: the same bytes, with the
  same Message-ID, go again (at least once instead of at most once).

A *live* failure after the ``.`` (the relay dropped the connection or timed out before its
reply; we waited ``relay_data_timeout_s``, RFC 5321's 10 minutes) is the relay's fault, not
ours, and the relay may have lost the message: like Postfix we defer and resend, accepting the
RFC 1047 duplicate. Every attempt resends the stored bytes, so a duplicate carries the same
Message-ID (and DKIM signature), which receivers and mail clients collapse.

Duplicated commands: the same ``send_id``, or the same ``(user_id, client_id)``, is one send
(primary key / unique index); the repeat is acknowledged and dropped.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import multiprocessing
import random
import ssl
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg

from libs.common import db
from libs.common.events import MailSend
from services.sender import storage, workers
from services.sender.domain.render import Job, Refusal, Rendered, render
from services.sender.groupcommit import GroupCommit
from services.sender.relay import Accepted, LostAfterDot, Rejected, RelayPool, SessionError, TooBig
from services.sender.signing import Signer, load_keys

if TYPE_CHECKING:
    from services.sender.service import SenderService

log = logging.getLogger("chatflow.sender.delivery")
UNCONFIRMED = "relay accepted before crash (unconfirmed)"


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with (equal) jitter: base * 2^(n-1), capped, then 50-100% of it."""
    ceiling = min(cap, base * 2 ** max(0, attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


def _one_line(text: str) -> str:
    return " ".join(text.split())


class LostOwnership(Exception):
    """Our attempt is no longer the row's current one: stop before the final '.'."""


class Locks:
    """The one PostgreSQL session whose advisory locks say which sends this process owns."""

    def __init__(self, svc: SenderService) -> None:
        self.svc = svc
        self._pool: asyncpg.Pool | None = None
        self._conn: Any = None
        self._mutex = asyncio.Lock()

    async def _session(self) -> Any:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        if self._pool is None:
            s = self.svc.settings
            self._pool = await db.connect_pool(
                s.own_database_url, s.db_schema, 1, 1, ca=s.tls_ca, session_state=True
            )
        if self._conn is not None:
            log.error("lock session lost; sends in flight may be taken over by another replica")
            await self._pool.release(self._conn)
            self._conn = None
        self._conn = await self._pool.acquire()
        return self._conn

    async def run(self, fn: Any, *args: Any) -> Any:
        async with self._mutex:
            conn = await self._session()
            return await fn(conn, *args)

    async def close(self) -> None:
        if self._pool is not None:
            if self._conn is not None:
                await self._pool.release(self._conn)  # the release resets: unlocks everything
                self._conn = None
            await self._pool.close()
            self._pool = None


class Delivery:
    def __init__(self, svc: SenderService, tls: ssl.SSLContext) -> None:
        self.svc = svc
        s = svc.settings
        self.signer = Signer(load_keys(s.dkim_keys_dir, s.dkim_keys), s.dkim_rsa)
        self.relay = RelayPool(
            s.relay_host,
            s.relay_port,
            tls_context=tls,
            starttls=s.relay_starttls,
            implicit_tls=s.relay_implicit_tls,
            username=s.relay_username,
            password=s.relay_password,
            ehlo_name=s.relay_ehlo_name,
            timeout=s.relay_timeout_s,
            data_timeout=s.relay_data_timeout_s,
            max_connections=s.relay_max_connections,
            idle_s=s.relay_idle_s,
            max_messages_per_connection=s.relay_max_messages_per_connection,
        )
        self.locks = Locks(svc)
        # Group commit of the per-attempt writes (see groupcommit.py); the order each attempt
        # sees is unchanged: its mark commits before its '.', its outcome before its unlock.
        self._dots: GroupCommit[tuple[uuid.UUID, int], bool] = GroupCommit("dots", self._write_dots)
        self._outcomes: GroupCommit[tuple[storage.Outcome, Any], Any] = GroupCommit(
            "outcomes", self._write_outcomes
        )
        self._unlocks: GroupCommit[uuid.UUID, None] = GroupCommit("unlocks", self._write_unlocks)
        # The claim loop waits on _wake (set when an attempt ends and by wake()); it asks the
        # database only when _claim_due says a composed send may be waiting for a slot (see
        # run). Each prepare worker waits on its own event, set by wake() only: an attempt that
        # ends makes no new command to compose.
        self._wake = asyncio.Event()
        self._prepare_wakes: list[asyncio.Event] = []
        self._claim_due = True
        self._stopping = False
        self._inflight: dict[uuid.UUID, asyncio.Task[None]] = {}
        # Attempt slots promised to a prepare pass between its free-slot count and its tasks'
        # start, and the sends it holds the advisory lock of meanwhile (recover() skips them).
        self._reserved = 0
        self._starting: set[uuid.UUID] = set()
        self._workers: ProcessPoolExecutor | None = None
        # Sends this process has just queued, for its prepare passes to lock by key (hint):
        # found without prepare_candidates' scan of the queue. Only a shortcut: a send whose
        # hint is lost (full, a restart, another replica took it) is found by that scan.
        self._hints: collections.deque[uuid.UUID] = collections.deque()
        self._scan_due = True  # wake(): sends may be due that no hint names
        self._last_scan = 0.0
        # Since when prepare passes have waited for free attempt slots (see _prepare_quota).
        self._starved_since: float | None = None
        self.counts: collections.Counter[str] = collections.Counter()

    MAX_HINTS = 20_000

    def wake(self) -> None:
        self._claim_due = True
        self._scan_due = True
        self._wake.set()
        self._wake_preparers()

    def hint(self, send_ids: list[uuid.UUID]) -> None:
        """Sends just queued here: the next prepare passes take them by key, in this order."""
        room = max(0, self.MAX_HINTS - len(self._hints))
        self._hints.extend(send_ids[:room])
        if len(send_ids) > room:
            self._scan_due = True  # the scan finds the sends without a hint
        self._wake_preparers()

    def _wake_preparers(self) -> None:
        for event in self._prepare_wakes:
            event.set()

    def relay_for(self, row: Any) -> RelayPool:
        """Every message goes through the configured smarthost (one pool per relay)."""
        return self.relay

    # ---- the loop --------------------------------------------------------------------------
    async def run(self) -> None:
        """Claim loop (and crash recovery) here; ``prepare_workers`` prepare loops beside it.

        Several prepare passes at once (``storage.prepare_candidates`` and ``lock_for_prepare``
        give each its own rows) keep the CPU composing and signing while another pass waits for
        the database.
        """
        s = self.svc.settings
        poll = s.delivery_poll_ms / 1000
        next_recover = 0.0
        self._prepare_wakes = [asyncio.Event() for _ in range(max(1, s.prepare_workers))]
        preparers = [
            asyncio.create_task(self._prepare_loop(event), name=f"prepare-{i}")
            for i, event in enumerate(self._prepare_wakes)
        ]
        try:
            while not (self.svc.stop_event.is_set() or self._stopping):
                self._wake.clear()
                busy = False
                try:
                    if time.monotonic() >= next_recover:
                        await self.recover()
                        next_recover = time.monotonic() + s.recover_interval_s
                    if self._claim_due:
                        busy = await self.claim_once() > 0
                except Exception:
                    log.exception("delivery pass failed; retrying")
                    await asyncio.sleep(min(1.0, poll))
                if busy:
                    continue
                try:
                    await asyncio.wait_for(self._wake.wait(), poll)
                except TimeoutError:
                    self._claim_due = True  # deferred sends come due with time
            self._stopping = True
            for event in self._prepare_wakes:
                event.set()
            await asyncio.gather(*preparers, return_exceptions=True)
        finally:
            for task in preparers:
                task.cancel()
        await self.drain(s.shutdown_grace_s)

    async def _prepare_loop(self, event: asyncio.Event) -> None:
        poll = self.svc.settings.delivery_poll_ms / 1000
        while not (self.svc.stop_event.is_set() or self._stopping):
            event.clear()
            try:
                if await self.prepare_once() > 0:
                    continue
            except Exception:
                log.exception("prepare pass failed; retrying")
                await asyncio.sleep(min(1.0, poll))
            try:
                await asyncio.wait_for(event.wait(), poll)
            except TimeoutError:
                pass  # sends that waited for their conversation come due with time

    async def drain(self, grace: float) -> None:
        """Stop claiming; let attempts in flight finish and record their outcome."""
        self._stopping = True
        self._wake.set()
        for event in self._prepare_wakes:
            event.set()
        if self._inflight:
            await asyncio.wait(list(self._inflight.values()), timeout=grace)

    async def close(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        await self.relay.close()
        await self.locks.close()
        if self._workers is not None:
            self._workers.shutdown(wait=False, cancel_futures=True)
            self._workers = None

    # ---- prepare ---------------------------------------------------------------------------
    async def prepare_once(self) -> int:
        """Compose and sign a batch of new commands; how many it took (0: nothing to do now)."""
        locked: set[uuid.UUID] = set()
        slots = [0]  # attempt slots this pass holds until its tasks start (see _free_slots)
        try:
            return await self._prepare(locked, slots)
        except BaseException:
            self._scan_due = True  # what the pass took (hints) is found again by a scan
            self._starting -= locked
            await self._unlock_many(locked)  # their transaction did not commit: not ours to send
            raise
        finally:
            self._reserved -= slots[0]

    def _prepare_quota(self) -> tuple[int, int]:
        """``(commands, slots)`` a prepare pass takes now: as many commands as there are free
        attempt slots (up to ``prepare_batch``), each of them to begin its first attempt in the
        pass's own transaction. While attempts are in flight, a pass waits until a batch, or half
        the slots, is free (they free one at a time: passes of one or two sends cost a
        transaction each). If no slot frees for ``delivery_poll_ms`` (a relay that hangs), a
        pass composes a whole batch anyway, as before, and the sends it cannot start wait for
        claim_once.
        """
        s = self.svc.settings
        batch = max(1, s.prepare_batch)
        free = max(0, self._free_slots())
        if self._stopping:
            return 0, 0
        if free >= self._enough_slots() or not (self._inflight or self._reserved):
            self._starved_since = None
            return min(batch, free), min(batch, free)
        now = time.monotonic()
        if self._starved_since is None:
            self._starved_since = now
        if now - self._starved_since < s.delivery_poll_ms / 1000:
            return 0, 0
        return batch, free

    def _enough_slots(self) -> int:
        s = self.svc.settings
        return min(max(1, s.prepare_batch), max(1, s.delivery_concurrency // 2))

    def _take_hints(self, n: int) -> list[uuid.UUID]:
        take = min(n, len(self._hints))
        return [self._hints.popleft() for _ in range(take)]

    async def _prepare(self, locked: set[uuid.UUID], slots: list[int]) -> int:
        s = self.svc.settings
        wait = timedelta(seconds=s.unknown_conversation_wait_s)
        take, reserve = self._prepare_quota()
        if take <= 0:
            return 0
        # Other prepare passes and the claim loop count these slots as taken from here on.
        slots[0] = reserve
        self._reserved += reserve
        async with self.svc.pool.acquire() as conn:
            # The database's due sends when wake() says there may be some no hint names (their
            # conversation arrived, a restart, a hint dropped), at least every poll (sends that
            # waited for their conversation, another process's: hinted sends never starve the
            # others), and again while scans find full batches and no hints are left (a
            # restart's backlog). Else only the hinted ones.
            poll = s.delivery_poll_ms / 1000
            if self._scan_due or time.monotonic() - self._last_scan >= poll:
                self._last_scan = time.monotonic()
                self._scan_due = False
                candidates = await storage.prepare_candidates(conn, take)
                self._scan_due = len(candidates) >= take and not self._hints
                self.counts["prepare_scans"] += 1
            else:
                candidates = self._take_hints(take)
                self.counts["prepare_hinted"] += 1
            if not candidates:
                # A scan that found nothing (the rows locked by another pass) leaves the hints
                # to the next pass at once, not a poll later.
                return 1 if self._hints else 0
            async with conn.transaction():
                rows = await storage.lock_for_prepare(conn, candidates)
                if not rows:
                    return len(candidates)  # taken meanwhile (stale hints): go on
                cmds = {r["send_id"]: MailSend.model_validate(r["command"]) for r in rows}
                boxes, threads = await storage.views_for(
                    conn,
                    (c.mailbox_id for c in cmds.values()),
                    (c.id_conversa for c in cmds.values()),
                )
                files = await storage.attachments(
                    conn, (a for c in cmds.values() for a in c.attachments)
                )
                jobs: list[tuple[Any, Job, bool]] = []
                now = datetime.now(UTC)
                for row in rows:
                    cmd = cmds[row["send_id"]]
                    box, thread = boxes.get(cmd.mailbox_id), threads.get(cmd.id_conversa, [])
                    missing = box is None or (not thread and cmd.conversation is None)
                    if missing and now < row["created_at"] + wait:
                        await storage.postpone(conn, row["send_id"], row["created_at"] + wait)
                        continue
                    mine = {a: files[a] for a in cmd.attachments if a in files}
                    job = Job(cmd, dict(box) if box else None, [dict(m) for m in thread], mine)
                    jobs.append((row, job, missing))
                results = await asyncio.gather(*(self._render(job, now) for _, job, _ in jobs))
                ready = []
                refused = 0
                for (row, _, missing), result in zip(jobs, results, strict=True):
                    if isinstance(result, Refusal):
                        refused += 1
                        detail = result.detail
                        if missing:
                            detail += f" (not seen within {s.unknown_conversation_wait_s:g} s)"
                        await storage.refuse(conn, row, detail)
                        log.info(
                            "send refused", extra={"send_id": str(row["send_id"]), "detail": detail}
                        )
                    else:
                        ready.append((row["send_id"], result))
                # As many as the pass reserved slots for begin their first attempt now, in this
                # transaction (no second UPDATE and claim round trip for them, and their bytes need
                # not come back from the database); the others wait for claim_once as before.
                now_ready = ready[: slots[0]]
                if now_ready:
                    got = await self.locks.run(storage.try_locks, [sid for sid, _ in now_ready])
                    locked |= got
                    self._starting |= got  # recover() leaves these alone (see below)
                started = await storage.mark_sending(
                    conn, [(sid, r) for sid, r in now_ready if sid in locked]
                )
                await storage.mark_ready(conn, [(sid, r) for sid, r in ready if sid not in locked])
        # Committed: the rows are 'sending' under our locks and their attempts give them back;
        # no await before their tasks exist. Until then (the commit and the connection's
        # release are awaits) recover() skips them through _starting, as it skips _inflight.
        self._reserved -= slots[0]
        slots[0] = 0
        missed = locked - {r["send_id"] for r in started}
        self._starting -= locked
        locked.clear()
        self.counts["started_in_prepare"] += len(started)
        self.counts["composed_without_slot"] += len(ready) - len(started)
        rendered = dict(now_ready)
        for record in started:
            row = dict(record)
            r = rendered[row["send_id"]]
            row["mime"], row["sent_message"] = r.mime, r.sent  # not read back: we have them
            self._start(row)
        if len(ready) > len(started):
            self._claim_due = True  # composed without a slot: claim_once takes them
            self._wake.set()
        await self._unlock_many(missed)
        if refused:  # their 'failed' events are outbox rows for the relay
            self.svc.relay.wake()
        return max(len(jobs), 1)

    def _free_slots(self) -> int:
        if self._stopping:
            return 0
        return self.svc.settings.delivery_concurrency - len(self._inflight) - self._reserved

    async def _unlock_many(self, send_ids: set[uuid.UUID]) -> None:
        if send_ids:
            await asyncio.gather(*(self._unlock(sid) for sid in send_ids))

    async def _render(self, job: Job, now: datetime) -> Rendered | Refusal:
        s = self.svc.settings
        if s.render_workers <= 0:
            result = render(job, self.signer, now, s.max_message_bytes)
            await asyncio.sleep(0)  # composing is CPU: let the SMTP sessions breathe
            return result
        if self._workers is None:
            self._workers = ProcessPoolExecutor(
                s.render_workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=workers.init,
                initargs=(self.signer.keys, self.signer.rsa_backend),
            )
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._workers, workers.render_job, job, now, s.max_message_bytes
            )
        except BrokenProcessPool:
            log.error("a render worker died; starting new ones")
            self._workers.shutdown(wait=False, cancel_futures=True)
            self._workers = None
            raise

    # ---- claim and attempt -----------------------------------------------------------------
    async def claim_once(self) -> int:
        free = self._free_slots()
        if free <= 0:
            return 0
        # Cleared before the query: a send composed after it sets the flag again.
        self._claim_due = False
        self._reserved += free  # prepare passes meanwhile must not promise these slots again
        try:
            rows = await self.locks.run(storage.claim, free)
        finally:
            self._reserved -= free
        for row in rows:
            self._start(row)
        self.counts["claimed"] += len(rows)
        if len(rows) >= free:
            self._claim_due = True  # the limit, not the queue, ended it: there may be more
        return len(rows)

    def _start(self, row: Any) -> None:
        """Run the attempt the row was claimed for (its send locked by this process)."""
        task = asyncio.create_task(self.attempt(row), name=f"send-{row['send_id']}")
        self._inflight[row["send_id"]] = task
        task.add_done_callback(functools.partial(self._done, row["send_id"]))

    def _done(self, send_id: uuid.UUID, _task: object = None) -> None:
        self._inflight.pop(send_id, None)
        self._wake.set()
        if self._starved_since is not None and self._free_slots() >= self._enough_slots():
            self._wake_preparers()  # a pass waits for these slots (see _prepare_quota)

    async def attempt(self, row: Any) -> None:
        send_id, n = row["send_id"], row["attempts"]

        async def before_dot() -> None:
            if not await self._dots.submit((send_id, n)):
                raise LostOwnership(f"attempt {n} is no longer current")

        state, outcome = "deferred", "deferred"
        try:
            accepted: Accepted = await self.relay_for(row).deliver(
                row["mail_from"], list(row["recipients"]), bytes(row["mime"]), before_dot
            )
            detail = _one_line(accepted.reply)
            if accepted.refused:
                refused = "; ".join(f"{r}: {_one_line(m)}" for r, m in accepted.refused.items())
                detail += f"; not accepted for {refused}"
            state = outcome = "sent"
        except Rejected as exc:
            detail = _one_line(f"{exc.code} {exc.detail}")
            state = outcome = "failed" if exc.permanent else "deferred"
            if exc.stage != "end of data":
                detail = f"{detail} (at {exc.stage})"
        except TooBig as exc:
            detail, state, outcome = str(exc), "failed", "failed"
        except LostAfterDot as exc:
            detail = f"{exc}; the relay may have it, resending with the same Message-ID"
        except SessionError as exc:
            detail = str(exc)
        except LostOwnership as exc:
            log.warning("attempt lost its row", extra={"send_id": str(send_id), "error": str(exc)})
            await self._unlock(send_id)
            return
        except asyncio.CancelledError:
            raise  # the row stays 'sending' and is recovered by the policy above
        except Exception as exc:
            log.exception("unexpected delivery error", extra={"send_id": str(send_id)})
            detail = f"internal error: {type(exc).__name__}"
        unlocked = False
        try:
            unlocked = await self.finish(row, state, detail, outcome)
        finally:
            if not unlocked:
                await self._unlock(send_id)

    async def _unlock(self, send_id: uuid.UUID) -> None:
        try:
            await self._unlocks.submit(send_id)
        except Exception:
            log.exception("unlock failed", extra={"send_id": str(send_id)})

    async def _write_dots(self, items: list[tuple[uuid.UUID, int]]) -> list[bool]:
        marked = await storage.mark_dots(self.svc.pool, items)
        return [item in marked for item in items]

    async def _write_outcomes(self, items: list[tuple[storage.Outcome, Any]]) -> list[Any]:
        """The outcomes, their events and the unlocks of their sends: one statement, on the lock
        session (``finish_many`` unlocks each send only once its row is updated). The events go
        out on the outbox's direct path once it committed (ADR 0006)."""
        outcomes, events = [o for o, _ in items], [e for _, e in items]

        async def write(conn: Any) -> Any:
            return await storage.finish_many(conn, outcomes, events, unlock=True)

        done, staged = await self.locks.run(write)
        await self.svc.relay.publish(staged)
        return [done.get((o[0], o[1])) for o in outcomes]

    async def _write_unlocks(self, send_ids: list[uuid.UUID]) -> list[None]:
        await self.locks.run(storage.unlock, send_ids)
        return [None] * len(send_ids)

    async def finish(self, row: Any, state: str, detail: str, outcome: str) -> bool:
        """Record the outcome and its event, and give the send's lock back; False when the
        attempt was no longer current (nothing written, the lock not given back)."""
        s = self.svc.settings
        next_at = None
        if state == "deferred":
            now = datetime.now(UTC)
            age = now - row["created_at"]
            deadline = row["created_at"] + timedelta(seconds=s.max_queue_age_s)
            if now >= deadline:
                state = outcome = "failed"
                detail = (
                    f"gave up after {row['attempts']} attempts in {age.total_seconds():.0f} s "
                    f"(max_queue_age_s {s.max_queue_age_s:g}): {detail}"
                )
            else:
                wait = backoff(row["attempts"], s.retry_base_s, s.retry_max_s)
                next_at = min(now + timedelta(seconds=wait), deadline)
        event = storage.outcome_event(row, state, detail, next_at)
        done = await self._outcomes.submit(
            ((row["send_id"], row["attempts"], state, detail, outcome, next_at), event)
        )
        if done is None:
            log.warning(
                "outcome not recorded: attempt no longer current",
                extra={"send_id": str(row["send_id"])},
            )
            return False
        log.info(
            "delivery attempt",
            extra={"send_id": str(row["send_id"]), "attempt": row["attempts"], "state": state},
        )
        return True

    # ---- crash recovery --------------------------------------------------------------------
    async def recover(self) -> int:
        """Apply the policy (module docstring) to rows left in 'sending' by dead processes."""
        orphans = await self.locks.run(
            storage.lock_orphans, list(self._inflight.keys() | self._starting)
        )
        for send_id in orphans:
            try:
                async with self.svc.pool.acquire() as conn, conn.transaction():
                    row = await storage.orphan(conn, send_id)
                    if row is None:
                        continue  # finished by its owner just before we looked
                    n = row["attempts"]
                    if row["smtp_dot_at"] is None:
                        state, outcome = "deferred", "interrupted"
                        detail = f"attempt {n} was interrupted before end of data; retrying"
                    elif self.svc.settings.unconfirmed_policy == "assume_sent":
                        state, outcome, detail = "sent", "unconfirmed", UNCONFIRMED
                    else:
                        state, outcome = "deferred", "interrupted"
                        detail = (
                            f"attempt {n} was interrupted after end of data; resending with the "
                            "same Message-ID (the relay may already have it)"
                        )
                    now = datetime.now(UTC) if state == "deferred" else None
                    await storage.finish(conn, send_id, n, state, detail, outcome, now)
                log.warning(
                    "recovered an orphaned send",
                    extra={"send_id": str(send_id), "attempt": n, "state": state, "detail": detail},
                )
            finally:
                await self._unlock(send_id)
        if orphans:
            self.svc.relay.wake()
            self.wake()
        return len(orphans)
