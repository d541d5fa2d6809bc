"""A pool of persistent SMTP connections to one relay, and the SMTP transaction we run on them.

Opening a connection costs a TCP and a TLS handshake, a greeting, EHLO, STARTTLS, EHLO again and
maybe AUTH: several round trips and most of the relay's per-message CPU. So connections stay open
and are reused, one transaction at a time each, up to ``max_connections`` per relay (which also
bounds how many transactions we have in flight there). A connection that failed is dropped; one
that went stale while idle (the relay closed it) is noticed at ``MAIL`` -- before anything about
the message was said -- and the transaction is run once more on a fresh connection.

``DATA`` is ours rather than aiosmtplib's ``data()``: we need a hook between the last byte of the
body and the terminating ``.``, where the queue commits "end of data is being sent" (see
``delivery.py`` for why that moment decides what a crash means).

A relay that advertises PIPELINING (RFC 2920; Postfix and most MTAs do) gets ``MAIL FROM``, every
``RCPT TO`` and ``DATA`` in one write, and we read their replies in order: one round trip instead
of two plus one per recipient. aiosmtplib reads one reply per command written, so its protocol is
extended here (``_Protocol``) to keep every byte that arrives while such a group's replies are
read. The body still goes only after the 354, and the '.' only after ``before_dot``: nothing of
the exactly-once order changes. If the relay answered 354 although no recipient was accepted (a
server must not), the connection is closed without ending the data: nothing is delivered.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib
import aiosmtplib.smtp
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import (
    COMMAND_INJECTION_REGEX,
    MAX_RESPONSE_LENGTH,
    PERIOD_REGEX,
    SMTPProtocol,
    normalize_message_line_endings,
)
from aiosmtplib.response import SMTPResponse

log = logging.getLogger("chatflow.sender.relay")


class SessionError(Exception):
    """The relay could not be reached or the session could not be set up (always temporary)."""


class Rejected(Exception):
    """The relay answered the message with an error reply."""

    def __init__(self, code: int, detail: str, *, stage: str) -> None:
        super().__init__(f"{code} {detail}")
        self.code = code
        self.detail = detail
        self.stage = stage

    @property
    def permanent(self) -> bool:
        return self.code >= 500


class TooBig(Exception):
    """The relay announced a SIZE limit the message exceeds (permanent)."""


class LostAfterDot(Exception):
    """The connection failed after the final '.' was written: the relay may have the message."""


class _Protocol(SMTPProtocol):
    """aiosmtplib's protocol, able to read the replies to a group of pipelined commands.

    aiosmtplib parses one reply per ``data_received`` and drops what arrives while a parsed reply
    waits to be picked up: with several replies in flight that loses replies. While
    :meth:`pipeline` runs, every byte is kept and the replies are parsed from the buffer in order;
    otherwise it is aiosmtplib's protocol unchanged.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._grouped = False
        self._more: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        if not self._grouped:
            super().data_received(data)
            return
        self._buffer.extend(data)
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._wake()

    def eof_received(self) -> bool:
        self._wake()
        return super().eof_received()

    def _wake(self) -> None:
        if self._more is not None and not self._more.done():
            self._more.set_result(None)

    async def pipeline(
        self, commands: list[bytes], limit_s: float
    ) -> tuple[list[SMTPResponse], Exception | None]:
        """Write ``commands`` (each ending in CRLF) at once; the replies read, in order, and the
        error that stopped reading before the last one (disconnection, timeout), if any."""
        if self._command_lock is None:
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        loop = asyncio.get_running_loop()
        replies: list[SMTPResponse] = []
        async with self._command_lock:
            self._grouped = True
            try:
                self.write(b"".join(commands))
                deadline = loop.time() + limit_s
                while len(replies) < len(commands):
                    reply = self._read_response_from_buffer()
                    if reply is not None:
                        replies.append(reply)
                        continue
                    if len(self._buffer) > MAX_RESPONSE_LENGTH:
                        raise aiosmtplib.SMTPResponseException(-1, "Response too long")
                    if not self.is_connected:
                        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
                    self._more = loop.create_future()
                    try:
                        await asyncio.wait_for(self._more, max(0.0, deadline - loop.time()))
                    except TimeoutError:
                        raise aiosmtplib.SMTPReadTimeoutError(
                            "Timed out waiting for server response"
                        ) from None
                if self._buffer:  # more replies than commands: we cannot tell whose they are
                    raise aiosmtplib.SMTPResponseException(-1, "unexpected data after replies")
            except (aiosmtplib.SMTPException, OSError) as exc:
                return replies, exc
            finally:
                self._grouped = False
                self._more = None
        return replies, None


