"""``/ws`` over trunks (``services.gateway.trunk``): many agents on one WebSocket to the notifier,
each frame routed to its own session; the gateway's own slow-consumer cut, heartbeat, and the
loss of a trunk."""

from __future__ import annotations

import asyncio
import base64
import os

import pytest
from websockets.exceptions import ConnectionClosed

from libs.common import testing
from services.gateway.domain import wsframes as wf
from services.gateway.tests.conftest import Gateway, Rig, StartGateway, stop_gateway
from services.gateway.tests.conftest import token as make_token
from services.gateway.tests.test_ws import closed_with, dial, raw_upgrade


async def test_many_agents_share_one_trunk_and_each_gets_its_own_frames(
    start_gateway: StartGateway, rig: Rig
) -> None:
    gw = await start_gateway(ws_trunks=1)
    try:
        before = len(rig.notifier.links)
        conns = [
            await dial(gw, rig, ["chatflow.v1", f"bearer.{make_token(rig.key)}"]) for _ in range(20)
        ]
        links = rig.notifier.links[before:]
        assert len(links) == 20
        assert len({id(link.end) for link in links}) == 1  # one trunk carries them all
        for i, ws in enumerate(conns):
            await ws.send(f"m{i}")
        for i, ws in enumerate(conns):
            assert await ws.recv() == f"echo:m{i}"
        # One frame for several agents is one trunk message naming them; each gets it once.
        frame = wf.server_frame(wf.OP_TEXT, b"to-all")
        links[0].end.write(
            b"F"
            + (10).to_bytes(4, "big")
            + b"".join(link.cid.to_bytes(4, "big") for link in links[:10])
            + frame
        )
        for ws in conns[:10]:
            assert await ws.recv() == "to-all"
        for ws in conns[10:]:
            await ws.send("still-mine")
            assert await ws.recv() == "echo:still-mine"
        for ws in conns:
            await ws.close()
    finally:
        await stop_gateway(gw)


async def test_trunks_fill_in_turn(start_gateway: StartGateway, rig: Rig) -> None:
    gw = await start_gateway(ws_trunks=2)
    try:
        before = len(rig.notifier.links)
        conns = [
            await dial(gw, rig, ["chatflow.v1", f"bearer.{make_token(rig.key)}"]) for _ in range(6)
        ]
        ends = [id(link.end) for link in rig.notifier.links[before:]]
        assert len(set(ends)) == 2 and ends.count(ends[0]) == 3
        for ws in conns:
            await ws.close()
    finally:
        await stop_gateway(gw)


async def test_a_slow_client_is_closed_4008_and_the_others_stay_on_time(
    start_gateway: StartGateway, rig: Rig
) -> None:
    gw = await start_gateway(ws_slow_consumer_bytes=64 * 1024)
    try:
        slow = await dial(gw, rig, ["chatflow.v1", f"bearer.{make_token(rig.key)}"])
        fast = await dial(gw, rig, ["chatflow.v1", f"bearer.{make_token(rig.key)}"])
        before = len(rig.notifier.closes)
        assert slow.transport is not None
        slow.transport.pause_reading()  # an agent whose socket takes nothing
        await slow.send("flood:20000:1000")  # 20 MB of frames from the notifier
        for i in range(20):
            await fast.send(f"f{i}")
            assert await asyncio.wait_for(fast.recv(), 5) == f"echo:f{i}"
        assert await testing.eventually(lambda: 4008 in rig.notifier.closes[before:], timeout=10)
        slow.transport.resume_reading()
        with pytest.raises(ConnectionClosed) as info:  # after the frames it had been sent
            while True:
                await asyncio.wait_for(slow.recv(), 10)
        assert info.value.rcvd is not None and info.value.rcvd.code == 4008
        await fast.send("after")
        assert await fast.recv() == "echo:after"
        await fast.close()
    finally:
        await stop_gateway(gw)


async def _raw_upgrade(
    gw: Gateway, rig: Rig, tok: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client that does the handshake and then answers nothing (no pong)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.settings.public_port, ssl=rig.ctx, server_hostname="127.0.0.1"
    )
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(raw_upgrade(key, tok))
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    return reader, writer


async def _frames_until_close(reader: asyncio.StreamReader) -> list[wf.Frame]:
    buf, frames = b"", []
    while True:
        while (frame := wf.parse_frame(buf, 1 << 20)) is None:
            chunk = await asyncio.wait_for(reader.read(4096), 5)
            if not chunk:
                return frames
            buf += chunk
        buf = buf[frame.size :]
        frames.append(frame)
        if frame.opcode == wf.OP_CLOSE:
            return frames


async def test_a_client_that_answers_no_ping_is_closed_1011(
    start_gateway: StartGateway, rig: Rig
) -> None:
    gw = await start_gateway(ws_ping_interval_s=0.2, ws_ping_timeout_s=0.2)
    try:
        before = len(rig.notifier.closes)
        reader, writer = await _raw_upgrade(gw, rig, make_token(rig.key))
        frames = await _frames_until_close(reader)
        assert frames[0].opcode == wf.OP_PING
        assert wf.parse_close(frames[-1].payload) == (1011, "keepalive ping timeout")
        assert await testing.eventually(lambda: len(rig.notifier.closes) > before)
        writer.close()
    finally:
        await stop_gateway(gw)


