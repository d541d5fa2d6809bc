"""The sender in-process against real PostgreSQL, Redis and an aiosmtpd relay with STARTTLS:
DKIM, relay replies and failures, the connection pool, refusals and duplicate commands."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from unittest import mock

import asyncpg
import dkim
import pytest

from libs.common import testing
from libs.common.bus import Bus
from services.sender.tests.conftest import (
    ADDRESS,
    CUSTOMER,
    MAILBOX,
    DkimKey,
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


async def conversation(bus: Bus, pool: asyncpg.Pool) -> str:
    await publish_mailbox(bus)
    conv = await publish_conversation(bus)
    await ready(bus, pool, conv)
    return conv


def parsed(raw: bytes) -> EmailMessage:
    msg = message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


async def test_dkim_signed_reply_verifies_at_the_relay(
    bus: Bus, sender_db: str, sender_pool: asyncpg.Pool, sink: Sink, dkim_key: DkimKey
) -> None:
    s = settings_for(sender_db, bus, sink, dkim_keys_dir=dkim_key.folder)
    async with running(s):
        conv = await conversation(bus, sender_pool)
        send_id = await send(bus, conv)
        done = await final_status(bus, send_id)
    assert done["status"] == "sent", done
    assert [p["status"] for p in await statuses(bus, send_id)] == ["queued", "sent"]
    (got,) = sink.received
    assert dkim.verify(got.raw, dnsfunc=dkim_key.dns)
    sig = parsed(got.raw)["DKIM-Signature"]
    tags = dict(t.strip().split("=", 1) for t in str(sig).replace(" ", "").split(";") if t)
    assert tags["d"] == "chatflow.test" and tags["s"] == "s2024" and tags["c"] == "relaxed/relaxed"
    assert tags["h"].split(":").count("from") == 2  # oversigned: nobody can add a From
    # A header changed on the way breaks it.
    assert not dkim.verify(
        got.raw.replace(b"Where is my order", b"Where is my money"), dnsfunc=dkim_key.dns
    )
    assert got.mail_from == ADDRESS and got.rcpt_tos == [CUSTOMER]
    assert done["message"]["message_id"] == got.message_id
    assert done["attempt"] == 1 and done["detail"].startswith("250 ")


async def test_unsigned_without_a_key_for_the_domain(
    bus: Bus, sender_db: str, sender_pool: asyncpg.Pool, sink: Sink
) -> None:
    async with running(settings_for(sender_db, bus, sink)):
        conv = await conversation(bus, sender_pool)
        assert (await final_status(bus, await send(bus, conv)))["status"] == "sent"
    assert "DKIM-Signature" not in parsed(sink.received[0].raw)


@pytest.mark.parametrize("sink", [True, False], ids=["pipelining", "one-by-one"], indirect=True)
async def test_451_twice_then_250_delivers_once(
    bus: Bus, sender_db: str, sender_pool: asyncpg.Pool, sink: Sink
) -> None:
    pipelined = sink.handler.pipelining
    sink.handler.data_replies = ["451 4.3.0 Try again later", "451 4.7.1 Greylisted, come back"]
    async with running(settings_for(sender_db, bus, sink)):
        conv = await conversation(bus, sender_pool)
        send_id = await send(bus, conv)
        await final_status(bus, send_id)
    seq = await statuses(bus, send_id)
    assert [(p["status"], p["attempt"]) for p in seq] == [
        ("queued", 0),
        ("deferred", 1),
        ("deferred", 2),
        ("sent", 3),
    ]
    assert "451 4.3.0 Try again later" in seq[1]["detail"]
    assert "451 4.7.1 Greylisted" in seq[2]["detail"]
    assert all(p["next_attempt_at"] for p in seq[1:3])
    assert len(sink.received) == 1 and sink.handler.data_calls == 3
    assert sink.connections == 1  # one pooled connection for all three attempts
    # A relay that offers PIPELINING gets MAIL, RCPT and DATA in one write (RFC 2920).
    grouped = [r for r in sink.reads if r.startswith(b"MAIL FROM:")]
    assert len(grouped) == 3
    assert all(
        (b"\r\nRCPT TO:<" in r and r.endswith(b"\r\nDATA\r\n")) == pipelined for r in grouped
    )
    outcomes = await sender_pool.fetch(
        "SELECT attempt, outcome FROM attempts WHERE send_id = $1 ORDER BY attempt",
        uuid.UUID(send_id),
    )
    assert [(r["attempt"], r["outcome"]) for r in outcomes] == [
        (1, "deferred"),
        (2, "deferred"),
        (3, "sent"),
    ]


@pytest.mark.parametrize("sink", [True, False], ids=["pipelining", "one-by-one"], indirect=True)
async def test_5xx_fails_at_once_with_the_reply_text(
    bus: Bus, sender_db: str, sender_pool: asyncpg.Pool, sink: Sink
) -> None:
    sink.handler.data_replies = ["550 5.7.1 Message rejected: looks like spam"]
    sink.handler.rcpt_replies = {"nobody@customer.test": "550 5.1.1 No such user here"}
    async with running(settings_for(sender_db, bus, sink)):
        conv = await conversation(bus, sender_pool)
        at_data = await send(bus, conv)
        at_data_done = await final_status(bus, at_data)
        at_rcpt = await send(bus, conv, to=[{"address": "nobody@customer.test"}])
        at_rcpt_done = await final_status(bus, at_rcpt)
        partly = await send(
            bus, conv, to=[{"address": CUSTOMER}, {"address": "nobody@customer.test"}]
        )
        partly_done = await final_status(bus, partly)
    assert at_data_done["status"] == "failed"
    assert at_data_done["detail"] == "550 5.7.1 Message rejected: looks like spam"
    assert [p["status"] for p in await statuses(bus, at_data)] == ["queued", "failed"]
    assert at_rcpt_done["status"] == "failed"
    assert "nobody@customer.test: 550 5.1.1 No such user here" in at_rcpt_done["detail"]
    # Some recipients refused, others not: sent to those, the refusals reported with it.
    assert partly_done["status"] == "sent"
    assert (
        "not accepted for nobody@customer.test: 550 5.1.1 No such user here"
        in partly_done["detail"]
    )
    assert [r.rcpt_tos for r in sink.received] == [[CUSTOMER]]
    assert sink.handler.data_calls == 2


async def test_a_message_over_the_relays_size_limit_fails(
    bus: Bus, sender_db: str, sender_pool: asyncpg.Pool
) -> None:
    sink = await Sink(data_size_limit=2000).start()
    try:
        async with running(settings_for(sender_db, bus, sink)):
            conv = await conversation(bus, sender_pool)
            done = await final_status(
                bus, await send(bus, conv, html="<p>" + "word " * 600 + "</p>")
            )
    finally:
        await sink.stop()
    assert done["status"] == "failed" and "accepts at most 2000" in done["detail"]
    assert sink.handler.data_calls == 0


async def test_relay_down_at_first_gets_the_message_when_it_comes_up(
    bus: Bus, sender_db: str, sender_pool: asyncpg.Pool
) -> None:
    sink = Sink()  # its port stays closed for now
    async with running(settings_for(sender_db, bus, sink)):
        conv = await conversation(bus, sender_pool)
        send_id = await send(bus, conv)

        async def deferred() -> bool:
            return any(p["status"] == "deferred" for p in await statuses(bus, send_id))

        await testing.eventually(deferred, timeout=10)
        await sink.start()
        try:
            done = await final_status(bus, send_id)
        finally:
            await sink.stop()
    first = next(p for p in await statuses(bus, send_id) if p["status"] == "deferred")
    assert "connection to 127.0.0.1:" in first["detail"] and first["next_attempt_at"]
    assert done["status"] == "sent" and len(sink.received) == 1


async def test_connections_are_pooled_and_bounded_per_relay(
    bus: Bus, sender_db: str, sender_pool: asyncpg.Pool, sink: Sink
) -> None:
    sink.handler.delay_s = 0.15
    async with running(settings_for(sender_db, bus, sink, relay_max_connections=2)):
        conv = await conversation(bus, sender_pool)
        ids = [await send(bus, conv) for _ in range(8)]
        done = [await final_status(bus, i) for i in ids]
    assert {d["status"] for d in done} == {"sent"}
    assert len(sink.received) == 8
    assert sink.handler.max_active == 2  # in parallel, but never more than the bound
    assert sink.connections == 2  # and the same two connections carried all eight


@pytest.mark.parametrize("sink", [True, False], ids=["pipelining", "one-by-one"], indirect=True)
async def test_a_connection_the_relay_closed_is_replaced_without_a_deferral(
    bus: Bus, sender_db: str, sender_pool: asyncpg.Pool, sink: Sink
) -> None:
    async with running(settings_for(sender_db, bus, sink)):
        conv = await conversation(bus, sender_pool)
        assert (await final_status(bus, await send(bus, conv)))["status"] == "sent"
        sink.drop_connections()  # the relay restarted, or timed the idle connection out
        await asyncio.sleep(0.1)
        second = await send(bus, conv)
        second_done = await final_status(bus, second)
        # A relay going down answers the next MAIL on the pooled connection with 421.
        sink.handler.mail_replies = ["421 4.3.2 Shutting down, try another connection"]
        third = await send(bus, conv)
        third_done = await final_status(bus, third)
    for sid, done in ((second, second_done), (third, third_done)):
        assert done["status"] == "sent" and done["attempt"] == 1
        assert [p["status"] for p in await statuses(bus, sid)] == ["queued", "sent"]
    assert sink.connections == 3 and len(sink.received) == 3


async def test_retries_stop_at_max_queue_age(
    bus: Bus, sender_db: str, sender_pool: asyncpg.Pool, sink: Sink
) -> None:
    sink.handler.data_replies = ["451 4.3.2 System not accepting network messages"] * 50
    async with running(settings_for(sender_db, bus, sink, max_queue_age_s=1.0)):
        conv = await conversation(bus, sender_pool)
        send_id = await send(bus, conv)
        done = await final_status(bus, send_id)
    assert done["status"] == "failed"
    assert done["detail"].startswith(f"gave up after {done['attempt']} attempts")
    assert "451 4.3.2 System not accepting network messages" in done["detail"]
    assert done["attempt"] >= 2 and sink.received == []


async def test_unsendable_commands_fail_with_a_clear_detail(
    bus: Bus, sender_db: str, sender_pool: asyncpg.Pool, sink: Sink
) -> None:
    async with running(settings_for(sender_db, bus, sink, max_message_bytes=40_000)):
        conv = await conversation(bus, sender_pool)
        cases = {
            await send(bus, str(uuid.uuid4())): "unknown conversation",
            await send(
                bus, conv, attachments=["att-missing"]
            ): "attachment 'att-missing' not found",
            await send(bus, conv, to=[]): "no recipients",
            await send(
                bus, conv, to=[{"name": "Zoë\r\nBcc: victim@evil.test", "address": CUSTOMER}]
            ): "invalid message: To name: CR, LF or NUL in header value",
            await send(bus, conv, subject="Hello\r\nBcc: victim@evil.test"): (
                "invalid message: Subject: CR, LF or NUL in header value"
            ),
            await send(
                bus, conv, html="<p>" + "x" * 60_000 + "</p>"
            ): "over the limit of 40000 bytes",
            await send(bus, conv, send_id="not-a-uuid"): "send_id 'not-a-uuid' is not a UUID",
        }
        done = {sid: await final_status(bus, sid) for sid in cases}
    for sid, expected in cases.items():
        assert done[sid]["status"] == "failed", done[sid]
        assert expected in done[sid]["detail"], (expected, done[sid]["detail"])
    unknown = next(s for s, e in cases.items() if e == "unknown conversation")
    assert "(not seen within 0.6 s)" in done[unknown]["detail"]
    assert sink.received == [] and sink.connections == 0


async def test_a_conversation_arriving_late_is_waited_for(
    bus: Bus, sender_db: str, sender_pool: asyncpg.Pool, sink: Sink
) -> None:
    """It goes when its conversation arrives, not when the wait runs out."""
    async with running(settings_for(sender_db, bus, sink, unknown_conversation_wait_s=8.0)):
        conv = str(uuid.uuid4())
        early = await send(bus, conv)
        postponed = "SELECT next_attempt_at > now() FROM sends WHERE send_id = $1::uuid"
        for _ in range(100):  # until prepare has seen it and put it off
            if await sender_pool.fetchval(postponed, early):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the send was never postponed")
        await publish_mailbox(bus)
        await publish_conversation(bus, conv=conv)
        arrived = time.monotonic()
        done = await final_status(bus, early)
        took = time.monotonic() - arrived
    assert done["status"] == "sent"
    assert took < 4.0, f"sent {took:.1f} s after its conversation arrived (the wait is 8 s)"


async def test_same_send_id_or_client_id_sends_once(
    bus: Bus, sender_db: str, sender_pool: asyncpg.Pool, sink: Sink
) -> None:
    async with running(settings_for(sender_db, bus, sink)):
        conv = await conversation(bus, sender_pool)
        once = await send(bus, conv)
        await send(bus, conv, send_id=once)  # a second envelope, the same command
        first = await send(bus, conv, client_id="c-1")
        repeat = await send(bus, conv, client_id="c-1")  # a client's retry: new send_id
        other_user = await send(bus, conv, client_id="c-1", user_id="u-other")
        for sid in (once, first, other_user):
            assert (await final_status(bus, sid))["status"] == "sent"
        await asyncio.sleep(0.5)
    assert sorted(sink.count_by_message_id().values()) == [1, 1, 1]
    assert [p["status"] for p in await statuses(bus, once)] == ["queued", "sent"]
    assert await statuses(bus, repeat) == []
    assert await sender_pool.fetchval("SELECT count(*) FROM sends") == 3


async def test_a_client_id_reused_for_another_conversation_fails_with_the_reason(
    bus: Bus, sender_db: str, sender_pool: asyncpg.Pool, sink: Sink
) -> None:
    """A retry (same conversation, new send_id) is still one send, in silence; the same
    client_id on another conversation is another request: failed, saying why, never dropped
    unseen (found by a trial: a reply answered 202 that nothing ever sent)."""
    async with running(settings_for(sender_db, bus, sink)):
        a, b = await conversation(bus, sender_pool), await conversation(bus, sender_pool)
        first = await send(bus, a, client_id="c-7")
        assert (await final_status(bus, first))["status"] == "sent"
        retry = await send(bus, a, client_id="c-7")
        elsewhere = await send(bus, b, client_id="c-7")
        refused = await final_status(bus, elsewhere)
        assert refused["status"] == "failed"
        assert "already used by a send to another conversation" in refused["detail"]
        await asyncio.sleep(0.5)
    assert await statuses(bus, retry) == []
    assert sorted(sink.count_by_message_id().values()) == [1]
    assert await sender_pool.fetchval("SELECT count(*) FROM sends") == 1


async def test_an_attachment_by_id_is_sent(
    bus: Bus, sender_db: str, sender_pool: asyncpg.Pool, sink: Sink
) -> None:
    data = bytes(range(256)) * 4
    await sender_pool.execute(
        """INSERT INTO attachments (id, mailbox_id, filename, content_type, data)
           VALUES ('att-1', $1, 'fatura março.pdf', 'application/pdf', $2)""",
        MAILBOX,
        data,
    )
    async with running(settings_for(sender_db, bus, sink)):
        conv = await conversation(bus, sender_pool)
        assert (await final_status(bus, await send(bus, conv, attachments=["att-1"])))[
            "status"
        ] == "sent"
    (part,) = list(parsed(sink.received[0].raw).iter_attachments())
    assert part.get_filename() == "fatura março.pdf" and part.get_content() == data


@contextlib.contextmanager
def counting_claims() -> Iterator[list[uuid.UUID]]:
    """The send ids ``storage.claim`` hands out while the block runs."""
    from services.sender import storage

    claimed: list[uuid.UUID] = []
    real_claim = storage.claim

    async def counting_claim(conn: asyncpg.Connection, limit: int) -> list[asyncpg.Record]:
        rows = await real_claim(conn, limit)
        claimed.extend(r["send_id"] for r in rows)
        return rows

    with mock.patch.object(storage, "claim", counting_claim):
        yield claimed


async def test_a_send_composed_with_a_free_slot_begins_in_its_prepare_transaction(
    bus: Bus, sender_db: str, sender_pool: asyncpg.Pool, sink: Sink
) -> None:
    """No separate claim for it; with every slot taken the others wait for the claim, and each
    is sent once either way."""
    with counting_claims() as claimed:
        async with running(settings_for(sender_db, bus, sink)):
            conv = await conversation(bus, sender_pool)
            first = await send(bus, conv)
            assert (await final_status(bus, first))["status"] == "sent"
        assert claimed == []
        sink.handler.delay_s = 0.1
        settings = settings_for(sender_db, bus, sink, delivery_concurrency=1)
        async with running(settings):
            ids = [await send(bus, conv) for _ in range(4)]
            done = [await final_status(bus, i) for i in ids]
    assert [d["status"] for d in done] == ["sent"] * 4
    assert claimed and set(claimed) <= {uuid.UUID(i) for i in ids}
    assert sink.handler.max_active == 1
    assert list(sink.count_by_message_id().values()) == [1] * 5
    attempts = await sender_pool.fetch("SELECT send_id, attempt, outcome FROM attempts")
    assert sorted(r["attempt"] for r in attempts) == [1] * 5
    locks = await sender_pool.fetchval(
        """SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"""
    )
    assert locks == 0


async def test_commands_read_together_are_stored_and_acked_together(
    bus: Bus, sender_db: str, sender_pool: asyncpg.Pool, sink: Sink
) -> None:
    from redis.asyncio import Redis

    acks: list[tuple[str, int]] = []
    real_xack = Redis.xack

    async def counting_xack(self: Redis, name: str, groupname: str, *ids: str) -> int:
        if name.endswith("mail.send"):
            acks.append((groupname, len(ids)))
        return await real_xack(self, name, groupname, *ids)

    await publish_mailbox(bus)
    conv = await publish_conversation(bus)
    ids = [await send(bus, conv) for _ in range(12)]  # waiting in the stream before we start
    with mock.patch.object(Redis, "xack", counting_xack):
        async with running(settings_for(sender_db, bus, sink)):
            done = [await final_status(bus, i) for i in ids]
    assert [d["status"] for d in done] == ["sent"] * 12
    mine = [n for group, n in acks if group == "sender"]
    assert sum(mine) == 12 and len(mine) < 12


async def test_a_prepare_pass_takes_only_as_many_commands_as_there_are_free_slots(
    bus: Bus, sender_db: str, sender_pool: asyncpg.Pool, sink: Sink
) -> None:
    """Each command is composed when a slot is free for it, so it begins its attempt in its
    prepare transaction: none is stored, claimed and read back (three statements instead of one)."""
    sink.handler.delay_s = 0.05
    await publish_mailbox(bus)
    conv = await publish_conversation(bus)
    ids = [await send(bus, conv) for _ in range(12)]  # waiting in the stream before we start
    # A long poll: no pass composes ahead of the slots because none freed for a poll.
    s = settings_for(
        sender_db, bus, sink, delivery_concurrency=2, prepare_batch=5, delivery_poll_ms=3000
    )
    with counting_claims() as claimed:
        async with running(s) as svc:
            done = [await final_status(bus, i) for i in ids]
            counts = dict(svc.delivery.counts)
    assert [d["status"] for d in done] == ["sent"] * 12
    assert claimed == []
    assert counts.get("composed_without_slot", 0) == 0 and counts["started_in_prepare"] == 12
    assert sink.handler.max_active <= 2
    assert list(sink.count_by_message_id().values()) == [1] * 12


async def test_commands_still_compose_while_a_slow_relay_holds_every_slot(
    bus: Bus, sender_db: str, sender_pool: asyncpg.Pool, sink: Sink
) -> None:
    """A pass that found no free slot for a poll composes anyway (a refusal or a missing
    conversation is not held up behind the relay); the send waits for the claim."""
    sink.handler.delay_s = 3.0
    async with running(settings_for(sender_db, bus, sink, delivery_concurrency=1)):
        conv = await conversation(bus, sender_pool)
        first = await send(bus, conv)

        async def sending() -> bool:
            state = await sender_pool.fetchval(
                "SELECT state FROM sends WHERE send_id = $1", uuid.UUID(first)
            )
            return bool(state == "sending")

        await testing.eventually(sending, timeout=10)
        second = await send(bus, conv)
        unknown = await send(bus, "no-such-conversation")

        async def composed() -> bool:
            return bool(
                await sender_pool.fetchval(
                    "SELECT mime IS NOT NULL FROM sends WHERE send_id = $1", uuid.UUID(second)
                )
            )

        await testing.eventually(composed, timeout=10)
        assert await sending()  # the first send still holds the slot
        failed = await final_status(bus, unknown)
        assert await sending()
        done = [await final_status(bus, i) for i in (first, second)]
    assert failed["status"] == "failed" and "unknown conversation" in failed["detail"]
    assert [d["status"] for d in done] == ["sent", "sent"]
    assert list(sink.count_by_message_id().values()) == [1, 1]


async def test_queued_commands_are_prepared_by_key_without_scanning_the_queue(
    bus: Bus, sender_db: str, sender_pool: asyncpg.Pool, sink: Sink
) -> None:
    """The commands this process queued are handed to its prepare passes by id; the scan of
    the queue (prepare_candidates) is for the others (a restart, a late conversation)."""
    from services.sender import storage

    scans: list[int] = []
    real_scan = storage.prepare_candidates

    async def counting_scan(conn: asyncpg.Connection, limit: int) -> list[uuid.UUID]:
        found = await real_scan(conn, limit)
        scans.append(len(found))
        return found

    with mock.patch.object(storage, "prepare_candidates", counting_scan):
        async with running(settings_for(sender_db, bus, sink, delivery_poll_ms=5000)):
            conv = await conversation(bus, sender_pool)
            ids = [await send(bus, conv) for _ in range(6)]
            done = [await final_status(bus, i) for i in ids]
    assert [d["status"] for d in done] == ["sent"] * 6
    assert sum(scans) == 0 and len(scans) <= 2  # the first pass's, on an empty queue


async def test_a_poll_scan_in_a_backlog_does_not_turn_every_later_pass_into_a_scan(
    bus: Bus, sender_db: str, sender_pool: asyncpg.Pool, sink: Sink
) -> None:
    """The scan of each poll finds a full batch of sends that are hinted too; the passes after
    it go on with the hints, and the next scan waits for the next poll (a first version kept
    scanning, pass after pass, while scans came back full)."""
    from services.sender import storage

    scanned_at: list[float] = []
    real_scan = storage.prepare_candidates

    async def timed_scan(conn: asyncpg.Connection, limit: int) -> list[uuid.UUID]:
        scanned_at.append(time.monotonic())
        return await real_scan(conn, limit)

    sink.handler.delay_s = 0.03
    await publish_mailbox(bus)
    conv = await publish_conversation(bus)
    ids = [await send(bus, conv) for _ in range(40)]
    s = settings_for(sender_db, bus, sink, delivery_concurrency=2, delivery_poll_ms=200)
    with mock.patch.object(storage, "prepare_candidates", timed_scan):
        async with running(s) as svc:
            done = [await final_status(bus, i) for i in ids]
            counts = dict(svc.delivery.counts)
    assert [d["status"] for d in done] == ["sent"] * 40
    assert counts["prepare_hinted"] > 0, counts
    # After the first few (the start, while the commands are being queued), a poll apart.
    gaps = [b - a for a, b in itertools.pairwise(scanned_at[3:])]
    assert all(gap >= 0.15 for gap in gaps), (gaps, counts)


async def test_outcome_events_go_out_directly_without_a_relay_pass(
    bus: Bus, sender_db: str, sender_pool: asyncpg.Pool, sink: Sink
) -> None:
    """``sent`` is published by the attempt once its outcome committed (ADR 0006): no relay pass
    reads the event back, and its outbox row is deleted after."""
    from libs.common.outbox import OutboxRelay

    passes: list[int] = []
    real_pass = OutboxRelay.publish_once

    async def counting_pass(self: OutboxRelay, limit: int = 500) -> int:
        n = await real_pass(self, limit)
        passes.append(n)
        return n

    with mock.patch.object(OutboxRelay, "publish_once", counting_pass):
        async with running(settings_for(sender_db, bus, sink, outbox_poll_ms=60_000)):
            conv = await conversation(bus, sender_pool)
            ids = [await send(bus, conv) for _ in range(3)]
            done = [await final_status(bus, i, timeout=10) for i in ids]
            await testing.eventually(
                lambda: sender_pool.fetchval("SELECT count(*) = 0 FROM outbox"), timeout=5
            )
    assert [d["status"] for d in done] == ["sent"] * 3
    # The relay's passes (at start, at stop: one per turn while it deletes what was published
    # directly) found nothing to publish; there was no pass per outcome.
    assert sum(passes) == 0


async def test_a_scan_that_finds_nothing_leaves_the_hints_to_the_next_pass_at_once(
    bus: Bus, sender_db: str, sender_pool: asyncpg.Pool, sink: Sink
) -> None:
    """A poll's scan can find nothing while hints wait (their rows locked by another pass):
    the prepare loop goes on with them at once instead of waiting a poll."""
    from services.sender.service import SenderService

    svc = SenderService(settings_for(sender_db, bus, sink, delivery_poll_ms=10_000))
    svc.pool = sender_pool
    d = svc.delivery
    d.hint([uuid.uuid4()])  # no row: as a hint whose row another pass took
    assert await d.prepare_once() == 1  # the scan (due at start) found nothing; hints wait
    assert await d.prepare_once() == 1  # the hint, tried and found taken: go on
    assert await d.prepare_once() == 0  # nothing left: wait
    assert d.counts["prepare_scans"] == 1 and d.counts["prepare_hinted"] == 2
