"""The agents' live connection: WSS ``/ws``, authenticated at the upgrade, frames both ways.

Auth: the browser can't set headers on a WebSocket, so the access token rides in a
``bearer.<token>`` subprotocol (we select ``chatflow.v1``, never echo the token); without it the
first frame must be ``{"type":"auth","token":...}`` within ``ws_auth_timeout_s``. A bad token
closes with 4401 so the client knows to refresh rather than retry, and so does token expiry.
An account disabled meanwhile closes (and is refused) with 4401 "account disabled"; a membership
removed meanwhile leaves the connection's effective mailbox set (``services.notifier.access``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
import weakref
from collections.abc import Coroutine, Sequence
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import urlsplit

import asyncpg
from pydantic import ValidationError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Data, Subprotocol

from libs.common import outbox, tls
from libs.common.bus import Bus
from libs.common.events import Envelope, EventError, MailSend
from libs.common.outbox import OutboxRelay
from libs.common.tokens import Identity, InvalidToken, TokenVerifier, bearer_from_subprotocols
from libs.common.trunk import SUBPROTOCOL as TRUNK_PROTOCOL
from libs.common.trunk import TrunkEnd, TrunkLink
from services.notifier import frames, storage
from services.notifier.access import AccessState
from services.notifier.domain.drafts import DraftLimits
from services.notifier.domain.rules import in_audience, is_after, needs_resync
from services.notifier.drafts import DRAFT_FRAMES, Drafts
from services.notifier.frames import (
    CLIENT_FRAMES,
    FRAME_TYPE,
    MAX_CLIENT_ID,
    AccessChange,
    AuthFrame,
    NotifierFrame,
    ResumeFrame,
    SendFrame,
)
from services.notifier.hub import Client, Hub
from services.notifier.live_state import LiveState
from services.notifier.settings import NotifierSettings

log = logging.getLogger("chatflow.notifier.ws")
# Frames remembered by envelope id against a second copy: minutes of traffic at a busy mailbox,
# far past the outbox's grace (5 s) after which a second copy can come.
RECENT_FRAMES = 20_000

PROTOCOL: Final = Subprotocol("chatflow.v1")
UNAUTHORIZED: Final = 4401
DISABLED: Final = "account disabled"
_REJECTED: Final = object()  # the upgrade carried a token that failed verification
_TRUNK: Final = object()  # a gateway's trunk (libs.common.trunk), not one agent's socket
_PAGE = 500


def render(entry_id: str, frame: dict[str, Any]) -> str:
    """The frame as sent: ``type`` first, then the ``event_id`` a client resumes from."""
    body = {"type": frame.get("type"), "event_id": entry_id}
    body.update((k, v) for k, v in frame.items() if k != "type")
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def _dump(frame: dict[str, Any]) -> str:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


def offered_subprotocols(headers: Headers) -> list[str]:
    return [
        p.strip()
        for value in headers.get_all("Sec-WebSocket-Protocol")
        for p in value.split(",")
        if p.strip()
    ]


def _short(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'frame'}: {e['msg']}" for e in exc.errors()[:3]
    )


class LiveServer:
    def __init__(
        self,
        settings: NotifierSettings,
        verifier: TokenVerifier,
        pool: asyncpg.Pool,
        relay: OutboxRelay,
        bus: Bus,
        hub: Hub,
        access: AccessState | None = None,
        state: LiveState | None = None,
    ) -> None:
        self.settings = settings
        self.verifier = verifier
        self.pool = pool
        self.relay = relay
        self.bus = bus
        self.hub = hub
        self.access = access or AccessState()
        self.state = state  # badges and presence (services.notifier.live_state)
        self.drafts = Drafts(  # services.notifier.drafts
            pool,
            bus,
            hub,
            self.access,
            DraftLimits(
                max_message_bytes=settings.draft_max_message_bytes,
                max_doc_bytes=settings.draft_max_doc_bytes,
                compact_every=settings.draft_compact_every,
                compact_bytes=settings.draft_compact_bytes,
                max_open_per_connection=settings.draft_max_open_per_connection,
            ),
        )
        self.stream = bus.stream(FRAME_TYPE)
        # Envelope ids of the frames delivered lately: an outbox row published twice (its
        # writer died between its XADD and its DELETE; libs.common.outbox) arrives again under
        # a new entry id, and a broadcast reader has no processed_events to absorb it. Each id
        # maps to the entry of its first copy, which is the one a resume replays.
        self._recent: dict[str, str] = {}
        # Entries a resume read lately, parsed and rendered once for every client that resumes
        # over them (entry id -> envelope id, frame, text): after a replica restart all its
        # agents resume over the same entries, and each parsed every one (found by a trial:
        # 200 resumes over 1,200 entries held other agents' mail back 0.6 s).
        self._replayable: dict[str, tuple[str, NotifierFrame, str] | None] = {}
        self.server: Server | None = None
        self._pending: weakref.WeakKeyDictionary[ServerConnection, object] = (
            weakref.WeakKeyDictionary()
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self.trunks: set[TrunkEnd] = set()

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        self.server = await serve(
            self._handle,
            s.http_host,
            s.ws_port,
            ssl=tls.server_context(s.tls_cert, s.tls_key),
            select_subprotocol=self._select_subprotocol,
            process_request=self._process_request,
            compression=None,  # per-connection deflate state costs far more memory than it saves
            max_size=s.ws_max_size,
            write_limit=s.ws_write_limit,
            ping_interval=s.ws_ping_interval_s,
            ping_timeout=s.ws_ping_timeout_s,
            close_timeout=s.ws_close_timeout_s,
            server_header=None,
        )
        log.info("websocket listening", extra={"ws_port": s.ws_port})

    async def close(self) -> None:
        # The agents on trunks get what direct ones get from the server's close: 1001.
        for end in list(self.trunks):
            for link in list(end.links.values()):
                await link.close(1001, "going away")
        if self.server is not None:
            self.server.close(close_connections=True)
            await self.server.wait_closed()

    @property
    def serving(self) -> bool:
        return self.server is not None and self.server.is_serving()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- opening handshake ---------------------------------------------------------------------
    async def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        origin = request.headers.get("Origin")
        if path == self.settings.trunk_path:
            if origin is not None:  # browsers always send one; a gateway never does
                return conn.respond(HTTPStatus.FORBIDDEN, "Invalid Origin header\n")
            self._pending[conn] = _TRUNK
            return None
        if path != self.settings.ws_path:
            return conn.respond(HTTPStatus.NOT_FOUND, "not found\n")
        if not self._origin_ok(origin):
            return conn.respond(HTTPStatus.FORBIDDEN, "Invalid Origin header\n")
        token = bearer_from_subprotocols(offered_subprotocols(request.headers))
        if token is None:
            return None  # the first frame must authenticate
        try:
            self._pending[conn] = await self.verifier.verify(token)
        except InvalidToken:
            self._pending[conn] = _REJECTED  # closed with 4401 right after the upgrade
        except Exception:
            log.exception("token verification unavailable")
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "unavailable\n")
        return None

    def _origin_ok(self, origin: str | None) -> bool:
        if origin is None:
            return self.settings.allow_missing_origin
        return origin in self.settings.allowed_origins

    def _select_subprotocol(
        self, conn: ServerConnection, offered: Sequence[Subprotocol]
    ) -> Subprotocol | None:
        # Never select bearer.*: that would echo the token in the response.
        if self._pending.get(conn) is _TRUNK:
            return Subprotocol(TRUNK_PROTOCOL) if TRUNK_PROTOCOL in offered else None
        return PROTOCOL if PROTOCOL in offered else None

    # ---- connection ----------------------------------------------------------------------------
    async def _handle(self, conn: ServerConnection) -> None:
        state = self._pending.pop(conn, None)
        if state is _TRUNK:
            await self._serve_trunk(conn)
            return
        identity: Identity | None
        if state is _REJECTED:
            identity = None
        elif isinstance(state, Identity):
            identity = state
        else:
            identity = await self._first_frame_auth(conn)
        if identity is None:
            await conn.close(UNAUTHORIZED, "unauthorized")
            return
        # No await from this check to ``hub.add``: a disable applied later finds the client.
        if self.access.is_disabled(identity.sub):
            await conn.close(UNAUTHORIZED, DISABLED)
            return
        await self._serve(self._admit(conn, identity))

    def _admit(self, conn: ServerConnection | TrunkLink, identity: Identity) -> Client:
        client = Client(conn, identity, self.access.effective(identity.sub, identity.mailboxes))
        self.hub.add(client)
        if self.state is not None:
            self.state.connected(client)  # before any await: no frame slips past
        return client

    async def _serve(self, client: Client) -> None:
        """The connection's frames until it closes; then it leaves the hub, drafts, presence."""
        loop = asyncio.get_running_loop()
        expiry = loop.call_later(max(0.0, client.identity.exp - time.time()), self._expire, client)
        try:
            async for raw in client.conn:
                await self._on_message(client, raw)
        except ConnectionClosed:
            pass
        finally:
            expiry.cancel()
            self.hub.remove(client)
            self.drafts.leave_all(client)
            if self.state is not None:
                self.state.disconnected(client)

    # ---- trunks --------------------------------------------------------------------------------
    async def _serve_trunk(self, conn: ServerConnection) -> None:
        """A gateway's trunk: its agents' connections, each handled as a direct one is."""
        s = self.settings
        # A trunk message is an agent's message plus a few bytes: the cap per agent is the
        # link's (1009 for that agent, as on its own socket), the trunk's only a safety net, so a
        # gateway allowing more than ws_max_size cannot close everyone's trunk.
        conn.protocol.max_message_size = s.trunk_max_message_bytes
        end = TrunkEnd(conn, s.trunk_max_buffer_bytes, s.trunk_max_queued_frames, s.ws_max_size)
        self.trunks.add(end)
        log.info("trunk opened")
        try:
            await end.serve(self._open_link)
        finally:
            self.trunks.discard(end)
            log.info("trunk closed")

    async def _open_link(self, link: TrunkLink) -> None:
        """An agent's connection on a trunk: the checks of an upgrade, then ``accepted``."""
        end, info = link.end, link.info
        origin = info.get("origin")
        if not self._origin_ok(origin if isinstance(origin, str) else None):
            end.refuse(link, 4403, "origin not allowed")
            return
        try:
            identity = await self.verifier.verify(info["token"])
        except InvalidToken:
            end.refuse(link, UNAUTHORIZED, "unauthorized")
            return
        except Exception:
            log.exception("token verification unavailable")
            end.refuse(link, 1013, "unavailable")
            return
        if not link.open:
            return  # the agent left while its token was checked
        if self.access.is_disabled(identity.sub):
            end.refuse(link, UNAUTHORIZED, DISABLED)
            return
        client = self._admit(link, identity)
        end.accept(link)  # after hub.add, before any frame for it can be written
        await self._serve(client)

    async def _first_frame_auth(self, conn: ServerConnection) -> Identity | None:
        try:
            async with asyncio.timeout(self.settings.ws_auth_timeout_s):
                raw = await conn.recv()
            frame = AuthFrame.model_validate_json(raw)
            return await self.verifier.verify(frame.token)
        except (TimeoutError, ConnectionClosed, ValidationError, InvalidToken):
            return None

    def _expire(self, client: Client) -> None:
        """Tokens live 15 minutes; the client reconnects with a fresh one and resumes."""
        self._close(client, UNAUTHORIZED, "token expired")

    def _close(self, client: Client, code: int, reason: str) -> None:
        """Out of the hub now (no frame reaches it any more), the close handshake meanwhile."""
        if client.closing:
            return
        client.closing = True
        client.held.clear()
        self.hub.remove(client)
        self._spawn(client.conn.close(code, reason))

    async def _reply(self, client: Client, frame: dict[str, Any]) -> None:
        await client.conn.send(_dump(frame))

    async def _on_message(self, client: Client, raw: Data) -> None:
        if not isinstance(raw, str):
            await self._reply(client, frames.error("bad_request", "frames are JSON text"))
            return
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):  # nesting deeper than the parser goes is bad too
            await self._reply(client, frames.error("bad_request", "invalid JSON"))
            return
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            await self._reply(client, frames.error("bad_request", "a frame is a typed object"))
            return
        client_id = data.get("client_id")
        if not isinstance(client_id, str) or len(client_id) > MAX_CLIENT_ID:
            client_id = None  # echoed to tie an error to its draft, not past its own limit
        if data["type"] in DRAFT_FRAMES:
            await self.drafts.on_frame(client, data)  # answers its own errors
            return
        model = CLIENT_FRAMES.get(data["type"])
        if model is None:
            await self._reply(client, frames.error("unknown_type", "unknown frame type"))
            return
        try:
            frame = model.model_validate(data)
        except ValidationError as exc:
            await self._reply(client, frames.error("bad_request", _short(exc), client_id))
            return
        try:
            if isinstance(frame, SendFrame):
                await self._send(client, frame)
                await self.drafts.after_send(
                    client, frame.id_conversa, frame.client_id, frame.draft
                )
            elif isinstance(frame, ResumeFrame):
                await self._resume(client, frame.after)
            elif self.state is not None and await self.state.on_frame(client, frame):
                pass
            else:
                await self._reply(client, frames.PONG)
        except ConnectionClosed:
            raise
        except Exception:
            log.exception("frame handling failed", extra={"frame_type": data["type"]})
            await self._reply(client, frames.error("internal", "internal error", client_id))

    # ---- send ----------------------------------------------------------------------------------
    async def _send(self, client: Client, f: SendFrame) -> None:
        taken = await self._take_send(client, f)
        if taken is None:
            # The same answer for "absent" and "not yours": no probing of other mailboxes.
            await self._reply(
                client, frames.error("not_found", "conversation not found", f.client_id)
            )
            return
        send_id, earlier = taken
        if earlier is not None and earlier["id_conversa"] != f.id_conversa:
            # A client_id names one message; reusing it for another must not drop that one.
            await self._reply(
                client,
                frames.error("conflict", "client_id already used for another message", f.client_id),
            )
            return
        await self._reply(client, frames.send_ack(f.client_id, send_id))
        if earlier is not None and earlier["status"] in ("queued", "sent", "deferred", "failed"):
            # A retry: tell the client where its message already is.
            await self._reply(
                client,
                {
                    "type": "send.status",
                    "send_id": send_id,
                    "client_id": f.client_id,
                    "status": earlier["status"],
                    "detail": earlier["detail"],
                },
            )

    async def _take_send(self, client: Client, f: SendFrame) -> tuple[str, Any] | None:
        """Record the send and outbox its ``mail.send`` once per (user, client_id).

        Returns the send id and, for a client_id used before, that earlier send's row.
        """
        sub = client.identity.sub
        async with self.pool.acquire() as conn:
            mailbox_id = await storage.conversation_mailbox(conn, f.id_conversa)
            # The connection's effective mailboxes: a membership removed since the token was
            # minted no longer counts.
            if (
                mailbox_id is None
                or mailbox_id not in client.mailboxes
                or self.access.is_disabled(sub)
            ):
                return None
            async with conn.transaction():
                send_id = await storage.insert_send(
                    conn, str(uuid.uuid4()), sub, f.client_id, f.id_conversa, mailbox_id
                )
                if send_id is None:  # a retry of a send we already took: same id, no new command
                    earlier = await storage.existing_send(conn, sub, f.client_id)
                    if earlier is None:
                        return None
                    return str(earlier["send_id"]), earlier
                cmd = MailSend(
                    send_id=send_id,
                    client_id=f.client_id,
                    id_conversa=f.id_conversa,
                    mailbox_id=mailbox_id,
                    user_id=sub,
                    html=f.html,
                    attachments=f.attachments,
                )
                staged = await outbox.stage(conn, Envelope.of(cmd, producer="notifier"))
        await self.relay.publish(staged)
        return send_id, None

    # ---- resume --------------------------------------------------------------------------------
    async def _resume(self, client: Client, after: str) -> None:
        """Replay frames after ``after`` for this client, then the live ones held meanwhile."""
        redis = self.bus.redis
        client.resuming = True
        # Frames from this one on were delivered live. The next live frame after this resume
        # is the next cutoff, so a second resume (rare) sends again what this one replays.
        cutoff, client.first_live = client.first_live, None
        try:
            head: Any = await redis.xrange(self.stream, "-", "+", count=1)
            first = head[0][0].decode() if head else None
            last: str | None = None
            if needs_resync(after, first):
                await self._reply(client, frames.RESYNC)
            else:
                last = after
                scanned = 0
                reached = False
                replayed: set[str] = set()  # envelope ids, against a second copy in the range
                while not reached:
                    page: Any = await redis.xrange(self.stream, f"({last}", "+", count=_PAGE)
                    for entry_id_b, fields in page:
                        entry_id = entry_id_b.decode()
                        if cutoff is not None and not is_after(cutoff, entry_id):
                            reached = True  # from here on it got everything live
                            break
                        last = entry_id
                        text = self._text_for(client, last, fields, replayed)
                        if text is not None:
                            await client.conn.send(text)
                    scanned += len(page)
                    if reached or len(page) < _PAGE:
                        break
                    if scanned >= self.settings.resume_max_entries:
                        await self._reply(client, frames.RESYNC)
                        break
            # Live frames that arrived during the replay; those it already covered are skipped.
            while client.held:
                held, client.held = client.held, []
                for entry_id, mailbox_id, text in held:
                    if client.closing:
                        break
                    if is_after(entry_id, last) and mailbox_id in client.mailboxes:
                        await client.conn.send(text)
        finally:
            client.resuming = False

    def _text_for(
        self, client: Client, entry_id: str, fields: dict[bytes, bytes], replayed: set[str]
    ) -> str | None:
        """The replayed frame of one entry, or None: not the client's, or a second copy of an
        outbox row. A copy is second when this replay sent its envelope already, or when the
        broadcast reader saw a first copy at another entry (before ``after`` too: the client
        had that one before it went away)."""
        if client.closing:
            return None
        if entry_id in self._replayable:
            cached = self._replayable[entry_id]
        else:
            parsed = _parse_envelope(fields)
            cached = None if parsed is None else (*parsed, render(entry_id, parsed[1].frame))
            self._replayable[entry_id] = cached
            if len(self._replayable) > RECENT_FRAMES:
                del self._replayable[next(iter(self._replayable))]
        if cached is None:
            return None
        envelope_id, nf, text = cached
        first = self._recent.get(envelope_id)
        if envelope_id in replayed or (first is not None and first != entry_id):
            return None
        replayed.add(envelope_id)
        if (
            nf.access is not None
            or nf.frame.get("type") in frames.EPHEMERAL
            or not in_audience(client.mailboxes, client.identity.sub, nf.mailbox_id, nf.user_id)
        ):
            return None
        return text

    # ---- broadcast -----------------------------------------------------------------------------
    async def on_frame(self, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> None:
        """BroadcastReader handler: every replica delivers each frame to its own connections."""
        parsed = _parse_envelope(fields)
        if parsed is None:
            return
        envelope_id, nf = parsed
        if envelope_id in self._recent:
            return  # a second copy of one outbox row
        self._recent[envelope_id] = entry_id
        if len(self._recent) > RECENT_FRAMES:
            del self._recent[next(iter(self._recent))]
        if nf.access is not None:
            self.on_access(nf.access)
            return
        if not self.hub.by_mailbox.get(nf.mailbox_id):
            return
        if self.state is not None and self.state.deliver(entry_id, nf):
            return  # a badge-only entry, delivered per agent
        self.hub.deliver(nf.mailbox_id, nf.user_id, entry_id, render(entry_id, nf.frame))
        if self.state is not None and nf.badge is not None:
            self.state.deliver_badge(entry_id, nf)  # queued after the frame it counts

    def on_access(self, change: AccessChange) -> None:
        """Apply a directory change to this replica's connections, in stream order."""
        if not self.access.apply(change):
            return  # older than one applied already
        user = change.user_id
        if change.mailbox_id is None:
            if not change.active:
                clients = self.hub.of_user(user)
                for c in clients:
                    self._close(c, UNAUTHORIZED, DISABLED)
                log.info("account disabled", extra={"user_id": user, "closed": len(clients)})
        elif change.active:
            self.hub.restore_mailbox(user, change.mailbox_id)
        else:
            n = self.hub.drop_mailbox(user, change.mailbox_id)
            log.info(
                "membership removed",
                extra={"user_id": user, "mailbox_id": change.mailbox_id, "connections": n},
            )


def _parse_envelope(fields: dict[bytes, bytes]) -> tuple[str, NotifierFrame] | None:
    data = fields.get(b"e")
    if data is None:
        return None
    try:
        env = Envelope.from_json(data)
        return env.id, env.payload_as(NotifierFrame)
    except EventError:
        log.warning("skipping invalid frame entry")
        return None
