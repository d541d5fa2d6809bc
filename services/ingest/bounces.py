"""Announcing bounces: a stored DSN that names a Message-ID becomes a ``mail.bounced`` event.

Why a scan and not a step of ``IngestHandler.store``: the SMTP path's 250 must stay as cheap as
it is, and a bounce needs no millisecond latency. The scan reads only what a bounce is sent as
(null reverse-path, ``MAILER-DAEMON@`` or ``postmaster@``; migration 0003's partial index), so
ordinary mail costs it nothing. Each checked message gets a ``bounce_checks`` row in the
transaction that writes its ``mail.bounced`` outbox row: announced exactly once, whichever
replica gets there, and a crash in between just checks the message again.

Messages older than ``WINDOW_S`` are not scanned (a bounce is about a recent send; an ingest that
was down longer than that does not flood the sender with stale reports).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import TYPE_CHECKING

from libs.common import outbox
from libs.common.events import BouncedRecipient, Envelope, MailBounced
from services.ingest import storage
from services.ingest.domain.dsn import Dsn, parse_dsn

if TYPE_CHECKING:
    from services.ingest.service import IngestService

log = logging.getLogger("chatflow.ingest.bounces")

POLL_S = 1.0
WINDOW_S = 7 * 24 * 3600.0
BATCH = 20


def bounced_event(dsn: Dsn, ingest_id: str, mailbox_id: str, received_at: datetime) -> MailBounced:
    return MailBounced.model_validate(
        {
            "ingest_id": ingest_id,
            "mailbox_id": mailbox_id,
            "original_message_id": dsn.original_message_id,
            "reporting_mta": dsn.reporting_mta,
            "structured": dsn.structured,
            "recipients": [
                BouncedRecipient(
                    address=r.address,
                    action=r.action,  # type: ignore[arg-type]
                    status=r.status,
                    diagnostic=r.diagnostic,
                    remote_mta=r.remote_mta,
                )
                for r in dsn.recipients
            ],
            "received_at": received_at,
        }
    )


class BounceScanner:
    def __init__(self, service: IngestService) -> None:
        self.service = service
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Scan now (a message was stored by a path that knows it); else every ``POLL_S``."""
        self._wake.set()

    async def run(self) -> None:
        stop = self.service.stop_event
        while not stop.is_set():
            self._wake.clear()
            try:
                n = await self.scan_once()
            except Exception:
                log.exception("bounce scan failed; retrying")
                n = 0
            if n >= BATCH:
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), POLL_S)
            except TimeoutError:
                pass

    async def scan_once(self) -> int:
        """Check one batch of candidates; returns how many were looked at."""
        svc = self.service
        rows = await storage.bounce_candidates(svc.pool, WINDOW_S, BATCH)
        announced = 0
        for row in rows:
            raw = bytes(row["raw"])
            dsn = await asyncio.to_thread(parse_dsn, raw) if len(raw) > 65536 else parse_dsn(raw)
            original = dsn.original_message_id if dsn is not None else None
            async with svc.pool.acquire() as conn, conn.transaction():
                if not await storage.record_bounce_check(conn, row["id"], original):
                    continue
                if dsn is None or original is None:
                    continue
                ev = bounced_event(dsn, str(row["id"]), row["mailbox_id"], row["received_at"])
                await outbox.add(conn, Envelope.of(ev, producer="ingest"))
                announced += 1
            log.info(
                "bounce announced",
                extra={
                    "ingest_id": str(row["id"]),
                    "original_message_id": original,
                    "failed": [r.address for r in dsn.failed],
                },
            )
        if announced:
            svc.relay.wake()
        return len(rows)
