"""Sender fixtures: a database of the module's own, a scriptable STARTTLS SMTP sink (aiosmtpd,
dev certs) as the relay, a DKIM key, and the events that give the sender its view of a
conversation, published the way production publishes them."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from libs.common import db, testing
from libs.common.bus import Bus
from libs.common.events import (
    Address,
    ConversationMessageAdded,
    ConversationState,
    MailboxChanged,
    MailSend,
    MessageSummary,
)
from libs.common.events import (
    Envelope as Env,
)
from libs.common.settings import ROOT
from libs.common.tls import server_context
from services.sender.service import SenderService
from services.sender.settings import SenderSettings
from services.sender.signing import public_record

MAILBOX = "mb-support"
ADDRESS = "support@chatflow.test"
CUSTOMER = "zoe@customer.test"
TABLES = "sends, attempts, attachments, blobs, thread_messages, mailboxes, outbox, processed_events"
Hook = Callable[[Envelope], Awaitable[None]]


# ---- the relay ---------------------------------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes

    @property
    def message_id(self) -> str:
        return str(message_from_bytes(self.raw, policy=policy.default)["Message-ID"])


@dataclass
class SinkHandler:
    """What the relay answers. ``data_replies`` are used in order (then 250); hooks may block."""

    data_replies: list[str] = field(default_factory=list)
    mail_replies: list[str] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    on_mail: Hook | None = None
    before_reply: Hook | None = None  # runs after the message is stored, before the reply
    delay_s: float = 0.0
    pipelining: bool = True  # advertise PIPELINING (RFC 2920), as Postfix does
    received: list[Received] = field(default_factory=list)
    data_calls: int = 0
    active: int = 0
    max_active: int = 0

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        return testing.ehlo_pipelining(session, hostname, responses, self.pipelining)

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.on_mail is not None:
            hook, self.on_mail = self.on_mail, None
            await hook(envelope)
        if self.mail_replies:
            return self.mail_replies.pop(0)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.rcpt_replies.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.data_calls += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if self.data_replies:
                return self.data_replies.pop(0)
            raw = envelope.original_content or b""
            # Stored before the reply, as real relays commit before they answer the '.'.
            self.received.append(Received(str(envelope.mail_from), list(envelope.rcpt_tos), raw))
            if self.before_reply is not None:
                hook, self.before_reply = self.before_reply, None
                await hook(envelope)
            return "250 2.0.0 Ok: queued"
        finally:
            self.active -= 1

    def count_by_message_id(self) -> Counter[str]:
        return Counter(r.message_id for r in self.received)


class _CountingSMTP(SMTP):
    def __init__(self, sink: Sink, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sink = sink

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # not the second call that STARTTLS makes
            self._sink.connections += 1
            self._sink.transports.append(transport)
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._sink.reads.append(data)  # what each read brought (after STARTTLS: decrypted)
        super().data_received(data)


class Sink:
    """aiosmtpd with STARTTLS required and the dev certificate, like tools/smtp_sink.py."""

    def __init__(
        self, port: int | None = None, data_size_limit: int = 33554432, pipelining: bool = True
    ) -> None:
        self.port = port or testing.free_port()
        self.data_size_limit = data_size_limit
        self.handler = SinkHandler(pipelining=pipelining)
        self.connections = 0
        self.reads: list[bytes] = []
        self.transports: list[asyncio.BaseTransport] = []
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> Sink:
        ctx = server_context(ROOT / "var/certs/server.pem", ROOT / "var/certs/server.key")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _CountingSMTP(
                self,
                self.handler,
                hostname="sink.chatflow.test",
                tls_context=ctx,
                require_starttls=True,
                data_size_limit=self.data_size_limit,
            ),
            host="127.0.0.1",
            port=self.port,
        )
        return self

    async def stop(self) -> None:
        self.drop_connections()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    def drop_connections(self) -> None:
        """Close every client connection, as a relay restart (or its idle timeout) would."""
        for t in self.transports:
            t.close()
        self.transports.clear()

    @property
    def received(self) -> list[Received]:
        return self.handler.received

    def count_by_message_id(self) -> Counter[str]:
        return self.handler.count_by_message_id()


@pytest.fixture
async def sink(request: pytest.FixtureRequest) -> AsyncIterator[Sink]:
    """The relay; ``parametrize("sink", [False], indirect=True)`` for one without PIPELINING."""
    s = await Sink(pipelining=getattr(request, "param", True)).start()
    yield s
    await s.stop()


# ---- DKIM ----------------------------------------------------------------------------------------


@dataclass
class DkimKey:
    folder: Path
    pem: bytes
    selector: str = "s2024"

    @property
    def record(self) -> bytes:
        return public_record(self.pem)

    def dns(self, name: bytes, timeout: int = 5) -> bytes | None:
        """A dnsfunc for dkim.verify: our record at <selector>._domainkey.chatflow.test only."""
        want = f"{self.selector}._domainkey.chatflow.test.".encode()
        return self.record if name.rstrip(b".") + b"." == want else None


@pytest.fixture(scope="session")
def dkim_key(tmp_path_factory: pytest.TempPathFactory) -> DkimKey:
    folder = tmp_path_factory.mktemp("dkim")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    (folder / "chatflow.test.s2024.key").write_bytes(pem)
    return DkimKey(folder, pem)


# ---- database --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def sender_db() -> AsyncIterator[str]:
    """A database of this module's own: no other sender in the run claims its rows."""
    name = f"chatflow_t_{testing.new_run_id()}_sender"
    url = await testing.create_database(name)
    s = SenderSettings.load(database_url=url)
    await db.migrate(
        s.database_url, s.own_database_url, s.db_role, s.db_schema, SenderService.migrations
    )
    yield url
    await testing.drop_database(name)


