"""Rows left in 'sending' (as a crash leaves them) meet the policy of delivery.py; a row whose
owner is alive -- it holds the row's advisory lock -- is left alone however long it takes."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest

from libs.common import testing
from libs.common.bus import Bus
from services.sender.delivery import UNCONFIRMED
from services.sender.settings import SenderSettings
from services.sender.tests.conftest import (
    ADDRESS,
    CUSTOMER,
    MAILBOX,
    Sink,
    final_status,
    running,
    settings_for,
    statuses,
)


async def stuck_row(pool: asyncpg.Pool, *, dot: bool) -> tuple[uuid.UUID, str]:
    """A composed send whose attempt 1 was claimed; ``dot``: its end of data was marked too."""
    send_id = uuid.uuid4()
    mid = f"<{send_id.hex}@chatflow.test>"
    mime = (
        f"From: <{ADDRESS}>\r\nTo: <{CUSTOMER}>\r\nSubject: stuck\r\nMessage-ID: {mid}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
    ).encode()
    await pool.execute(
        """INSERT INTO sends (send_id, user_id, id_conversa, mailbox_id, state, attempts,
                              message_id, mail_from, recipients, mime, command, correlation_id,
                              attempt_started_at, smtp_dot_at)
           VALUES ($1, 'u-agent', 'conv-1', $2, 'sending', 1, $3, $4, $5, $6, '{}', 'corr',
                   now(), CASE WHEN $7 THEN now() END)""",
        send_id,
        MAILBOX,
        mid,
        ADDRESS,
        [CUSTOMER],
        mime,
        dot,
    )
    return send_id, mid


@pytest.mark.parametrize("policy", ["assume_sent", "resend"])
async def test_orphans_follow_the_policy_and_live_owners_are_respected(
    policy: str, bus: Bus, sender_db: str, sender_pool: asyncpg.Pool, sink: Sink
) -> None:
    before_dot, before_mid = await stuck_row(sender_pool, dot=False)
    after_dot, after_mid = await stuck_row(sender_pool, dot=True)
    owned, owned_mid = await stuck_row(sender_pool, dot=False)
    # Another live process owns `owned`: it holds the row's session lock.
    owner = await asyncpg.connect(SenderSettings.load(database_url=sender_db).own_database_url)
    try:
        await owner.execute("SET search_path = sender")
        assert await owner.fetchval("SELECT pg_try_advisory_lock(send_lock_key($1))", owned)
        async with running(settings_for(sender_db, bus, sink, unconfirmed_policy=policy)):
            retried = await final_status(bus, str(before_dot))
            after = await final_status(bus, str(after_dot))
            # Several recovery passes later the owned row is still untouched.
            await testing.eventually(
                lambda: sender_pool.fetchval(
                    "SELECT count(*) FROM attempts WHERE send_id = ANY($1::uuid[])",
                    [before_dot, after_dot],
                ),
                timeout=5,
            )
            await _passes(3)
            assert (
                await sender_pool.fetchval("SELECT state FROM sends WHERE send_id = $1", owned)
                == "sending"
            )
            await owner.execute("SELECT pg_advisory_unlock(send_lock_key($1))", owned)
            released = await final_status(bus, str(owned))
    finally:
        await owner.close()

    counts = sink.count_by_message_id()
    assert retried["status"] == "sent" and counts[before_mid] == 1
    seq = [(p["status"], p["attempt"]) for p in await statuses(bus, str(before_dot))]
    assert seq == [("deferred", 1), ("sent", 2)]
    first: Any = (await statuses(bus, str(before_dot)))[0]
    assert "interrupted before end of data" in first["detail"]
    if policy == "assume_sent":
        assert after["status"] == "sent" and after["detail"] == UNCONFIRMED
        assert after["attempt"] == 1 and counts[after_mid] == 0  # never resent
    else:
        assert after["status"] == "sent" and after["attempt"] == 2 and counts[after_mid] == 1
        note = (await statuses(bus, str(after_dot)))[0]["detail"]
        assert "after end of data; resending with the same Message-ID" in note
    assert released["status"] == "sent" and counts[owned_mid] == 1


async def _passes(n: int) -> None:
    await asyncio.sleep(n * 0.3 + 0.1)  # recover_interval_s in settings_for
