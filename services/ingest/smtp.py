"""The SMTP side of ingest: aiosmtpd keeps the protocol, this module makes the decisions.

What a sending MTA can rely on (each point is shown in ``tests/test_smtp.py``):

- **250 means committed.** ``handle_DATA`` answers 250 only after the raw message, what we read
  from it and its ``mail.received`` outbox row are committed in one transaction; any failure on
  the way is 451 and nothing is kept, so the sender's retry is the only copy. The transaction is
  shared with the other sessions that finished DATA meanwhile (group commit, ``writer.py``): one
  WAL flush for all of them; a batch that fails is committed again message by message, so one
  bad message costs only its own session the 451 (``tests/test_writer.py``).
- **Retries are stored once.** The same raw bytes for the same mailbox are one message, forever
  (unique index of migration 0002; why no window is explained there). A retry of a message we
  committed but whose 250 the client never saw gets 250 again, and no second ``mail.received``.
- **Only CRLF.CRLF ends DATA.** DATA is read with aiosmtpd's rule (>= 1.4.5, CVE-2024-27305:
  CRLF-terminated lines, the end is a line that is exactly ``.``), in large pieces
  (``data_reader.py``, held to aiosmtpd's own loop by ``tests/test_data_reader.py``), so
  ``\\n.\\n``, ``\\n.\\r\\n``, ``\\r.\\r``, ``\\r\\n.\\r``, ``\\r\\n.\\n`` and whatever follows them (a
  smuggled ``MAIL FROM``/``RCPT TO``/``DATA``) are message content.
- **Bare CR and bare LF are normalized to CRLF**, before anything reads the message (limits,
  digest, reader, storage); the stored raw is the normalized message. We normalize rather than
  refuse because scripts that write LF-only bodies through a correct SMTP library are common and
  legitimate (Postfix 3.9 chose the same default, ``smtpd_forbid_bare_newline = normalize``),
  and normalizing is what closes the smuggling ambiguity for everything downstream: Python's
  parser treats CR, LF and CRLF alike as line ends, so after normalization every later reader,
  including one that splits on CRLF only, sees exactly the lines and headers we read. A dot
  at the start of a line that followed a bare LF is kept as sent (only CRLF lines are
  dot-transparent on the wire).
- **STARTTLS before MAIL** (530), TLS 1.2 or newer (``libs.common.tls``), and plaintext pipelined
  behind ``STARTTLS`` is discarded (aiosmtpd >= 1.4.6, CVE-2024-34083), never run after the
  handshake.
- **Limits** (settings ``smtp_*``): SIZE advertised and enforced at MAIL and during DATA (552);
  recipients (452 past the limit; the client sends the rest in another transaction); line
  length, header fields and Received hops, checked at the end of DATA with a 5xx that says
  which limit; idle time and total session time (421, then close).
- **PIPELINING** is advertised; aiosmtpd answers pipelined commands in order.
- Unknown recipients get 550 with a text that says we do not relay; ``box+tag@x`` is ``box@x``.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import re
import ssl
import uuid
import weakref
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, AnyStr, TypeVar, cast

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, TLSSetupException, syntax

from libs.common.events import Envelope as EventEnvelope
from services.ingest import storage
from services.ingest.data_reader import DataState, read_data
from services.ingest.domain.mime_reader import ReadMessage, Unreadable, read_message
from services.ingest.received import to_event
from services.ingest.writer import Copy, Job, Writer

if TYPE_CHECKING:
    from services.ingest.service import IngestService
    from services.ingest.settings import IngestSettings

log = logging.getLogger("chatflow.ingest.smtp")
T = TypeVar("T")
# Stores that outlive their session (the client dropped mid-commit); held here so they finish.
_INFLIGHT: set[asyncio.Future[Any]] = set()

# aiosmtpd's reader limit, and so its own line-length refusal. It is a memory bound only: our
# line-length limit is applied after line endings are normalized, so a body written with bare LFs
# is measured by its real lines, not as one long CRLF line.
HARD_LINE_BYTES = 64 * 1024
# Messages larger than this are read in a worker thread, so one big message does not stall
# every other session on the loop.
READ_INLINE_BYTES = 64 * 1024

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# ``<dot-atom@dot-atom>``, then nothing or whitespace and parameters (no comment).
_PLAIN_PATH = re.compile(
    rf"<(?P<address>(?P<local>{_ATOM}(?:\.{_ATOM})*)@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>"
    r"(?P<rest>(?:[ \t]+[^ \t(][^(]*)?)"
)


def base_address(address: str) -> str:
    """``support+token@x`` is delivered to ``support@x`` (the token is for threading)."""
    local, _, domain = address.strip().lower().rpartition("@")
    return f"{local.split('+', 1)[0]}@{domain}"


def normalize_line_endings(data: bytes) -> tuple[bytes, int]:
    """The message with every bare CR and bare LF turned into CRLF, and how many there were."""
    bare = data.count(b"\r") + data.count(b"\n") - 2 * data.count(b"\r\n")
    if not bare:
        return data, 0
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n"), bare


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_line: int
    max_fields: int
    max_received: int

    @classmethod
    def of(cls, s: IngestSettings) -> Limits:
        return cls(
            s.smtp_max_message_bytes,
            s.smtp_max_line_length,
            s.smtp_max_header_fields,
            s.smtp_max_received_headers,
        )

    @property
    def line_too_long(self) -> str:
        return (
            f"500 5.6.0 Line too long: the limit is {self.max_line} octets per line "
            "(RFC 5322 2.1.1); message refused"
        )


def content_refusal(raw: bytes, limits: Limits) -> str | None:
    """The 5xx for a (normalized) message over a content limit, or None."""
    if raw and max(map(len, raw.split(b"\r\n"))) > limits.max_line:
        return limits.line_too_long
    if raw.startswith(b"\r\n"):
        head = b""
    else:
        end = raw.find(b"\r\n\r\n")
        head = raw if end < 0 else raw[:end]
    fields = received = 0
    for line in head.split(b"\r\n"):
        if not line or line[:1] in (b" ", b"\t"):
            continue  # a continuation of the field above
        fields += 1
        if line.split(b":", 1)[0].strip().lower() == b"received":
            received += 1
    if fields > limits.max_fields:
        return (
            f"554 5.6.0 Message refused: {fields} header fields; the limit is {limits.max_fields}"
        )
    if received > limits.max_received:
        return (
            f"554 5.4.6 Message refused: {received} Received headers (limit "
            f"{limits.max_received}); probably a mail loop"
        )
    return None


class EventEncodingError(Exception):
    """A read message whose ``mail.received`` event cannot be encoded."""


class IngestEnvelope(Envelope):
    """aiosmtpd's envelope plus the mailbox each accepted RCPT resolved to, when it was accepted."""

    def __init__(self) -> None:
        super().__init__()
        self.boxes: list[storage.Mailbox] = []


@dataclass
class Prepared:
    """A message past the content checks, read (or quarantined), ready to store."""

    raw: bytes
    read: ReadMessage | None
    reason: str | None
    received_at: datetime
    bare_line_ends: int


@dataclass
class Stored:
    id: str
    new: bool


class IngestSMTP(SMTP):
    """aiosmtpd's SMTP with our session clock, limits and clearer refusal texts."""

    def __init__(self, handler: Any, *, settings: IngestSettings, **kwargs: Any) -> None:
        self.line_length_limit = HARD_LINE_BYTES  # read by SMTP.__init__ for its StreamReader
        # aiosmtpd keeps these in one class-level dict that every new session clears and every
        # EHLO grows: give each session its own (set again at each EHLO, see handle_EHLO).
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self.limits = Limits.of(settings)
        self._session_max_s = settings.smtp_session_max_s
        self._deadline: float | None = None
        super().__init__(handler, timeout=settings.smtp_idle_timeout_s, **kwargs)
        size = self.limits.max_bytes
        self._clearer = {
            "530 Must issue a STARTTLS command first": (
                "530 5.7.0 Must issue a STARTTLS command first"
            ),
            "552 Error: message size exceeds fixed maximum message size": (
                f"552 5.3.4 Message size exceeds the limit of {size} octets"
            ),
            "552 Error: Too much mail data": (
                f"552 5.3.4 Too much mail data: the limit is {size} octets"
            ),
            "500 Line too long (see RFC5321 4.5.3.1.6)": self.limits.line_too_long,
        }

    def _create_envelope(self) -> Envelope:
        return IngestEnvelope()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's MAIL/RCPT path parser, with a fast path for a plain ``<local@domain>``.

        aiosmtpd's own builds a class per call and runs the full RFC 5322 parser (a tenth of
        ingest's CPU, measured); a plain path reads the same either way (test_ingest_fast_paths),
        anything else still goes to it.
        """
        m = _PLAIN_PATH.fullmatch(arg)
        if m is None:
            return super()._getaddr(arg)
        local, address = m["local"], m["address"]
        if self.local_part_limit and len(local) > self.local_part_limit:
            return None, None
        return address, m["rest"].lstrip(" \t")

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """aiosmtpd's STARTTLS on the event loop's own TLS layer (``loop.start_tls``).

        aiosmtpd builds asyncio's pure-Python ``SSLProtocol`` itself, so every reply and every
        piece of DATA went through Python TLS code (a fifth of ingest's CPU in a profile), where
        uvloop's TLS is compiled. What aiosmtpd's ``connection_made`` does after its handshake is
        done here: plaintext sent after the command dropped, a new session (RFC 3207 §4.2), the
        STARTTLS hook asked.
        """
        if arg:
            await self.push("501 Syntax: STARTTLS")
            return
        if not self.tls_context:
            await self.push("454 TLS not available")
            return
        if self._tls_protocol:
            await self.push("503 5.5.1 TLS already active")
            return
        await self.push("220 Ready to start TLS")
        # The handshake has its own timeout: the session timer would write a plaintext 421 into
        # it, and the handshake would then end on a closed transport without an error.
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        plain = cast(asyncio.Transport, self.transport)
        self._original_transport = plain  # closed in connection_lost, as aiosmtpd's is
        # Plaintext pipelined after the command is dropped (RFC 3207 §5). Before the handshake:
        # once it completes, the loop may feed the client's first encrypted command before this
        # coroutine runs again.
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        try:
            secure = await self.loop.start_tls(
                plain,
                self,
                self.tls_context,
                server_side=True,
                ssl_handshake_timeout=self._timeout_duration,
            )
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise TLSSetupException() from error
        if secure is None or secure.is_closing():  # the client went away during the handshake
            raise TLSSetupException()
        self._reader._transport = secure  # type: ignore[attr-defined]
        self._writer._transport = secure  # type: ignore[attr-defined]
        self.transport = secure
        self._tls_protocol = secure  # type: ignore[assignment]  # aiosmtpd tests truthiness
        self._set_rset_state()
        self.session = self._create_session()
        self.session.peer = plain.get_extra_info("peername")
        self.session.ssl = {
            name: secure.get_extra_info(name)
            for name in ("peercert", "cipher", "compression", "ssl_object")
        }
        self._reset_timeout()
        hook = self._handle_hooks.get("STARTTLS")
        self._tls_handshake_okay = True if hook is None else hook(self, self.session, self.envelope)

    async def handle_exception(self, error: Exception) -> str:
        """A failed TLS handshake (a scanner, garbage, an old TLS version) is the client's
        fault: one info line, not an error with a traceback per attempt. aiosmtpd then closes
        the connection without sending the status."""
        if isinstance(error, TLSSetupException):
            assert self.session is not None
            log.info(
                "TLS handshake failed",
                extra={"peer": str(self.session.peer), "reason": str(error.__cause__ or "")},
            )
            return "421 4.7.0 TLS handshake failed"
        return await super().handle_exception(error)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA with its line loop replaced by ``data_reader`` (same rules, measured
        several times cheaper); the checks before and the handler call after are aiosmtpd's."""
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            state, content = await read_data(
                self._reader, self.data_size_limit, self.line_length_limit
            )
        except asyncio.CancelledError:  # the connection went away during DATA
            log.info("Connection lost during DATA")
            self._writer.close()
            raise
        if state is DataState.TOO_LONG:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
            self._set_post_data_state()
            return
        if state is DataState.TOO_MUCH:
            await self.push("552 Error: Too much mail data")
            self._set_post_data_state()
            return
        self.envelope.content = content  # decode_data=False: the bytes as received
        self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str):
            await super().push(self._clearer.get(status, status))
        else:
            await super().push(status)

    # The session clock. aiosmtpd restarts its timer on every valid command (not during DATA);
    # we cap each timer at the session's deadline and say 421 before closing, as RFC 5321 asks.
    def _reset_timeout(self, duration: float | None = None) -> None:
        now = self.loop.time()
        if self._deadline is None:
            self._deadline = now + self._session_max_s
        left = self._deadline - now
        super()._reset_timeout(max(0.001, min(duration or self._timeout_duration, left)))

    def restart_idle_timer(self) -> None:
        """The client finished sending; what we do next is not charged to its idle time."""
        self._reset_timeout()

    def _timeout_cb(self) -> None:
        if self.transport is None:
            return
        over = self._deadline is not None and self.loop.time() >= self._deadline - 0.005
        why = "session time limit reached" if over else "idle for too long"
        try:
            self._writer.write(f"421 4.4.2 {self.hostname} {why}, closing connection\r\n".encode())
        except Exception:  # already closing; the close below is what matters
            log.debug("could not send 421", exc_info=True)
        super()._timeout_cb()


