"""Bounces of our sent mail: ``mail.bounced`` marks the send failed and says so in ``mail.status``.

Real PostgreSQL, Redis and relay sink; the last test runs a real ingest on the same streams and
hands it the DSN by SMTP, so the whole way (ingest stores and reads the DSN, announces it, the
sender fails the send) is exercised.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiosmtplib
import asyncpg
import pytest

from libs.common import db, testing, tls
from libs.common.bus import Bus
from libs.common.events import BouncedRecipient, Envelope, MailBounced
from services.ingest.service import IngestService
from services.ingest.settings import IngestSettings
from services.ingest.tests.test_dsn import postfix
from services.sender.bounces import failure_detail, matching_failures
from services.sender.tests.conftest import (
    ADDRESS,
    CUSTOMER,
    MAILBOX,
    Sink,
    final_status,
    publish_conversation,
    publish_mailbox,
    ready,
    running,
    send,
    settings_for,
    statuses,
)


def failed(address: str = CUSTOMER, **kw: Any) -> BouncedRecipient:
    values: dict[str, Any] = {
        "address": address,
        "action": "failed",
        "status": "5.1.1",
        "diagnostic": "550 5.1.1 <zoe@customer.test>: Recipient address rejected: User unknown",
    }
    values.update(kw)
    return BouncedRecipient.model_validate(values)


def bounce(message_id: str, *recipients: BouncedRecipient, mailbox: str = MAILBOX) -> Envelope:
    ev = MailBounced(
        ingest_id=str(uuid.uuid4()),
        mailbox_id=mailbox,
        original_message_id=message_id,
        reporting_mta="mx.customer.test",
        recipients=list(recipients) or [failed()],
        received_at=datetime.now(UTC),
    )
    return Envelope.of(ev, "ingest")


# ---- pure ---------------------------------------------------------------------------------------


def test_failure_detail_names_who_and_what_their_server_said() -> None:
    assert failure_detail([failed()]) == (
        "bounced: zoe@customer.test: 550 5.1.1 <zoe@customer.test>: Recipient address rejected:"
        " User unknown"
    )
    assert failure_detail([failed(diagnostic="mailbox full", status="5.2.2")]) == (
        "bounced: zoe@customer.test: 5.2.2 mailbox full"
    )
    assert failure_detail([failed(diagnostic="", status="")]) == "bounced: zoe@customer.test"
    many = failure_detail([failed(f"a{i}@x.test", diagnostic="", status="5.0.0") for i in range(7)])
    assert many.endswith("a4@x.test: 5.0.0 (and 2 more)")
    assert len(failure_detail([failed(diagnostic="x" * 5000)])) == 1000


def test_only_failed_recipients_we_sent_to_count() -> None:
    rs = [
        failed("Zoe@Customer.test"),
        failed("other@customer.test"),
        failed("ana@customer.test", action="delayed", status="4.4.1"),
    ]
    got = matching_failures(rs, ["zoe@customer.test", "ana@customer.test"])
    assert [r.address for r in got] == ["Zoe@Customer.test"]
    assert matching_failures(rs, []) == []


# ---- the sender ---------------------------------------------------------------------------------


async def sent_one(bus: Bus, pool: asyncpg.Pool) -> tuple[str, str]:
    """Deliver one reply to the sink; its send id and Message-ID."""
    await publish_mailbox(bus)
    conv = await publish_conversation(bus)
    await ready(bus, pool, conv)
    send_id = await send(bus, conv)
    done = await final_status(bus, send_id)
    assert done["status"] == "sent", done
    return send_id, done["message"]["message_id"]


async def test_a_bounce_fails_the_sent_message_once(
    bus: Bus, sender_db: str, sender_pool: asyncpg.Pool, sink: Sink
) -> None:
    async with running(settings_for(sender_db, bus, sink)):
        send_id, mid = await sent_one(bus, sender_pool)
        env = bounce(mid)
        await bus.publish(env)

        async def failed_status() -> list[dict[str, Any]]:
            return [p for p in await statuses(bus, send_id) if p["status"] == "failed"]

        (st,) = await testing.eventually(failed_status, timeout=15)
        assert st["detail"] == (
            "bounced: zoe@customer.test: 550 5.1.1 <zoe@customer.test>: Recipient address "
            "rejected: User unknown"
        )
        assert st["attempt"] == 1 and st["mailbox_id"] == MAILBOX
        assert st["message"]["message_id"] == mid
        row = await sender_pool.fetchrow(
            "SELECT state, detail, bounced_at FROM sends WHERE send_id = $1", uuid.UUID(send_id)
        )
        assert row["state"] == "failed" and row["bounced_at"] is not None
        assert row["detail"] == st["detail"]
        # The same event redelivered, and a second report for the same send: nothing more.
        await bus.publish(env)
        await bus.publish(bounce(mid, failed(diagnostic="again")))
        marker = bounce(f"<{uuid.uuid4().hex}@nowhere.test>")
        await bus.publish(marker)
        await testing.eventually(
            lambda: sender_pool.fetchval(
                "SELECT count(*) FROM processed_events WHERE event_id = $1", marker.id
            ),
            timeout=10,
        )
        await asyncio.sleep(0.3)
        assert [p["status"] for p in await statuses(bus, send_id)] == ["queued", "sent", "failed"]


@pytest.mark.parametrize(
    "case",
    ["not ours", "other mailbox", "delayed", "recipient we never sent to"],
)
async def test_reports_that_must_not_fail_a_send(
    case: str, bus: Bus, sender_db: str, sender_pool: asyncpg.Pool, sink: Sink
) -> None:
    async with running(settings_for(sender_db, bus, sink)):
        send_id, mid = await sent_one(bus, sender_pool)
        env = {
            "not ours": bounce(f"<{uuid.uuid4().hex}@customer.test>"),
            "other mailbox": bounce(mid, mailbox="mb-sales"),
            "delayed": bounce(mid, failed(action="delayed", status="4.4.1")),
            "recipient we never sent to": bounce(mid, failed("someone@else.test")),
        }[case]
        await bus.publish(env)
        # A later event on the same stream shows the first one was handled (entries are in order
        # for the one consumer).
        probe = bounce(f"<{uuid.uuid4().hex}@probe.test>")
        await bus.publish(probe)
        await testing.eventually(
            lambda: sender_pool.fetchval(
                "SELECT count(*) FROM processed_events WHERE event_id = $1", probe.id
            ),
            timeout=10,
        )
        await asyncio.sleep(0.3)
        assert [p["status"] for p in await statuses(bus, send_id)] == ["queued", "sent"]
        state = await sender_pool.fetchval(
            "SELECT state FROM sends WHERE send_id = $1", uuid.UUID(send_id)
        )
        assert state == "sent"


# ---- ingest to sender ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def ingest_for(bus: Bus) -> AsyncIterator[IngestService]:
    """A real ingest on the sender's streams (a database of its own)."""
    name = f"chatflow_t_{testing.new_run_id()}_bounce_ingest"
    url = await testing.create_database(name)
    s = IngestSettings.load(
        database_url=url,
        stream_prefix=bus.prefix,
        http_port=testing.free_port(),
        smtp_port=testing.free_port(),
        outbox_poll_ms=100,
        consumer_block_ms=200,
    )
    assert isinstance(s, IngestSettings)
    await db.migrate(
        s.database_url, s.own_database_url, s.db_role, s.db_schema, IngestService.migrations
    )
    svc = IngestService(s)
    task = asyncio.create_task(svc.run())
    try:
        await testing.eventually(lambda: task.done() or ADDRESS in svc.mailboxes, timeout=15)
        assert not task.done()
        yield svc
    finally:
        svc.stop_event.set()
        await asyncio.wait_for(task, 30)
        await testing.drop_database(name)


async def test_a_dsn_by_smtp_fails_the_send_end_to_end(
    bus: Bus, sender_db: str, sender_pool: asyncpg.Pool, sink: Sink
) -> None:
    async with running(settings_for(sender_db, bus, sink)):
        send_id, mid = await sent_one(bus, sender_pool)  # also publishes the mailbox for ingest
        async with ingest_for(bus) as mx:
            dsn = postfix(mid).replace(b"nobody@customer.test", CUSTOMER.encode())
            ctx = tls.client_context(mx.settings.tls_ca)
            async with aiosmtplib.SMTP(
                hostname="127.0.0.1", port=mx.settings.smtp_port, start_tls=True, tls_context=ctx
            ) as c:
                await c.sendmail("", [ADDRESS], dsn)

            async def failed_status() -> list[dict[str, Any]]:
                return [p for p in await statuses(bus, send_id) if p["status"] == "failed"]

            (st,) = await testing.eventually(failed_status, timeout=20)
        assert st["detail"].startswith(
            "bounced: zoe@customer.test: 550 5.1.1 <zoe@customer.test>: Recipient address rejected"
        )