# aiosmtplib makes its protocol in SMTP._create_connection by this module-level name; ours is the
# same protocol until pipeline() is called (only this module calls it).
aiosmtplib.smtp.SMTPProtocol = _Protocol  # type: ignore[misc]


def _command(*args: bytes) -> bytes:
    """One command line, refusing control characters in it as aiosmtplib's execute_command does."""
    for arg in args:
        if COMMAND_INJECTION_REGEX.search(arg):
            raise ValueError("Command arg contains a prohibited control character")
    return b" ".join(args) + b"\r\n"


@dataclass
class Accepted:
    reply: str
    refused: dict[str, str] = field(default_factory=dict)


@dataclass
class _Conn:
    smtp: aiosmtplib.SMTP
    last_used: float
    messages: int = 0


class RelayPool:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls_context: ssl.SSLContext,
        starttls: bool,
        implicit_tls: bool,
        username: str = "",
        password: str = "",
        ehlo_name: str = "",
        timeout: float = 30.0,
        data_timeout: float = 600.0,
        max_connections: int = 8,
        idle_s: float = 30.0,
        max_messages_per_connection: int = 100,
    ) -> None:
        self.host, self.port = host, port
        self.name = f"{host}:{port}"
        self._tls = tls_context
        self._starttls = starttls and not implicit_tls
        self._implicit_tls = implicit_tls
        self._username, self._password = username, password
        self._ehlo_name = ehlo_name or None
        self._timeout, self._data_timeout = timeout, data_timeout
        self._idle_s = idle_s
        self._max_messages = max_messages_per_connection
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Conn] = []
        self.connections_opened = 0

    async def _open(self) -> _Conn:
        smtp = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            use_tls=self._implicit_tls,
            start_tls=self._starttls,
            tls_context=self._tls,
            username=self._username or None,
            password=self._password or None,
            local_hostname=self._ehlo_name,
            timeout=self._timeout,
        )
        try:
            await smtp.connect()
        except (aiosmtplib.SMTPException, OSError, TimeoutError, ssl.SSLError) as exc:
            smtp.close()
            raise SessionError(f"connection to {self.name} failed: {_describe(exc)}") from exc
        self.connections_opened += 1
        return _Conn(smtp, time.monotonic())

    def _take_idle(self) -> _Conn | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.smtp.is_connected and now - conn.last_used < self._idle_s:
                return conn
            conn.smtp.close()
        return None

    def _release(self, conn: _Conn, reusable: bool) -> None:
        conn.messages += 1
        conn.last_used = time.monotonic()
        if reusable and conn.smtp.is_connected and conn.messages < self._max_messages:
            self._idle.append(conn)
        elif conn.smtp.is_connected and reusable:
            asyncio.get_running_loop().create_task(_quit(conn.smtp))
        else:
            conn.smtp.close()

    async def deliver(
        self,
        mail_from: str,
        recipients: list[str],
        message: bytes,
        before_dot: Callable[[], Awaitable[None]],
    ) -> Accepted:
        """One SMTP transaction; raises SessionError, Rejected, TooBig or LostAfterDot."""
        async with self._slots:
            conn = self._take_idle()
            reused = conn is not None
            if conn is None:
                conn = await self._open()
            try:
                try:
                    result = await self._transaction(
                        conn.smtp, mail_from, recipients, message, before_dot
                    )
                except _Stale as stale:
                    conn.smtp.close()
                    if not reused:
                        raise SessionError(f"{self.name}: {stale}") from None
                    conn = await self._open()
                    result = await self._transaction(
                        conn.smtp, mail_from, recipients, message, before_dot
                    )
            except Rejected as exc:
                self._release(conn, reusable=exc.code != 421)
                raise
            except TooBig:
                self._release(conn, reusable=True)
                raise
            except _Stale as stale:
                conn.smtp.close()
                raise SessionError(f"{self.name}: {stale}") from None
            except BaseException:
                conn.smtp.close()
                raise
            self._release(conn, reusable=True)
            return result

    async def _transaction(
        self,
        smtp: aiosmtplib.SMTP,
        mail_from: str,
        recipients: list[str],
        message: bytes,
        before_dot: Callable[[], Awaitable[None]],
    ) -> Accepted:
        options: list[str] = []
        try:
            if smtp.last_ehlo_response is None:  # after STARTTLS aiosmtplib says EHLO lazily
                await smtp.ehlo()
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
            raise _Stale(f"connection closed before EHLO ({_describe(exc)})") from exc
        except aiosmtplib.SMTPResponseException as exc:
            raise SessionError(f"{self.name}: EHLO refused: {exc.code} {exc.message}") from exc
        if smtp.supports_extension("size"):
            limit = smtp.esmtp_extensions.get("size", "").strip()
            if limit.isdigit() and 0 < int(limit) < len(message):
                raise TooBig(
                    f"message is {len(message)} bytes; {self.name} accepts at most {limit}"
                )
            options.append(f"SIZE={len(message)}")
        if smtp.supports_extension("pipelining") and isinstance(smtp.protocol, _Protocol):
            return await self._pipelined(smtp, mail_from, recipients, message, before_dot, options)
        try:
            await smtp.mail(mail_from, options=options)
        except aiosmtplib.SMTPSenderRefused as exc:
            if exc.code == 421:
                raise _Stale(f"421 {_one_line(exc.message)} (at MAIL FROM)") from exc
            raise Rejected(exc.code, exc.message, stage="MAIL FROM") from exc
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
            raise _Stale(f"connection closed at MAIL FROM ({_describe(exc)})") from exc
        try:
            refused: dict[str, tuple[int, str]] = {}
            for rcpt in recipients:
                try:
                    await smtp.rcpt(rcpt)
                except aiosmtplib.SMTPRecipientRefused as exc:
                    if exc.code == 421:
                        raise Rejected(421, exc.message, stage="RCPT TO") from exc
                    refused[rcpt] = (exc.code, exc.message)
            if len(refused) == len(recipients):
                await _rset(smtp)
                temporary = [r for r, (code, _) in refused.items() if code < 500]
                code = refused[temporary[0]][0] if temporary else next(iter(refused.values()))[0]
                detail = "; ".join(f"{r}: {code_} {msg}" for r, (code_, msg) in refused.items())
                raise Rejected(code, detail, stage="RCPT TO")
            reply = await self._data(smtp, message, before_dot)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            raise SessionError(f"{self.name}: {_describe(exc)}") from exc
        notes = {r: f"{code} {msg}" for r, (code, msg) in refused.items()}
        return Accepted(reply, notes)

    async def _pipelined(
        self,
        smtp: aiosmtplib.SMTP,
        mail_from: str,
        recipients: list[str],
        message: bytes,
        before_dot: Callable[[], Awaitable[None]],
        options: list[str],
    ) -> Accepted:
        """``_transaction`` with MAIL, RCPT and DATA in one write (RFC 2920), the same outcomes."""
        proto = smtp.protocol
        assert isinstance(proto, _Protocol)
        commands = [
            _command(
                b"MAIL",
                b"FROM:" + quote_address(mail_from).encode("ascii"),
                *(o.encode("ascii") for o in options),
            ),
            *(_command(b"RCPT", b"TO:" + quote_address(r).encode("ascii")) for r in recipients),
            _command(b"DATA"),
        ]
        replies, error = await proto.pipeline(commands, self._timeout)
        if not replies:
            if isinstance(error, aiosmtplib.SMTPServerDisconnected | ConnectionError):
                raise _Stale(f"connection closed at MAIL FROM ({_describe(error)})") from error
            raise SessionError(f"{self.name}: {_describe(error or Exception())}") from error
        started = len(replies) == len(commands) and replies[-1].code == 354
        try:
            mail = replies[0]
            if mail.code != 250:
                if mail.code == 421:
                    raise _Stale(f"421 {_one_line(mail.message)} (at MAIL FROM)")
                raise Rejected(mail.code, mail.message, stage="MAIL FROM")
            refused: dict[str, tuple[int, str]] = {}
            for rcpt, answer in zip(recipients, replies[1:], strict=False):
                if answer.code == 421:
                    raise Rejected(421, answer.message, stage="RCPT TO")
                if answer.code not in (250, 251):
                    refused[rcpt] = (answer.code, answer.message)
            if error is not None:  # the connection failed before every reply came
                raise SessionError(f"{self.name}: {_describe(error)}") from error
            if len(refused) == len(recipients):
                temporary = [r for r, (code, _) in refused.items() if code < 500]
                code = refused[temporary[0]][0] if temporary else next(iter(refused.values()))[0]
                detail = "; ".join(f"{r}: {code_} {msg}" for r, (code_, msg) in refused.items())
                raise Rejected(code, detail, stage="RCPT TO")
            start = replies[-1]
            if not started:
                raise Rejected(start.code, start.message, stage="DATA")
        except BaseException:
            if started or error is not None:
                # A 354 we will not follow with data (nothing may end it), or replies still due.
                smtp.close()
            elif smtp.is_connected and replies[0].code == 250:
                await _rset(smtp)
            raise
        try:
            reply = await self._data(smtp, message, before_dot, started=True)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            raise SessionError(f"{self.name}: {_describe(exc)}") from exc
        notes = {r: f"{code} {msg}" for r, (code, msg) in refused.items()}
        return Accepted(reply, notes)

    async def _data(
        self,
        smtp: aiosmtplib.SMTP,
        message: bytes,
        before_dot: Callable[[], Awaitable[None]],
        *,
        started: bool = False,
    ) -> str:
        if not started:
            start = await smtp.execute_command(b"DATA", timeout=self._timeout)
            if start.code != 354:
                await _rset(smtp)
                raise Rejected(start.code, start.message, stage="DATA")
        proto = smtp.protocol
        if proto is None:
            raise aiosmtplib.SMTPServerDisconnected("connection lost")
        body = wire_body(message)
        proto.write(body)
        await _drained(proto, self._data_timeout)
        if not proto.is_connected:
            raise aiosmtplib.SMTPServerDisconnected("connection lost during DATA")
        await before_dot()
        try:
            # No await between the write and read_response: the reply cannot slip past the reader.
            proto.write(b".\r\n")
            reply = await proto.read_response(timeout=self._data_timeout)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            raise LostAfterDot(f"{self.name}: {_describe(exc)} after end of data") from exc
        if reply.code != 250:
            raise Rejected(reply.code, reply.message, stage="end of data")
        return f"{reply.code} {reply.message}"

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        await asyncio.gather(*(_quit(c.smtp) for c in idle), return_exceptions=True)