@pytest.fixture
async def sender_pool(sender_db: str) -> AsyncIterator[asyncpg.Pool]:
    """The sender's schema, emptied for this test."""
    s = SenderSettings.load(database_url=sender_db)
    pool = await db.connect_pool(s.own_database_url, s.db_schema, 1, 4)
    await pool.execute(f"TRUNCATE {TABLES} CASCADE")
    yield pool
    await pool.close()


def settings_for(database_url: str, bus: Bus, sink: Sink, **overrides: Any) -> SenderSettings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "stream_prefix": bus.prefix,
        "http_port": testing.free_port(),
        "relay_port": sink.port,
        "retry_base_s": 0.2,
        "retry_max_s": 0.4,
        "delivery_poll_ms": 100,
        "outbox_poll_ms": 50,
        "consumer_block_ms": 200,
        "recover_interval_s": 0.3,
        "unknown_conversation_wait_s": 0.6,
        "shutdown_grace_s": 3.0,
    }
    values.update(overrides)
    s = SenderSettings.load(**values)
    assert isinstance(s, SenderSettings)
    return s


@contextlib.asynccontextmanager
async def running(settings: SenderSettings) -> AsyncIterator[SenderService]:
    svc = SenderService(settings)
    task = asyncio.create_task(svc.run())
    try:
        await testing.eventually(lambda: task.done() or svc.consumers, timeout=10)
        yield svc
    finally:
        svc.stop_event.set()
        await asyncio.wait_for(task, 20)


# ---- events ------------------------------------------------------------------------------------


async def publish_mailbox(bus: Bus, mailbox_id: str = MAILBOX, address: str = ADDRESS) -> None:
    await bus.publish(
        Env.of(
            MailboxChanged(mailbox_id=mailbox_id, address=address, name="ChatFLOW Support"), "test"
        )
    )


async def publish_conversation(
    bus: Bus,
    mailbox_id: str = MAILBOX,
    subject: str = "Where is my order?",
    number: int = 1042,
    conv: str | None = None,
) -> str:
    """An inbound customer message opening a conversation; returns its id."""
    conv = conv or str(uuid.uuid4())
    now = datetime.now(UTC)
    added = ConversationMessageAdded(
        id_conversa=conv,
        mailbox_id=mailbox_id,
        message=MessageSummary(
            id=str(uuid.uuid4()),
            message_id=f"<{uuid.uuid4().hex}@customer.test>",
            direction="in",
            from_=Address(name="Zoë Customer", address=CUSTOMER),
            to=[Address(address=ADDRESS)],
            subject=subject,
            date=now,
        ),
        conversation=ConversationState(
            id_conversa=conv,
            mailbox_id=mailbox_id,
            number=number,
            subject=subject,
            last_message_at=now,
        ),
    )
    await bus.publish(Env.of(added, "test"))
    return conv


async def send(bus: Bus, conv: str, *, send_id: str | None = None, **kw: Any) -> str:
    values: dict[str, Any] = {
        "send_id": send_id or str(uuid.uuid4()),
        "id_conversa": conv,
        "mailbox_id": MAILBOX,
        "user_id": "u-agent",
        "html": "<p>Your order ships <b>today</b>.</p>",
    }
    values.update(kw)
    cmd = MailSend.model_validate(values)
    await bus.publish(Env.of(cmd, "test"))
    return cmd.send_id


async def statuses(bus: Bus, send_id: str | None = None) -> list[dict[str, Any]]:
    entries = await bus.redis.xrange(bus.stream("mail.status"))
    out = [Env.from_json(fields[b"e"]).payload for _, fields in entries]
    return [p for p in out if send_id is None or p["send_id"] == send_id]


async def final_status(bus: Bus, send_id: str, timeout: float = 15.0) -> dict[str, Any]:
    """The first sent/failed status of ``send_id``."""

    async def done() -> dict[str, Any] | None:
        for p in await statuses(bus, send_id):
            if p["status"] in ("sent", "failed"):
                return p
        return None

    result: dict[str, Any] = await testing.eventually(done, timeout=timeout)
    return result


async def ready(bus: Bus, pool: asyncpg.Pool, conv: str) -> None:
    """Wait until the sender's view has the mailbox and the conversation."""
    await testing.eventually(
        lambda: pool.fetchval(
            "SELECT count(*) FROM thread_messages t JOIN mailboxes m ON m.id = t.mailbox_id "
            "WHERE t.id_conversa = $1",
            conv,
        ),
        timeout=10,
    )
