"""Exactly once across real crashes: ``python -m services.sender run`` is SIGKILLed before, during
and right after the SMTP transaction, then started again; the relay counts each Message-ID once.

(a) killed while the relay holds MAIL: no end of data yet, so the restart resends it.
(b) killed while the relay, which has stored the message, has not answered the final '.'.
(c) killed after the relay answered 250 but before the outcome was committed: the test holds the
    row lock, so the process is caught exactly inside the outcome transaction.
In (b) and (c) the restart must not resend: the row becomes ``sent``, "unconfirmed".
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
from aiosmtpd.smtp import Envelope

from libs.common import testing
from libs.common.bus import Bus
from services.sender.delivery import UNCONFIRMED
from services.sender.settings import SenderSettings
from services.sender.tests.conftest import (
    DkimKey,
    Sink,
    final_status,
    publish_conversation,
    publish_mailbox,
    ready,
    send,
    statuses,
)


class Sender:
    """The sender as a separate process (what production runs)."""

    def __init__(self, database_url: str, bus: Bus, sink: Sink, dkim: DkimKey, log: Path) -> None:
        self.port = testing.free_port()
        self.env = testing.service_env(
            database_url,
            bus.prefix,
            CHATFLOW_SENDER_HTTP_PORT=str(self.port),
            CHATFLOW_SENDER_RELAY_PORT=str(sink.port),
            CHATFLOW_SENDER_RETRY_BASE_S="0.2",
            CHATFLOW_SENDER_RETRY_MAX_S="0.4",
            CHATFLOW_SENDER_RECOVER_INTERVAL_S="0.3",
            CHATFLOW_SENDER_DELIVERY_POLL_MS="100",
            CHATFLOW_SENDER_DKIM_KEYS_DIR=str(dkim.folder),
            CHATFLOW_OUTBOX_POLL_MS="50",
            CHATFLOW_CONSUMER_BLOCK_MS="200",
        )
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.proc = testing.start_python(["services.sender", "run"], self.env, self.log)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sender exited: {self.log.read_text()[-3000:]}")
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    async def stop(self) -> None:
        """SIGTERM, waiting without blocking the loop (the relay in this process must answer)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        deadline = time.monotonic() + 15
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.asynccontextmanager
async def sender(
    database_url: str, bus: Bus, sink: Sink, dkim: DkimKey, tmp_path: Path
) -> AsyncIterator[Sender]:
    s = Sender(database_url, bus, sink, dkim, tmp_path / "sender.log")
    try:
        yield s
    finally:
        await s.stop()


def blocker() -> tuple[asyncio.Event, Callable[[Envelope], Awaitable[None]]]:
    """A relay hook that signals it was reached, then holds the session until it is dropped."""
    reached = asyncio.Event()

    async def hold(envelope: Envelope) -> None:
        reached.set()
        await asyncio.Event().wait()  # cancelled by aiosmtpd when the client goes away

    return reached, hold


async def row(pool: asyncpg.Pool, send_id: str) -> Any:
    return await pool.fetchrow(
        "SELECT state, attempts, smtp_dot_at FROM sends WHERE send_id = $1", uuid.UUID(send_id)
    )


async def first_send(bus: Bus, pool: asyncpg.Pool) -> str:
    await publish_mailbox(bus)
    conv = await publish_conversation(bus)
    await ready(bus, pool, conv)
    return await send(bus, conv)


async def settled(sink: Sink, seconds: float = 1.0) -> None:
    """Give a wrong resend time to happen (several recovery passes and retries)."""
    await asyncio.sleep(seconds)


async def test_killed_before_end_of_data_resends_once(
    bus: Bus,
    sender_db: str,
    sender_pool: asyncpg.Pool,
    sink: Sink,
    dkim_key: DkimKey,
    tmp_path: Path,
) -> None:
    reached, hold = blocker()
    sink.handler.on_mail = hold
    async with sender(sender_db, bus, sink, dkim_key, tmp_path) as proc:
        await proc.start()
        send_id = await first_send(bus, sender_pool)
        await asyncio.wait_for(reached.wait(), 15)
        before = await row(sender_pool, send_id)
        assert (before["state"], before["attempts"], before["smtp_dot_at"]) == ("sending", 1, None)
        proc.kill()
        await proc.start()
        done = await final_status(bus, send_id)
        await settled(sink)
    assert done["status"] == "sent" and done["attempt"] == 2
    assert list(sink.count_by_message_id().values()) == [1]
    seq = await statuses(bus, send_id)
    assert [p["status"] for p in seq] == ["queued", "deferred", "sent"]
    assert "interrupted before end of data" in seq[1]["detail"]


async def test_killed_while_the_relay_holds_the_final_dot_is_not_resent(
    bus: Bus,
    sender_db: str,
    sender_pool: asyncpg.Pool,
    sink: Sink,
    dkim_key: DkimKey,
    tmp_path: Path,
) -> None:
    reached, hold = blocker()
    sink.handler.before_reply = hold  # stored, then no answer to the '.'
    async with sender(sender_db, bus, sink, dkim_key, tmp_path) as proc:
        await proc.start()
        send_id = await first_send(bus, sender_pool)
        await asyncio.wait_for(reached.wait(), 15)
        before = await row(sender_pool, send_id)
        assert before["state"] == "sending" and before["smtp_dot_at"] is not None
        proc.kill()
        await proc.start()
        done = await final_status(bus, send_id)
        await settled(sink)
    assert done["status"] == "sent" and done["detail"] == UNCONFIRMED
    assert done["message"]["message_id"] == sink.received[0].message_id
    assert list(sink.count_by_message_id().values()) == [1]
    assert [p["status"] for p in await statuses(bus, send_id)] == ["queued", "sent"]


async def test_killed_after_the_250_before_recording_it_is_not_resent(
    bus: Bus,
    sender_db: str,
    sender_pool: asyncpg.Pool,
    sink: Sink,
    dkim_key: DkimKey,
    tmp_path: Path,
) -> None:
    locker = await asyncpg.connect(SenderSettings.load(database_url=sender_db).own_database_url)
    await locker.execute("SET search_path = sender")
    holding = locker.transaction()

    async def lock_the_row(envelope: Envelope) -> None:
        await holding.start()
        mid = sink.received[-1].message_id
        await locker.execute("SELECT 1 FROM sends WHERE message_id = $1 FOR UPDATE", mid)

    sink.handler.before_reply = lock_the_row  # then the relay answers 250
    try:
        async with sender(sender_db, bus, sink, dkim_key, tmp_path) as proc:
            await proc.start()
            send_id = await first_send(bus, sender_pool)
            # The process got the 250 and now waits for the row inside its outcome transaction.
            locker_pid = locker.get_server_pid()
            await testing.eventually(
                lambda: sender_pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                    locker_pid,
                ),
                timeout=15,
            )
            proc.kill()
            # The outcome is one statement (no COMMIT of ours to wait for): a backend whose
            # client died still finishes the statement it was given, and commits it, once the
            # row is free. A process killed *before* its outcome reached the database is this
            # backend gone too.
            await sender_pool.execute(
                """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                   WHERE $1 = ANY(pg_blocking_pids(pid))""",
                locker_pid,
            )
            await holding.rollback()
            assert (await row(sender_pool, send_id))["state"] == "sending"
            await proc.start()
            done = await final_status(bus, send_id)
            await settled(sink)
    finally:
        await locker.close()
    assert done["status"] == "sent" and done["detail"] == UNCONFIRMED
    assert list(sink.count_by_message_id().values()) == [1]
    assert [p["status"] for p in await statuses(bus, send_id)] == ["queued", "sent"]
