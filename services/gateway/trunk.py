"""The gateway's end of the trunks: a few WebSockets to the notifier carrying every agent.

A ``Session`` (``services.gateway.wsedge``) attaches to the trunk with the fewest sessions, is
given a connection id, and sends ``open``; the notifier answers ``accepted`` once the agent is
registered (then the session sends its 101) or ``refused``. From then on the notifier's ``F``
messages name the sessions each frame is for, and the trunk hands the same bytes to each; the
sessions touched by one read of the trunk write once each. The codec and the notifier's end are
``libs.common.trunk``; the why is ADR 0005.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import ssl
from typing import Protocol, cast
from urllib.parse import urlsplit

from libs.common import trunk as tk
from services.gateway.domain import wsframes as wf

log = logging.getLogger("chatflow.gateway.trunk")

MAX_HEAD = 16 * 1024


class TrunkUser(Protocol):
    """What a trunk needs of a session."""

    def trunk_accepted(self) -> None: ...
    def trunk_refused(self, code: int, reason: str) -> None: ...
    def trunk_frames(self, data: bytes, broadcast: bool = True) -> None: ...
    def trunk_flush(self) -> None: ...
    def trunk_close(self, code: int, reason: str) -> None: ...
    def trunk_lost(self) -> None: ...
    def trunk_hold(self, hold: bool) -> None: ...


class TrunkDown(ConnectionError):
    """The trunk could not be opened (the notifier is down or refused it)."""


class Trunk(asyncio.Protocol):
    """One TLS WebSocket to the notifier, as its client (our frames are masked)."""

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.sessions: dict[int, TrunkUser] = {}
        self.next_cid = 1
        self.buf = bytearray()
        self.head: asyncio.Future[bytes] = self.loop.create_future()
        self.head.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.upgraded = False
        self.lost = False
        self.fragments: list[bytes] = []
        self.ping_data: bytes | None = None  # our unanswered ping
        self.ping_sent = 0.0

    # ---- opening ------------------------------------------------------------------------------
    async def handshake(self, url: str, timeout: float) -> None:  # noqa: ASYNC109
        """The upgrade of the trunk path, checked as a WebSocket client must."""
        u = urlsplit(url)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {u.path or '/'} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: {tk.SUBPROTOCOL}\r\n\r\n"
        ).encode()
        assert self.transport is not None
        self.transport.write(request)
        async with asyncio.timeout(timeout):
            head = await self.head
        status, headers = _parse_response(head)
        if (
            status != 101
            or headers.get("sec-websocket-accept") != wf.accept_key(key)
            or headers.get("upgrade", "").lower() != "websocket"
            or "sec-websocket-extensions" in headers
            or headers.get("sec-websocket-protocol") != tk.SUBPROTOCOL
        ):
            raise TrunkDown(f"trunk handshake refused ({status})")
        self.upgraded = True
        if self.buf:
            self._read()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    @property
    def usable(self) -> bool:
        return (
            self.upgraded
            and not self.lost
            and self.transport is not None
            and not self.transport.is_closing()
        )

    # ---- sessions -----------------------------------------------------------------------------
    def open(self, user: TrunkUser, token: str, origin: str | None, ip: str, rid: str) -> int:
        cid = self.next_cid
        self.next_cid = cid + 1 if cid < 0xFFFFFFFF else 1
        self.sessions[cid] = user
        self._send(tk.open_msg(cid, token, origin, ip, rid))
        return cid

    def text(self, cid: int, payload: bytes) -> None:
        self._send(tk.text_msg(cid, payload))

    def binary(self, cid: int, payload: bytes) -> None:
        self._send(tk.binary_msg(cid, payload))

    def closed(self, cid: int, code: int) -> None:
        """The agent's socket is gone: the notifier forgets it."""
        if self.sessions.pop(cid, None) is not None:
            self._send(tk.closed_msg(cid, code))

    def forget(self, cid: int) -> None:
        self.sessions.pop(cid, None)

    def full(self, cid: int, full: bool) -> None:
        """The agent's socket is full (or drained): the notifier's sends to it wait (or go)."""
        if cid in self.sessions:
            self._send(tk.wait_msg(cid) if full else tk.go_msg(cid))

    def heartbeat(self, now: float, timeout: float) -> None:
        """Ping the notifier; a trunk whose last ping went unanswered for ``timeout`` is dropped
        (its agents get 1011 and reconnect): a hung or unreachable replica would otherwise keep
        them connected to nothing, their own pings answered here."""
        if not self.usable:
            return
        if self.ping_data is not None:
            if now - self.ping_sent >= timeout:
                log.warning("trunk not answering pings, dropping it")
                self._abort()
            return
        self.ping_data, self.ping_sent = os.urandom(4), now
        assert self.transport is not None
        self.transport.write(wf.client_frame(wf.OP_PING, self.ping_data, os.urandom(4)))

    def _send(self, message: bytes) -> None:
        if self.usable:
            assert self.transport is not None
            self.transport.write(wf.client_frame(wf.OP_BINARY, message, os.urandom(4)))

    # ---- reading ------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.upgraded:
            if self.head.done():
                return
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buf[:end])
                del self.buf[: end + 4]
                self.head.set_result(head)
            elif len(self.buf) > MAX_HEAD:
                self.head.set_exception(TrunkDown("trunk response head too long"))
            return
        self._read()

    def _read(self) -> None:
        buf, pos, touched = self.buf, 0, dict[int, TrunkUser]()
        try:
            while True:
                try:
                    frame = wf.parse_frame(buf, self.max_message_bytes, pos)
                except ValueError:
                    log.warning("trunk message over the cap: dropping the trunk")
                    self._abort()
                    return
                if frame is None:
                    break
                pos += frame.size
                try:
                    self._on_frame(frame, touched)
                except Exception:
                    # One session's trouble must not take the trunk, and every agent on it, down.
                    log.exception("trunk message handling failed")
                if self.lost:
                    return
        finally:
            del buf[:pos]
            for user in touched.values():
                try:
                    user.trunk_flush()
                except Exception:
                    log.exception("session write failed")

    def _on_frame(self, frame: wf.Frame, touched: dict[int, TrunkUser]) -> None:
        op = frame.opcode
        if op == wf.OP_PING:
            assert self.transport is not None
            self.transport.write(wf.client_frame(wf.OP_PONG, frame.payload, os.urandom(4)))
            return
        if op == wf.OP_CLOSE:
            if self.transport is not None:
                self.transport.write(wf.client_frame(wf.OP_CLOSE, frame.payload[:2], os.urandom(4)))
            self._abort()
            return
        if op == wf.OP_PONG:
            if frame.payload == self.ping_data:
                self.ping_data = None
            return
        if op not in (wf.OP_BINARY, wf.OP_CONT):
            return  # the notifier sends no text on a trunk
        self.fragments.append(frame.payload)
        if not frame.fin:
            return
        payload = self.fragments[0] if len(self.fragments) == 1 else b"".join(self.fragments)
        self.fragments = []
        try:
            m = tk.decode(payload)
        except tk.TrunkError as exc:
            log.warning("bad trunk message", extra={"error": str(exc)})
            return
        if m.kind == tk.FRAMES:
            sessions = self.sessions
            for cid in m.cids:
                user = sessions.get(cid)
                if user is not None:
                    user.trunk_frames(m.body)
                    touched[cid] = user
            return
        user = self.sessions.get(m.cid)
        if user is None:
            return
        if m.kind == tk.DIRECT:
            user.trunk_frames(m.body, broadcast=False)
            touched[m.cid] = user
        elif m.kind == tk.ACCEPTED:
            user.trunk_accepted()
        elif m.kind == tk.HOLD or m.kind == tk.RELEASE:
            user.trunk_hold(m.kind == tk.HOLD)
        elif m.kind == tk.REFUSED:
            self.sessions.pop(m.cid, None)
            user.trunk_refused(m.code, m.reason)
        elif m.kind == tk.CLOSE:
            self.sessions.pop(m.cid, None)
            touched.pop(m.cid, None)
            user.trunk_flush()  # the frames before the close first
            user.trunk_close(m.code, m.reason)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.head.done():
            self.head.set_exception(TrunkDown("notifier closed the trunk"))
        sessions, self.sessions = self.sessions, {}
        if sessions:
            log.warning("trunk lost", extra={"sessions": len(sessions)})
        for user in sessions.values():
            user.trunk_lost()

    def _abort(self) -> None:
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self.transport.abort()
        self.connection_lost(None)

    def close(self) -> None:
        self._abort()


