"""Two replicas, one stopped and replaced mid-stream, its client resuming on the new one: every
client counts every event of its mailboxes exactly once, and none of other mailboxes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from websockets.exceptions import ConnectionClosed

from .conftest import Env, Starter, mbx, message_added, recv_type, user, ws_connect

FAST_RECLAIM = {"consumer_claim_idle_ms": 500, "consumer_claim_interval_ms": 200}


async def take(ws: Any, got: list[dict[str, Any]], n: int, timeout: float = 20.0) -> None:
    """Read message.added frames into ``got`` until it holds ``n`` (or the socket closes)."""
    try:
        while len(got) < n:
            got.append(await recv_type(ws, "message.added", timeout))
    except ConnectionClosed:
        pass


async def test_a_replica_restarted_mid_stream_loses_and_doubles_nothing(
    env: Env, start: Starter
) -> None:
    a = await start(**FAST_RECLAIM)
    b = await start(**FAST_RECLAIM)
    box, other = mbx(), mbx()
    events = [message_added(other if i % 4 == 0 else box) for i in range(60)]
    ours = {e.id_conversa for e in events if e.mailbox_id == box}
    theirs = {e.id_conversa for e in events if e.mailbox_id == other}
    on_a: list[dict[str, Any]] = []
    on_b: list[dict[str, Any]] = []
    outsider: list[dict[str, Any]] = []
    ua = user()
    async with (
        ws_connect(b, env.token(user(), [box])) as wb,
        ws_connect(b, env.token(user(), [other])) as wo,
    ):
        async with ws_connect(a, env.token(ua, [box])) as wa:
            for ev in events[:20]:
                await env.publish(ev)
            await take(wa, on_a, sum(e.mailbox_id == box for e in events[:20]))

            async def publish_rest() -> None:
                for ev in events[20:40]:
                    await env.publish(ev)
                    await asyncio.sleep(0.01)

            # Replica a stops while events keep coming; its client is cut off mid-stream.
            publishing = asyncio.create_task(publish_rest())
            await asyncio.sleep(0.05)
            a.stop_event.set()
            await take(wa, on_a, len(ours))
            await publishing
        last = on_a[-1]["event_id"]
        a2 = await start(**FAST_RECLAIM)
        async with ws_connect(a2, env.token(ua, [box])) as wa2:
            await wa2.send(json.dumps({"type": "resume", "after": last}))
            for ev in events[40:]:
                await env.publish(ev)
            await take(wa2, on_a, len(ours))
            await take(wb, on_b, len(ours))
            await take(wo, outsider, len(theirs))
            # Nothing more arrives for anyone (no doubles after the counts were reached).
            for ws in (wa2, wb, wo):
                try:
                    extra = await recv_type(ws, "message.added", 1.0)
                except TimeoutError:
                    continue
                raise AssertionError(f"an extra frame: {extra}")
    for got, want in ((on_a, ours), (on_b, ours), (outsider, theirs)):
        ids = [f["id_conversa"] for f in got]
        assert len(ids) == len(set(ids)), "a frame came twice"
        assert set(ids) == want
        assert len({f["event_id"] for f in got}) == len(got)
