"""Refresh rotation and reuse detection, client credentials, revocation, keys and discovery."""

from __future__ import annotations

import base64
import json

import httpx

from libs.common.bus import Bus
from libs.common.events import JwksPublished
from libs.common.tokens import TokenVerifier
from services.auth.service import AuthService
from services.auth.tests.conftest import (
    WEB,
    Seeded,
    basic,
    cli,
    payloads,
    refresh,
    tokens_for,
)

SECRET = "machine-secret-0123456789"


async def test_refresh_rotates_and_reuse_revokes_the_family(
    svc: AuthService, client: httpx.AsyncClient, seeded: Seeded
) -> None:
    t0 = await tokens_for(client, seeded.email)
    r1 = await refresh(client, t0["refresh_token"])
    assert r1.status_code == 200, r1.text
    t1 = r1.json()
    assert t1["refresh_token"] != t0["refresh_token"]
    assert t1["access_token"] != t0["access_token"]
    who = await svc.verifier.verify(t1["access_token"])
    assert who.sub == seeded.user_id and who.mailboxes == {seeded.mailbox_id}

    t2 = (await refresh(client, t1["refresh_token"])).json()
    # t0 was spent: presenting it again means a copy exists, so the whole login ends.
    r = await refresh(client, t0["refresh_token"])
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    r = await refresh(client, t2["refresh_token"])
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    assert (
        await svc.pool.fetchval("SELECT count(*) FROM refresh_tokens WHERE revoked_at IS NULL") == 0
    )


async def test_refresh_may_narrow_but_not_widen_scope(
    client: httpx.AsyncClient, seeded: Seeded
) -> None:
    t0 = await tokens_for(client, seeded.email)
    r = await client.post(
        "/oauth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": t0["refresh_token"],
            "client_id": WEB,
            "scope": "chatflow admin",
        },
    )
    assert r.status_code == 400 and r.json()["error"] == "invalid_scope"


async def test_refresh_for_another_client_is_invalid_grant(
    svc: AuthService, client: httpx.AsyncClient, seeded: Seeded
) -> None:
    t0 = await tokens_for(client, seeded.email)
    await _machine_client(svc, "refresh_token")
    r = await client.post(
        "/oauth/token",
        data={"grant_type": "refresh_token", "refresh_token": t0["refresh_token"]},
        headers=basic("robot", SECRET),
    )
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"


async def test_expired_refresh_token(
    svc: AuthService, client: httpx.AsyncClient, seeded: Seeded
) -> None:
    t0 = await tokens_for(client, seeded.email)
    await svc.pool.execute("UPDATE refresh_tokens SET expires_at = now() - interval '1 second'")
    assert (await refresh(client, t0["refresh_token"])).json()["error"] == "invalid_grant"


async def test_revoke_ends_the_refresh_family(client: httpx.AsyncClient, seeded: Seeded) -> None:
    t0 = await tokens_for(client, seeded.email)
    t1 = (await refresh(client, t0["refresh_token"])).json()
    r = await client.post("/oauth/revoke", data={"token": t0["refresh_token"], "client_id": WEB})
    assert r.status_code == 200
    assert (await refresh(client, t1["refresh_token"])).json()["error"] == "invalid_grant"
    for token in ("unknown", t1["access_token"]):
        r = await client.post("/oauth/revoke", data={"token": token, "client_id": WEB})
        assert r.status_code == 200


async def _machine_client(svc: AuthService, *grants: str) -> None:
    import io
    import sys

    argv = [
        "create-client",
        "--client-id",
        "robot",
        "--scopes",
        "mail.send threads.read",
        "--secret-stdin",
    ]
    for g in grants or ("client_credentials",):
        argv += ["--grant-type", g]
    fn, args = cli(*argv)
    old = sys.stdin
    sys.stdin = io.StringIO(SECRET + "\n")
    try:
        assert await fn(args, svc.settings) == 0
    finally:
        sys.stdin = old


