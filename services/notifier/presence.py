"""Who is connected, who views and who types in each conversation, shared by every replica.

State lives in Redis sorted sets whose scores are expiry times (ms), so a replica that dies takes
its agents with it after one TTL, without anyone cleaning up:
- ``<prefix>notifier:online:<user>``: one member per open connection, refreshed by its replica's
  heartbeat; the push sender asks it whether an agent is reachable live;
- ``<prefix>notifier:presence:<id_conversa>``: ``v|<user>|<conn>`` while a connection views the
  conversation (refreshed by the heartbeat), ``t|<user>|<conn>`` for ``typing_ttl_s`` after each
  ``typing`` frame.
A change is announced as one ``presence`` frame on the frames stream (XADD, not the outbox:
presence is ephemeral and needs no PostgreSQL commit), to the members of the conversation's
mailbox: ``{"type":"presence","event_id","id_conversa","viewing":[users],"typing":[users]}``.
A ``SET ... GET`` of the last announced state makes replicas announce each change once.
Client frames: ``viewing`` (also leaves the one viewed before), ``typing``, ``left``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from libs.common.bus import Bus
from libs.common.events import Envelope
from services.notifier import storage
from services.notifier.frames import NotifierFrame
from services.notifier.hub import Client, Hub

log = logging.getLogger("chatflow.notifier.presence")
MAX_TYPED = 8  # conversations a connection typed in that its disconnect clears
# The heartbeat's refresh, run by Redis: KEYS are sorted sets, ARGV[1] the expiry score, ARGV[2]
# the TTL (ms), ARGV[2 + i] the member of KEYS[i]. As a pipeline it was two commands per
# connection, which redis-py packs and parses one by one: at 1,000 agents about half a second of
# the notifier's loop every heartbeat, every frame of that moment late by as much.
_REFRESH = """
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, ARGV[1], ARGV[i + 2])
  redis.call('PEXPIRE', key, ARGV[2])
