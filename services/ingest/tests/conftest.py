"""Ingest fixtures: a real IngestService in-process on a database and stream prefix of its own,
mailboxes fed to it the way production feeds them, and a raw SMTP/LMTP client for the cases a
polite client library cannot send (pipelining, smuggling, TLS downgrades)."""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

import asyncpg
import pytest

from libs.common import db, testing, tls
from libs.common.bus import Bus, connect
from libs.common.events import Envelope, MailboxChanged
from services.ingest import storage
from services.ingest.service import IngestService
from services.ingest.settings import IngestSettings

SUPPORT = "support@chatflow.test"
SALES = "sales@chatflow.test"


def message(
    mid: str,
    *,
    to: str = SUPPORT,
    headers: bytes = b"",
    body: bytes = b"Hello, my order has not arrived.\r\n",
    subject: str = "Where is my order?",
) -> bytes:
    """A small RFC 5322 message with CRLF line ends; ``mid`` without the angle brackets."""
    return (
        b"From: Zoe Customer <zoe@customer.test>\r\n"
        + f"To: <{to}>\r\nSubject: {subject}\r\nMessage-ID: <{mid}>\r\n".encode()
        + f"Date: {format_datetime(datetime.now(UTC))}\r\n".encode()
        + headers
        + b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        + body
    )


def new_mid(tag: str) -> str:
    return f"{tag}.{uuid.uuid4().hex}@customer.test"


async def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        w.close()
        return


class Raw:
    """SMTP/LMTP by hand: what we write is exactly what goes on the wire."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer
        self.greeting: tuple[int, list[str]] = (0, [])

    @classmethod
    async def open(cls, port: int) -> Raw:
        r, w = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        raw = cls(r, w)
        raw.greeting = await raw.reply()
        return raw

    async def reply(self, timeout: float = 10.0) -> tuple[int, list[str]]:
        lines: list[str] = []
        while True:
            line = await asyncio.wait_for(self.r.readline(), timeout)
            if not line:
                raise EOFError(f"connection closed after {lines!r}")
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text[4:])
            if text[3:4] != "-":
                return int(text[:3]), lines

    async def send(self, data: bytes | str) -> None:
        self.w.write(data.encode() if isinstance(data, str) else data)
        await self.w.drain()

    async def cmd(self, line: str) -> tuple[int, list[str]]:
        await self.send(line + "\r\n")
        return await self.reply()

    async def starttls(self, ctx: ssl.SSLContext, hello: str = "EHLO") -> None:
        code, lines = await self.cmd("STARTTLS")
        assert code == 220, lines
        await self.w.start_tls(ctx, server_hostname="127.0.0.1")
        code, lines = await self.cmd(f"{hello} client.customer.test")
        assert code == 250, lines

    async def eof(self, timeout: float = 5.0) -> bool:
        try:
            return await asyncio.wait_for(self.r.read(), timeout) == b""
        except (ConnectionError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.w.close()


@dataclass
class Mx:
    svc: IngestService
    settings: IngestSettings
    pool: asyncpg.Pool
    bus: Bus
    admin_url: str
    ca: ssl.SSLContext

    @property
    def port(self) -> int:
        return self.settings.smtp_port

    async def raw(self, *, tls_: bool = True) -> Raw:
        s = await Raw.open(self.port)
        code, _ = await s.cmd("EHLO client.customer.test")
        assert code == 250
        if tls_:
            await s.starttls(self.ca)
        return s

    async def stored(self, mid: str) -> list[asyncpg.Record]:
        return list(
            await self.pool.fetch(
                """SELECT m.id, m.mailbox_id, m.rcpt, m.status, b.data AS raw
                   FROM messages m JOIN blobs b ON b.sha256 = m.raw_sha256
                   WHERE m.message_id = $1 ORDER BY m.mailbox_id""",
                f"<{mid}>",
            )
        )

    async def drained(self) -> None:
        """Wait until the relay has published every committed event."""
        await testing.eventually(
            lambda: self.pool.fetchval("SELECT count(*) = 0 FROM outbox"), timeout=15
        )

    async def events(self, mid: str | None = None) -> list[Envelope]:
        entries = await self.bus.redis.xrange(self.bus.stream("mail.received"))
        out = [Envelope.from_json(fields[b"e"]) for _, fields in entries]
        if mid is not None:
            out = [e for e in out if e.payload["message_id"] == f"<{mid}>"]
        return out


@pytest.fixture(scope="module")
async def mx(stream_prefix: str) -> AsyncIterator[Mx]:
    """One IngestService for the module, with small limits so tests can reach them cheaply.

    Its database is its own (not the run's shared one): another ingest in the same run (the
    e2e stack) would otherwise relay this one's outbox rows to its own streams.
    """
    name = f"chatflow_t_{testing.new_run_id()}_smtp"
    url = await testing.create_database(name)
    settings = IngestSettings.load(
        database_url=url,
        stream_prefix=f"{stream_prefix}smtp{testing.new_run_id()}:",
        http_port=testing.free_port(),
        smtp_port=testing.free_port(),
        lmtp_port=testing.free_port(),
        smtp_max_message_bytes=100_000,
        smtp_max_recipients=5,
        smtp_max_header_fields=40,
        smtp_max_received_headers=10,
        outbox_poll_ms=100,
        consumer_block_ms=200,
        db_pool_max=10,
    )
    assert isinstance(settings, IngestSettings)
    await db.migrate(
        settings.database_url,
        settings.own_database_url,
        settings.db_role,
        settings.db_schema,
        IngestService.migrations,
    )
    svc = IngestService(settings)
    task = asyncio.create_task(svc.run())
    await wait_port(settings.smtp_port)
    redis = connect(testing.REDIS_URL)
    bus = Bus(redis, settings.stream_prefix)
    pool = await db.connect_pool(settings.own_database_url, settings.db_schema, 1, 4)
    # support@ arrives the production way (auth publishes mailbox.changed), sales@ through storage.
    await bus.publish(Envelope.of(MailboxChanged(mailbox_id="mb-support", address=SUPPORT), "test"))
    await testing.eventually(lambda: SUPPORT in svc.mailboxes, timeout=10)
    # Stored too (the group consumer may commit after the broadcast reader applied it), so the
    # reload below cannot lose it.
    stored = "SELECT 1 FROM mailboxes WHERE address = $1"
    await testing.eventually(lambda: pool.fetchval(stored, SUPPORT), timeout=10)
    async with pool.acquire() as conn:
        await storage.upsert_mailbox(conn, "mb-sales", SALES, "Sales", True)
    svc.mailboxes = await storage.load_mailboxes(svc.pool)
    ca = tls.client_context(settings.tls_ca)
    try:
        yield Mx(svc, settings, pool, bus, url, ca)
    finally:
        svc.stop_event.set()
        try:
            await asyncio.wait_for(task, 30)
        finally:
            await pool.close()
            await redis.aclose()
            await testing.drop_prefix(settings.stream_prefix)
            await testing.drop_database(name)