async def test_client_credentials(svc: AuthService, client: httpx.AsyncClient) -> None:
    await _machine_client(svc)
    r = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", "scope": "mail.send"},
        headers=basic("robot", SECRET),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["scope"] == "mail.send" and "refresh_token" not in body
    who = await svc.verifier.verify(body["access_token"])
    assert who.sub == "robot" and who.client_id == "robot" and who.roles == ()
    assert who.mailboxes == frozenset() and who.scopes == {"mail.send"}

    # client_secret_post works too, and no scope means everything the client may have.
    r = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", "client_id": "robot", "client_secret": SECRET},
    )
    assert r.json()["scope"] == "mail.send threads.read"

    r = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", "scope": "mail.send admin"},
        headers=basic("robot", SECRET),
    )
    assert r.status_code == 400 and r.json()["error"] == "invalid_scope"

    # A machine token is not a user: /api/me refuses it.
    r = await client.get("/api/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert r.status_code == 403


async def test_client_credentials_wrong_secret_is_401_invalid_client(
    svc: AuthService, client: httpx.AsyncClient
) -> None:
    await _machine_client(svc)
    for headers, data in (
        (basic("robot", "wrong-secret-000000"), {}),
        ({}, {"client_id": "robot", "client_secret": "wrong-secret-000000"}),
        ({}, {"client_id": "robot"}),
        (basic("ghost", SECRET), {}),
    ):
        r = await client.post(
            "/oauth/token", data={"grant_type": "client_credentials", **data}, headers=headers
        )
        assert r.status_code == 401, (headers, data)
        assert r.json()["error"] == "invalid_client"
        assert r.headers["www-authenticate"].startswith("Basic")


async def test_public_client_cannot_use_client_credentials(
    client: httpx.AsyncClient, seeded: Seeded
) -> None:
    r = await client.post(
        "/oauth/token", data={"grant_type": "client_credentials", "client_id": WEB}
    )
    assert r.status_code == 400 and r.json()["error"] == "unauthorized_client"


async def test_token_endpoint_request_rules(client: httpx.AsyncClient, seeded: Seeded) -> None:
    r = await client.post("/oauth/token", json={"grant_type": "client_credentials"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    r = await client.post("/oauth/token", data={"grant_type": "password", "client_id": WEB})
    assert r.json()["error"] == "unsupported_grant_type"
    r = await client.post(
        "/oauth/token",
        content="grant_type=refresh_token&grant_type=refresh_token&client_id=chatflow-web",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.json()["error"] == "invalid_request"


async def test_jwks_and_discovery(svc: AuthService, client: httpx.AsyncClient, bus: Bus) -> None:
    jwks = (await client.get("/.well-known/jwks.json")).json()
    [key] = jwks["keys"]
    assert key["kty"] == "OKP" and key["crv"] == "Ed25519" and key["alg"] == "Ed25519"
    assert "d" not in key
    published = (await payloads(bus, "auth.jwks", JwksPublished))[-1]
    assert published.keys == jwks["keys"]

    meta = (await client.get("/.well-known/openid-configuration")).json()
    base = svc.settings.jwt_issuer
    assert meta["issuer"] == base
    assert meta["token_endpoint"] == f"{base}/oauth/token"
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert meta["authorization_response_iss_parameter_supported"] is True


async def test_every_start_republishes_jwks_and_keeps_the_key(svc: AuthService, bus: Bus) -> None:
    from services.auth.tests.conftest import start

    again = await start(svc.settings, clean=False)
    try:
        entries = await payloads(bus, "auth.jwks", JwksPublished)
        assert len(entries) == 2
        kids = [[k["kid"] for k in e.keys] for e in entries]
        assert kids[0] == kids[1] and len(kids[0]) == 1
    finally:
        await again.pool.close()
        await again.redis.aclose()


async def test_rotated_key_signs_and_old_tokens_still_verify(
    svc: AuthService, client: httpx.AsyncClient, seeded: Seeded, bus: Bus
) -> None:
    old = await tokens_for(client, seeded.email)
    fn, args = cli("rotate-key", "--lead-s", "0")
    assert await fn(args, svc.settings) == 0
    svc.keys.invalidate()  # skip the replica's key cache
    new = await tokens_for(client, seeded.email)
    assert kid(new["access_token"]) != kid(old["access_token"])
    fresh = TokenVerifier(bus, svc.settings.jwt_issuer, svc.settings.jwt_audience)
    a, b = await fresh.verify(old["access_token"]), await fresh.verify(new["access_token"])
    assert a.sub == b.sub == seeded.user_id
    jwks = (await client.get("/.well-known/jwks.json")).json()["keys"]
    assert len(jwks) == 2


def kid(token: str) -> str:
    head = token.split(".", 1)[0]
    return str(json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))["kid"])


async def test_refresh_of_a_disabled_user_is_invalid_grant_and_revokes_the_family(
    svc: AuthService, client: httpx.AsyncClient, seeded: Seeded
) -> None:
    t0 = await tokens_for(client, seeded.email)
    # Disabled behind the API's back (no revocation yet): the refresh itself must end the login.
    await svc.pool.execute("UPDATE users SET active = false")
    r = await refresh(client, t0["refresh_token"])
    assert r.json() == {"error": "invalid_grant", "error_description": "user is not active"}
    assert (
        await svc.pool.fetchval("SELECT count(*) FROM refresh_tokens WHERE revoked_at IS NULL") == 0
    )
    r = await client.get("/api/me", headers={"Authorization": f"Bearer {t0['access_token']}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    # Enabled again, the old family stays dead: the user signs in anew.
    await svc.pool.execute("UPDATE users SET active = true")
    assert (await refresh(client, t0["refresh_token"])).json()["error"] == "invalid_grant"


async def test_disabled_client_cannot_use_client_credentials(
    svc: AuthService, client: httpx.AsyncClient
) -> None:
    await _machine_client(svc)
    ok = await client.post(
        "/oauth/token", data={"grant_type": "client_credentials"}, headers=basic("robot", SECRET)
    )
    assert ok.status_code == 200
    await svc.pool.execute("UPDATE oauth_clients SET active = false WHERE client_id = 'robot'")
    r = await client.post(
        "/oauth/token", data={"grant_type": "client_credentials"}, headers=basic("robot", SECRET)
    )
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
