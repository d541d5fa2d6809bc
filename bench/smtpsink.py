"""A lean SMTP sink for the benchmarks: a real ESMTP server (STARTTLS, PIPELINING, SIZE,
transparency) that hands every message it accepts to a callback and answers 250.

``bench.sender``'s relay was aiosmtpd, whose per-message cost was a third of the sender's own
(~1 ms of CPU per 5 KB message on this machine: a coroutine per command, each address parsed
with ``email``'s header parser, one TLS write per reply). A sink that only counts and keeps
what it is given needs none of that: this one is an ``asyncio.Protocol`` that answers all the
commands a read brought in one write (RFC 2920) and does nothing per message beyond finding
the end of data and undoing dot-stuffing. It does not check addresses or enforce limits; it
is for measuring the sender, not for the exactness tests (their sinks stay aiosmtpd).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import cast

Deliver = Callable[[str, list[str], bytes], None]
MAX_SIZE = 33554432  # what aiosmtpd offers by default


class SinkProtocol(asyncio.Protocol):
    def __init__(
        self,
        deliver: Deliver,
        hostname: str,
        tls_context: ssl.SSLContext | None,
        *,
        require_starttls: bool = True,
        pipelining: bool = True,
    ) -> None:
        self._deliver = deliver
        self._hostname = hostname
        self._tls_context = tls_context
        self._require_tls = require_starttls and tls_context is not None
        self._pipelining = pipelining
        self._transport: asyncio.Transport | None = None
        self._tls = False
        self._buf = b""
        self._in_data = False
        self._scan_from = 0
        self._mail_from: str | None = None
        self._rcpts: list[str] = []
        self._closing = False

    # ---- transport events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if not self._tls:
            self._transport.write(f"220 {self._hostname} ESMTP bench sink\r\n".encode())

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        out: list[bytes] = []
        starttls = False
        while self._buf and not self._closing:
            if self._in_data:
                if not self._take_data(out):
                    break
                continue
            end = self._buf.find(b"\r\n")
            if end < 0:
                if len(self._buf) > 4096:
                    out.append(b"500 5.5.2 line too long\r\n")
                    self._closing = True
                break
            line, self._buf = self._buf[:end], self._buf[end + 2 :]
            reply, starttls = self._command(line.decode("utf-8", "replace"))
            out.append(reply)
            if starttls:
                break
        transport = self._transport
        if transport is None:
            return
        if out:
            transport.write(b"".join(out))
        if self._closing:
            transport.close()
        elif starttls:
            asyncio.get_running_loop().create_task(self._start_tls(transport))

    async def _start_tls(self, transport: asyncio.Transport) -> None:
        assert self._tls_context is not None
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(transport, self, self._tls_context, server_side=True)
        except (OSError, ssl.SSLError):
            transport.close()
            return
        if new is None:
            transport.close()
            return
        self._transport = new
        self._tls = True
        self._reset()
        self._buf = b""

    # ---- commands
    def _reset(self) -> None:
        self._mail_from = None
        self._rcpts = []

    def _ehlo(self) -> bytes:
        lines = [self._hostname, f"SIZE {MAX_SIZE}", "8BITMIME", "SMTPUTF8"]
        if self._pipelining:
            lines.append("PIPELINING")
        if self._tls_context is not None and not self._tls:
            lines.append("STARTTLS")
        lines.append("HELP")
        return "".join(
            f"250{'-' if i < len(lines) - 1 else ' '}{text}\r\n" for i, text in enumerate(lines)
        ).encode()

    def _command(self, line: str) -> tuple[bytes, bool]:
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        if verb == "EHLO":
            self._reset()
            return self._ehlo(), False
        if verb == "HELO":
            self._reset()
            return f"250 {self._hostname}\r\n".encode(), False
        if verb == "QUIT":
            self._closing = True
            return b"221 2.0.0 Bye\r\n", False
        if verb == "NOOP":
            return b"250 2.0.0 OK\r\n", False
        if verb == "RSET":
            self._reset()
            return b"250 2.0.0 OK\r\n", False
        if verb == "STARTTLS":
            if self._tls_context is None or self._tls:
                return b"503 5.5.1 TLS not available\r\n", False
            return b"220 2.0.0 Ready to start TLS\r\n", True
        if verb in ("MAIL", "RCPT", "DATA") and self._require_tls and not self._tls:
            return b"530 5.7.0 Must issue a STARTTLS command first\r\n", False
        if verb == "MAIL":
            if self._mail_from is not None:
                return b"503 5.5.1 Error: nested MAIL command\r\n", False
            upper = arg.upper()
            if not upper.startswith("FROM:"):
                return b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n", False
            self._mail_from = _path(arg[5:])
            return b"250 2.1.0 OK\r\n", False
        if verb == "RCPT":
            if self._mail_from is None:
                return b"503 5.5.1 Error: need MAIL command\r\n", False
            if not arg.upper().startswith("TO:"):
                return b"501 5.5.4 Syntax: RCPT TO:<address>\r\n", False
            self._rcpts.append(_path(arg[3:]))
            return b"250 2.1.5 OK\r\n", False
        if verb == "DATA":
            if not self._rcpts:
                return b"503 5.5.1 Error: need RCPT command\r\n", False
            self._in_data = True
            self._scan_from = 0
            return b"354 End data with <CR><LF>.<CR><LF>\r\n", False
        return b"500 5.5.2 Error: command not recognized\r\n", False

    def _take_data(self, out: list[bytes]) -> bool:
        """The message, once its end (CRLF . CRLF) is in the buffer; False until then."""
        buf = self._buf
        if buf.startswith(b".\r\n"):
            end, body = 0, b""
        else:
            end = buf.find(b"\r\n.\r\n", self._scan_from)
            if end < 0:
                self._scan_from = max(0, len(buf) - 4)
                return False
            body = buf[: end + 2]
            end += 2
        self._buf = buf[end + 3 :]
        self._in_data = False
        if body.startswith(b".") or b"\n." in body:
            if body.startswith(b"."):
                body = body[1:]
            body = body.replace(b"\r\n..", b"\r\n.")
        assert self._mail_from is not None
        self._deliver(self._mail_from, self._rcpts, body)
        self._reset()
        out.append(b"250 2.0.0 Ok: queued\r\n")
        return True


def _path(text: str) -> str:
    """The address of ``<address> [params]``."""
    text = text.strip()
    if text.startswith("<"):
        return text[1 : text.find(">")] if ">" in text else text[1:]
    return text.split(" ", 1)[0]


async def serve(
    deliver: Deliver,
    *,
    host: str,
    port: int,
    hostname: str,
    tls_context: ssl.SSLContext | None,
    require_starttls: bool = True,
    pipelining: bool = True,
) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: SinkProtocol(
            deliver,
            hostname,
            tls_context,
            require_starttls=require_starttls,
            pipelining=pipelining,
        ),
        host=host,
        port=port,
    )
