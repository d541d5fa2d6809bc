"""The trunk codec (pure) and the notifier's end batching frames per turn in call order."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from websockets.protocol import State

from libs.common import trunk as tk


def test_every_message_round_trips() -> None:
    m = tk.decode(tk.open_msg(7, "tok", "https://a.test", "10.0.0.1", "rid-1"))
    assert (m.kind, m.cid) == (tk.OPEN, 7)
    assert tk.open_info(m.body) == {
        "token": "tok",
        "origin": "https://a.test",
        "ip": "10.0.0.1",
        "rid": "rid-1",
    }
    assert tk.decode(tk.text_msg(1, "héllo".encode())).body.decode() == "héllo"
    assert tk.decode(tk.binary_msg(2**32 - 1, b"\x00\xff")) == tk.Message(
        tk.BINARY, 2**32 - 1, b"\x00\xff"
    )
    assert tk.decode(tk.closed_msg(3, 1001)) == tk.Message(tk.CLOSED, 3, code=1001)
    assert tk.decode(tk.accepted_msg(4)) == tk.Message(tk.ACCEPTED, 4)
    r = tk.decode(tk.refused_msg(5, 4401, "account disabled"))
    assert (r.kind, r.cid, r.code, r.reason) == (tk.REFUSED, 5, 4401, "account disabled")
    c = tk.decode(tk.close_msg(6, 4008, "é" * 100))  # the reason is cut to 123 bytes, whole chars
    assert c.code == 4008 and c.reason == "é" * 61
    frame = tk.server_frame("x")
    f = tk.decode(tk.frames_msg([1, 2, 3], frame + frame))
    assert (f.kind, f.cids, f.body) == (tk.FRAMES, (1, 2, 3), frame + frame)


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"T\x00\x00",
        b"Z\x00\x00\x00\x01",
        b"F\x00\x00\x00\x00",
        b"F\x00\x00\x00\x09\x00",
        b"X\x00\x00\x00\x01",
    ],
)
def test_malformed_messages_are_refused(bad: bytes) -> None:
    with pytest.raises(tk.TrunkError):
        tk.decode(bad)


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"origin": "x"}', b'{"token": 1}'])
def test_an_open_needs_a_token(body: bytes) -> None:
    with pytest.raises(tk.TrunkError):
        tk.open_info(body)


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_write_buffer_size(self) -> int:
        return sum(map(len, self.written))

    def abort(self) -> None:
        self.aborted = True


class _Conn:
    def __init__(self) -> None:
        self.transport = _Transport()

        class P:
            state = State.OPEN

        self.protocol = P()


def _messages(written: list[bytes]) -> list[tk.Message]:
    """Decode the binary WebSocket frames the end wrote (unmasked, any length)."""
    data, out, pos = b"".join(written), [], 0
    while pos < len(data):
        n, head = data[pos + 1] & 0x7F, 2
        if n == 126:
            n, head = int.from_bytes(data[pos + 2 : pos + 4], "big"), 4
        elif n == 127:
            n, head = int.from_bytes(data[pos + 2 : pos + 10], "big"), 10
        out.append(tk.decode(data[pos + head : pos + head + n]))
        pos += head + n
    return out


async def test_frames_of_a_turn_are_batched_in_call_order() -> None:
    conn: Any = _Conn()
    end = tk.TrunkEnd(conn, max_buffer=1 << 20, max_queued=4, max_message=None)
    a, b = (tk.TrunkLink(end, cid, {}, 4) for cid in (1, 2))
    end.links.update({1: a, 2: b})
    x, y, z = (tk.server_frame(t) for t in "xyz")
    a.queue(x)
    b.queue(x)  # the same frame right after: one message for both
    a.queue(y)
    b.queue(z)
    a.queue(x)  # x again, after others: a new message, so a gets x, y, x in that order
    assert conn.transport.written == []  # nothing before the end of the turn
    await asyncio.sleep(0)
    got = _messages(conn.transport.written)
    assert [(m.cids, m.body) for m in got] == [((1, 2), x), ((1,), y), ((2,), z), ((1,), x)]
    assert len(conn.transport.written) == 1  # one write for the whole turn


async def test_frames_in_a_row_for_the_same_links_share_one_body() -> None:
    """A mail's frame and its badge for the same agents: one id list, their frames in order."""
    conn: Any = _Conn()
    end = tk.TrunkEnd(conn, max_buffer=1 << 20, max_queued=4, max_message=None)
    x, y, z = (tk.server_frame(t) for t in "xyz")
    end.queue_many([1, 2, 3], x)
    end.queue_many([1, 2, 3], y)  # another list, the same links
    end.queue_many([1, 3], z)
    end.queue_many([1, 3], x)
    end.queue_many([1, 2, 3], y)  # not in a row with the first two: its own message
    await asyncio.sleep(0)
    got = _messages(conn.transport.written)
    assert [(m.cids, m.body) for m in got] == [((1, 2, 3), x + y), ((1, 3), z + x), ((1, 2, 3), y)]


