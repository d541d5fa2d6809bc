"""A light WebSocket client for the agents that only hold a connection and count frames.

The bench's agents share the 2 cores with every service: a ``websockets`` client per connection,
parsing each frame into a message and waking a task for it, cost the holders about as much CPU as
the notifier spent sending (at 1,000 agents, tens of thousands of frames a second). This is an
asyncio protocol (uvloop does the TLS in C) that does the opening handshake itself and then walks
frame headers over the received bytes: a text frame that starts with ``{"type":"message.added"``
and contains the run's marker is counted, a ping is answered, a close is answered and recorded.
Nothing is skipped: every byte is framed, so every frame is seen and the count stays exact.

While a case runs, a holder may also ask the kernel to wake it only once some kilobytes wait
(``batch_reads``, ``SO_RCVLOWAT``): the agents' browsers are on machines of their own in
production, while here they share two cores with every service, and a wake-up, a recv and a
Python call per frame per connection were most of the holders' CPU. The server's side does not
change (it writes each frame to each socket as it comes, and the kernel takes it); the
observers, which do the timing, read every frame at once; at the end each holder wakes on any
byte again, so the last frames are counted.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import ssl
from typing import cast
from urllib.parse import urlsplit

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
ADDED = b'{"type":"message.added"'
EVENT_ID = b'"event_id":"'
RESYNC = b'{"type":"resync"'
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())  # noqa: S324 (RFC 6455 §4.2.2)


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame (RFC 6455 §5.3: client frames are masked)."""
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    key = os.urandom(4)
    return head + key + mask(payload, key)


def mask(data: bytes, key: bytes) -> bytes:
    n = len(data)
    if not n:
        return b""
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


class HandshakeError(Exception):
    pass


class FrameCounter(asyncio.Protocol):
    """One agent's connection: counts this run's ``message.added`` frames."""

    def __init__(self, request: bytes, key: bytes) -> None:
        self.request = request
        self.expect = accept_key(key)
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.upgraded = False
        self.marker = b""
        self.count = 0
        self.frames = 0
        self.close_code: int | None = None
        self.errors = 0
        # The last event id seen (every server frame names it right after its type), for a
        # ``resume`` after the connection is lost; and whether the server said ``resync``.
        self.last_id = b""
        self.resyncs = 0

    # ---- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(HandshakeError(f"connection lost: {exc!r}"))
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).decode("latin-1").split("\r\n")
            del buf[: end + 4]
            ok = head[0].startswith("HTTP/1.1 101") and any(
                line.lower().startswith("sec-websocket-accept:")
                and line.split(":", 1)[1].strip().encode() == self.expect
                for line in head[1:]
            )
            if not ok:
                self.opened.set_exception(HandshakeError(head[0]))
                assert self.transport is not None
                self.transport.close()
                return
            self.upgraded = True
            self.opened.set_result(None)
        self._frames()

    # ---- frames ------------------------------------------------------------------------------
    def _frames(self) -> None:
        buf = self.buf
        size = len(buf)
        pos = 0
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            h = 2
            if n == 126:
                if size - pos < 4:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                h = 4
            elif n == 127:
                if size - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                h = 10
            start = pos + h
            end = start + n
            if end > size:
                break
            op = b0 & 0x0F
            self.frames += 1
            if b1 & 0x80 or b0 & 0x70 or (not b0 & 0x80 and op < OP_CLOSE) or op == OP_CONT:
                self.errors += 1  # masked, extension bits or fragments: the notifier sends none
            elif op == OP_TEXT:
                if (
                    self.marker
                    and buf.startswith(ADDED, start)
                    and buf.find(self.marker, start, end) >= 0
                ):
                    self.count += 1
                at = buf.find(EVENT_ID, start, min(end, start + 48))
                if at >= 0:
                    at += len(EVENT_ID)
                    self.last_id = bytes(buf[at : buf.find(b'"', at, end)])
                elif buf.startswith(RESYNC, start):
                    self.resyncs += 1
            elif op == OP_PING:
                self._send(OP_PONG, bytes(buf[start:end]))
            elif op == OP_CLOSE:
                self.close_code = int.from_bytes(buf[start : start + 2], "big") if n >= 2 else 1005
                self._send(OP_CLOSE, bytes(buf[start : start + 2]))
            pos = end
        if pos:
            del buf[:pos]

    def batch_reads(self, low_bytes: int) -> None:
        """Wake on ``low_bytes`` waiting (1: on any byte, the default; see the module's text)."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is not None and not self.transport.is_closing():  # type: ignore[union-attr]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, max(1, low_bytes))

    def _send(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(masked_frame(opcode, payload))

    def send_text(self, payload: bytes) -> None:
        self._send(OP_TEXT, payload)

    def close(self) -> None:
        """Start the closing handshake (1000); the server closes TCP after it answers."""
        if self.close_code is None:
            self._send(OP_CLOSE, (1000).to_bytes(2, "big"))


async def open_counter(
    url: str, token: str, ctx: ssl.SSLContext, origin: str, open_timeout_s: float = 30
) -> FrameCounter:
    """Connect, upgrade with the ``bearer.`` subprotocol and return the counting protocol."""
    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 443
    key = base64.b64encode(os.urandom(16))
    request = (
        f"GET {u.path or '/'} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: chatflow.v1, bearer.{token}\r\n"
        f"Origin: {origin}\r\n"
        "\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    _, proto = await asyncio.wait_for(
        loop.create_connection(
            lambda: FrameCounter(request, key), host, port, ssl=ctx, server_hostname=host
        ),
        open_timeout_s,
    )
    await asyncio.wait_for(proto.opened, open_timeout_s)
    return proto
