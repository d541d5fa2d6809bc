"""The trunk: one WebSocket between a gateway process and a notifier that carries many agents.

Fan-out was the cost of the live channel: with a WebSocket per agent from the gateway to the
notifier, every frame to N agents cost N TLS writes in the notifier and N TLS reads plus N writes
in the gateway. On a trunk the notifier writes a frame once per gateway, with the list of
connections it is for, and only the gateway writes it N times, to the agents' sockets (ADR 0005).
The notifier still decides everything per connection (audience, resume, acks, close codes); the
gateway still owns the agent's socket (upgrade checks, pings, the size cap, slow consumers).

Each trunk message is one binary WebSocket message: a kind byte, a connection id (``cid``, the
gateway's, unique on its trunk), then the body:

===========  ====================  ===========================================================
direction    kind                  body
===========  ====================  ===========================================================
gw -> nf     ``O`` open            JSON: token, origin, ip, request id
gw -> nf     ``T`` text            the agent's text message (UTF-8, checked by the gateway)
gw -> nf     ``B`` binary          the agent's binary message
gw -> nf     ``X`` closed          close code (2 bytes): the agent's socket is gone
gw -> nf     ``W`` wait, ``G`` go   (none): the agent's socket is full / drained again
nf -> gw     ``A`` accepted        (none): registered, frames may follow; the gateway sends 101
nf -> gw     ``R`` refused         close code, reason
nf -> gw     ``C`` close           close code, reason: close the agent's socket with them
nf -> gw     ``F`` frames          count (4 bytes), that many cids, then whole server frames
nf -> gw     ``D`` direct          whole server frames for this one agent (a reply, a replay)
nf -> gw     ``H`` hold, ``L``      (none): stop reading the agent's socket / read it again
             release
===========  ====================  ===========================================================

``F`` carries WebSocket frames already encoded as a server sends them (unmasked, no extension),
so the gateway writes the same bytes to every connection listed; ``D`` the same for one agent,
what the notifier's ``send`` wrote on a socket of its own (replies, a resume's replay). A live
``F`` frame for a socket that stays full ends in the gateway's slow-consumer close (4008); ``D``
frames are paced instead. ``W``/``G`` and ``H``/``L`` are
the flow control a socket of its own gave each agent: a ``send`` of the notifier (a resume's
replay) waits while the agent's socket is full, and an agent that sends faster than the notifier
handles its frames is not read until it catches up, instead of either side being closed. This module holds the codec
(pure) and the notifier's end (``TrunkEnd``, ``TrunkLink``); the gateway's end is
``services.gateway.trunk``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import State

log = logging.getLogger("chatflow.trunk")

OPEN: Final = 0x4F  # "O"
TEXT: Final = 0x54  # "T"
BINARY: Final = 0x42  # "B"
CLOSED: Final = 0x58  # "X"
ACCEPTED: Final = 0x41  # "A"
REFUSED: Final = 0x52  # "R"
CLOSE: Final = 0x43  # "C"
FRAMES: Final = 0x46  # "F"
DIRECT: Final = 0x44  # "D": nf -> gw, frames for one agent, paced by wait/go
WAIT: Final = 0x57  # "W": gw -> nf, the agent's socket is full: send it nothing more for now
GO: Final = 0x47  # "G": gw -> nf, it drained
HOLD: Final = 0x48  # "H": nf -> gw, stop reading the agent's socket: its frames pile up here
RELEASE: Final = 0x4C  # "L": nf -> gw, read it again

_CID = struct.Struct("!BI")
_CID_CODE = struct.Struct("!BIH")
_COUNT = struct.Struct("!BI")
MAX_REASON = 123
SUBPROTOCOL: Final = "chatflow.trunk.v1"


class TrunkError(ValueError):
    """A trunk message that does not follow the format above."""


# ---- codec ------------------------------------------------------------------------------------
def open_msg(cid: int, token: str, origin: str | None, ip: str, rid: str) -> bytes:
    body = json.dumps({"token": token, "origin": origin, "ip": ip, "rid": rid}).encode()
    return _CID.pack(OPEN, cid) + body


def text_msg(cid: int, payload: bytes) -> bytes:
    return _CID.pack(TEXT, cid) + payload


def binary_msg(cid: int, payload: bytes) -> bytes:
    return _CID.pack(BINARY, cid) + payload


def closed_msg(cid: int, code: int) -> bytes:
    return _CID_CODE.pack(CLOSED, cid, code)


def direct_msg(cid: int, data: bytes) -> bytes:
    return _CID.pack(DIRECT, cid) + data


def wait_msg(cid: int) -> bytes:
    return _CID.pack(WAIT, cid)


def go_msg(cid: int) -> bytes:
    return _CID.pack(GO, cid)


def hold_msg(cid: int) -> bytes:
    return _CID.pack(HOLD, cid)


def release_msg(cid: int) -> bytes:
    return _CID.pack(RELEASE, cid)


def accepted_msg(cid: int) -> bytes:
    return _CID.pack(ACCEPTED, cid)


def refused_msg(cid: int, code: int, reason: str) -> bytes:
    return _CID_CODE.pack(REFUSED, cid, code) + _reason(reason)


def close_msg(cid: int, code: int, reason: str) -> bytes:
    return _CID_CODE.pack(CLOSE, cid, code) + _reason(reason)


def frames_msg(cids: list[int], data: bytes) -> bytes:
    n = len(cids)
    return _COUNT.pack(FRAMES, n) + struct.pack(f"!{n}I", *cids) + data


def _reason(reason: str) -> bytes:
    return reason.encode()[:MAX_REASON].decode(errors="ignore").encode()


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded trunk message; ``cids`` only for frames, ``code``/``reason`` only where used."""

    kind: int
    cid: int
    body: bytes = b""
    code: int = 0
    reason: str = ""
    cids: tuple[int, ...] = ()


