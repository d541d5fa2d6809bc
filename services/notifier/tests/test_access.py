"""Access taken away while connected: disabled accounts and removed memberships, on every replica."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import asyncpg
from websockets.exceptions import ConnectionClosed

from libs.common import testing
from libs.common.events import Envelope, MembershipChanged, UserChanged
from services.notifier.frames import FRAME_TYPE
from services.notifier.service import NotifierService

from .conftest import (
    Env,
    Starter,
    assert_silent,
    mbx,
    message_added,
    recv_json,
    recv_type,
    user,
    wait_closed,
    ws_connect,
)


async def set_user(env: Env, user_id: str, active: bool) -> Envelope:
    """What auth publishes when an admin disables or re-enables an account."""
    return await env.publish(
        UserChanged(user_id=user_id, email=f"{user_id}@chatflow.test", active=active), "auth"
    )


async def set_member(env: Env, user_id: str, mailbox_id: str, active: bool) -> Envelope:
    return await env.publish(
        MembershipChanged(user_id=user_id, mailbox_id=mailbox_id, active=active), "auth"
    )


def served(svc: NotifierService, sub: str) -> list[set[str]]:
    """The effective mailbox sets of ``sub``'s connections on this replica."""
    return [set(c.mailboxes) for c in svc.hub.of_user(sub)]


async def refused(svc: NotifierService, token: str) -> tuple[int | None, str | None]:
    async with ws_connect(svc, token) as ws:
        return await wait_closed(ws)


async def test_disabled_user_is_closed_and_refused_others_unaffected(
    env: Env, start: Starter
) -> None:
    svc = await start()
    box, sub = mbx(), user()
    token = env.token(sub, [box])
    async with (
        ws_connect(svc, token) as ws,
        ws_connect(svc, env.token(user(), [box])) as colleague,
    ):
        await ws.send(json.dumps({"type": "ping"}))
        assert await recv_json(ws) == {"type": "pong"}
        published = time.monotonic()
        await set_user(env, sub, active=False)
        assert await wait_closed(ws, 5.0) == (4401, "account disabled")
        assert time.monotonic() - published < 1.0
        assert svc.hub.of_user(sub) == []
        # The colleague goes on receiving.
        await env.publish(message_added(box))
        await recv_type(colleague, "message.added")

    # Reconnects are refused, with the token in the upgrade or in the first frame.
    assert await refused(svc, token) == (4401, "account disabled")
    async with ws_connect(svc, None) as ws:
        await ws.send(json.dumps({"type": "auth", "token": token}))
        assert await wait_closed(ws) == (4401, "account disabled")

    await set_user(env, sub, active=True)

    async def back() -> bool:
        try:
            async with ws_connect(svc, token) as ws:
                await ws.send(json.dumps({"type": "ping"}))
                return (await recv_json(ws, 1.0)) == {"type": "pong"}
        except ConnectionClosed:
            return False

    await testing.eventually(back, timeout=3)
    async with ws_connect(svc, token) as ws:
        await env.publish(message_added(box))
        await recv_type(ws, "message.added")


async def test_removed_membership_stops_that_mailboxs_frames_at_once(
    env: Env, start: Starter
) -> None:
    svc = await start()
    kept, lost, sub = mbx(), mbx(), user()
    async with (
        ws_connect(svc, env.token(sub, [kept, lost])) as ws,
        ws_connect(svc, env.token(user(), [lost])) as colleague,
    ):
        # A conversation in the mailbox that goes away, known while still a member.
        before = message_added(lost)
        await env.publish(before)
        seen = await recv_type(ws, "message.added")
        assert seen["id_conversa"] == before.id_conversa
        await recv_type(colleague, "message.added")

        published = time.monotonic()
        await set_member(env, sub, lost, active=False)
        await testing.eventually(lambda: served(svc, sub) == [{kept}], timeout=5.0, interval=0.01)
        assert time.monotonic() - published < 1.0
        assert sub not in {c.identity.sub for c in svc.hub.by_mailbox.get(lost, ())}

        gone, stays = message_added(lost, before.id_conversa, n=2), message_added(kept)
        await env.publish(gone)
        await env.publish(stays)
        assert (await recv_type(ws, "message.added"))["id_conversa"] == stays.id_conversa
        assert (await recv_type(colleague, "message.added"))["id_conversa"] == gone.id_conversa
        await assert_silent(ws)

        # No sending into the mailbox any more either (the token still names it).
        await ws.send(
            json.dumps(
                {
                    "type": "send",
                    "client_id": "d1",
                    "id_conversa": before.id_conversa,
                    "html": "<p>hi</p>",
                }
            )
        )
        err = await recv_type(ws, "error")
        assert err["code"] == "not_found" and err["client_id"] == "d1"

    # A resume does not replay the lost mailbox's frames either.
    async with ws_connect(svc, env.token(sub, [kept, lost])) as ws:
        assert served(svc, sub) == [{kept}]
        await ws.send(json.dumps({"type": "resume", "after": seen["event_id"]}))
        got = [await recv_json(ws)]
        await assert_silent(ws)
        assert [f["id_conversa"] for f in got] == [stays.id_conversa]

        # Back in the mailbox: this connection's token names it, so its frames come again.
        await set_member(env, sub, lost, active=True)
        await testing.eventually(lambda: served(svc, sub) == [{kept, lost}], timeout=5.0)
        again = message_added(lost)
        await env.publish(again)
        assert (await recv_type(ws, "message.added"))["id_conversa"] == again.id_conversa


