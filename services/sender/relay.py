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
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiosmtplib
from aiosmtplib.protocol import PERIOD_REGEX, SMTPProtocol, normalize_message_line_endings

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

    async def _data(
        self, smtp: aiosmtplib.SMTP, message: bytes, before_dot: Callable[[], Awaitable[None]]
    ) -> str:
        start = await smtp.execute_command(b"DATA", timeout=self._timeout)
        if start.code != 354:
            await _rset(smtp)
            raise Rejected(start.code, start.message, stage="DATA")
        proto = smtp.protocol
        if proto is None:
            raise aiosmtplib.SMTPServerDisconnected("connection lost")
        body = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message))
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
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
