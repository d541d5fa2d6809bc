"""Web Push to a local push service (aiohttp) that checks VAPID and decrypts every push."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import http_ece
import httpx
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid02

from libs.common import testing
from libs.common.events import ConversationRead
from libs.common.events import now as utcnow
from services.notifier import push
from services.notifier.service import NotifierService
from tools.devcerts import make_vapid

from .conftest import Env, Starter, client_ssl, mbx, message_added, user, ws_connect


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass
class Device:
    """A browser's side of a subscription: its key pair and auth secret."""

    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    auth: bytes = field(default_factory=lambda: os.urandom(16))

    def keys(self) -> dict[str, str]:
        pub = self.key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return {"p256dh": b64(pub), "auth": b64(self.auth)}


@dataclass
class PushService:
    url: str
    devices: dict[str, Device] = field(default_factory=dict)
    got: list[tuple[str, dict[str, str], dict[str, Any]]] = field(default_factory=list)
    status: int = 201

    def endpoint(self, name: str) -> str:
        return f"{self.url}/push/{name}"


@pytest.fixture
async def push_service() -> AsyncIterator[PushService]:
    port = testing.free_port()
    svc = PushService(f"http://127.0.0.1:{port}")

    async def receive(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await request.read()
        device = svc.devices[name]
        assert request.headers["Content-Encoding"] == "aes128gcm"
        # VAPID (RFC 8292): a JWT for this origin signed by the key in k=.
        assert Vapid02.verify(request.headers["Authorization"])
        plain = http_ece.decrypt(
            body, private_key=device.key, auth_secret=device.auth, version="aes128gcm"
        )
        svc.got.append(
            (name, {k.lower(): v for k, v in request.headers.items()}, json.loads(plain))
        )
        return web.Response(status=svc.status)

    app = web.Application()
    app.router.add_post("/push/{name}", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    yield svc
    await runner.cleanup()


@pytest.fixture
def vapid_file(tmp_path: Path) -> Path:
    path = tmp_path / "vapid.pem"
    make_vapid(path)
    return path


async def start_pushing(start: Starter, vapid_file: Path, **kw: Any) -> NotifierService:
    values: dict[str, Any] = {
        "vapid_private_key_file": vapid_file,
        "push_allow_http": True,
        "push_delay_s": 0.3,
        "push_poll_s": 0.1,
    }
    return await start(**{**values, **kw})


def api(svc: NotifierService, env: Env, sub: str, boxes: list[str]) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"https://127.0.0.1:{svc.cfg.http_port}",
        verify=client_ssl(svc.cfg),
        headers={"authorization": f"Bearer {env.token(sub, boxes)}"},
    )


async def subscribe(http: httpx.AsyncClient, ps: PushService, name: str) -> httpx.Response:
    device = ps.devices.setdefault(name, Device())
    return await http.post(
        "/api/push/subscriptions", json={"endpoint": ps.endpoint(name), "keys": device.keys()}
    )


async def test_push_reaches_an_offline_agent_once_per_conversation_and_410_removes_it(
    env: Env, start: Starter, push_service: PushService, vapid_file: Path
) -> None:
    svc = await start_pushing(start, vapid_file)
    box, ana = mbx(), user()
    async with api(svc, env, ana, [box]) as http:
        key = (await http.get("/api/push/vapid-key")).json()["public_key"]
        assert key == push.public_key(svc.vapid)
        r = await subscribe(http, push_service, "ana-laptop")
        assert r.status_code == 201 and r.json()["created"] is True
        assert (await subscribe(http, push_service, "ana-laptop")).status_code == 200
    # Three messages of one conversation in a burst: one push (collapsed), Topic per conversation.
    first = message_added(box, subject="Order 1234")
    await env.publish(first)
    for n in (2, 3):
        await env.publish(message_added(box, first.id_conversa, n=n, subject="Order 1234"))
    await testing.eventually(lambda: push_service.got, timeout=5)
    await asyncio.sleep(0.8)
    assert len(push_service.got) == 1
    name, headers, body = push_service.got[0]
    assert name == "ana-laptop"
    assert body["id_conversa"] == first.id_conversa and body["mailbox"] == box
    assert body["title"] == "Ana" and body["body"].startswith("Order 1234")
    assert headers["topic"] == push.topic(first.id_conversa) and len(headers["topic"]) <= 32
    assert headers["ttl"] == str(svc.cfg.push_ttl_s)
    assert f"k={key}" in headers["authorization"].replace(" ", "")
    # The push service says the subscription is gone: it is deleted.
    push_service.status = 410
    await env.publish(message_added(box, subject="another"))
    await testing.eventually(lambda: len(push_service.got) == 2, timeout=5)
    await testing.eventually(lambda: _gone(svc, push_service.endpoint("ana-laptop")), timeout=5)


async def _gone(svc: NotifierService, endpoint: str) -> bool:
    return not await svc.pool.fetchval(
        "SELECT 1 FROM push_subscriptions WHERE endpoint = $1", endpoint
    )


async def test_no_push_for_connected_agents_read_or_answered_conversations(
    env: Env, start: Starter, push_service: PushService, vapid_file: Path
) -> None:
    a = await start_pushing(start, vapid_file, push_delay_s=0.6)
    b = await start_pushing(start, vapid_file, push_delay_s=0.6)
    box, online, reader, replier = mbx(), user(), user(), user()
    for who in (online, reader, replier):
        async with api(a, env, who, [box]) as http:
            assert (await subscribe(http, push_service, who)).status_code == 201
    # ``online`` holds a connection on replica b; ``reader`` reads the conversation in time.
    async with ws_connect(b, env.token(online, [box])):
        await testing.eventually(lambda: a.presence.online(online))
        ev = message_added(box)
        await env.publish(ev)
        await testing.eventually(
            lambda: a.pool.fetchval(
                "SELECT count(*) = 3 FROM push_pending WHERE id_conversa = $1", ev.id_conversa
            )
        )
        read = ConversationRead(
            id_conversa=ev.id_conversa, mailbox_id=box, user_id=reader, read_at=utcnow()
        )
        await env.publish(read, producer="threader")
        await asyncio.sleep(1.5)
    assert [n for n, _, _ in push_service.got] == [replier]
    # An answer drops what was waiting for everyone.
    again = message_added(box)
    await env.publish(again)
    reply = message_added(box, again.id_conversa, n=2)
    reply.message.direction = "out"
    await env.publish(reply)
    await asyncio.sleep(1.5)
    assert [n for n, _, _ in push_service.got] == [replier]


async def test_subscription_input_is_checked_and_delete_is_per_owner(
    env: Env, start: Starter, push_service: PushService, vapid_file: Path
) -> None:
    svc = await start(vapid_private_key_file=vapid_file)  # https endpoints only
    box, ana, bia = mbx(), user(), user()
    dev = Device()
    async with api(svc, env, ana, [box]) as http:
        for endpoint, keys in (
            ("http://127.0.0.1:1/push/x", dev.keys()),  # not https
            ("https://user:pw@push.example/x", dev.keys()),
            ("https://push.example/x", {**dev.keys(), "p256dh": b64(b"\x04" + b"x" * 10)}),
            ("https://push.example/x", {**dev.keys(), "auth": "!!"}),
            ("https://push.example/\x00x", dev.keys()),
            ("https://[::1/x", dev.keys()),
            ("https://push.example/x", {**dev.keys(), "p256dh": "\x00" + dev.keys()["p256dh"]}),
        ):
            r = await http.post(
                "/api/push/subscriptions", json={"endpoint": endpoint, "keys": keys}
            )
            assert r.status_code == 422, (endpoint, r.text)
            assert r.json()["error"]["code"]
        ok = {"endpoint": "https://push.example/ana", "keys": dev.keys()}
        assert (await http.post("/api/push/subscriptions", json=ok)).status_code == 201
    async with api(svc, env, bia, [box]) as http:
        r = await http.request(
            "DELETE", "/api/push/subscriptions", json={"endpoint": ok["endpoint"]}
        )
        assert r.status_code == 404  # not hers
    async with api(svc, env, ana, [box]) as http:
        r = await http.request(
            "DELETE", "/api/push/subscriptions", json={"endpoint": ok["endpoint"]}
        )
        assert r.status_code == 204
    async with httpx.AsyncClient(verify=client_ssl(svc.cfg)) as anon:
        r = await anon.get(f"https://127.0.0.1:{svc.cfg.http_port}/api/push/vapid-key")
        assert r.status_code == 401