def wire_body(message: bytes) -> bytes:
    """The message as DATA carries it: CRLF line ends, a '.' starting a line doubled, a CRLF at
    the end. aiosmtplib's regular expressions for it, run only where they change something
    (our messages are composed with CRLF and rarely have a line that starts with '.')."""
    crlf = message.count(b"\r\n")
    if message.count(b"\n") != crlf or message.count(b"\r") != crlf:
        message = normalize_message_line_endings(message)
    if message.startswith(b".") or b"\n." in message:
        message = PERIOD_REGEX.sub(b"..", message)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    return message


class _Stale(Exception):
    """A reused connection turned out to be closed before the transaction began."""


async def _drained(proto: SMTPProtocol, limit_s: float) -> None:
    """Wait until our side has handed the body to the kernel (it may sit in user space)."""
    deadline = time.monotonic() + limit_s
    transport = proto.transport
    while transport is not None and not transport.is_closing():
        if getattr(transport, "get_write_buffer_size", lambda: 0)() == 0:
            return
        if time.monotonic() > deadline:
            raise aiosmtplib.SMTPTimeoutError("timed out sending the message body")
        await asyncio.sleep(0.002)


async def _rset(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.rset()
    except aiosmtplib.SMTPException:
        smtp.close()


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.quit(timeout=2.0)
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        smtp.close()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
