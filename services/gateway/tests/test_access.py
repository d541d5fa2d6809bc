"""Disabled accounts: ``user.changed`` (active=false) ends a user's access before the token does."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import timedelta

import asyncpg
import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from libs.common import testing
from libs.common.bus import Bus, connect
from libs.common.events import Envelope, UserChanged
from services.gateway.tests.conftest import Gateway, Rig, StartGateway, stop_gateway, token
from services.gateway.tests.test_ws import dial


def new_user() -> str:
    return f"u-{uuid.uuid4().hex[:10]}"


async def publish_user(gw: Gateway, user_id: str, active: bool) -> Envelope:
    """What auth does when an admin disables or re-enables an account."""
    env = Envelope.of(
        UserChanged(user_id=user_id, email=f"{user_id}@chatflow.test", active=active), "auth"
    )
    await publish(gw, env)
    return env


async def publish(gw: Gateway, env: Envelope) -> None:
    redis = connect(testing.REDIS_URL)
    try:
        await Bus(redis, gw.settings.stream_prefix).publish(env)
    finally:
        await redis.aclose()


async def status(client: httpx.AsyncClient, tok: str, path: str = "/api/conversations") -> int:
    return (await client.get(path, headers={"Authorization": f"Bearer {tok}"})).status_code


async def test_disabled_user_gets_401_at_once_and_others_do_not(
    gateway: Gateway, client: httpx.AsyncClient, rig: Rig
) -> None:
    sub, other = new_user(), new_user()
    tok, other_tok = token(rig.key, sub=sub), token(rig.key, sub=other)
    assert await status(client, tok) == 200  # verified once: the token is in the cache now
    assert await status(client, other_tok) == 200

    published = time.monotonic()
    await publish_user(gateway, sub, active=False)
    await testing.eventually(lambda: _is(client, tok, 401), timeout=5.0, interval=0.02)
    assert time.monotonic() - published < 1.0
    for path in ("/api/conversations", "/api/me", "/api/attachments/a1", "/api/nope"):
        r = await client.get(path, headers={"Authorization": f"Bearer {tok}"})
        assert r.status_code == 401, path
        assert r.json() == {"error": {"code": "unauthorized", "message": "account disabled"}}
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "x-upstream" not in r.headers
    assert await status(client, other_tok) == 200
    # A token minted later for the same account is refused as well.
    assert await status(client, token(rig.key, sub=sub)) == 401

    await publish_user(gateway, sub, active=True)
    await testing.eventually(lambda: _is(client, tok, 200), timeout=5.0, interval=0.02)


async def _is(client: httpx.AsyncClient, tok: str, code: int) -> bool:
    return await status(client, tok) == code


async def test_open_websocket_closed_4401_and_reconnect_refused(gateway: Gateway, rig: Rig) -> None:
    sub, other = new_user(), new_user()
    tok = token(rig.key, sub=sub)
    async with (
        dial(gateway, rig, ["chatflow.v1", f"bearer.{tok}"]) as ws,
        dial(gateway, rig, ["chatflow.v1", f"bearer.{token(rig.key, sub=other)}"]) as bystander,
    ):
        await ws.send("hi")
        assert await ws.recv() == "echo:hi"
        await publish_user(gateway, sub, active=False)
        with pytest.raises(ConnectionClosed) as info:
            async with asyncio.timeout(1.0):
                while True:
                    await ws.recv()
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (4401, "account disabled")
        await bystander.send("still here")
        assert await bystander.recv() == "echo:still here"

    for protocols in (["chatflow.v1", f"bearer.{tok}"], ["chatflow.v1"]):
        async with dial(gateway, rig, protocols) as again:
            if protocols == ["chatflow.v1"]:
                await again.send(f'{{"type": "auth", "token": "{tok}"}}')
            with pytest.raises(ConnectionClosed) as info:
                await again.recv()
            assert info.value.rcvd is not None
            assert (info.value.rcvd.code, info.value.rcvd.reason) == (4401, "account disabled")

    await publish_user(gateway, sub, active=True)

    async def reconnects() -> bool:
        try:
            async with dial(gateway, rig, ["chatflow.v1", f"bearer.{tok}"]) as ws:
                await ws.send("back")
                return await ws.recv() == "echo:back"
        except ConnectionClosed:
            return False

    await testing.eventually(reconnects, timeout=2.0)


async def test_a_restarted_gateway_still_refuses(
    gateway: Gateway, client: httpx.AsyncClient, start_gateway: StartGateway, rig: Rig
) -> None:
    sub = new_user()
    tok = token(rig.key, sub=sub)
    await publish_user(gateway, sub, active=False)
    await testing.eventually(lambda: _is(client, tok, 401), timeout=5.0, interval=0.02)
    # Another gateway on the same database (its own stream prefix: it never saw the event).
    fresh = await start_gateway()
    try:
        async with httpx.AsyncClient(base_url=fresh.base, verify=rig.ctx, trust_env=False) as c:
            assert await status(c, tok) == 401
            assert await status(c, token(rig.key, sub=new_user())) == 200
    finally:
        await stop_gateway(fresh)
    conn = await asyncpg.connect(rig.database_url)
    try:
        since = await conn.fetchval(
            "SELECT since FROM gateway.disabled_users WHERE user_id=$1", sub
        )
    finally:
        await conn.close()
    assert since is not None


async def test_every_replica_applies_the_change(start_gateway: StartGateway, rig: Rig) -> None:
    """Two gateways in one consumer group: only one handles the event, both refuse at once."""
    a = await start_gateway()
    b = await start_gateway(stream_prefix=a.settings.stream_prefix)
    try:
        sub = new_user()
        tok = token(rig.key, sub=sub)
        clients = [
            httpx.AsyncClient(base_url=gw.base, verify=rig.ctx, trust_env=False) for gw in (a, b)
        ]
        try:
            await publish_user(a, sub, active=False)
            for c in clients:
                await testing.eventually(lambda c=c: _is(c, tok, 401), timeout=5.0, interval=0.02)
            await publish_user(a, sub, active=True)
            for c in clients:
                await testing.eventually(lambda c=c: _is(c, tok, 200), timeout=5.0, interval=0.02)
        finally:
            for c in clients:
                await c.aclose()
    finally:
        await stop_gateway(b)
        await stop_gateway(a)


async def test_redelivered_and_stale_changes_change_nothing(
    gateway: Gateway, client: httpx.AsyncClient, rig: Rig
) -> None:
    sub = new_user()
    tok = token(rig.key, sub=sub)
    disable = await publish_user(gateway, sub, active=False)
    await testing.eventually(lambda: _is(client, tok, 401), timeout=5.0, interval=0.02)
    # An enable that happened before the disable, handled late (a reclaimed entry): ignored.
    late = Envelope.of(UserChanged(user_id=sub, email="x@chatflow.test", active=True), "auth")
    late.occurred_at = disable.occurred_at - timedelta(seconds=5)
    await publish(gateway, late)
    # The disable again (a redelivery): ignored too, then a real enable.
    await publish(gateway, disable)
    marker = new_user()
    marker_tok = token(rig.key, sub=marker)
    await publish_user(gateway, marker, active=False)  # handled after the two above
    await testing.eventually(lambda: _is(client, marker_tok, 401), timeout=5.0, interval=0.02)
    assert await status(client, tok) == 401
    await publish_user(gateway, sub, active=True)
    await testing.eventually(lambda: _is(client, tok, 200), timeout=5.0, interval=0.02)