def decode(msg: bytes) -> Message:
    if len(msg) < 5:
        raise TrunkError("trunk message too short")
    kind = msg[0]
    if kind == FRAMES:
        _, n = _COUNT.unpack_from(msg)
        end = 5 + 4 * n
        if n == 0 or len(msg) < end:
            raise TrunkError("frames message with a bad count")
        return Message(kind, 0, msg[end:], cids=struct.unpack_from(f"!{n}I", msg, 5))
    if kind in (TEXT, BINARY, OPEN, DIRECT):
        return Message(kind, _CID.unpack_from(msg)[1], msg[5:])
    if kind in (ACCEPTED, WAIT, GO, HOLD, RELEASE):
        return Message(kind, _CID.unpack_from(msg)[1])
    if kind in (CLOSED, REFUSED, CLOSE):
        if len(msg) < 7:
            raise TrunkError("close message too short")
        _, cid, code = _CID_CODE.unpack_from(msg)
        return Message(kind, cid, code=code, reason=msg[7:].decode(errors="replace"))
    raise TrunkError(f"unknown trunk message kind {kind:#x}")


def open_info(body: bytes) -> dict[str, Any]:
    try:
        info = json.loads(body)
    except ValueError as exc:
        raise TrunkError("open message body is not JSON") from exc
    if not isinstance(info, dict) or not isinstance(info.get("token"), str):
        raise TrunkError("open message without a token")
    return info


def server_frame(message: str | bytes) -> bytes:
    """A frame as the server sends it: unmasked, no extension, the same for every client."""
    if isinstance(message, str):
        return Frame(Opcode.TEXT, message.encode()).serialize(mask=False)
    return Frame(Opcode.BINARY, message).serialize(mask=False)


# ---- the notifier's end -------------------------------------------------------------------------
MERGE_MAX = 256 * 1024  # a merged body stays far below any gateway's message cap
HOLD_AT = 32  # an agent's frames waiting to be handled when its socket stops being read
RELEASE_AT = 8  # and when it is read again


