"""LMTP (RFC 2033), for a Postfix (or any MTA) in front of ingest: ``lmtp_port``, 0 = off.

Same checks and storage as SMTP, with the one difference LMTP exists for: after DATA there is a
reply per accepted recipient, in RCPT order. Each mailbox is committed in its own transaction,
so one mailbox failing (451) does not make the MTA redeliver to the others, and a redelivery to
a mailbox that already has the message is answered 250 without storing it again.

The listener offers STARTTLS like every other one. aiosmtpd's own ``require_starttls`` would also
refuse ``LHLO`` before STARTTLS (it only lets ``EHLO`` through), which breaks an MTA that greets
first and then upgrades; so TLS is demanded at ``MAIL`` instead (``lmtp_require_starttls``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from services.ingest.smtp import IngestEnvelope, IngestHandler, IngestSMTP, Stored

if TYPE_CHECKING:
    from services.ingest.service import IngestService

log = logging.getLogger("chatflow.ingest.lmtp")


class IngestLMTP(IngestSMTP, LMTP):
    """Our session clock, limits and texts on aiosmtpd's LMTP (``LHLO``, no HELO/EHLO)."""


class LMTPHandler(IngestHandler):
    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if self.service.settings.lmtp_require_starttls and session.ssl is None:
            return "530 5.7.0 Must issue a STARTTLS command first"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope, IngestEnvelope)
        if isinstance(server, IngestSMTP):
            server.restart_idle_timer()
        prepared = await self.prepare(session, envelope)
        if isinstance(prepared, str):
            return "\r\n".join([prepared] * len(envelope.rcpt_tos))
        boxes = {b.id: b for b in envelope.boxes}
        results = await asyncio.gather(
            *(
                self.finish(self.store(prepared, [box], session, envelope))
                for box in boxes.values()
            ),
            return_exceptions=True,
        )
        reply: dict[str, str] = {}
        for box_id, result in zip(boxes, results, strict=True):
            if isinstance(result, BaseException):
                log.error("could not store message for a mailbox", exc_info=result)
                reply[box_id] = (
                    "451 4.3.0 Temporary failure storing the message for this recipient, "
                    "try again later"
                )
            else:
                stored: list[Stored] = result
                reply[box_id] = self.accepted(stored[0])
        return "\r\n".join(reply[b.id] for b in envelope.boxes)


def lmtp_factory(service: IngestService, tls: ssl.SSLContext) -> SMTP:
    s = service.settings
    return IngestLMTP(
        LMTPHandler(service),
        settings=s,
        hostname=s.smtp_hostname,
        tls_context=tls,
        require_starttls=False,  # demanded at MAIL, see the module docstring
        data_size_limit=s.smtp_max_message_bytes,
        enable_SMTPUTF8=True,
        decode_data=False,
        ident="ChatFLOW ingest LMTP",
        auth_exclude_mechanism=["LOGIN", "PLAIN"],
    )


async def serve(service: IngestService, tls: ssl.SSLContext) -> asyncio.AbstractServer | None:
    """Start the LMTP listener when ``lmtp_port`` is set (close it in ``before_stop``)."""
    s = service.settings
    if not s.lmtp_port:
        return None
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: lmtp_factory(service, tls), host=s.lmtp_host, port=s.lmtp_port
    )