class TrunkPool:
    """Up to ``size`` trunks, opened when first needed; a session takes the least loaded.

    Behind a Kubernetes Service each trunk may land on another notifier replica, so ``size``
    spreads one gateway's agents over that many replicas.
    """

    def __init__(
        self, url: str, ssl_context: ssl.SSLContext, size: int, timeout: float, max_bytes: int
    ) -> None:
        u = urlsplit(url)
        self.url = url
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 443
        self.ssl = ssl_context
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.slots: list[Trunk | None] = [None] * max(1, size)
        self.locks = [asyncio.Lock() for _ in self.slots]
        self.attaching = [0 for _ in self.slots]  # sessions choosing each slot right now

    async def attach(self) -> Trunk:
        """The trunk with the fewest sessions, counting those being attached and a slot not
        open yet as none, so the trunks fill in turn even when a reconnect storm asks for many
        at once; ``TrunkDown`` when none can be had."""

        def load(i: int) -> int:
            t = self.slots[i]
            return self.attaching[i] + (len(t.sessions) if t is not None and t.usable else 0)

        i = min(range(len(self.slots)), key=load)
        self.attaching[i] += 1
        try:
            async with self.locks[i]:
                trunk = self.slots[i]
                if trunk is not None and trunk.usable:
                    return trunk
                try:
                    trunk = await self._open()
                except TrunkDown:
                    # Another slot's trunk still works: better loaded than refused.
                    other = next((t for t in self.slots if t is not None and t.usable), None)
                    if other is None:
                        raise
                    return other
                self.slots[i] = trunk
                return trunk
        finally:
            self.attaching[i] -= 1

    def heartbeat(self, now: float, timeout: float) -> None:
        for t in self.slots:
            if t is not None:
                t.heartbeat(now, timeout)

    async def _open(self) -> Trunk:
        loop = asyncio.get_running_loop()
        trunk: Trunk | None = None
        try:
            async with asyncio.timeout(self.timeout):
                _, trunk = await loop.create_connection(
                    lambda: Trunk(self.max_bytes),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host,
                )
            await trunk.handshake(self.url, self.timeout)
        except (OSError, TimeoutError, ssl.SSLError, ConnectionError) as exc:
            if trunk is not None:
                trunk.close()
            # Only the exception type: nothing of the exchange goes to the log.
            raise TrunkDown(type(exc).__name__) from exc
        log.info("trunk opened", extra={"notifier": f"{self.host}:{self.port}"})
        return trunk

    def close(self) -> None:
        for t in self.slots:
            if t is not None:
                t.close()


def _parse_response(head: bytes) -> tuple[int, dict[str, str]]:
    """Status and headers (lower-case names) of a handshake response."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    try:
        status = int(parts[1]) if len(parts) >= 2 and parts[0].startswith("HTTP/1.") else 0
    except ValueError:
        status = 0
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers
