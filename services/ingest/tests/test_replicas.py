"""Two ingest replicas share a schema and a consumer group: a mailbox change reaches both maps."""

from __future__ import annotations

import asyncio
import uuid

from libs.common import testing
from libs.common.events import Envelope, MailboxChanged
from services.ingest import storage
from services.ingest.service import IngestService, apply_mailbox_change
from services.ingest.tests.conftest import Mx, wait_port


def test_apply_mailbox_change() -> None:
    boxes = {"a@x.test": storage.Mailbox("mb-a", "a@x.test", "A")}
    renamed = apply_mailbox_change(
        boxes, MailboxChanged(mailbox_id="mb-a", address="New@X.test", name="N")
    )
    assert renamed == {"new@x.test": storage.Mailbox("mb-a", "new@x.test", "N")}
    assert boxes == {"a@x.test": storage.Mailbox("mb-a", "a@x.test", "A")}  # a new dict
    gone = apply_mailbox_change(
        renamed, MailboxChanged(mailbox_id="mb-a", address="new@x.test", active=False)
    )
    assert gone == {}
    added = apply_mailbox_change(gone, MailboxChanged(mailbox_id="mb-b", address="b@x.test"))
    assert set(added) == {"b@x.test"}


async def test_a_mailbox_change_reaches_every_replica(mx: Mx) -> None:
    settings = mx.settings.model_copy(
        update={
            "http_port": testing.free_port(),
            "smtp_port": testing.free_port(),
            "lmtp_port": 0,
        }
    )
    second = IngestService(settings)
    task = asyncio.create_task(second.run())
    try:
        await wait_port(settings.smtp_port)
        address = f"new-{uuid.uuid4().hex[:8]}@chatflow.test"
        box_id = f"mb-{uuid.uuid4().hex[:8]}"
        await mx.bus.publish(
            Envelope.of(MailboxChanged(mailbox_id=box_id, address=address), "test")
        )
        for svc in (mx.svc, second):
            await testing.eventually(lambda svc=svc: address in svc.mailboxes, timeout=10)
        # Stored once, by whichever replica's consumer took the entry.
        stored = "SELECT count(*) FROM mailboxes WHERE id = $1 AND active"
        await testing.eventually(lambda: mx.pool.fetchval(stored, box_id), timeout=10)
        assert await mx.pool.fetchval(stored, box_id) == 1
        await mx.bus.publish(
            Envelope.of(MailboxChanged(mailbox_id=box_id, address=address, active=False), "test")
        )
        for svc in (mx.svc, second):
            await testing.eventually(lambda svc=svc: address not in svc.mailboxes, timeout=10)
    finally:
        second.stop_event.set()
        await asyncio.wait_for(task, 30)
