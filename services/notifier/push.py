"""Web Push (RFC 8030, VAPID RFC 8292, aes128gcm RFC 8291) to agents with no live connection.

A new inbound message queues one push per subscribed agent of the mailbox (``push_store``, one
row per agent and conversation: a burst collapses). ``push_delay_s`` later a replica takes it
and sends it only if the agent still matters to it: no open connection on any replica (the
``presence`` heartbeats in Redis), still unread for that agent (a read, a reply or a close drops
it earlier), access not taken away. The push carries ``Topic`` (one per conversation: the push
service keeps only the newest of a conversation for an offline device) and a ``TTL``, so an agent
who comes back after hours is not flooded with stale alerts. A 404 or 410 from the push service
deletes the subscription.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
from typing import Any

import aiohttp
import asyncpg
from cryptography.hazmat.primitives import serialization
from prometheus_client import Counter
from py_vapid import Vapid
from pywebpush import WebPushException, webpush_async

from services.notifier import badge_store, push_store
from services.notifier.access import AccessState
from services.notifier.presence import Presence
from services.notifier.settings import NotifierSettings

log = logging.getLogger("chatflow.notifier.push")

PUSHES = Counter("chatflow_notifier_pushes_total", "Web Push outcomes", ["outcome"])


def topic(id_conversa: str) -> str:
    """A ``Topic`` header value: at most 32 URL-safe base64 characters (RFC 8030 §5.4)."""
    return base64.urlsafe_b64encode(hashlib.sha256(id_conversa.encode()).digest()[:24]).decode()


def load_vapid(settings: NotifierSettings) -> Vapid | None:
    path = settings.vapid_private_key_file
    if not path.exists():
        log.warning("no VAPID key: Web Push is off", extra={"path": str(path)})
        return None
    return Vapid.from_pem(path.read_bytes())


def public_key(vapid: Vapid) -> str:
    """The application server key a browser subscribes with (uncompressed P-256, base64url)."""
    raw = vapid.public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class Pusher:
    def __init__(
        self,
        settings: NotifierSettings,
        pool: asyncpg.Pool,
        presence: Presence,
        access: AccessState,
        vapid: Vapid | None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.presence = presence
        self.access = access
        self.vapid = vapid
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        if self.vapid is None:
            return
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            while not stop.is_set():
                try:
                    sent = await self.once(session)
                except Exception as exc:
                    log.warning("push round failed", extra={"error": str(exc)})
                    sent = 0
                if sent:
                    continue
                self._wake.clear()
                waits = [
                    asyncio.ensure_future(stop.wait()),
                    asyncio.ensure_future(self._wake.wait()),
                ]
                await asyncio.wait(
                    waits, timeout=self.settings.push_poll_s, return_when=asyncio.FIRST_COMPLETED
                )
                for w in waits:
                    w.cancel()

    async def once(self, session: aiohttp.ClientSession) -> int:
        due = await push_store.claim_due(self.pool, 100)
        if due:
            await asyncio.gather(*(self._one(session, d) for d in due))
        return len(due)

    async def _one(self, session: aiohttp.ClientSession, d: push_store.Due) -> None:
        user = d.user_id
        if self.access.is_disabled(user) or d.mailbox_id in self.access.removed(user):
            PUSHES.labels("no_access").inc()
            return
        if await self.presence.online(user):
            PUSHES.labels("online").inc()  # the live frame reached them
            return
        async with self.pool.acquire() as conn:
            if not await badge_store.needs_alert(conn, user, d.id_conversa):
                PUSHES.labels("read").inc()
                return
        payload = json.dumps(
            {
                "type": "message",
                "id_conversa": d.id_conversa,
                "mailbox": d.mailbox_id,
                "title": d.title,
                "body": d.body,
            },
            ensure_ascii=False,
        )
        for sub in await push_store.of_user(self.pool, user, d.mailbox_id):
            await self.send(session, sub, payload, topic(d.id_conversa))

    async def send(
        self, session: aiohttp.ClientSession, sub: push_store.Subscription, payload: str, tp: str
    ) -> bool:
        info: dict[str, Any] = {
            "endpoint": sub.endpoint,
            "keys": {"p256dh": sub.p256dh, "auth": sub.auth},
        }
        try:
            await webpush_async(
                info,
                payload,
                vapid_private_key=self.vapid,
                # A fresh dict each time: pywebpush writes the endpoint's origin into it as aud.
                vapid_claims={"sub": self.settings.vapid_subject},
                ttl=self.settings.push_ttl_s,
                headers={"Topic": tp, "Urgency": "normal"},
                aiohttp_session=session,
            )
        except WebPushException as exc:
            status = getattr(exc.response, "status", None) or getattr(
                exc.response, "status_code", None
            )
            if status in (404, 410):
                await push_store.remove(self.pool, sub.endpoint)
                PUSHES.labels("gone").inc()
                log.info("push subscription gone, removed", extra={"status": status})
            else:
                PUSHES.labels("failed").inc()
                log.warning("push refused", extra={"status": status})
            return False
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            PUSHES.labels("failed").inc()
            log.warning("push service unreachable", extra={"error": type(exc).__name__})
            return False
        PUSHES.labels("sent").inc()
        await push_store.delivered(self.pool, sub.endpoint)
        return True
