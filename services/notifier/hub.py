"""This replica's live connections, indexed by mailbox, and the fan-out of broadcast frames.

A frame is serialized once, JSON and WebSocket framing both (server frames are unmasked and we
negotiate no extension, so the bytes are the same for every connection), and queued on each
matching connection; one flush per event-loop turn writes each connection's queued frames with a
single ``transport.write``. Every frames entry of one XREAD batch is delivered in one turn, so a
mail's ``message.added`` and ``conversation.updated`` cost one TLS record and one syscall per
connection instead of two (the write was most of the notifier's CPU at 1,000 agents). There is no
per-connection queue beyond that turn and the transport's buffer, and a connection whose buffer
outgrows ``slow_bytes`` is closed instead of slowing the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import InitVar, dataclass, field

from prometheus_client import Counter, Gauge
from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

from libs.common.tokens import Identity
from libs.common.trunk import TrunkEnd, TrunkLink, server_frame

log = logging.getLogger("chatflow.notifier.hub")

CONNECTIONS = Gauge("chatflow_notifier_connections", "Open authenticated WebSocket connections")
FRAMES_DELIVERED = Counter(
    "chatflow_notifier_frames_delivered_total", "Frames written to WebSocket connections"
)
SLOW_CLOSED = Counter(
    "chatflow_notifier_slow_consumers_total", "Connections closed for not reading fast enough"
)
SLOW_CONSUMER = 4008


@dataclass(eq=False)
class Client:
    # A WebSocket of its own, or one carried by a gateway's trunk (``libs.common.trunk``).
    conn: ServerConnection | TrunkLink
    identity: Identity
    # The mailboxes this connection is served: the token's, less memberships removed since it was
    # minted (``served``, when given). Changed only through the Hub, which keeps ``by_mailbox``
    # in step.
    mailboxes: set[str] = field(init=False)
    served: InitVar[set[str] | None] = None
    # While a resume replays the stream, live frames wait here (entry id, mailbox, text) so the
    # client gets every frame once and in order.
    resuming: bool = False
    held: list[tuple[str, str, str]] = field(default_factory=list)
    closing: bool = False
    # Encoded frames waiting for this turn's flush.
    pending: list[bytes] = field(default_factory=list)
    # The entry id of the first frame delivered live on this connection. From the moment it is
    # in the hub, every frame of its audience is delivered to it live, in stream order (or held
    # while it resumes), so a ``resume`` replays only what came before that frame: the frames
    # it got live between its reconnect and its ``resume`` do not come twice, however late the
    # resume is (a set of ids kept for 10 s did that before, found by a trial).
    first_live: str | None = None
    # ``conn`` when a trunk carries it: the fan-out's test, without an isinstance per frame.
    link: TrunkLink | None = field(init=False)

    def __post_init__(self, served: set[str] | None) -> None:
        self.mailboxes = set(self.identity.mailboxes) if served is None else set(served)
        self.link = self.conn if isinstance(self.conn, TrunkLink) else None


class Hub:
    def __init__(self, slow_bytes: int, max_held: int) -> None:
        self.slow_bytes = slow_bytes
        self.max_held = max_held
        self.by_mailbox: dict[str, set[Client]] = {}
        self.by_user: dict[str, set[Client]] = {}
        self.clients: set[Client] = set()
        self._closers: set[asyncio.Task[None]] = set()
        self._dirty: list[Client] = []
        self._flush: asyncio.Handle | None = None

    def add(self, client: Client) -> None:
        self.clients.add(client)
        self.by_user.setdefault(client.identity.sub, set()).add(client)
        for m in client.mailboxes:
            self.by_mailbox.setdefault(m, set()).add(client)
        CONNECTIONS.set(len(self.clients))

    def remove(self, client: Client) -> None:
        if client not in self.clients:
            return
        self.clients.discard(client)
        _discard(self.by_user, client.identity.sub, client)
        for m in client.mailboxes:
            _discard(self.by_mailbox, m, client)
        CONNECTIONS.set(len(self.clients))

    def of_user(self, user_id: str) -> list[Client]:
        return list(self.by_user.get(user_id, ()))

    def drop_mailbox(self, user_id: str, mailbox_id: str) -> int:
        """The user left the mailbox: their connections get none of its frames from now on."""
        n = 0
        for c in self.of_user(user_id):
            if mailbox_id in c.mailboxes:
                c.mailboxes.discard(mailbox_id)
                _discard(self.by_mailbox, mailbox_id, c)
                n += 1
        return n

    def restore_mailbox(self, user_id: str, mailbox_id: str) -> int:
        """The user is a member again: connections whose token names the mailbox get it back."""
        n = 0
        for c in self.of_user(user_id):
            if mailbox_id in c.identity.mailboxes and mailbox_id not in c.mailboxes:
                c.mailboxes.add(mailbox_id)
                self.by_mailbox.setdefault(mailbox_id, set()).add(c)
                n += 1
        return n

    def audience(self, mailbox_id: str, user_id: str | None) -> Iterable[Client]:
        if user_id:  # one user's frame: their few connections, not the whole mailbox
            return [c for c in self.by_user.get(user_id, ()) if mailbox_id in c.mailboxes]
        return list(self.by_mailbox.get(mailbox_id, ()))

    def deliver(self, mailbox_id: str, user_id: str | None, entry_id: str, text: str) -> int:
        """Queue one serialized frame for its local audience; returns how many get it now."""
        live: list[Client] = []
        for c in self.audience(mailbox_id, user_id):
            if c.closing:
                continue
            if c.resuming:
                c.held.append((entry_id, mailbox_id, text))
                if len(c.held) > self.max_held:
                    self.kick(c)
                continue
            if c.first_live is None:
                c.first_live = entry_id
            live.append(c)
        return self._fan(live, encode(text)) if live else 0

    def send(self, clients: Iterable[Client], text: str) -> int:
        """One frame to these clients (a badge shared by agents in the same state), encoded once
        and written with the frames queued before it in this turn, in order."""
        live = [c for c in clients if not c.closing]
        return self._fan(live, encode(text)) if live else 0

    def _fan(self, clients: list[Client], data: bytes) -> int:
        """Queue ``data`` for each client: a trunk gets one list of its links' ids per frame.

        Per client and frame this is a list append, not the four calls of ``queue``: at 1,000
        agents a mail's frames are queued 2,000 times.
        """
        ends: dict[TrunkEnd, list[int]] = {}
        end: TrunkEnd | None = None
        cids: list[int] = []
        n = 0
        for c in clients:
            link = c.link
            if link is None:
                self.queue(c, data)
                n += 1
            elif link.open:
                if link.end is not end:
                    end = link.end
                    cids = ends.setdefault(end, [])
                cids.append(link.cid)
                n += 1
        for e, ids in ends.items():
            e.queue_many(ids, data)
        if n:
            FRAMES_DELIVERED.inc(n)
        return n

    def queue(self, client: Client, data: bytes) -> None:
        """Queue an ``encode``d frame for this turn's flush."""
        if isinstance(client.conn, TrunkLink):
            client.conn.queue(data)  # batched by its trunk: one message for all its links
            return
        if not client.pending:
            self._dirty.append(client)
        client.pending.append(data)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write what this turn queued: one write per connection, slow ones closed instead."""
        self._flush = None
        dirty, self._dirty = self._dirty, []
        for c in dirty:
            chunks, c.pending = c.pending, []
            if c.closing or not chunks:
                continue
            conn = c.conn
            if isinstance(conn, TrunkLink):
                continue  # never queued here: its trunk batches its frames
            if buffered(conn) > self.slow_bytes:
                self.kick(c)
                continue
            write(conn, chunks)

    def kick(self, client: Client) -> None:
        """Close a connection that can't keep up; it resumes from its last event id later."""
        if client.closing:
            return
        client.closing = True
        client.held.clear()
        client.pending.clear()
        self.remove(client)
        SLOW_CLOSED.inc()
        log.warning("closing slow consumer", extra={"user_id": client.identity.sub})
        task = asyncio.create_task(client.conn.close(SLOW_CONSUMER, "slow consumer"))
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)


