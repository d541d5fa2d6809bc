"""The per-connection state beyond the frame fan-out: unread badges and presence, one entry point
for ``ws.LiveServer`` so its hooks stay four lines."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from pydantic import BaseModel

from services.notifier import frames
from services.notifier.badges import Badges
from services.notifier.frames import NotifierFrame, PresenceFrame, ReadFrame
from services.notifier.hub import Client
from services.notifier.presence import Presence

log = logging.getLogger("chatflow.notifier.live")


def _dump(frame: dict[str, Any]) -> str:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


class LiveState:
    def __init__(self, badges: Badges, presence: Presence) -> None:
        self.badges = badges
        self.presence = presence
        self._tasks: set[asyncio.Task[None]] = set()

    def connected(self, client: Client) -> None:
        """Right after the client joined the hub, before anything awaits: from here on its badge
        frames wait for its snapshot instead of passing it by. The loading runs in a task."""
        self.badges.register(client)
        self.presence.register(client)
        task = asyncio.create_task(self._load(client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _load(self, client: Client) -> None:
        """A failure costs the client its badges or its online mark (logged), not the socket."""
        try:
            await self.presence.connected(client)
        except Exception:
            log.exception("presence unavailable on connect")
        try:
            await self.badges.on_connect(client)
        except Exception:
            self.badges.forget(client)
            log.exception("badges unavailable on connect")

    def disconnected(self, client: Client) -> None:
        self.presence.disconnected(client)
        self.badges.forget(client)

    def deliver(self, entry_id: str, nf: NotifierFrame) -> bool:
        """A badge-only entry (a read, a merge), delivered per agent: True; else False."""
        if nf.frame.get("type") != "badge":
            return False
        self.badges.deliver(entry_id, nf.mailbox_id, nf.user_id, nf.frame)
        return True

    def deliver_badge(self, entry_id: str, nf: NotifierFrame) -> None:
        """The badge change riding on a frame's entry, after that frame was queued."""
        if nf.badge is not None:
            self.badges.deliver(entry_id, nf.mailbox_id, None, nf.badge)

    async def on_frame(self, client: Client, frame: BaseModel) -> bool:
        """Handle ``read``, ``viewing``, ``typing`` and ``left``; False for any other frame."""
        if isinstance(frame, ReadFrame):
            if not await self.badges.read(client, frame.id_conversa):
                await self._not_found(client, frame.id_conversa)
            return True
        if not isinstance(frame, PresenceFrame):
            return False
        if frame.type == "left":
            await self.presence.left(client, frame.id_conversa)
            return True
        if frame.type == "typing":
            if await self.presence.typing(client, frame.id_conversa) is None:
                await self._not_found(client, frame.id_conversa)
            return True
        viewed = await self.presence.viewing(client, frame.id_conversa)
        if viewed is None:
            await self._not_found(client, frame.id_conversa)
        elif not viewed[1]:
            # Nothing changed for the others (already viewing, say): the viewer still learns
            # who else is here, right away. A change reaches it with the mailbox's frame.
            await client.conn.send(_dump(viewed[0]))
        return True

    async def _not_found(self, client: Client, id_conversa: str) -> None:
        # The same answer for "absent" and "not yours": no probing of other mailboxes. It names
        # the conversation asked for, as the draft errors do, so a client can tell which.
        error = frames.error("not_found", "conversation not found")
        await client.conn.send(_dump({**error, "id_conversa": id_conversa}))