async def test_every_replica_acts_and_a_restarted_one_still_refuses(
    env: Env, start: Starter
) -> None:
    a = await start()
    b = await start()
    kept, lost, sub, gone = mbx(), mbx(), user(), user()
    async with (
        ws_connect(a, env.token(gone, [kept])) as on_a,
        ws_connect(b, env.token(gone, [kept])) as on_b,
        ws_connect(a, env.token(sub, [kept, lost])),
        ws_connect(b, env.token(sub, [kept, lost])),
    ):
        await set_user(env, gone, active=False)
        await set_member(env, sub, lost, active=False)
        # One replica of the group handled each event; both replicas act on it.
        for ws in (on_a, on_b):
            assert await wait_closed(ws, 5.0) == (4401, "account disabled")
        for svc in (a, b):
            await testing.eventually(lambda svc=svc: served(svc, sub) == [{kept}], timeout=5.0)

    # A replica started afterwards never saw the events: it reads them from its schema.
    c = await start()
    assert await refused(c, env.token(gone, [kept])) == (4401, "account disabled")
    async with ws_connect(c, env.token(sub, [kept, lost])) as ws:
        assert served(c, sub) == [{kept}]
        stays = message_added(kept)
        await env.publish(message_added(lost))
        await env.publish(stays)
        assert (await recv_type(ws, "message.added"))["id_conversa"] == stays.id_conversa
        await assert_silent(ws)


async def test_redelivered_and_stale_changes_change_nothing(env: Env, start: Starter) -> None:
    svc = await start()
    box, sub = mbx(), user()
    token = env.token(sub, [box])
    disable = await set_user(env, sub, active=False)
    await testing.eventually(lambda: svc.access.is_disabled(sub), timeout=5.0)
    entries = await env.bus.redis.xlen(env.bus.stream(FRAME_TYPE))
    # The same event again, and an enable that happened before it, handled late: no effect.
    await env.bus.publish(disable)
    late = Envelope.of(UserChanged(user_id=sub, email="x@chatflow.test", active=True), "auth")
    late.occurred_at = disable.occurred_at - timedelta(seconds=5)
    await env.bus.publish(late)
    # Nothing taken away at all (a new user, a new member): no entry for the replicas either.
    await set_user(env, user(), active=True)
    await set_member(env, user(), box, active=True)
    marker = user()
    await set_user(env, marker, active=False)  # handled after all of the above
    await testing.eventually(lambda: svc.access.is_disabled(marker), timeout=2.0)
    assert await env.bus.redis.xlen(env.bus.stream(FRAME_TYPE)) == entries + 1
    assert await refused(svc, token) == (4401, "account disabled")
    conn = await asyncpg.connect(env.database_url)
    try:
        rows = await conn.fetch(
            "SELECT user_id FROM notifier.disabled_users WHERE user_id = ANY($1)", [sub, marker]
        )
    finally:
        await conn.close()
    assert {r["user_id"] for r in rows} == {sub, marker}


async def test_access_entries_never_reach_clients(env: Env, start: Starter) -> None:
    svc = await start()
    box, sub = mbx(), user()
    async with ws_connect(svc, env.token(sub, [box])) as ws:
        await env.publish(message_added(box))
        first = await recv_type(ws, "message.added")
        await set_member(env, user(), box, active=False)  # someone else leaves the mailbox
        await set_user(env, user(), active=False)

        async def three() -> bool:
            return await env.bus.redis.xlen(env.bus.stream(FRAME_TYPE)) == 3

        await testing.eventually(three)
        await assert_silent(ws)
        await ws.send(json.dumps({"type": "resume", "after": first["event_id"]}))
        await assert_silent(ws)
        assert served(svc, sub) == [{box}]