async def test_a_direct_message_goes_after_what_was_queued() -> None:
    conn: Any = _Conn()
    end = tk.TrunkEnd(conn, max_buffer=1 << 20, max_queued=4, max_message=None)
    link = tk.TrunkLink(end, 9, {}, 4)
    end.links[9] = link
    link.queue(tk.server_frame("live"))
    await link.send("reply")
    await link.close(4401, "token expired")
    got = _messages(conn.transport.written)
    assert [m.kind for m in got] == [tk.FRAMES, tk.DIRECT, tk.CLOSE]
    assert got[1].body == tk.server_frame("reply") and got[2].code == 4401
    assert 9 not in end.links and not link.open
    with pytest.raises(Exception):  # noqa: B017 (websockets' ConnectionClosed)
        await link.send("late")


async def test_a_link_that_floods_is_closed_not_the_trunk() -> None:
    conn: Any = _Conn()
    end = tk.TrunkEnd(conn, max_buffer=1 << 20, max_queued=2, max_message=None)
    link = tk.TrunkLink(end, 1, {}, 2)
    end.links[1] = link
    for i in range(3):
        link.feed(f"m{i}")
    assert not link.open and link.close_code == 1008
    assert [await link.recv(), await link.recv()] == ["m0", "m1"]
    assert [m async for m in link] == []  # then it ends
    assert _messages(conn.transport.written)[-1].code == 1008
    assert not conn.transport.aborted


async def test_a_trunk_not_read_is_dropped() -> None:
    conn: Any = _Conn()
    end = tk.TrunkEnd(conn, max_buffer=10, max_queued=2, max_message=None)
    link = tk.TrunkLink(end, 1, {}, 2)
    end.links[1] = link
    await link.send("x" * 20)
    await link.send("y")
    assert conn.transport.aborted


async def test_a_busy_link_holds_the_agent_and_releases_it_once_it_caught_up() -> None:
    conn: Any = _Conn()
    end = tk.TrunkEnd(conn, max_buffer=1 << 20, max_queued=100, max_message=None)
    link = tk.TrunkLink(end, 5, {}, 100)
    end.links[5] = link
    for i in range(tk.HOLD_AT):
        link.feed(f"m{i}")
    assert [m.kind for m in _messages(conn.transport.written)] == [tk.HOLD]
    for _ in range(tk.HOLD_AT - tk.RELEASE_AT):
        await link.recv()
    assert [m.kind for m in _messages(conn.transport.written)] == [tk.HOLD, tk.RELEASE]
    assert link.open


async def test_a_send_waits_while_the_agents_socket_is_full() -> None:
    conn: Any = _Conn()
    end = tk.TrunkEnd(conn, max_buffer=1 << 20, max_queued=4, max_message=None)
    link = tk.TrunkLink(end, 3, {}, 4)
    end.links[3] = link
    link.full(True)
    sending = asyncio.create_task(link.send("replay"))
    await asyncio.sleep(0.05)
    assert not sending.done() and conn.transport.written == []
    link.full(False)
    await asyncio.wait_for(sending, 1)
    assert _messages(conn.transport.written)[0].kind == tk.DIRECT
    link.full(True)
    blocked = asyncio.create_task(link.send("never"))
    await asyncio.sleep(0.01)
    link.lost(1001)  # the agent left meanwhile: the send ends
    with pytest.raises(Exception):  # noqa: B017 (websockets' ConnectionClosed)
        await asyncio.wait_for(blocked, 1)


async def test_a_merged_body_stays_far_below_a_gateways_message_cap() -> None:
    """A burst for one mailbox (500 frames of 9 KiB: a mail with a long Cc list) merged into one
    body would pass the gateway's 4 MiB cap and cost every agent on it the trunk (found by a
    trial); merging stops at MERGE_MAX, order kept."""
    conn: Any = _Conn()
    end = tk.TrunkEnd(conn, max_buffer=64 << 20, max_queued=4, max_message=None)
    frames = [tk.server_frame(f'{{"n":{i},"x":"{"a" * 9000}"}}') for i in range(500)]
    for f in frames:
        end.queue_many([1, 2, 3], f)
    await asyncio.sleep(0)
    got = _messages(conn.transport.written)
    assert all(len(m.body) <= tk.MERGE_MAX for m in got) and len(got) > 1
    assert all(m.cids == (1, 2, 3) for m in got)
    assert b"".join(m.body for m in got) == b"".join(frames)