end
return #KEYS
"""
REFRESH_CHUNK = 500  # keys per script call: each call holds Redis for well under a millisecond


@dataclass
class _Where:
    key: str  # this connection's member suffix
    viewing: str | None = None
    mailbox: str | None = None
    # Conversations it typed in without viewing them (id -> mailbox), the newest last: its
    # typing ends there too when it disconnects, not only when the entry expires.
    typed: dict[str, str] = field(default_factory=dict)


def state_of(members: list[bytes]) -> tuple[list[str], list[str]]:
    """The sorted viewing and typing users of a conversation from its live members."""
    viewing: set[str] = set()
    typing: set[str] = set()
    for raw in members:
        kind, _, rest = raw.decode().partition("|")
        user = rest.rpartition("|")[0]
        (viewing if kind == "v" else typing).add(user)
    return sorted(viewing), sorted(typing)


class Presence:
    def __init__(
        self,
        bus: Bus,
        pool: asyncpg.Pool,
        hub: Hub,
        *,
        view_ttl_s: float,
        typing_ttl_s: float,
        heartbeat_s: float,
    ) -> None:
        self.bus = bus
        self.redis = bus.redis
        self.pool = pool
        self.hub = hub
        self.view_ttl_ms = int(view_ttl_s * 1000)
        self.typing_ttl_s = typing_ttl_s
        self.heartbeat_s = heartbeat_s
        self.replica = uuid.uuid4().hex[:12]
        self.where: weakref.WeakKeyDictionary[Client, _Where] = weakref.WeakKeyDictionary()
        self._seq = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._refresh = self.redis.register_script(_REFRESH)

    def _online_key(self, user: str) -> str:
        return f"{self.bus.prefix}notifier:online:{user}"

    def _conv_key(self, id_conversa: str) -> str:
        return f"{self.bus.prefix}notifier:presence:{id_conversa}"

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- connections ---------------------------------------------------------------------------
    def register(self, client: Client) -> None:
        """As the client joins the hub, so its first frames find it."""
        self._seq += 1
        self.where[client] = _Where(f"{self.replica}.{self._seq}")

    async def connected(self, client: Client) -> None:
        """Mark the agent online (the push sender skips them while any replica holds one)."""
        w = self.where.get(client)
        if w is None:
            return
        key = self._online_key(client.identity.sub)
        expiry = int(time.time() * 1000) + self.view_ttl_ms
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(key, {w.key: expiry})
        pipe.pexpire(key, self.view_ttl_ms)
        await pipe.execute()

    def disconnected(self, client: Client) -> None:
        w = self.where.pop(client, None)
        if w is not None:
            self._spawn(self._gone(client.identity.sub, w))

    async def _gone(self, user: str, w: _Where) -> None:
        try:
            await self.redis.zrem(self._online_key(user), w.key)
            places = dict(w.typed)
            if w.viewing is not None and w.mailbox is not None:
                places[w.viewing] = w.mailbox
            for conv, mailbox in places.items():
                await self.redis.zrem(
                    self._conv_key(conv), f"v|{user}|{w.key}", f"t|{user}|{w.key}"
                )
                await self.announce(conv, mailbox)
        except Exception:
            log.exception("presence cleanup failed")

    async def online(self, user: str) -> bool:
        """Does any replica hold an open connection of this agent (heartbeat not expired)?"""
        now = int(time.time() * 1000)
        return bool(await self.redis.zcount(self._online_key(user), now, "+inf"))

    async def heartbeat(self, stop: asyncio.Event) -> None:
        """Refresh this replica's connections and views before their TTL runs out."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.heartbeat_s)
                return
            except TimeoutError:
                pass
            try:
                await self.refresh()
            except Exception as exc:
                log.warning("presence heartbeat failed", extra={"error": str(exc)})

    async def refresh(self) -> None:
        expiry = int(time.time() * 1000) + self.view_ttl_ms
        keys: list[str] = []
        members: list[str] = []
        for client, w in list(self.where.items()):
            if client.closing:
                continue
            user = client.identity.sub
            keys.append(self._online_key(user))
            members.append(w.key)
            if w.viewing is not None:
                keys.append(self._conv_key(w.viewing))
                members.append(f"v|{user}|{w.key}")
        for i in range(0, len(keys), REFRESH_CHUNK):
            await self._refresh(
                keys=keys[i : i + REFRESH_CHUNK],
                args=[expiry, self.view_ttl_ms, *members[i : i + REFRESH_CHUNK]],
            )

    # ---- client frames -------------------------------------------------------------------------
    async def _mailbox(self, client: Client, id_conversa: str) -> str | None:
        async with self.pool.acquire() as conn:
            mailbox = await storage.conversation_mailbox(conn, id_conversa)
        return mailbox if mailbox is not None and mailbox in client.mailboxes else None

    async def viewing(self, client: Client, id_conversa: str) -> tuple[dict[str, Any], bool] | None:
        """The agent opened a conversation (and left the one before); None: not theirs.

        Returns the presence frame and whether it was announced to the mailbox (the viewer
        then gets it from there, so it needs no copy of its own)."""
        w = self.where.get(client)
        mailbox = await self._mailbox(client, id_conversa)
        if w is None or mailbox is None:
            return None
        user = client.identity.sub
        if w.viewing is not None and w.viewing != id_conversa:
            await self.left(client)
        w.viewing, w.mailbox = id_conversa, mailbox
        key = self._conv_key(id_conversa)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(key, {f"v|{user}|{w.key}": int(time.time() * 1000) + self.view_ttl_ms})
        pipe.pexpire(key, self.view_ttl_ms)
        await pipe.execute()
        return await self._announce(id_conversa, mailbox)

    async def typing(self, client: Client, id_conversa: str) -> dict[str, Any] | None:
        w = self.where.get(client)
        mailbox = await self._mailbox(client, id_conversa)
        if w is None or mailbox is None:
            return None
        if id_conversa != w.viewing:
            w.typed.pop(id_conversa, None)
            w.typed[id_conversa] = mailbox
            while len(w.typed) > MAX_TYPED:
                del w.typed[next(iter(w.typed))]  # the oldest (likely expired already)
        key = self._conv_key(id_conversa)
        ttl_ms = int(self.typing_ttl_s * 1000)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(key, {f"t|{client.identity.sub}|{w.key}": int(time.time() * 1000) + ttl_ms})
        pipe.pexpire(key, max(ttl_ms, self.view_ttl_ms))
        await pipe.execute()
        # Stopped typing: announced once the entry has expired, unless a newer one extended it.
        loop = asyncio.get_running_loop()
        loop.call_later(
            self.typing_ttl_s + 0.05, lambda: self._spawn(self.announce(id_conversa, mailbox))
        )
        return await self.announce(id_conversa, mailbox)

    async def left(self, client: Client, id_conversa: str | None = None) -> dict[str, Any] | None:
        w = self.where.get(client)
        if w is None or w.viewing is None or w.mailbox is None:
            return None
        if id_conversa is not None and id_conversa != w.viewing:
            return None
        conv, mailbox = w.viewing, w.mailbox
        w.viewing = w.mailbox = None
        user = client.identity.sub
        await self.redis.zrem(self._conv_key(conv), f"v|{user}|{w.key}", f"t|{user}|{w.key}")
        return await self.announce(conv, mailbox)

    # ---- announcing ----------------------------------------------------------------------------
    async def announce(self, id_conversa: str, mailbox_id: str) -> dict[str, Any]:
        """Publish the conversation's presence if it changed since the last announcement."""
        frame, _ = await self._announce(id_conversa, mailbox_id)
        return frame

    async def _announce(self, id_conversa: str, mailbox_id: str) -> tuple[dict[str, Any], bool]:
        key = self._conv_key(id_conversa)
        now = int(time.time() * 1000)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zremrangebyscore(key, "-inf", now)
        pipe.zrangebyscore(key, now, "+inf")
        _, members = await pipe.execute()
        viewing, typing = state_of(members)
        frame: dict[str, Any] = {
            "type": "presence",
            "id_conversa": id_conversa,
            "viewing": viewing,
            "typing": typing,
        }
        text = json.dumps([viewing, typing])
        last: Any = await self.redis.set(
            f"{key}:last", text, get=True, px=max(self.view_ttl_ms, 60_000)
        )
        if last is None or bytes(last).decode() != text:
            env = Envelope.of(
                NotifierFrame(mailbox_id=mailbox_id, frame=frame), producer="notifier"
            )
            await self.bus.publish(env)
            return frame, True
        return frame, False
