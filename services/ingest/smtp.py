"""The SMTP side of ingest: aiosmtpd keeps the protocol, this handler makes the decisions.

Durability is ours, not aiosmtpd's: ``handle_DATA`` answers 250 only after the raw message, what
we read from it and its ``mail.received`` outbox row are committed in one transaction.
"""

from __future__ import annotations

import logging
import ssl
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from libs.common import outbox
from libs.common.events import Envelope as EventEnvelope
from services.ingest import storage
from services.ingest.domain.mime_reader import Unreadable, read_message
from services.ingest.received import to_event

if TYPE_CHECKING:
    from services.ingest.service import IngestService

log = logging.getLogger("chatflow.ingest.smtp")


def base_address(address: str) -> str:
    """``support+token@x`` is delivered to ``support@x`` (the token is for threading)."""
    local, _, domain = address.strip().lower().rpartition("@")
    return f"{local.split('+', 1)[0]}@{domain}"


class IngestHandler:
    def __init__(self, service: IngestService) -> None:
        self.service = service

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self.service.settings.smtp_max_recipients:
            return "452 4.5.3 Too many recipients"
        if base_address(address) not in self.service.mailboxes:
            log.info("recipient refused", extra={"rcpt": address, "peer": _peer(session)})
            return f"550 5.1.1 <{address}>: no such mailbox here; this server does not relay"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Recipient ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw: bytes = envelope.original_content or b""
        received_at = datetime.now(UTC)
        boxes: dict[str, storage.Mailbox] = {}
        for rcpt in envelope.rcpt_tos:
            box = self.service.mailboxes.get(base_address(rcpt))
            if box:
                boxes.setdefault(box.id, box)
        if not boxes:
            return "554 5.5.1 No valid recipients"
        reason: str | None = None
        read = None
        try:
            read = read_message(raw)
        except Unreadable as exc:
            reason = f"unreadable: {exc}"
        except Exception as exc:  # the reader must never cost us a message
            log.exception("reader crashed; message quarantined")
            reason = f"reader error: {type(exc).__name__}: {exc}"
        peer = _peer(session)
        try:
            ids = await self._store(raw, read, reason, boxes, envelope, received_at, peer)
        except Exception:
            log.exception("could not store message; asking the client to retry")
            return "451 4.3.0 Temporary failure storing the message, try again later"
        self.service.relay.wake()
        log.info(
            "message accepted" if read is not None else "message quarantined",
            extra={
                "ingest_ids": ids,
                "message_id": read.message_id if read is not None else None,
                "size": len(raw),
                "peer": peer,
                "reason": reason,
            },
        )
        return f"250 2.0.0 Ok: queued as {ids[0]}"

    async def _store(
        self,
        raw: bytes,
        read: Any,
        reason: str | None,
        boxes: dict[str, storage.Mailbox],
        envelope: Envelope,
        received_at: datetime,
        peer: str,
    ) -> list[str]:
        ids: list[str] = []
        async with self.service.pool.acquire() as conn, conn.transaction():
            for box in boxes.values():
                msg_id = await storage.insert_message(
                    conn,
                    mailbox_id=box.id,
                    envelope_from=envelope.mail_from or "",
                    rcpt=",".join(envelope.rcpt_tos),
                    raw=raw,
                    status="accepted" if read is not None else "quarantined",
                    reason=reason,
                    message_id=read.message_id if read is not None else None,
                    received_at=received_at,
                    peer=peer,
                )
                ids.append(str(msg_id))
                if read is None:
                    continue
                refs = []
                for part in read.parts:
                    att_id = await storage.insert_attachment(
                        conn,
                        message_id=msg_id,
                        mailbox_id=box.id,
                        data=part.data,
                        filename=part.filename,
                        content_type=part.content_type,
                        content_id=part.content_id,
                        inline=part.inline,
                    )
                    refs.append((str(att_id), part))
                payload = to_event(read, str(msg_id), box, refs, received_at)
                await outbox.add(conn, EventEnvelope.of(payload, producer="ingest"))
        return ids


def _peer(session: Session) -> str:
    return str(session.peer[0]) if session.peer else ""


def smtp_factory(service: IngestService, tls: ssl.SSLContext) -> SMTP:
    s = service.settings
    return SMTP(
        IngestHandler(service),
        hostname=s.smtp_hostname,
        tls_context=tls,
        require_starttls=s.smtp_require_starttls,
        data_size_limit=s.smtp_max_message_bytes,
        enable_SMTPUTF8=True,
        decode_data=False,
        ident="ChatFLOW ingest",
        # An MX takes no logins: don't advertise AUTH at all.
        auth_exclude_mechanism=["LOGIN", "PLAIN"],
    )
