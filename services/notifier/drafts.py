"""Collaborative reply drafts: one Yjs document per (conversation, draft), over the agents' socket.

Frames (JSON text; ``data`` is a base64 y-protocols sync message, exactly what y-websocket
sends, see ``services.notifier.domain.drafts``)::

    → {"type": "draft.sync",   "id_conversa", "draft"?: "reply", "epoch"?, "data"}  step 1 opens
    → {"type": "draft.update", "id_conversa", "draft"?, "epoch"?, "data"}        step 2 / update
    → {"type": "draft.close",  "id_conversa", "draft"?}
    ← {"type": "draft.sync",   "id_conversa", "draft", "epoch", "data"}  step 2, then step 1
    ← {"type": "draft.update", "id_conversa", "draft", "epoch", "data"}  another editor's change
    ← {"type": "draft.cleared", "id_conversa", "draft", "epoch"}  sent: start a new document
    ← {"type": "error", "code", "message", "id_conversa", "draft"}

Why this shape: the server keeps one ``pycrdt.Doc`` per draft open on this replica and answers
the sync handshake from it; every update is first appended to the draft's log in PostgreSQL
(``drafts_store``; that is what a reload, a restart or another replica reads), then applied
here, sent to this replica's other editors at once, and XADDed to ``<prefix>notifier.draft``,
which every other replica reads (``BroadcastReader``) to update its own copy and editors. The
XADD is not transactional with the append: a replica that dies between the two leaves the others
without that update live, but its author reconnects, and the two-way sync handshake (client
step 1 and server step 1) hands it over again; the log has it either way.

Only agents whose connection is currently served the conversation's mailbox (the notifier's
``conversations`` table, fed by ``conversation.*`` events) may open or edit a draft, and the
answer for "no such conversation" and "not yours" is the same.

A ``send`` frame that names its ``draft`` clears it once the send is taken: a new epoch with an
empty document, ``draft.cleared`` to every editor on every replica. An update or a client copy
of an older epoch is refused with ``draft.cleared`` instead of bringing sent text back. A REST
reply that names its ``draft`` does the same, through ``mail.send`` (``on_command``); one that
names none leaves drafts alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final, Literal

import asyncpg
import pycrdt
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from websockets.exceptions import ConnectionClosed

from libs.common.bus import Bus
from libs.common.events import Envelope, EventError, MailSend, now, register
from services.notifier import drafts_store, storage
from services.notifier.access import AccessState
from services.notifier.domain.drafts import (
    DEFAULT_DRAFT,
    DRAFT_NAME,
    EMPTY_UPDATE,
    DraftError,
    DraftKey,
    DraftLimits,
    SyncKind,
    decode_data,
    encode_data,
    parse_sync,
    should_compact,
    stale_epoch,
    sync_message,
    valid_name,
)
from services.notifier.frames import OBJECT_ID
from services.notifier.hub import Client, Hub

log = logging.getLogger("chatflow.notifier.drafts")

DRAFT_TYPE: Final = "notifier.draft"
DRAFT_FRAMES: Final = frozenset({"draft.sync", "draft.update", "draft.close"})
STALE_COMMAND: Final = timedelta(minutes=5)  # a mail.send older than this clears no draft
STREAM_MAXLEN: Final = 10_000  # live fan-out only; the log in PostgreSQL is the record

OPEN_DRAFTS = Gauge("chatflow_notifier_open_drafts", "Drafts held in memory on this replica")
DRAFT_UPDATES = Counter("chatflow_notifier_draft_updates_total", "Draft updates stored")


@register(DRAFT_TYPE)
class DraftEvent(BaseModel):
    """A draft changed on one notifier replica; the others apply it to their open copy."""

    model_config = ConfigDict(extra="ignore")

    replica: str
    id_conversa: str
    draft: str
    epoch: int
    update: str = ""  # base64 Yjs update; empty when ``cleared``
    cleared: bool = False

    @property
    def key(self) -> DraftKey:
        return DraftKey(self.id_conversa, self.draft)


class _DraftFrame(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id_conversa: str = Field(min_length=1, max_length=200, pattern=OBJECT_ID)
    draft: str = Field(DEFAULT_DRAFT, pattern=DRAFT_NAME.pattern)

    @property
    def key(self) -> DraftKey:
        return DraftKey(self.id_conversa, self.draft)


class DraftSyncFrame(_DraftFrame):
    type: Literal["draft.sync", "draft.update"]
    epoch: int | None = Field(None, ge=0)
    data: str


class DraftCloseFrame(_DraftFrame):
    type: Literal["draft.close"]


@dataclass(eq=False)
class OpenDraft:
    """A draft held by this replica while at least one of its connections edits it."""

    key: DraftKey
    mailbox_id: str
    doc: pycrdt.Doc = field(default_factory=pycrdt.Doc)
    epoch: int = 0
    editors: set[Client] = field(default_factory=set)
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    failed: bool = False
    early: list[DraftEvent] = field(default_factory=list)  # other replicas' while loading
    dirty: bool = False  # appended to by this replica since it was opened


def _dump(frame: dict[str, Any]) -> str:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


def _error(code: str, message: str, key: DraftKey | None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if key is not None:
        out["id_conversa"], out["draft"] = key
    return out


def _frame(type_: str, od: OpenDraft, message: bytes | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": type_,
        "id_conversa": od.key.id_conversa,
        "draft": od.key.draft,
        "epoch": od.epoch,
    }
    if message is not None:
        out["data"] = encode_data(message)
    return out


def _cleared(key: DraftKey, epoch: int) -> dict[str, Any]:
    return {
        "type": "draft.cleared",
        "id_conversa": key.id_conversa,
        "draft": key.draft,
        "epoch": epoch,
    }


class Drafts:
    def __init__(
        self,
        pool: asyncpg.Pool,
        bus: Bus,
        hub: Hub,
        access: AccessState,
        limits: DraftLimits | None = None,
    ) -> None:
        self.pool = pool
        self.bus = bus
        self.hub = hub
        self.access = access
        self.limits = limits or DraftLimits()
        self.replica = uuid.uuid4().hex
        self.stream = bus.stream(DRAFT_TYPE)
        self.open: dict[DraftKey, OpenDraft] = {}
        self.of_client: dict[Client, set[DraftKey]] = {}
        self._compacting: set[DraftKey] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    # ---- client frames -------------------------------------------------------------------------
    async def on_frame(self, client: Client, data: dict[str, Any]) -> None:
        """A ``draft.*`` frame: answered, or refused with an error frame (never a close)."""
        key = _key_of(data)
        try:
            if data["type"] == "draft.close":
                self.leave(client, DraftCloseFrame.model_validate(data).key)
                return
            await self._on_sync(client, DraftSyncFrame.model_validate(data))
        except ValidationError as exc:
            await _reply(client, _error("bad_request", _short(exc), key))
        except DraftError as exc:
            await _reply(client, _error(exc.code, exc.message, key))
        except ConnectionClosed:
            raise
        except Exception:
            log.exception("draft frame failed", extra={"frame_type": data["type"]})
            await _reply(client, _error("internal", "internal error", key))

    async def _on_sync(self, client: Client, f: DraftSyncFrame) -> None:
        message = parse_sync(decode_data(f.data, self.limits))
        od = self.open.get(f.key)
        subscribed = od is not None and client in od.editors
        if message.kind is SyncKind.STEP1 and not subscribed:
            mine = self.of_client.get(client, set())
            if len(mine) >= self.limits.max_open_per_connection:
                raise DraftError(
                    "too_many", f"at most {self.limits.max_open_per_connection} open drafts"
                )
            od = await self._open(client, f.key)
        elif not subscribed or od is None:
            epoch = await self._stored_epoch(client, f.key) if f.epoch is not None else None
            if epoch is not None and stale_epoch(f.epoch, epoch):
                # Sent while this update was on its way (we dropped the editor then).
                await _reply(client, _cleared(f.key, epoch))
                return
            raise DraftError("not_open", "open the draft with a sync step 1 first")
        if not self._may_edit(client, od):
            self.leave(client, od.key)
            raise DraftError("not_found", "conversation not found")
        if stale_epoch(f.epoch, od.epoch):
            self.leave(client, od.key)
            await _reply(client, _cleared(od.key, od.epoch))
            return
        if message.kind is SyncKind.STEP1:
            od.editors.add(client)
            self.of_client.setdefault(client, set()).add(od.key)
            reply = sync_message(SyncKind.STEP2, od.doc.get_update(message.payload))
            await _reply(client, _frame("draft.sync", od, reply))
            own = pycrdt.create_sync_message(od.doc)  # what the client has that we lack
            await _reply(client, _frame("draft.sync", od, own))
            return
        if message.payload != EMPTY_UPDATE:
            await self._update(client, od, message.payload)

    async def _open(self, client: Client, key: DraftKey) -> OpenDraft:
        """This replica's copy, loaded; the caller subscribes before its next await."""
        for _ in range(3):
            od = self.open.get(key)
            if od is None:
                async with self.pool.acquire() as conn:
                    mailbox_id = await storage.conversation_mailbox(conn, key.id_conversa)
                if mailbox_id is None or mailbox_id not in client.mailboxes:
                    raise DraftError("not_found", "conversation not found")
                od = self.open.get(key)  # another editor may have opened it meanwhile
                if od is None:
                    od = OpenDraft(key, mailbox_id)
                    self.open[key] = od
                    OPEN_DRAFTS.set(len(self.open))
                    await self._load(od)
            await od.loaded.wait()
            if od.failed:
                raise RuntimeError("draft could not be loaded")
            if self.open.get(key) is od:
                return od
            # Cleared while it loaded (an ``early`` clear dropped it): load the new epoch.
        raise RuntimeError("draft kept changing while it loaded")

    async def _load(self, od: OpenDraft) -> None:
        """Registered first, loaded second: another replica's update meanwhile waits in ``early``."""
        try:
            loaded = await drafts_store.load(self.pool, od.key)
            od.epoch = loaded.epoch
            for u in loaded.updates:
                od.doc.apply_update(u)
        except Exception:
            od.failed = True
            self._drop(od)
            raise
        finally:
            od.loaded.set()
        early, od.early = od.early, []
        for ev in early:
            self._apply_event(od, ev)

    async def _stored_epoch(self, client: Client, key: DraftKey) -> int | None:
        """The draft's epoch, for a client that may see it (None otherwise)."""
        async with self.pool.acquire() as conn:
            mailbox_id = await storage.conversation_mailbox(conn, key.id_conversa)
            if mailbox_id is None or mailbox_id not in client.mailboxes:
                return None
            return await drafts_store.epoch(conn, key)

    def _may_edit(self, client: Client, od: OpenDraft) -> bool:
        return (
            not client.closing
            and od.mailbox_id in client.mailboxes
            and not self.access.is_disabled(client.identity.sub)
        )

    async def _update(self, client: Client, od: OpenDraft, update: bytes) -> None:
        result = await drafts_store.append(
            self.pool, od.key, od.epoch, update, client.identity.sub, self.limits
        )
        if result.status == "too_large" and result.pending:
            await self._compact(od.key)  # the log may hold what compaction collects
            result = await drafts_store.append(
                self.pool, od.key, od.epoch, update, client.identity.sub, self.limits
            )
        if result.status == "cleared":
            # Cleared on another replica, whose entry has not reached us yet; the client is an
            # editor, so it gets ``draft.cleared`` with the others.
            await self._on_event(self._event(od.key, result.epoch, cleared=True), publish=False)
            return
        if result.status == "too_large":
            raise DraftError("too_large", f"a draft is at most {self.limits.max_doc_bytes} bytes")
        DRAFT_UPDATES.inc()
        od.dirty = True
        od.doc.apply_update(update)
        self._fan_out(od, update, exclude=client)
        await self._publish(self._event(od.key, od.epoch, update=update))
        if should_compact(result.pending, result.pending_bytes, self.limits):
            self._spawn_compaction(od.key)

    # ---- leaving ---------------------------------------------------------------------------
    def leave(self, client: Client, key: DraftKey) -> None:
        keys = self.of_client.get(client)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self.of_client[client]
        od = self.open.get(key)
        if od is None:
            return
        od.editors.discard(client)
        if not od.editors and od.loaded.is_set():
            self._drop(od)
            if od.dirty:
                self._spawn_compaction(key)  # compacted on close, so the next load is one row

    def leave_all(self, client: Client) -> None:
        """The connection is gone: out of every draft it edited."""
        for key in list(self.of_client.get(client, ())):
            self.leave(client, key)

    def _drop(self, od: OpenDraft) -> None:
        if self.open.get(od.key) is od:
            del self.open[od.key]
            OPEN_DRAFTS.set(len(self.open))
        for c in od.editors:
            keys = self.of_client.get(c)
            if keys is not None:
                keys.discard(od.key)
                if not keys:
                    del self.of_client[c]
        od.editors.clear()

    # ---- sent: clear --------------------------------------------------------------------------
    async def after_send(
        self, client: Client, id_conversa: str, client_id: str, draft: str | None
    ) -> None:
        """A ``send`` frame named the draft it came from (``SendFrame`` checked the name):
        clear it once the send is taken."""
        if draft is None:
            return
        key = DraftKey(id_conversa, draft)
        async with self.pool.acquire() as conn:
            sent = await storage.existing_send(conn, client.identity.sub, client_id)
            mailbox_id = await storage.conversation_mailbox(conn, id_conversa)
        if (
            sent is None
            or sent["id_conversa"] != id_conversa
            or mailbox_id is None
            or mailbox_id not in client.mailboxes
        ):
            return  # the send was refused; its error frame went out already
        epoch = await drafts_store.clear(self.pool, key, str(sent["send_id"]))
        if epoch is None:
            return  # a retried send: this send cleared it already
        od = self.open.get(key)
        told = od is not None and client in od.editors and od.loaded.is_set()
        await self._on_event(self._event(key, epoch, cleared=True), publish=True)
        if not told:
            await _reply(client, _cleared(key, epoch))

    async def on_command(self, env: Envelope, entry_id: str) -> None:
        """``mail.send`` (consumer group ``notifier-drafts``): a reply that names its draft
        empties it, also when it was sent by REST. One taken over the WebSocket was cleared by
        ``after_send`` already; ``drafts_store.clear`` does nothing for the same send twice."""
        cmd = env.payload_as(MailSend)
        if cmd.draft is None or not valid_name(cmd.draft):
            return
        if now() - env.occurred_at > STALE_COMMAND:
            return  # replayed long after (a new group, a reclaim): a newer draft may be there
        key = DraftKey(cmd.id_conversa, cmd.draft)
        epoch = await drafts_store.clear(self.pool, key, cmd.send_id)
        if epoch is not None:
            await self._on_event(self._event(key, epoch, cleared=True), publish=True)

    # ---- across replicas ----------------------------------------------------------------------
    def _event(
        self, key: DraftKey, epoch: int, *, update: bytes = b"", cleared: bool = False
    ) -> DraftEvent:
        return DraftEvent(
            replica=self.replica,
            id_conversa=key.id_conversa,
            draft=key.draft,
            epoch=epoch,
            update=encode_data(update) if update else "",
            cleared=cleared,
        )

    async def _publish(self, ev: DraftEvent) -> None:
        env = Envelope.of(ev, producer="notifier")
        try:
            await self.bus.redis.xadd(
                self.stream, {"e": env.to_json()}, maxlen=STREAM_MAXLEN, approximate=True
            )
        except Exception as exc:  # stored already; other replicas catch up by the handshake
            log.warning("draft fan-out to other replicas failed", extra={"error": str(exc)})

    async def on_stream(self, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> None:
        """BroadcastReader handler for ``notifier.draft``: another replica's change."""
        raw = fields.get(b"e")
        if raw is None:
            return
        try:
            ev = Envelope.from_json(raw).payload_as(DraftEvent)
        except EventError:
            log.warning("skipping invalid draft entry", extra={"entry_id": entry_id})
            return
        if ev.replica != self.replica:
            await self._on_event(ev, publish=False)

    async def _on_event(self, ev: DraftEvent, *, publish: bool) -> None:
        if publish:
            await self._publish(ev)
        od = self.open.get(ev.key)
        if od is None:
            return
        if not od.loaded.is_set():
            od.early.append(ev)
            return
        self._apply_event(od, ev)

    def _apply_event(self, od: OpenDraft, ev: DraftEvent) -> None:
        if ev.epoch < od.epoch:
            return  # from before a clear this copy has seen
        if ev.epoch > od.epoch:
            # Sent. (An update of a newer epoch means we missed the clear: same outcome, and
            # an editor who reopens loads that update from the log.)
            text = _dump(_cleared(od.key, ev.epoch))
            editors = list(od.editors)
            self._drop(od)
            self._broadcast(editors, text)
            return
        if ev.cleared:
            return  # this copy was loaded after that clear
        try:
            update = decode_data(ev.update, self.limits)
            od.doc.apply_update(update)
        except (DraftError, ValueError):
            log.warning("skipping undecodable draft update", extra={"id_conversa": ev.id_conversa})
            return
        self._fan_out(od, update, exclude=None)

    # ---- fan-out -------------------------------------------------------------------------------
    def _fan_out(self, od: OpenDraft, update: bytes, exclude: Client | None) -> None:
        targets = [c for c in od.editors if c is not exclude and self._may_edit(c, od)]
        if targets:
            message = sync_message(SyncKind.UPDATE, update)
            self._broadcast(targets, _dump(_frame("draft.update", od, message)))

    def _broadcast(self, clients: list[Client], text: str) -> None:
        """Encoded once, written with this turn's other frames (slow connections closed there)."""
        self.hub.send(clients, text)

    # ---- compaction ------------------------------------------------------------------------
    def _spawn_compaction(self, key: DraftKey) -> None:
        if key in self._compacting:
            return
        self._compacting.add(key)

        async def run() -> None:
            try:
                await self._compact(key)
            except Exception:
                log.exception("draft compaction failed", extra={"id_conversa": key.id_conversa})
            finally:
                self._compacting.discard(key)

        self._spawn(run())

    async def _compact(self, key: DraftKey) -> None:
        await drafts_store.compact(self.pool, key)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Let compactions in flight finish before the pool closes (the log is kept anyway)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)


def _key_of(data: dict[str, Any]) -> DraftKey | None:
    cid, name = data.get("id_conversa"), data.get("draft", DEFAULT_DRAFT)
    if isinstance(cid, str) and 0 < len(cid) <= 200 and valid_name(name):
        return DraftKey(cid, name)
    return None


def _short(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'frame'}: {e['msg']}" for e in exc.errors()[:3]
    )


async def _reply(client: Client, frame: dict[str, Any]) -> None:
    await client.conn.send(_dump(frame))
