"""``/ws``: Origin and token checks, then frames and close codes through to the notifier."""

from __future__ import annotations

import json

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin, Subprotocol

from libs.common import testing
from services.gateway.tests.conftest import ORIGIN, Gateway, Rig, StartGateway, stop_gateway, token


def dial(gw: Gateway, rig: Rig, protocols: list[str], origin: str | None = ORIGIN) -> connect:
    return connect(
        gw.ws_url,
        subprotocols=[Subprotocol(p) for p in protocols],
        origin=Origin(origin) if origin else None,
        ssl=rig.ctx,
        proxy=None,
        open_timeout=5,
    )


def raw_upgrade(key: str, token: str) -> bytes:
    """A ``/ws`` upgrade request with the token as subprotocol, as a browser sends it."""
    return (
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\nOrigin: {ORIGIN}\r\n"
        f"Sec-WebSocket-Protocol: chatflow.v1, bearer.{token}\r\n\r\n"
    ).encode()


async def closed_with(ws: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed) as info:
        for _ in range(3):
            await ws.recv()
    return info.value.rcvd.code if info.value.rcvd else None


async def test_subprotocol_token_echoes(gateway: Gateway, rig: Rig, good_token: str) -> None:
    before = len(rig.notifier.handshakes)
    async with dial(gateway, rig, ["chatflow.v1", f"bearer.{good_token}"]) as ws:
        assert ws.subprotocol == "chatflow.v1"
        await ws.send("hello")
        assert await ws.recv() == "echo:hello"
        await ws.send(json.dumps({"type": "ping"}))
        assert await ws.recv() == 'echo:{"type": "ping"}'
    seen = rig.notifier.handshakes[before]
    assert seen["origin"] == ORIGIN
    assert seen["subprotocol"] == "chatflow.v1"
    assert f"bearer.{good_token}" in ",".join(seen["protocols"])
    assert seen["forwarded_for"] == "127.0.0.1"


async def test_bad_origin_refused(gateway: Gateway, rig: Rig, good_token: str) -> None:
    for origin in ("https://evil.example", None):
        with pytest.raises(InvalidStatus) as info:
            async with dial(gateway, rig, ["chatflow.v1", f"bearer.{good_token}"], origin):
                pass
        assert info.value.response.status_code == 403
        assert info.value.response.headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize("bad", ["garbage", "expired", "wrong_aud"])
async def test_bad_subprotocol_token_closes_4401(gateway: Gateway, rig: Rig, bad: str) -> None:
    tok = {
        "garbage": "a.b.c",
        "expired": token(rig.key, exp=1, iat=0, nbf=0),
        "wrong_aud": token(rig.key, aud="nope"),
    }[bad]
    before = len(rig.notifier.handshakes)
    async with dial(gateway, rig, ["chatflow.v1", f"bearer.{tok}"]) as ws:
        assert await closed_with(ws) == 4401
    assert len(rig.notifier.handshakes) == before  # the notifier never saw it


async def test_first_frame_auth(gateway: Gateway, rig: Rig, good_token: str) -> None:
    async with dial(gateway, rig, ["chatflow.v1"]) as ws:
        assert ws.subprotocol == "chatflow.v1"
        await ws.send(json.dumps({"type": "auth", "token": good_token}))
        await ws.send("after auth")
        assert await ws.recv() == "echo:after auth"


@pytest.mark.parametrize(
    "frame", [{"type": "auth", "token": "x.y.z"}, {"type": "hello"}, "not json", {"type": "auth"}]
)
async def test_first_frame_bad_auth_closes_4401(gateway: Gateway, rig: Rig, frame: object) -> None:
    async with dial(gateway, rig, ["chatflow.v1"]) as ws:
        await ws.send(frame if isinstance(frame, str) else json.dumps(frame))
        assert await closed_with(ws) == 4401


async def test_close_codes_propagate(gateway: Gateway, rig: Rig, good_token: str) -> None:
    async with dial(gateway, rig, ["chatflow.v1", f"bearer.{good_token}"]) as ws:
        await ws.send("close:4123")
        assert await closed_with(ws) == 4123
    async with dial(gateway, rig, ["chatflow.v1", f"bearer.{good_token}"]) as ws:
        await ws.send("x")
        await ws.recv()
        before = len(rig.notifier.closes)
        await ws.close(4000, "client done")
    assert await testing.eventually(lambda: len(rig.notifier.closes) > before)
    assert rig.notifier.closes[-1] == 4000


async def test_notifier_down_closes_1013(start_gateway: StartGateway, rig: Rig) -> None:
    gw = await start_gateway(notifier_ws_url=f"wss://127.0.0.1:{testing.free_port()}/ws")
    try:
        async with dial(gw, rig, ["chatflow.v1", f"bearer.{token(rig.key)}"]) as ws:
            assert await closed_with(ws) == 1013
    finally:
        await stop_gateway(gw)


async def test_shutdown_closes_bridged_sessions(
    start_gateway: StartGateway, rig: Rig, good_token: str
) -> None:
    gw = await start_gateway()
    async with dial(gw, rig, ["chatflow.v1", f"bearer.{good_token}"]) as ws:
        await ws.send("x")
        assert await ws.recv() == "echo:x"
        await stop_gateway(gw)
        assert await closed_with(ws) == 1012  # "service restart": the SPA reconnects


async def test_first_frame_auth_fragmented_or_binary(
    gateway: Gateway, rig: Rig, good_token: str
) -> None:
    """As the notifier's own socket takes it (found by a trial: the gateway refused both)."""
    auth = json.dumps({"type": "auth", "token": good_token})
    for message in ([auth[:10], auth[10:]], auth.encode()):
        async with dial(gateway, rig, ["chatflow.v1"]) as ws:
            await ws.send(message)
            await ws.send("after auth")
            assert await ws.recv() == "echo:after auth"


async def test_a_throttled_upgrade_is_accepted_then_closed_4429(
    start_gateway: StartGateway, rig: Rig
) -> None:
    """Over the rate limit, an upgrade is answered as a bad token is: accepted, then closed
    4429, since a browser sees close codes and never the handshake's status (it was HTTP 429
    when the token came as a subprotocol, which a browser reports as 1006)."""
    import asyncio
    import time

    if time.time() % 60 > 55:  # keep the whole test inside one fixed window
        await asyncio.sleep(60 - time.time() % 60 + 0.1)
    gw = await start_gateway(rate_limit_per_user=1, rate_limit_per_ip=1000)
    try:
        tok = token(rig.key, sub="ws-throttled")
        async with dial(gw, rig, ["chatflow.v1", f"bearer.{tok}"]) as ws:
            await ws.send("hello")
            assert await ws.recv() == "echo:hello"
        before = len(rig.notifier.handshakes)
        async with dial(gw, rig, ["chatflow.v1", f"bearer.{tok}"]) as ws:
            assert ws.subprotocol == "chatflow.v1"
            assert await closed_with(ws) == 4429
            assert ws.close_reason == "too many requests"
        async with dial(gw, rig, ["chatflow.v1"]) as ws:  # the first-frame way: the same
            await ws.send(json.dumps({"type": "auth", "token": tok}))
            assert await closed_with(ws) == 4429
        assert len(rig.notifier.handshakes) == before  # the notifier never saw them
    finally:
        await stop_gateway(gw)