class TrunkLink:
    """One agent's connection carried by a trunk, with the part of ``ServerConnection``'s
    interface the notifier uses: ``send``, ``recv``, ``async for``, ``close``."""

    def __init__(self, end: TrunkEnd, cid: int, info: dict[str, Any], max_queued: int) -> None:
        self.end = end
        self.cid = cid
        self.info = info
        self.max_queued = max_queued
        self.inbox: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self.open = True
        self.close_code: int | None = None
        self.writable = asyncio.Event()  # cleared while the gateway says the socket is full
        self.writable.set()
        self.holding = False  # the gateway was asked to stop reading the agent

    async def send(self, message: str | bytes) -> None:
        """One frame now; waits first while the agent's socket is full, as a socket's drain
        does, so a long replay goes at the agent's pace."""
        # Yield first, as a socket's drain may: a replay's loop must let the gateway's ``wait``
        # in before it has written far past the agent's socket.
        await asyncio.sleep(0)
        if not self.writable.is_set():
            await self.writable.wait()
        if not self.open:
            raise ConnectionClosed(None, None)
        self.end.write(direct_msg(self.cid, server_frame(message)))

    def queue(self, data: bytes) -> None:
        """A server frame for this turn's batched write (``Hub``'s fan-out; never waits: a live
        frame for a socket that stays full ends in the gateway's slow-consumer close)."""
        if self.open:
            self.end.queue(self.cid, data)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if not self.open:
            return
        self._end(code)
        self.end.write(close_msg(self.cid, code, reason))

    async def recv(self) -> str | bytes:
        message = await self.inbox.get()
        if message is None:
            self.inbox.put_nowait(None)  # every later recv ends too
            raise ConnectionClosed(Close(self.close_code or 1006, ""), None)
        if self.holding and self.inbox.qsize() <= RELEASE_AT and self.open:
            self.holding = False
            self.end.write(release_msg(self.cid))
        return message

    async def __aiter__(self) -> AsyncIterator[str | bytes]:
        while True:
            try:
                yield await self.recv()
            except ConnectionClosed:
                return

    def feed(self, message: str | bytes) -> None:
        if not self.open:
            return
        queued = self.inbox.qsize()
        if queued >= self.max_queued:
            # Held and still sending (the gateway reads what was in flight): a client that
            # ignores the hold this much is broken.
            self._end(1008)
            self.end.write(close_msg(self.cid, 1008, "too many frames"))
            return
        self.inbox.put_nowait(message)
        if queued + 1 >= HOLD_AT and not self.holding:
            self.holding = True
            self.end.write(hold_msg(self.cid))

    def full(self, full: bool) -> None:
        """The gateway's ``wait`` / ``go`` for the agent's socket."""
        if full:
            self.writable.clear()
        else:
            self.writable.set()

    def lost(self, code: int) -> None:
        """The agent's socket is gone (its close code), or the whole trunk is."""
        if self.open:
            self._end(code)

    def _end(self, code: int) -> None:
        self.open = False
        self.close_code = code
        self.end.links.pop(self.cid, None)
        self.inbox.put_nowait(None)
        self.writable.set()  # a send waiting for room ends (ConnectionClosed)

    @property
    def buffered(self) -> int:
        return 0  # the gateway measures its agent's socket and closes a slow one itself


OnOpen = Callable[[TrunkLink], Coroutine[Any, Any, None]]


