"""This replica's live connections, indexed by mailbox, and the fan-out of broadcast frames.

A frame is serialized once and written to every matching connection with
``websockets.broadcast``; there is no per-connection queue beyond websockets' own write buffer,
and a connection whose buffer outgrows ``slow_bytes`` is closed instead of slowing the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import InitVar, dataclass, field

import websockets
from prometheus_client import Counter, Gauge
from websockets.asyncio.server import ServerConnection

from libs.common.tokens import Identity

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
    conn: ServerConnection
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

    def __post_init__(self, served: set[str] | None) -> None:
        self.mailboxes = set(self.identity.mailboxes) if served is None else set(served)


class Hub:
    def __init__(self, slow_bytes: int, max_held: int) -> None:
        self.slow_bytes = slow_bytes
        self.max_held = max_held
        self.by_mailbox: dict[str, set[Client]] = {}
        self.by_user: dict[str, set[Client]] = {}
        self.clients: set[Client] = set()
        self._closers: set[asyncio.Task[None]] = set()

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
        for c in self.by_mailbox.get(mailbox_id, ()):
            if not user_id or c.identity.sub == user_id:
                yield c

    def deliver(self, mailbox_id: str, user_id: str | None, entry_id: str, text: str) -> int:
        """Write one serialized frame to its local audience; returns how many got it now."""
        targets: list[ServerConnection] = []
        for c in list(self.audience(mailbox_id, user_id)):
            if c.closing:
                continue
            if c.resuming:
                c.held.append((entry_id, mailbox_id, text))
                if len(c.held) > self.max_held:
                    self.kick(c)
                continue
            if buffered(c.conn) > self.slow_bytes:
                self.kick(c)
                continue
            targets.append(c.conn)
        if targets:
            websockets.broadcast(targets, text)
            FRAMES_DELIVERED.inc(len(targets))
        return len(targets)

    def kick(self, client: Client) -> None:
        """Close a connection that can't keep up; it resumes from its last event id later."""
        if client.closing:
            return
        client.closing = True
        client.held.clear()
        self.remove(client)
        SLOW_CLOSED.inc()
        log.warning("closing slow consumer", extra={"user_id": client.identity.sub})
        task = asyncio.create_task(client.conn.close(SLOW_CONSUMER, "slow consumer"))
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)


def buffered(conn: ServerConnection) -> int:
    transport = conn.transport
    return transport.get_write_buffer_size() if transport is not None else 0


def _discard(index: dict[str, set[Client]], key: str, client: Client) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(client)
        if not members:
            del index[key]
