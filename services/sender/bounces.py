"""A bounce for one of our sent messages marks that send failed and tells the agent.

Ingest publishes ``mail.bounced`` for a stored DSN that names an original Message-ID. Ours carry
the send id (``<hex.TOKEN@domain>``, see ``domain/render.py``) and are stored in
``sends.message_id``. A send moves from ``sent`` to ``failed`` when all of these hold:

- the Message-ID is that of one of our sends, already ``sent`` (a DSN for anything else,
  or a second DSN for the same send, changes nothing);
- the bounce came to the mailbox the send left from (our MAIL FROM is that mailbox's address,
  so that is where a real DSN goes);
- at least one recipient the report says ``failed`` is one we sent it to. A ``delayed``
  report, one that lists no recipients, or one for recipients we never addressed does not mark
  anything: Message-IDs are not secret, and a forged report must not fail a good delivery.

The change and its ``mail.status`` (``failed``, the DSN's status and diagnostic in ``detail``)
commit in one transaction with the inbox record of the event (``inbox.first_time``); the
notifier pushes it to the agent as ``send.status`` failed. The send keeps its attempt number:
it is the outcome of that same delivery, learned later. The event carries the sent message
(``message``, as ``sent`` did), so the threader can find it by its Message-ID.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from libs.common import inbox, outbox
from libs.common.bus import Handler
from libs.common.events import BouncedRecipient, Envelope, MailBounced
from services.sender import storage

if TYPE_CHECKING:
    from services.sender.service import SenderService

CONSUMER = "sender-bounces"
log = logging.getLogger("chatflow.sender.bounces")


def failure_detail(failed: list[BouncedRecipient]) -> str:
    """One line for the agent: who bounced and what their server said."""
    parts = []
    for r in failed[:5]:
        if r.diagnostic and (not r.status or r.status in r.diagnostic):
            said = r.diagnostic
        else:
            said = " ".join(x for x in (r.status, r.diagnostic) if x)
        parts.append(f"{r.address}: {said}" if said else r.address)
    more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
    return ("bounced: " + "; ".join(parts) + more)[:1000]


def matching_failures(
    recipients: list[BouncedRecipient], sent_to: list[str]
) -> list[BouncedRecipient]:
    ours = {a.lower() for a in sent_to}
    return [r for r in recipients if r.action == "failed" and r.address.lower() in ours]


def handler(svc: SenderService) -> Handler:
    async def on_bounced(env: Envelope, entry_id: str) -> None:
        ev = env.payload_as(MailBounced)
        if not any(r.action == "failed" for r in ev.recipients):
            return  # delayed / delivered / nothing named: no state to change, nothing to record
        async with svc.pool.acquire() as conn, conn.transaction():
            if not await inbox.first_time(conn, CONSUMER, env.id):
                return
            row = await conn.fetchrow(
                f"""SELECT {storage.SEND_COLUMNS} FROM sends
                    WHERE message_id = $1 AND mailbox_id = $2 AND state = 'sent'
                    FOR UPDATE""",
                ev.original_message_id,
                ev.mailbox_id,
            )
            if row is None:
                return
            failed = matching_failures(ev.recipients, list(row["recipients"]))
            if not failed:
                log.info(
                    "bounce names recipients we did not send to; ignored",
                    extra={"send_id": str(row["send_id"]), "ingest_id": ev.ingest_id},
                )
                return
            detail = failure_detail(failed)
            updated = await conn.fetchrow(
                f"""UPDATE sends SET state = 'failed', detail = $2, bounced_at = now(),
                        updated_at = now()
                    WHERE send_id = $1 AND state = 'sent' RETURNING {storage.SEND_COLUMNS}""",
                row["send_id"],
                detail,
            )
            if updated is None:
                return
            # With the sent message, so a consumer can find it by its Message-ID.
            event = storage.status_event(
                updated, "failed", detail, message=storage.sent_message(updated)
            )
            await outbox.add(conn, event)
        log.info(
            "send bounced",
            extra={"send_id": str(row["send_id"]), "ingest_id": ev.ingest_id, "detail": detail},
        )
        svc.relay.wake()

    return on_bounced
