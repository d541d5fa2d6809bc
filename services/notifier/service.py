"""The notifier: conversation and send events in, live WebSocket frames out, sends in.

Events are handled once by the consumer group, which turns each into one ``notifier.frame``
(through the outbox); every replica reads that stream with a BroadcastReader and writes the
frame to its own agents, so an agent gets it once whichever replica it is connected to.
Disabled accounts and removed memberships reach every replica the same way
(``services.notifier.access``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, cast

from fastapi import FastAPI

from libs.common import web
from libs.common.bus import BroadcastReader
from libs.common.service import Service
from services.notifier import push, push_http
from services.notifier.access import AccessState
from services.notifier.badges import Badges
from services.notifier.drafts import DRAFT_TYPE
from services.notifier.frames import FRAME_TYPE
from services.notifier.hub import Hub
from services.notifier.live_state import LiveState
from services.notifier.presence import Presence
from services.notifier.settings import NotifierSettings
from services.notifier.stream import TYPES, StreamHandlers
from services.notifier.ws import LiveServer

log = logging.getLogger("chatflow.notifier")


class NotifierService(Service):
    name = "notifier"
    settings_cls = NotifierSettings
    migrations = Path(__file__).parent / "migrations"

    hub: Hub
    live: LiveServer
    access: AccessState
    presence: Presence
    pusher: push.Pusher
    vapid: Any = None

    def build_app(self) -> FastAPI:
        app = FastAPI(title="ChatFLOW notifier")
        app.include_router(push_http.router)
        return app

    @property
    def cfg(self) -> NotifierSettings:
        return cast(NotifierSettings, self.settings)

    async def on_start(self) -> None:
        s = self.cfg
        # Upgrade requests carry the token in a header; keep websockets' debug logging off.
        logging.getLogger("websockets.server").setLevel(logging.WARNING)
        self.hub = Hub(s.ws_slow_consumer_bytes, s.resume_max_entries)
        self.access = AccessState()
        self.presence = Presence(
            self.bus,
            self.pool,
            self.hub,
            view_ttl_s=s.presence_view_ttl_s,
            typing_ttl_s=s.presence_typing_ttl_s,
            heartbeat_s=s.presence_heartbeat_s,
        )
        self.vapid = push.load_vapid(s)
        self.pusher = push.Pusher(s, self.pool, self.presence, self.access, self.vapid)
        handlers = StreamHandlers(self.pool, self.relay, s.push_delay_s, self.pusher.wake)
        self.consumer(TYPES, handlers.handle, batch_handler=handlers.handle_batch)
        # The cursor first, then the stored access changes: whatever the load misses was
        # committed after it began, so its entry lies after the cursor (services.notifier.access).
        last: Any = await self.redis.xrevrange(self.bus.stream(FRAME_TYPE), count=1)
        cursor = last[0][0].decode() if last else "0-0"
        await self.access.load(self.pool)
        badges = Badges(self.pool, self.hub, self.relay, s.badge_snapshot_max)
        self.live = LiveServer(
            s,
            self.verifier,
            self.pool,
            self.relay,
            self.bus,
            self.hub,
            self.access,
            LiveState(badges, self.presence),
        )
        reader = BroadcastReader(
            self.bus, [FRAME_TYPE], self.live.on_frame, start=cursor, block_ms=s.consumer_block_ms
        )
        self.consumers.append(reader)  # readiness covers it; stopped with the consumers
        # Other replicas' draft changes, from before this one can open any (drafts.py).
        drafts_last: Any = await self.redis.xrevrange(self.bus.stream(DRAFT_TYPE), count=1)
        self.consumers.append(
            BroadcastReader(
                self.bus,
                [DRAFT_TYPE],
                self.live.drafts.on_stream,
                start=drafts_last[0][0].decode() if drafts_last else "0-0",
                block_ms=s.consumer_block_ms,
            )
        )
        # Replies that name their draft (REST ones too) empty it for every editor.
        self.consumer(["mail.send"], self.live.drafts.on_command, group="notifier-drafts")
        self.background.append(self._trim_frames)
        self.background.append(lambda: self.presence.heartbeat(self.stop_event))
        self.background.append(lambda: self.pusher.run(self.stop_event))
        await self.live.start()

    async def before_stop(self) -> None:
        await self.live.close()
        await self.live.drafts.drain()  # compactions of the drafts its editors just left

    def extra_checks(self) -> dict[str, web.Check]:
        async def websocket() -> bool:
            return self.live.serving

        return {"websocket": websocket}

    async def _trim_frames(self) -> None:
        """Frames are kept for resume only; older ones go (a client that far behind resyncs)."""
        s = self.cfg
        stream = self.bus.stream(FRAME_TYPE)
        while not self.stop_event.is_set():
            try:
                await asyncio.wait_for(self.stop_event.wait(), s.frames_trim_interval_s)
                return
            except TimeoutError:
                pass
            try:
                cutoff_ms = int((time.time() - s.frames_retention_s) * 1000)
                await self.redis.xtrim(stream, minid=f"{cutoff_ms}-0", approximate=True)
            except Exception as exc:
                log.warning("trimming frames failed", extra={"error": str(exc)})
