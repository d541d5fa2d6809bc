"""The delivery queue: like an MTA's, it retries 4xx and connection failures with backoff.

Each attempt is recorded (state ``sending``, attempts + 1) and committed before the SMTP
transaction, and its outcome committed with the ``mail.status`` event after it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import aiosmtplib

from libs.common import outbox
from libs.common.events import SentMessage
from services.sender.stream import status_event

if TYPE_CHECKING:
    from services.sender.service import SenderService

log = logging.getLogger("chatflow.sender.delivery")
STUCK_SENDING = timedelta(minutes=5)


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(base / 2, min(cap, base * 2 ** max(0, attempt - 1)))


class Delivery:
    def __init__(self, svc: SenderService, tls: ssl.SSLContext) -> None:
        self.svc = svc
        self.tls = tls
        self._wake = asyncio.Event()
        self._sem = asyncio.Semaphore(svc.settings.delivery_concurrency)
        self._inflight: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        poll = self.svc.settings.delivery_poll_ms / 1000
        while not self.svc.stop_event.is_set():
            self._wake.clear()
            try:
                claimed = await self.claim()
            except Exception:
                log.exception("claiming due sends failed")
                claimed = []
            for row in claimed:
                task = asyncio.create_task(self.attempt(row))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
            if claimed:
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), poll)
            except TimeoutError:
                pass
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=self.svc.settings.shutdown_grace_s)

    async def claim(self) -> list[Any]:
        free = self.svc.settings.delivery_concurrency - len(self._inflight)
        if free <= 0:
            return []
        async with self.svc.pool.acquire() as conn, conn.transaction():
            return list(
                await conn.fetch(
                    """UPDATE sends SET state = 'sending', attempts = attempts + 1, updated_at = now()
                       WHERE send_id IN (
                           SELECT send_id FROM sends
                           WHERE (state IN ('queued', 'deferred') AND next_attempt_at <= now())
                              OR (state = 'sending' AND updated_at < now() - $2::interval)
                           ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)
                       RETURNING *""",
                    free,
                    STUCK_SENDING,
                )
            )

    async def attempt(self, row: Any) -> None:
        async with self._sem:
            s = self.svc.settings
            try:
                _refused, reply = await aiosmtplib.send(
                    bytes(row["mime"]),
                    sender=row["mail_from"],
                    recipients=list(row["recipients"]),
                    hostname=s.relay_host,
                    port=s.relay_port,
                    start_tls=s.relay_starttls and not s.relay_implicit_tls,
                    use_tls=s.relay_implicit_tls,
                    tls_context=self.tls,
                    username=s.relay_username or None,
                    password=s.relay_password or None,
                    timeout=s.relay_timeout_s,
                )
                await self.finish(row, "sent", reply)
            except aiosmtplib.SMTPRecipientsRefused as exc:
                codes = [r.code for r in exc.recipients]
                permanent = all(code >= 500 for code in codes)
                detail = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
                await self.finish(row, "failed" if permanent else "deferred", detail)
            except aiosmtplib.SMTPResponseException as exc:
                detail = f"{exc.code} {exc.message}"
                await self.finish(row, "failed" if exc.code >= 500 else "deferred", detail)
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                await self.finish(row, "deferred", f"connection failed: {exc}")
            except Exception as exc:
                log.exception("unexpected delivery error")
                await self.finish(row, "deferred", f"error: {type(exc).__name__}")

    async def finish(self, row: Any, state: str, detail: str) -> None:
        s = self.svc.settings
        next_at = None
        if state == "deferred":
            age = datetime.now(UTC) - row["created_at"]
            if age.total_seconds() > s.max_queue_age_s:
                state, detail = "failed", f"gave up after {row['attempts']} attempts: {detail}"
            else:
                next_at = datetime.now(UTC) + timedelta(
                    seconds=backoff(row["attempts"], s.retry_base_s, s.retry_max_s)
                )
        async with self.svc.pool.acquire() as conn, conn.transaction():
            updated = await conn.fetchrow(
                """UPDATE sends SET state = $2, detail = $3, updated_at = now(),
                       next_attempt_at = COALESCE($4, next_attempt_at)
                   WHERE send_id = $1 RETURNING *""",
                row["send_id"],
                state,
                detail,
                next_at,
            )
            extra: dict[str, Any] = {"next_attempt_at": next_at}
            if state == "sent" and updated["sent_message"]:
                extra["message"] = SentMessage.model_validate(updated["sent_message"])
            await outbox.add(conn, status_event(updated, state, detail, **extra))
        self.svc.relay.wake()
        log.info("delivery attempt", extra={"send_id": str(row["send_id"]), "state": state})
