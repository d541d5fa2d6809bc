"""Unread badges on the live connection: a snapshot after auth, then one ``badge`` frame per change.

The stream carries one badge entry per change (the conversation's counters, see
``domain.badges``); each replica turns it into every connected agent's own numbers. Agents in
the same state share one serialized frame, so a new message in a mailbox of a thousand agents who
all read the same things costs one ``json.dumps``, as other frames do.

Frames to the client:
- ``{"type":"badge","snapshot":true,"totals":{mailbox: n},"conversations":[{"id_conversa",
  "mailbox","unread"}]}`` once after auth (no ``event_id``: it is the state, not a change);
- ``{"type":"badge","event_id","mailbox","id_conversa","unread","mailbox_total"}`` on each
  change, plus ``"merged":[ids]`` when conversations were merged into ``id_conversa`` (they count
  0 from now on).
Client frame ``{"type":"read","id_conversa"}`` marks a conversation read for that agent, as the
REST ``POST /api/conversations/{id}/read`` does (through ``conversation.read``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from libs.common import outbox
from libs.common.events import ConversationRead, Envelope, now
from libs.common.outbox import OutboxRelay
from services.notifier import badge_store, push_store, storage
from services.notifier.domain.badges import BadgeOp, BadgeView, inbound_groups
from services.notifier.frames import NotifierFrame
from services.notifier.hub import Client, Hub

log = logging.getLogger("chatflow.notifier.badges")


def _dump(frame: dict[str, Any]) -> str:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


def change_frame(entry_id: str, op: BadgeOp, unread: int, total: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": "badge",
        "event_id": entry_id,
        "mailbox": op.mailbox,
        "id_conversa": op.id_conversa,
        "unread": unread,
        "mailbox_total": total,
    }
    if op.merged:
        out["merged"] = [m for m, _ in op.merged]
    return out


def snapshot_frame(loaded: badge_store.Loaded) -> dict[str, Any]:
    return {
        "type": "badge",
        "snapshot": True,
        "totals": loaded.totals,
        "conversations": [
            {"id_conversa": c, "mailbox": m, "unread": n} for c, m, n in loaded.conversations
        ],
    }


@dataclass
class _Agent:
    """One connection's badges; frames that arrive before its snapshot loaded wait in ``pending``."""

    view: BadgeView
    pending: list[tuple[str, BadgeOp, str | None]] = field(default_factory=list)


class Badges:
    def __init__(self, pool: asyncpg.Pool, hub: Hub, relay: OutboxRelay, limit: int) -> None:
        self.pool = pool
        self.hub = hub
        self.relay = relay
        self.limit = limit
        # A plain dict (clients hash by identity), emptied by ``forget`` on disconnect: a
        # WeakKeyDictionary lookup per agent per frame was a tenth of the notifier's CPU at
        # 1,000 agents.
        self.agents: dict[Client, _Agent] = {}

    def register(self, client: Client) -> None:
        """Called as the client joins the hub: its frames queue until ``on_connect`` loaded."""
        self.agents[client] = _Agent(BadgeView(client.identity.sub))

    async def on_connect(self, client: Client) -> None:
        """Load after the client joined the hub: what the load misses arrives as a frame."""
        agent = self.agents.get(client)
        if agent is None:
            return
        view = agent.view
        loaded = await badge_store.load(
            self.pool, view.user_id, sorted(client.mailboxes), self.limit
        )
        view.load(loaded.snapshot, loaded.totals, loaded.reads)
        # Frames that arrived during the load, applied before any await lets newer ones in.
        texts = [_dump(snapshot_frame(loaded))]
        pending, agent.pending = agent.pending, []
        for entry_id, op, to_user in pending:
            n = view.apply(op, to_user)
            if n is not None and op.mailbox in client.mailboxes:
                frame = change_frame(entry_id, op, n, view.totals.get(op.mailbox, 0))
                texts.append(_dump(frame))
        for text in texts:
            self.hub.send([client], text)

    def forget(self, client: Client) -> None:
        """No badges for this connection (it left, or its snapshot could not be read)."""
        self.agents.pop(client, None)

    def deliver(
        self, entry_id: str, mailbox_id: str, to_user: str | None, fields: dict[str, Any]
    ) -> int:
        """A badge change from the stream to this replica's agents of its mailbox."""
        try:
            op = BadgeOp.of(fields)
        except (KeyError, TypeError, ValueError):
            log.warning("skipping malformed badge entry", extra={"entry_id": entry_id})
            return 0
        groups: dict[tuple[int, int], list[Client]] = {}
        agents, mailbox = self.agents, op.mailbox
        loaded: list[tuple[Client, BadgeView]] = []
        for c in self.hub.audience(mailbox_id, to_user):  # a list already: safe to kick in it
            agent = agents.get(c)
            if c.closing or agent is None:
                continue
            view = agent.view
            if view.snapshot is None:
                agent.pending.append((entry_id, op, to_user))
                if len(agent.pending) > self.hub.max_held:
                    self.hub.kick(c)  # its snapshot is far behind: it reconnects and reloads
                continue
            loaded.append((c, view))
        if op.op == "in":  # the common case, a new mail for everyone: one loop for all
            groups = inbound_groups(loaded, op)
        else:
            for c, view in loaded:
                n = view.apply(op, to_user)
                if n is not None:
                    groups.setdefault((n, view.totals.get(mailbox, 0)), []).append(c)
        # Queued with this turn's other frames (after the message.added it counts); the hub's
        # flush closes a connection that cannot keep up.
        return sum(
            self.hub.send(clients, _dump(change_frame(entry_id, op, n, total)))
            for (n, total), clients in groups.items()
        )

    async def read(self, client: Client, id_conversa: str) -> bool:
        """The ``read`` frame: False when the conversation is not the agent's to read."""
        sub = client.identity.sub
        async with self.pool.acquire() as conn:
            mailbox_id = await storage.conversation_mailbox(conn, id_conversa)
            if mailbox_id is None or mailbox_id not in client.mailboxes:
                return False
            async with conn.transaction():
                op = await badge_store.read(conn, sub, id_conversa)
                event = ConversationRead(
                    id_conversa=id_conversa, mailbox_id=mailbox_id, user_id=sub, read_at=now()
                )
                envs = [Envelope.of(event, producer="notifier")]
                if op is not None:
                    frame = NotifierFrame(mailbox_id=mailbox_id, user_id=sub, frame=op)
                    envs.append(Envelope.of(frame, producer="notifier"))
                staged = await outbox.stage(conn, *envs)
                await push_store.drop(conn, id_conversa, sub)
        await self.relay.publish(staged)
        return True
