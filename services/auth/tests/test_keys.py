"""Key rotation without downtime: published before it signs, retired only once replaced."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import Counter
from pathlib import Path

import asyncpg
import httpx
import pytest
from pydantic import ValidationError

from libs.common import testing
from libs.common.bus import Bus, connect
from libs.common.events import JwksPublished
from libs.common.tokens import InvalidToken, TokenVerifier
from services.auth.domain.keys import Scheduled, signing
from services.auth.service import AuthService
from services.auth.settings import AuthSettings
from services.auth.tests.conftest import (
    add_machine_client,
    add_user,
    cli,
    machine_token,
    payloads,
    start,
    tokens_for,
)


def kid_of(token: str) -> str:
    head = token.split(".", 1)[0]
    return str(json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))["kid"])


async def mint(svc: AuthService, client: httpx.AsyncClient) -> str:
    svc.keys.invalidate()
    r = await machine_token(client)
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


async def rotate(settings: AuthSettings, *extra: str) -> None:
    fn, args = cli("rotate-key", *extra)
    assert await fn(args, settings) == 0


async def test_a_rotated_key_is_published_at_once_and_signs_after_the_lead(
    svc: AuthService, client: httpx.AsyncClient, bus: Bus, capsys: pytest.CaptureFixture[str]
) -> None:
    await add_machine_client(svc)
    old_kid = kid_of(await mint(svc, client))

    await rotate(svc.settings)  # the default lead, 15 s
    out = capsys.readouterr()
    assert "signs from" in out.out and "warning" not in out.err
    new_kid = await svc.pool.fetchval("SELECT kid FROM signing_keys WHERE kid <> $1", old_kid)
    # Verifiers learn the new key now: old and new are in the newest auth.jwks entry...
    latest = (await payloads(bus, "auth.jwks", JwksPublished))[-1]
    assert [k["kid"] for k in latest.keys] == [new_kid, old_kid]
    jwks = (await client.get("/.well-known/jwks.json")).json()["keys"]
    assert [k["kid"] for k in jwks] == [new_kid, old_kid]
    # ...but tokens stay signed by the old one until the lead has passed, when it retires.
    assert kid_of(await mint(svc, client)) == old_kid
    lead, retired_when_new_signs = await svc.pool.fetchrow(
        """SELECT extract(epoch FROM n.signs_from - now()),
                  o.retired_at = n.signs_from
           FROM signing_keys n, signing_keys o WHERE n.kid = $1 AND o.kid = $2""",
        new_kid,
        old_kid,
    )
    assert 13 < lead <= 15 and retired_when_new_signs

    # Fifteen seconds later (moved in the database rather than waited for):
    await svc.pool.execute(
        """UPDATE signing_keys SET signs_from = signs_from - interval '16 s',
                                   retired_at = retired_at - interval '16 s'"""
    )
    assert kid_of(await mint(svc, client)) == new_kid
    jwks = (await client.get("/.well-known/jwks.json")).json()["keys"]
    assert [k["kid"] for k in jwks] == [new_kid, old_kid]  # old tokens still verify

    # Once the grace (longer than any token lives) is over, the old key is no longer published.
    grace = svc.settings.retired_key_grace_s
    await svc.pool.execute(
        "UPDATE signing_keys SET retired_at = now() - make_interval(secs => $1) WHERE kid = $2",
        float(grace + 1),
        old_kid,
    )
    jwks = (await client.get("/.well-known/jwks.json")).json()["keys"]
    assert [k["kid"] for k in jwks] == [new_kid]


async def test_a_second_rotation_within_the_lead_supersedes_the_first(
    svc: AuthService, client: httpx.AsyncClient, bus: Bus
) -> None:
    await add_machine_client(svc)
    a = kid_of(await mint(svc, client))
    await rotate(svc.settings, "--lead-s", "30")
    await rotate(svc.settings, "--lead-s", "20")  # signs before the first rotation's key
    rows = await svc.pool.fetch(
        "SELECT kid, signs_from, retired_at FROM signing_keys ORDER BY created_at"
    )
    assert rows[0]["kid"] == a
    _, b, c = rows
    # b is retired the moment c signs, i.e. before it ever signs itself; a hands over to c.
    assert b["retired_at"] == c["signs_from"] < b["signs_from"]
    assert rows[0]["retired_at"] == c["signs_from"] and c["retired_at"] is None
    assert kid_of(await mint(svc, client)) == a
    latest = (await payloads(bus, "auth.jwks", JwksPublished))[-1]
    assert {k["kid"] for k in latest.keys} == {a, b["kid"], c["kid"]}
    await svc.pool.execute(
        """UPDATE signing_keys SET signs_from = signs_from - interval '40 s',
                                   retired_at = retired_at - interval '40 s'"""
    )
    assert kid_of(await mint(svc, client)) == c["kid"]


async def test_rotate_key_refuses_a_negative_lead_and_warns_about_a_short_one(
    svc: AuthService, capsys: pytest.CaptureFixture[str]
) -> None:
    fn, args = cli("rotate-key", "--lead-s", "-1")
    assert await fn(args, svc.settings) == 1
    assert await svc.pool.fetchval("SELECT count(*) FROM signing_keys") == 1
    await rotate(svc.settings, "--lead-s", "2")
    assert "does not exceed the verifiers' refetch interval" in capsys.readouterr().err


def test_settings_refuse_an_unsafe_rotation() -> None:
    with pytest.raises(ValidationError, match="key_publish_lead_s"):
        AuthSettings.load(key_publish_lead_s=TokenVerifier.min_refetch_s)
    with pytest.raises(ValidationError, match="retired_key_grace_s"):
        AuthSettings.load(access_token_ttl_s=3600, retired_key_grace_s=3600)
    assert AuthSettings.load().key_publish_lead_s == 15


def test_the_signing_key_by_the_clock() -> None:
    a = Scheduled("a", "A", signs_from=0.0, retired_at=100.0)
    b = Scheduled("b", "B", signs_from=100.0, retired_at=None)
    assert signing([a, b], 50.0) is a
    assert signing([a, b], 99.999) is a
    assert signing([a, b], 100.0) is b  # the handover is one instant: never no key, never both
    assert signing([b], 50.0) is None
    early = Scheduled("c", "C", signs_from=80.0, retired_at=None)
    superseded = Scheduled("b", "B", signs_from=100.0, retired_at=80.0)
    assert signing([Scheduled("a", "A", 0.0, 80.0), superseded, early], 120.0) is early


async def test_migration_0002_keeps_existing_keys_signing(database_url: str) -> None:
    """0001 may already be applied with keys in it: 0002 must keep them as they were."""
    folder = Path(AuthService.migrations)
    conn = await asyncpg.connect(database_url)
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("CREATE SCHEMA auth_upgrade; SET LOCAL search_path = auth_upgrade")
        await conn.execute((folder / "0001_init.sql").read_text())
        await conn.execute(
            """INSERT INTO signing_keys (kid, private_jwk, public_jwk, created_at)
               VALUES ('k1', '{}', '{}', now() - interval '1 day');
               INSERT INTO oauth_clients (client_id, public) VALUES ('web', true)"""
        )
        await conn.execute((folder / "0002_key_schedule_and_client_status.sql").read_text())
        row = await conn.fetchrow("SELECT signs_from = created_at AS same FROM signing_keys")
        assert row["same"]
        assert await conn.fetchval("SELECT active FROM oauth_clients") is True
        await tx.rollback()
    finally:
        await conn.close()


async def test_key_rotation_while_a_load_runs_no_request_fails(
    settings: AuthSettings, bus: Bus
) -> None:
    """Tokens are minted and verified without pause for 3 s while the key rotates (lead 1 s
    against verifiers that refetch at most every 0.5 s): not one request may fail."""
    s = settings.model_copy(update={"key_cache_s": 0.2})
    svc = await start(s)
    transport = httpx.ASGITransport(app=svc.app())
    verifier = TokenVerifier(bus, s.jwt_issuer, s.jwt_audience, min_refetch_s=0.5)
    failures: list[str] = []
    seen: Counter[str] = Counter()
    tokens: list[str] = []
    try:
        await add_machine_client(svc)
        async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as c:
            end = time.monotonic() + 3.0

            async def load() -> None:
                while time.monotonic() < end:
                    r = await machine_token(c)
                    if r.status_code != 200:
                        failures.append(f"token endpoint {r.status_code}: {r.text}")
                        continue
                    token = r.json()["access_token"]
                    try:
                        await verifier.verify(token)
                    except InvalidToken as exc:
                        failures.append(f"{kid_of(token)}: {exc}")
                    seen[kid_of(token)] += 1
                    tokens.append(token)

            async def noise() -> None:
                """Tokens with unknown kids keep the verifier's refetch limit busy, as a stray
                client (or an attacker) would: a key published as it starts signing would then
                fail until the next allowed refetch."""
                forged = await mint(svc, c)
                head = base64.urlsafe_b64encode(
                    json.dumps({"alg": "Ed25519", "kid": "nope", "typ": "at+jwt"}).encode()
                ).rstrip(b"=")
                forged = head.decode() + forged[forged.index(".") :]
                while time.monotonic() < end:
                    with pytest.raises(InvalidToken):
                        await verifier.verify(forged)
                    await asyncio.sleep(0.02)

            async def rotate_midway() -> None:
                await asyncio.sleep(1.0)
                await rotate(s, "--lead-s", "1")

            await asyncio.gather(*(load() for _ in range(4)), noise(), rotate_midway())
        retired = await svc.pool.fetchval(
            "SELECT kid FROM signing_keys WHERE retired_at IS NOT NULL"
        )
    finally:
        await svc.pool.close()
        await svc.redis.aclose()

    assert failures == []
    assert len(seen) == 2, seen  # both keys signed during the run
    assert min(seen.values()) > 10, seen
    assert kid_of(tokens[0]) == retired
    # The old key's tokens outlive the switch: a verifier that starts now accepts all of them.
    late = TokenVerifier(bus, s.jwt_issuer, s.jwt_audience)
    for token in tokens:
        await late.verify(token)


async def test_keys_are_published_again_after_redis_restarts_empty(settings: AuthSettings) -> None:
    """Redis restarts with nothing in it: auth notices ``auth.jwks`` no longer holds its keys and
    publishes them again, so a service started after the restart verifies tokens within seconds
    (the trial's restarted services refused every token until auth itself was restarted), and
    the first login after the restart does not fail on a stale Redis connection."""
    server = testing.RedisServer()
    server.start()
    s = settings.model_copy(update={"redis_url": server.url, "jwks_check_interval_s": 0.5})
    svc = AuthService(s)
    task = asyncio.create_task(svc.run())
    redis = connect(server.url)
    try:
        await testing.eventually(lambda: svc._http is not None and svc._http.started, 15)
        await add_user(svc, "rita@chatflow.test", ["agent"], "help@chatflow.test")
        transport = httpx.ASGITransport(app=svc.app())
        async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as c:
            before = (await tokens_for(c, "rita@chatflow.test"))["access_token"]
            server.restart()
            after = (await tokens_for(c, "rita@chatflow.test"))["access_token"]

        verifier = TokenVerifier(Bus(redis, s.stream_prefix), s.jwt_issuer, s.jwt_audience)
        started = time.monotonic()

        async def verifies() -> bool:
            try:
                await verifier.verify(before)
            except InvalidToken:
                return False
            return True

        await testing.eventually(verifies, timeout=5, interval=0.1)
        assert time.monotonic() - started < 5
        await verifier.verify(after)
    finally:
        svc.stop_event.set()
        await asyncio.wait_for(task, 20)
        await redis.aclose()
        server.kill()
