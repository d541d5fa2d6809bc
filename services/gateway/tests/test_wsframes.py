"""The splice's framing helpers against websockets' own codec, on many streams and chunkings."""

from __future__ import annotations

import os
import random

import pytest
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode
from websockets.streams import StreamReader

from services.gateway.domain import wsframes as wf
from services.gateway.wsedge import is_ws_upgrade


def _ws_parse(data: bytes, mask: bool) -> list[WsFrame]:
    """Frames as websockets' parser reads them (``mask``: they are client frames)."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    out: list[WsFrame] = []
    while reader.buffer:
        gen = WsFrame.parse(reader.read_exact, mask=mask, max_size=None)
        try:
            next(gen)
        except StopIteration as stop:
            out.append(stop.value)
        else:
            raise AssertionError("incomplete frame")
    return out


def test_accept_key_is_the_rfc_example() -> None:
    assert wf.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_frames_we_build_are_what_websockets_reads(size: int) -> None:
    payload = os.urandom(size)
    [server] = _ws_parse(wf.server_frame(wf.OP_BINARY, payload), mask=False)
    assert (server.opcode, server.data, server.fin) == (Opcode.BINARY, payload, True)
    [client] = _ws_parse(wf.client_frame(wf.OP_TEXT, payload, os.urandom(4)), mask=True)
    assert (client.opcode, client.data) == (Opcode.TEXT, payload)
    ours = wf.parse_frame(wf.client_frame(wf.OP_TEXT, payload, b"abcd"), max_payload=size)
    assert ours is not None and ours.payload == payload and ours.masked


def test_mask_is_its_own_inverse() -> None:
    rng = random.Random(7)
    for n in range(0, 40):
        data, key = rng.randbytes(n), rng.randbytes(4)
        assert wf.mask(wf.mask(data, key), key) == data
        assert wf.mask(data, key) == bytes(b ^ key[i % 4] for i, b in enumerate(data))
    with pytest.raises(ValueError):
        wf.client_frame(wf.OP_TEXT, b"x", b"abc")


def test_close_payload_cuts_the_reason_on_a_character() -> None:
    payload = wf.close_payload(4401, "é" * 100)
    assert len(payload) <= 125 and payload[:2] == (4401).to_bytes(2, "big")
    code, reason = wf.parse_close(payload)
    assert code == 4401 and reason == "é" * 61
    assert wf.parse_close(b"") == (None, "")


def _stream(rng: random.Random, masked: bool) -> tuple[bytes, list[tuple[int, bool, bytes]]]:
    """Random frames (sizes around every length-encoding edge) and their (opcode, fin, payload)."""
    data = bytearray()
    expected: list[tuple[int, bool, bytes]] = []
    for _ in range(rng.randint(1, 30)):
        n = rng.choice([0, 1, 2, 124, 125, 126, 127, 300, 65535, 65536, 70000, rng.randint(0, 999)])
        op = rng.choice([wf.OP_TEXT, wf.OP_BINARY, wf.OP_PING, wf.OP_CLOSE, wf.OP_CONT])
        if op in wf.CONTROL:
            n = min(n, 125)
        frame = WsFrame(Opcode(op), rng.randbytes(n), fin=rng.random() < 0.8 or op in wf.CONTROL)
        expected.append((op, frame.fin, bytes(frame.data)))
        data += frame.serialize(mask=masked)
    return bytes(data), expected


@pytest.mark.parametrize("seed", range(60))
def test_parse_frame_finds_every_frame_however_the_stream_is_cut(seed: int) -> None:
    """As the trunk reads: bytes appended as they come, frames parsed from a moving position."""
    rng = random.Random(seed)
    masked = seed % 2 == 0
    data, expected = _stream(rng, masked)
    buf, seen, at, pos = bytearray(), [], 0, 0
    while pos < len(data):
        step = rng.choice([1, 2, 3, 7, 13, 100, 1400, 16384, 70000])
        buf += data[pos : pos + step]
        pos += step
        while (frame := wf.parse_frame(buf, 1 << 20, at)) is not None:
            assert frame.masked == masked and frame.rsv == 0
            seen.append((frame.opcode, frame.fin, frame.payload))
            at += frame.size
    assert seen == expected and at == len(data)


def test_parse_frame_waits_for_the_whole_frame_and_caps_it() -> None:
    frame = wf.client_frame(wf.OP_TEXT, b'{"type":"auth"}', b"\x01\x02\x03\x04")
    for cut in range(len(frame)):
        assert wf.parse_frame(frame[:cut], 100) is None
    whole = wf.parse_frame(frame + b"next", 100)
    assert whole is not None and whole.payload == b'{"type":"auth"}' and whole.size == len(frame)
    with pytest.raises(ValueError):
        wf.parse_frame(frame, 5)


@pytest.mark.parametrize(
    ("head", "ours"),
    [
        (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", True),
        (b"GET /ws?x=1 HTTP/1.1\r\nupgrade: WebSocket\r\n\r\n", True),
        (b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", False),
        (b"GET /wsx HTTP/1.1\r\nUpgrade: websocket\r\n\r\n", False),
        (b"GET /ws/ HTTP/1.1\r\nUpgrade: websocket\r\n\r\n", False),
        (b"POST /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n", False),
        (b"GET /ws HTTP/1.1\r\nUpgrade: h2c\r\n\r\n", False),
    ],
)
def test_which_heads_are_spliced(head: bytes, ours: bool) -> None:
    assert is_ws_upgrade(head) is ours