class TrunkEnd:
    """The notifier's end of one gateway's trunk: its links by id, frames batched per turn.

    Within a turn, the frames queued for each link keep their order: a frame queued for several
    links right after another goes in the same ``F`` message, otherwise a new one starts, so the
    messages follow the order of the calls that queued them.
    """

    def __init__(
        self, conn: ServerConnection, max_buffer: int, max_queued: int, max_message: int | None
    ) -> None:
        self.conn = conn
        self.max_buffer = max_buffer
        self.max_queued = max_queued
        self.max_message = max_message  # an agent's message, as on a socket of its own
        self.links: dict[int, TrunkLink] = {}
        self._batches: list[tuple[bytes, list[int]]] = []
        self._flush: asyncio.Handle | None = None

    def queue(self, cid: int, data: bytes) -> None:
        batches = self._batches
        if batches and batches[-1][0] is data:
            batches[-1][1].append(cid)
        else:
            batches.append((data, [cid]))
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_soon(self.flush)

    def queue_many(self, cids: list[int], data: bytes) -> None:
        """``queue`` for several links at once (a fan-out): the list is the batch's, not copied."""
        batches = self._batches
        if batches and batches[-1][0] is data:
            batches[-1][1].extend(cids)
        else:
            batches.append((data, cids))
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush = None
        batches, self._batches = self._batches, []
        if not batches:
            return
        # Frames in a row for the same links go as one body (a mail's message.added and the
        # badge that counts it, for a whole mailbox): one id list on the trunk, and one chunk
        # the gateway writes to each socket as it came, with no joining per agent.
        merged: list[tuple[bytes, list[int]]] = [batches[0]]
        for data, cids in batches[1:]:
            last_data, last_cids = merged[-1]
            if cids == last_cids and len(last_data) + len(data) <= MERGE_MAX:
                merged[-1] = (last_data + data, cids)
            else:
                merged.append((data, cids))
        self._put(b"".join(_binary(frames_msg(cids, data)) for data, cids in merged))

    def write(self, message: bytes) -> None:
        """A message now, after what this turn queued (so a link's frames keep their order)."""
        self.flush()
        self._put(_binary(message))

    def _put(self, data: bytes) -> None:
        conn = self.conn
        if conn.protocol.state is not State.OPEN:
            return
        transport = conn.transport
        if transport.get_write_buffer_size() > self.max_buffer:
            # The gateway has stopped reading: its agents reconnect (elsewhere) and resume.
            log.warning("trunk not read, dropping it", extra={"links": len(self.links)})
            transport.abort()
            return
        transport.write(data)

    async def serve(self, on_open: OnOpen) -> None:
        """Read the gateway's messages until the trunk closes; every link ends with it."""
        tasks: set[asyncio.Task[None]] = set()
        try:
            async for raw in self.conn:
                if not isinstance(raw, bytes):
                    await self.conn.close(1003, "trunk messages are binary")
                    break
                try:
                    m = decode(raw)
                except TrunkError as exc:
                    log.warning("bad trunk message", extra={"error": str(exc)})
                    await self.conn.close(1002, "bad trunk message")
                    break
                if m.kind == OPEN:
                    if m.cid in self.links:
                        continue  # a cid is opened once
                    try:
                        info = open_info(m.body)
                    except TrunkError:
                        self.write(refused_msg(m.cid, 1002, "bad open"))
                        continue
                    link = TrunkLink(self, m.cid, info, self.max_queued)
                    self.links[m.cid] = link
                    task = asyncio.create_task(on_open(link))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                elif m.kind in (TEXT, BINARY):
                    target = self.links.get(m.cid)
                    if target is None:
                        continue
                    if self.max_message is not None and len(m.body) > self.max_message:
                        await target.close(1009, "message too big")
                        continue
                    try:
                        target.feed(m.body.decode() if m.kind == TEXT else m.body)
                    except UnicodeDecodeError:
                        await target.close(1007, "invalid UTF-8")  # the gateway checks it
                elif m.kind in (CLOSED, WAIT, GO):
                    target = self.links.get(m.cid)
                    if target is None:
                        continue
                    if m.kind == CLOSED:
                        target.lost(m.code)
                    else:
                        target.full(m.kind == WAIT)
        except ConnectionClosed:
            pass
        finally:
            for link in list(self.links.values()):
                link.lost(1006)

    def refuse(self, link: TrunkLink, code: int, reason: str) -> None:
        if link.open:
            link._end(code)
            self.write(refused_msg(link.cid, code, reason))

    def accept(self, link: TrunkLink) -> None:
        if link.open:
            self.write(accepted_msg(link.cid))


def _binary(payload: bytes) -> bytes:
    return Frame(Opcode.BINARY, payload).serialize(mask=False)
