"""The spliced ``/ws`` (``services.gateway.wsedge``): bytes through intact, the cap, a vanished
client, and an upgrade on a kept-alive connection served by the frame-copy bridge instead."""

from __future__ import annotations

import asyncio
import base64
import os
import time

import pytest
from websockets.exceptions import ConnectionClosed

from libs.common import testing
from services.gateway.domain import wsframes as wf
from services.gateway.tests.conftest import Gateway, Rig, StartGateway, stop_gateway
from services.gateway.tests.conftest import token as make_token
from services.gateway.tests.test_ws import closed_with, dial, raw_upgrade


async def test_large_frames_cross_intact_both_ways(
    gateway: Gateway, rig: Rig, good_token: str
) -> None:
    """Frames far bigger than a TLS record, split anywhere by TCP, come out as they went in."""
    async with dial(gateway, rig, ["chatflow.v1", f"bearer.{good_token}"]) as ws:
        for size in (0, 125, 126, 65535, 65536, 300_000):
            text = (os.urandom(size // 2 + 1).hex())[:size]
            await ws.send(text)
            assert await ws.recv() == f"echo:{text}"
        blob = os.urandom(200_000)
        await ws.send(blob)
        assert await ws.recv() == blob
        pong = await ws.ping(b"p")  # control frames pass too: the notifier answers this ping
        await asyncio.wait_for(pong, 5)


async def test_the_socket_opens_only_once_the_notifier_has_it(
    gateway: Gateway, rig: Rig, good_token: str
) -> None:
    """The client's 101 comes after the notifier took the upstream connection, so no frame the
    notifier sends after the client sees its socket open can miss it (the 101 used to go first,
    and at 1,000 agents a busy gateway let frames pass new connections by; found by the bench)."""
    for _ in range(5):
        before = len(rig.notifier.registered)
        async with dial(gateway, rig, ["chatflow.v1", f"bearer.{good_token}"]) as ws:
            opened = time.monotonic()
            assert len(rig.notifier.registered) == before + 1
            assert rig.notifier.registered[-1] <= opened
            await ws.send("ping")
            assert await ws.recv() == "echo:ping"


async def test_frame_over_the_cap_closes_1009(start_gateway: StartGateway, rig: Rig) -> None:
    gw = await start_gateway(ws_max_message_bytes=64 * 1024)
    try:
        async with dial(gw, rig, ["chatflow.v1", f"bearer.{make_token(rig.key)}"]) as ws:
            await ws.send("small")
            assert await ws.recv() == "echo:small"
            await ws.send("x" * (64 * 1024 + 1))
            assert await closed_with(ws) == 1009
        # Fragments count as one message.
        async with dial(gw, rig, ["chatflow.v1", f"bearer.{make_token(rig.key)}"]) as ws:
            with pytest.raises(ConnectionClosed) as info:
                await ws.send(["y" * 40_000, "y" * 40_000])
                await ws.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    finally:
        await stop_gateway(gw)


async def test_client_vanishing_closes_the_notifier_side_1001(
    gateway: Gateway, rig: Rig, good_token: str
) -> None:
    ws = await dial(gateway, rig, ["chatflow.v1", f"bearer.{good_token}"])
    await ws.send("x")
    assert await ws.recv() == "echo:x"
    before = len(rig.notifier.closes)
    assert ws.transport is not None
    ws.transport.abort()  # no close frame, TCP gone
    assert await testing.eventually(lambda: len(rig.notifier.closes) > before)
    assert rig.notifier.closes[-1] == 1001


async def test_upgrade_on_a_kept_alive_connection_uses_the_bridge(
    gateway: Gateway, rig: Rig, good_token: str
) -> None:
    """The front door only sees a connection's first request; a later upgrade still works."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gateway.settings.public_port, ssl=rig.ctx, server_hostname="127.0.0.1"
    )
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(raw_upgrade(key, good_token))
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        assert wf.accept_key(key).encode() in head
        writer.write(wf.client_frame(wf.OP_TEXT, b"again", os.urandom(4)))
        buf = b""
        while (frame := wf.parse_frame(buf, 1 << 20)) is None:
            buf += await asyncio.wait_for(reader.read(4096), 5)
        assert (frame.opcode, frame.payload) == (wf.OP_TEXT, b"echo:again")
    finally:
        writer.close()