def encode(text: str) -> bytes:
    """A text frame as the server sends it: unmasked, no extension, the same for every client."""
    return server_frame(text)


def write(conn: ServerConnection, chunks: list[bytes]) -> None:
    """Put whole frames on the connection's transport, as ``websockets.broadcast`` would.

    Only while the connection is OPEN (after our close frame nothing may follow it), and never
    for a connection that negotiated an extension (our encoding assumes none; the server turns
    compression off, so this is a safety net, sent through websockets instead).
    """
    protocol = conn.protocol
    if protocol.state is not State.OPEN:
        return
    if protocol.extensions:
        for data in chunks:
            protocol.send_text(data[_header_size(data) :])
        conn.send_data()
        return
    conn.transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))


def _header_size(data: bytes) -> int:
    """Header length of an unmasked frame from ``encode`` (RFC 6455 §5.2)."""
    n = data[1] & 0x7F
    return 2 if n < 126 else 4 if n == 126 else 10


def buffered(conn: ServerConnection | TrunkLink) -> int:
    if isinstance(conn, TrunkLink):
        return conn.buffered
    transport = conn.transport
    return transport.get_write_buffer_size() if transport is not None else 0


def _discard(index: dict[str, set[Client]], key: str, client: Client) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(client)
        if not members:
            del index[key]