async def test_a_client_that_answers_pings_stays(start_gateway: StartGateway, rig: Rig) -> None:
    gw = await start_gateway(ws_ping_interval_s=0.1, ws_ping_timeout_s=0.1)
    try:
        async with dial(gw, rig, ["chatflow.v1", f"bearer.{make_token(rig.key)}"]) as ws:
            await asyncio.sleep(1.0)  # ten pings, each answered by the websockets client
            await ws.send("alive")
            assert await ws.recv() == "echo:alive"
    finally:
        await stop_gateway(gw)


async def test_a_lost_trunk_closes_its_agents_1011_and_the_next_opens_a_new_one(
    start_gateway: StartGateway, rig: Rig
) -> None:
    gw = await start_gateway(ws_trunks=1)
    try:
        ws = await dial(gw, rig, ["chatflow.v1", f"bearer.{make_token(rig.key)}"])
        await ws.send("x")
        assert await ws.recv() == "echo:x"
        end = rig.notifier.links[-1].end
        end.conn.transport.abort()  # the notifier replica vanished
        assert await closed_with(ws) == 1011
        async with dial(gw, rig, ["chatflow.v1", f"bearer.{make_token(rig.key)}"]) as again:
            await again.send("y")
            assert await again.recv() == "echo:y"
            assert rig.notifier.links[-1].end is not end
    finally:
        await stop_gateway(gw)


async def test_a_burst_of_client_frames_is_held_back_not_closed(
    gateway: Gateway, rig: Rig, good_token: str
) -> None:
    """Frames the notifier handles slowly pile up on its side: past a few dozen it asks the
    gateway to stop reading the client (TCP pushes back) instead of closing it (found by a
    trial: 300 keystrokes of a draft closed the editor with 1008)."""
    async with dial(gateway, rig, ["chatflow.v1", f"bearer.{good_token}"]) as ws:
        for i in range(300):
            await ws.send(f"slowly:0.002:{i}")
        got = [await asyncio.wait_for(ws.recv(), 10) for _ in range(300)]
        assert got == [f"slowly:0.002:{i}" for i in range(300)]


async def test_invalid_utf8_in_a_text_frame_closes_1007(
    gateway: Gateway, rig: Rig, good_token: str
) -> None:
    reader, writer = await _raw_upgrade(gateway, rig, good_token)
    before = len(rig.notifier.closes)
    writer.write(wf.client_frame(wf.OP_TEXT, b'{"type":"\xff"}', os.urandom(4)))
    frames = await _frames_until_close(reader)
    code, _ = wf.parse_close(frames[-1].payload)
    assert code == 1007
    assert await testing.eventually(lambda: len(rig.notifier.closes) > before)
    assert rig.notifier.closes[-1] == 1007  # the notifier never saw the frame, only the close
    writer.close()


async def test_a_replay_to_a_client_that_pauses_goes_at_its_pace(
    start_gateway: StartGateway, rig: Rig
) -> None:
    """The notifier's sends wait while the client's socket is full (``wait``/``go``), as they
    did on a socket of their own: a long resume to a client that stops reading for a while is
    not cut off as a slow consumer (found by a trial)."""
    gw = await start_gateway(ws_slow_consumer_bytes=256 * 1024)
    try:
        async with dial(gw, rig, ["chatflow.v1", f"bearer.{make_token(rig.key)}"]) as ws:
            assert ws.transport is not None
            ws.transport.pause_reading()
            await ws.send("replay:4000:2000")  # 8 MB, 32 times the slow-consumer limit
            await asyncio.sleep(2)
            ws.transport.resume_reading()
            for i in range(4000):
                assert (await asyncio.wait_for(ws.recv(), 10)).startswith(f"{i}:")
    finally:
        await stop_gateway(gw)


async def test_a_hung_notifier_drops_its_trunk_and_agents_get_1011(
    start_gateway: StartGateway, rig: Rig
) -> None:
    """The gateway pings its trunks: a notifier that stops answering (hung, or a network that
    drops packets without a reset) is dropped and its agents told (found by a trial: they stayed
    connected to nothing, their own pings answered by the gateway)."""
    gw = await start_gateway(ws_trunks=1, ws_ping_interval_s=0.2, ws_ping_timeout_s=0.5)
    try:
        ws = await dial(gw, rig, ["chatflow.v1", f"bearer.{make_token(rig.key)}"])
        await ws.send("x")
        assert await ws.recv() == "echo:x"
        end = rig.notifier.links[-1].end
        end.conn.transport.pause_reading()  # hung: the trunk's bytes, pings too, go unread
        assert await asyncio.wait_for(closed_with(ws), 10) == 1011
        end.conn.transport.resume_reading()
    finally:
        await stop_gateway(gw)


async def test_a_storm_of_upgrades_spreads_over_the_trunks(
    start_gateway: StartGateway, rig: Rig
) -> None:
    gw = await start_gateway(ws_trunks=2)
    try:
        before = len(rig.notifier.links)
        conns = await asyncio.gather(
            *(dial(gw, rig, ["chatflow.v1", f"bearer.{make_token(rig.key)}"]) for _ in range(20))
        )
        ends = [id(link.end) for link in rig.notifier.links[before:]]
        assert len(set(ends)) == 2
        assert min(ends.count(e) for e in set(ends)) >= 5
        for ws in conns:
            await ws.close()
    finally:
        await stop_gateway(gw)
