"""Notifier fixtures: an in-process NotifierService per test on its own stream prefix, a signing
key published as ``auth.jwks``, token minting and WSS clients verified against the dev CA."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import OKPKey
from websockets.asyncio.client import ClientConnection, connect

from libs.common import db, testing, tls
from libs.common.bus import Bus
from libs.common.bus import connect as redis_connect
from libs.common.events import (
    Address,
    ConversationMessageAdded,
    ConversationState,
    Envelope,
    JwksPublished,
    MessageSummary,
)
from services.notifier.service import NotifierService
from services.notifier.settings import NotifierSettings


@pytest.fixture(scope="session")
def signing_key() -> OKPKey:
    return OKPKey.generate_key("Ed25519", parameters={"kid": f"test-{uuid.uuid4().hex[:8]}"})


@pytest.fixture(scope="session")
async def migrated(database_url: str) -> str:
    s = NotifierSettings.load(database_url=database_url)
    await db.migrate(
        s.database_url, s.own_database_url, s.db_role, s.db_schema, NotifierService.migrations
    )
    return database_url


@pytest.fixture
async def bus(stream_prefix: str) -> AsyncIterator[Bus]:
    """A stream prefix of this test's own (each test starts its own notifiers on it)."""
    redis = redis_connect(testing.REDIS_URL)
    prefix = f"{stream_prefix}{testing.new_run_id()}:"
    yield Bus(redis, prefix)
    await testing.drop_prefix(prefix)
    await redis.aclose()


@dataclass
class Env:
    database_url: str
    bus: Bus
    key: OKPKey
    settings: NotifierSettings | None = None

    def token(
        self,
        sub: str,
        mailboxes: Sequence[str],
        *,
        exp_in: int = 900,
        key: OKPKey | None = None,
        aud: str | None = None,
    ) -> str:
        s = self.settings or NotifierSettings.load()
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": s.jwt_issuer,
            "aud": aud or s.jwt_audience,
            "sub": sub,
            "iat": now,
            "nbf": now,
            "exp": now + exp_in,
            "jti": uuid.uuid4().hex,
            "roles": ["agent"],
            "mailboxes": list(mailboxes),
            "scope": "",
            "client_id": "spa",
        }
        k = key or self.key
        return jwt.encode({"alg": "Ed25519", "kid": k.kid}, claims, k, algorithms=["Ed25519"])

    async def publish(self, payload: Any, producer: str = "test") -> Envelope:
        env = Envelope.of(payload, producer=producer)
        await self.bus.publish(env)
        return env


Starter = Callable[..., Awaitable[NotifierService]]


@pytest.fixture
async def env(migrated: str, bus: Bus, signing_key: OKPKey) -> Env:
    e = Env(migrated, bus, signing_key)
    await e.publish(JwksPublished(keys=[signing_key.as_dict(private=False)]), producer="auth")
    return e


@pytest.fixture
async def start(env: Env) -> AsyncIterator[Starter]:
    """Start NotifierService replicas in this loop (``run()`` in a task); all stop at teardown."""
    running: list[tuple[NotifierService, asyncio.Task[None]]] = []

    async def _start(**overrides: Any) -> NotifierService:
        values: dict[str, Any] = {
            "database_url": env.database_url,
            "redis_url": testing.REDIS_URL,
            "stream_prefix": env.bus.prefix,
            "http_port": testing.free_port(),
            "ws_port": testing.free_port(),
            "allow_missing_origin": True,
            "consumer_block_ms": 200,
            "outbox_poll_ms": 100,
            "shutdown_grace_s": 3.0,
            "db_pool_min": 1,
            "db_pool_max": 4,
        }
        values.update(overrides)
        settings = NotifierSettings.load(**values)
        env.settings = settings
        svc = NotifierService(settings)
        task = asyncio.create_task(svc.run())
        running.append((svc, task))

        def up() -> bool:
            if task.done():
                task.result()  # surface a crash at startup
            ready = getattr(svc, "live", None) is not None and svc.live.serving
            return ready and all(c.last_loop_at > 0 for c in svc.consumers)

        await testing.eventually(up, timeout=15)
        # The broadcast reader resolves "$" on its first pass; frames after that reach it.
        await asyncio.sleep(0.05)
        return svc

    yield _start
    for svc, _ in running:
        svc.stop_event.set()
    await asyncio.gather(*(t for _, t in running), return_exceptions=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)


def client_ssl(settings: NotifierSettings) -> ssl.SSLContext:
    return tls.client_context(settings.tls_ca)


def ws_connect(
    svc: NotifierService, token: str | None, *, subprotocols: list[str] | None = None, **kw: Any
) -> Any:
    s = svc.cfg
    protos = (
        subprotocols
        if subprotocols is not None
        else (["chatflow.v1", "bearer." + token] if token else ["chatflow.v1"])
    )
    return connect(
        f"wss://127.0.0.1:{s.ws_port}/ws",
        subprotocols=protos,  # type: ignore[arg-type]
        ssl=client_ssl(s),
        open_timeout=5,
        **kw,
    )


# State frames (unread badges, presence) come with every connect and inbound message; tests of
# other frames skip them, the badge and presence tests ask for them (``skip=()``).
STATE_FRAMES = frozenset({"badge", "presence"})


async def recv_json(
    ws: ClientConnection, timeout: float = 5.0, skip: Collection[str] = STATE_FRAMES
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = deadline - asyncio.get_running_loop().time()
        raw = await asyncio.wait_for(ws.recv(), max(0.01, left))
        frame = dict(json.loads(raw))
        if frame.get("type") not in skip:
            return frame


async def recv_type(ws: ClientConnection, type_: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = deadline - asyncio.get_running_loop().time()
        frame = await recv_json(ws, max(0.01, left))
        if frame["type"] == type_:
            return frame


async def assert_silent(
    ws: ClientConnection, wait: float = 0.6, skip: Collection[str] = STATE_FRAMES
) -> None:
    try:
        frame = await recv_json(ws, wait, skip)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected frame {frame!r}")


async def wait_closed(ws: ClientConnection, timeout: float = 5.0) -> tuple[int | None, str | None]:
    async def drain() -> None:
        try:
            while True:
                await ws.recv()
        except Exception:
            return

    await asyncio.wait_for(drain(), timeout)
    return ws.close_code, ws.close_reason


def message_added(
    mailbox_id: str, id_conversa: str | None = None, n: int = 1, subject: str = "Help"
) -> ConversationMessageAdded:
    cid = id_conversa or f"c-{uuid.uuid4().hex[:12]}"
    now = datetime.now(UTC)
    return ConversationMessageAdded(
        id_conversa=cid,
        mailbox_id=mailbox_id,
        message=MessageSummary(
            id=f"m-{uuid.uuid4().hex[:12]}",
            message_id=f"<{uuid.uuid4().hex}@customer.test>",
            direction="in",
            from_=Address(name="Ana", address="ana@customer.test"),
            to=[Address(address="support@chatflow.test")],
            subject=subject,
            date=now,
            snippet="my order did not arrive",
        ),
        conversation=ConversationState(
            id_conversa=cid,
            mailbox_id=mailbox_id,
            subject=subject,
            message_count=n,
            last_message_at=now,
            participants=[Address(name="Ana", address="ana@customer.test")],
        ),
    )


def mbx() -> str:
    """A mailbox id of this test's own."""
    return f"mb-{uuid.uuid4().hex[:8]}"


def user() -> str:
    return f"u-{uuid.uuid4().hex[:8]}"