class IngestHandler:
    """The decisions for SMTP; ``lmtp.LMTPHandler`` differs only in how it answers DATA."""

    def __init__(self, service: IngestService) -> None:
        self.service = service
        self.limits = Limits.of(service.settings)

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        # MAIL may carry SIZE= and SMTPUTF8 (RFC 1870: +26, RFC 6531: +10), once, not per EHLO.
        server.command_size_limits["MAIL"] = SMTP.command_size_limit + 26 + 10
        # An MX takes no logins: aiosmtpd would still list an empty "AUTH" after STARTTLS.
        out = [r for r in responses if not r[4:].upper().startswith("AUTH")]
        out.insert(len(out) - 1, "250-PIPELINING")
        return out

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        assert isinstance(envelope, IngestEnvelope)
        if len(envelope.rcpt_tos) >= self.service.settings.smtp_max_recipients:
            return (
                f"452 4.5.3 Too many recipients: at most "
                f"{self.service.settings.smtp_max_recipients} per message, send the rest "
                "in another transaction"
            )
        box = self.service.mailboxes.get(base_address(address)) or self.postmaster(address)
        if box is None:
            log.info("recipient refused", extra={"rcpt": address, "peer": _peer(session)})
            return f"550 5.1.1 <{address}>: no such mailbox here; this server does not relay"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        envelope.boxes.append(box)
        return "250 2.1.5 Recipient ok"

    def postmaster(self, address: str) -> storage.Mailbox | None:
        """The mailbox ``postmaster`` mail goes to: bare or at a domain we serve (RFC 5321
        4.5.1 requires it, case-insensitively), the configured one or the domain's first."""
        local, at, domain = address.strip().lower().rpartition("@")
        if not at:
            local, domain = domain, ""
        if local != "postmaster":
            return None
        boxes = self.service.mailboxes
        ours = sorted(a for a in boxes if not domain or a.rpartition("@")[2] == domain)
        if not ours:
            return None  # not a domain of ours: no relay for postmaster either
        chosen = self.service.settings.smtp_postmaster.strip().lower()
        return boxes.get(chosen) or boxes[ours[0]]

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope, IngestEnvelope)
        if isinstance(server, IngestSMTP):
            server.restart_idle_timer()
        prepared = await self.prepare(session, envelope)
        if isinstance(prepared, str):
            return prepared
        boxes = list({b.id: b for b in envelope.boxes}.values())
        if not boxes:
            return "554 5.5.1 No valid recipients"
        try:
            stored = await self.finish(self.store(prepared, boxes, session, envelope))
        except Exception:
            log.exception("could not store message; asking the client to retry")
            return "451 4.3.0 Temporary failure storing the message, try again later"
        return self.accepted(stored[0])

    # ---- shared by SMTP and LMTP ------------------------------------------------------------
    def accepted(self, stored: Stored) -> str:
        if stored.new:
            return f"250 2.0.0 Ok: queued as {stored.id}"
        return f"250 2.0.0 Ok: already have it as {stored.id}"

    async def prepare(self, session: Session, envelope: Envelope) -> Prepared | str:
        """Normalize, check the content limits and read the message; a str is the refusal."""
        raw, bare = normalize_line_endings(bytes(envelope.original_content or b""))
        refusal = content_refusal(raw, self.limits)
        if refusal is not None:
            log.info(
                "message refused",
                extra={"peer": _peer(session), "reply": refusal, "size": len(raw)},
            )
            return refusal
        received_at = datetime.now(UTC)
        reason: str | None = None
        read: ReadMessage | None = None
        try:
            if len(raw) > READ_INLINE_BYTES:
                read = await asyncio.to_thread(read_message, raw)
            else:
                read = read_message(raw)
        except Unreadable as exc:
            reason = f"unreadable: {exc}"
        except Exception as exc:  # the reader must never cost us a message
            log.exception("reader crashed; message quarantined")
            reason = f"reader error: {type(exc).__name__}: {exc}"
        return Prepared(raw, read, reason, received_at, bare)

    async def finish(self, work: Coroutine[Any, Any, T]) -> T:
        """Run a store to its end even if the client drops meanwhile.

        Its retry then finds the committed copy (a quick 250) instead of racing a rollback.
        """
        task = asyncio.ensure_future(work)
        _INFLIGHT.add(task)
        task.add_done_callback(_done)
        return await asyncio.shield(task)

    async def store(
        self,
        prepared: Prepared,
        boxes: list[storage.Mailbox],
        session: Session,
        envelope: IngestEnvelope,
    ) -> list[Stored]:
        """One transaction for all ``boxes``: the messages, attachments and outbox rows.

        The transaction is the writer's (``writer.py``), shared with the other sessions that
        finished DATA meanwhile; this returns once it is committed.
        """
        job = self.job(prepared, boxes, session, envelope)
        results = await writer_for(self.service).write(job)
        out = [Stored(id_, new) for id_, new in results]
        row = job.copies[0].row
        log.info(
            "message accepted" if row.status == "accepted" else "message quarantined",
            extra={
                "ingest_ids": [s.id for s in out],
                "duplicate": not any(s.new for s in out),
                "message_id": row.message_id,
                "size": len(prepared.raw),
                "bare_line_ends": prepared.bare_line_ends,
                "peer": _peer(session),
                "reason": row.reason,
            },
        )
        return out

    def job(
        self,
        prepared: Prepared,
        boxes: list[storage.Mailbox],
        session: Session,
        envelope: IngestEnvelope,
    ) -> Job:
        """Everything ``store`` commits, ids made here: a row, attachments and event per box.

        An event that cannot be encoded (a reader bug: text no JSON can carry) would fail the
        commit on every retry of the client; the message is quarantined with the reason instead.
        """
        try:
            return self._job(prepared, boxes, session, envelope)
        except EventEncodingError as exc:
            log.error("event could not be encoded; message quarantined", extra={"error": str(exc)})
            reason = f"reader error: its fields could not be encoded ({exc})"[:500]
            unread = replace(prepared, read=None, reason=reason)
            return self._job(unread, boxes, session, envelope)

    def _job(
        self,
        prepared: Prepared,
        boxes: list[storage.Mailbox],
        session: Session,
        envelope: IngestEnvelope,
    ) -> Job:
        read, peer = prepared.read, _peer(session)
        digest = hashlib.sha256(prepared.raw).hexdigest()
        blobs = {digest: prepared.raw}
        copies: list[Copy] = []
        for box in boxes:
            rcpts = [
                r for r, b in zip(envelope.rcpt_tos, envelope.boxes, strict=True) if b.id == box.id
            ]
            row = storage.MessageRow(
                id=uuid.uuid4(),
                mailbox_id=box.id,
                envelope_from=envelope.mail_from or "",
                rcpt=",".join(rcpts),
                raw_sha256=digest,
                status="accepted" if read is not None else "quarantined",
                reason=prepared.reason,
                message_id=read.message_id if read is not None else None,
                received_at=prepared.received_at,
                peer=peer,
            )
            attachments: list[storage.AttachmentRow] = []
            event: tuple[str, str] | None = None
            if read is not None:
                refs = []
                for part in read.parts:
                    sha = hashlib.sha256(part.data).hexdigest()
                    blobs[sha] = part.data
                    att = storage.AttachmentRow(
                        id=uuid.uuid4(),
                        message_id=row.id,
                        mailbox_id=box.id,
                        sha256=sha,
                        filename=part.filename,
                        content_type=part.content_type,
                        size=len(part.data),
                        content_id=part.content_id,
                        inline=part.inline,
                    )
                    attachments.append(att)
                    refs.append((str(att.id), part))
                payload = to_event(read, str(row.id), box, refs, prepared.received_at)
                env = EventEnvelope.of(payload, producer="ingest")
                try:
                    event = (env.type, env.to_json())
                except ValueError as exc:  # pydantic's serialization error is one
                    raise EventEncodingError(str(exc)[:200]) from exc
            copies.append(Copy(row, attachments, event))
        return Job(copies, blobs)


# One writer per service (every session's handler shares it), made on first use.
_WRITERS: weakref.WeakKeyDictionary[IngestService, Writer] = weakref.WeakKeyDictionary()


def writer_for(service: IngestService) -> Writer:
    writer = _WRITERS.get(service)
    if writer is None:
        writer = _WRITERS[service] = Writer(service.pool, service.relay.publish)
    return writer


def _done(task: asyncio.Future[Any]) -> None:
    _INFLIGHT.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: a waiting session logs it; a gone client just retries


def _peer(session: Session) -> str:
    return str(session.peer[0]) if session.peer else ""


def smtp_factory(service: IngestService, tls: ssl.SSLContext) -> SMTP:
    s = service.settings
    return IngestSMTP(
        IngestHandler(service),
        settings=s,
        hostname=s.smtp_hostname,
        tls_context=tls,
        require_starttls=s.smtp_require_starttls,
        data_size_limit=s.smtp_max_message_bytes,
        enable_SMTPUTF8=True,
        decode_data=False,
        ident="ChatFLOW ingest",
        # An MX takes no logins: no mechanism at all.
        auth_exclude_mechanism=["LOGIN", "PLAIN"],
    )
