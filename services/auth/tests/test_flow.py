"""The authorization-code flow with PKCE end to end, through the ASGI app."""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from argon2 import PasswordHasher

from libs.common.bus import Bus
from libs.common.tokens import InvalidToken, TokenVerifier
from services.auth import storage
from services.auth.service import AuthService
from services.auth.settings import AuthSettings
from services.auth.tests.conftest import (
    PASSWORD,
    REDIRECT,
    Seeded,
    add_user,
    authorize_params,
    exchange,
    get_code,
    get_form,
    hidden_fields,
    login,
    start,
    tokens_for,
)


async def test_code_flow_to_api_me(
    svc: AuthService, client: httpx.AsyncClient, seeded: Seeded, bus: Bus
) -> None:
    r = await client.get("/oauth/authorize", params=authorize_params())
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "form-action 'self' https://127.0.0.1:8443" in csp
    cookie = r.headers["set-cookie"].lower()
    assert "secure" in cookie and "samesite=strict" in cookie and "httponly" in cookie
    fields = hidden_fields(r.text)
    assert fields["redirect_uri"] == REDIRECT and fields["code_challenge_method"] == "S256"
    assert client.cookies.get("__Host-chatflow_csrf") == fields["csrf"]

    r = await client.post(
        "/oauth/authorize", data={**fields, "email": "Alice@ChatFLOW.test", "password": PASSWORD}
    )
    assert r.status_code == 302
    loc = urlsplit(r.headers["location"])
    assert f"{loc.scheme}://{loc.netloc}{loc.path}" == REDIRECT
    q = parse_qs(loc.query)
    assert q["state"] == ["st-123"] and q["iss"] == [svc.settings.jwt_issuer]

    r = await exchange(client, q["code"][0])
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 900
    assert body["scope"] == "chatflow" and body["refresh_token"]

    verifier = TokenVerifier(bus, svc.settings.jwt_issuer, svc.settings.jwt_audience)
    who = await verifier.verify(body["access_token"])
    assert who.sub == seeded.user_id and who.roles == ("agent",)
    assert who.mailboxes == {seeded.mailbox_id} and who.client_id == "chatflow-web"
    assert who.scopes == {"chatflow"}
    c = who.claims
    assert c["aud"] == "chatflow" and c["iss"] == svc.settings.jwt_issuer
    assert c["exp"] - c["iat"] == 900 and c["nbf"] == c["iat"] and c["jti"]
    assert abs(c["iat"] - time.time()) < 10

    r = await client.get("/api/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert r.status_code == 200, r.text
    me = r.json()
    assert me["id"] == seeded.user_id and me["email"] == "alice@chatflow.test"
    assert me["roles"] == ["agent"]
    assert me["mailboxes"] == [
        {"id": seeded.mailbox_id, "address": "help@chatflow.test", "name": "Help"}
    ]
    r = await client.get(
        "/api/mailboxes", headers={"Authorization": f"Bearer {body['access_token']}"}
    )
    assert r.json() == {"mailboxes": me["mailboxes"]}


async def test_api_needs_a_valid_bearer(client: httpx.AsyncClient, seeded: Seeded) -> None:
    assert (await client.get("/api/me")).status_code == 401
    r = await client.get("/api/me", headers={"Authorization": "Bearer not.a.token"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


async def test_admin_token_lists_memberships(client: httpx.AsyncClient, svc: AuthService) -> None:
    boss = await add_user(svc, "boss@chatflow.test", ["admin"], "sales@chatflow.test")
    tokens = await tokens_for(client, boss.email)
    who = await svc.verifier.verify(tokens["access_token"])
    assert who.is_admin and who.mailboxes == {boss.mailbox_id}


async def test_wrong_verifier_is_invalid_grant(client: httpx.AsyncClient, seeded: Seeded) -> None:
    code = await get_code(client, seeded.email)
    r = await exchange(client, code, verifier="w" * 43)
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_grant"
    # A failed redemption spends the code: the right verifier cannot use it any more.
    assert (await exchange(client, code)).json()["error"] == "invalid_grant"


async def test_reused_code_is_invalid_grant_and_revokes_its_tokens(
    client: httpx.AsyncClient, seeded: Seeded
) -> None:
    code = await get_code(client, seeded.email)
    first = await exchange(client, code)
    assert first.status_code == 200
    again = await exchange(client, code)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    r = await client.post(
        "/oauth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": first.json()["refresh_token"],
            "client_id": "chatflow-web",
        },
    )
    assert r.json()["error"] == "invalid_grant"


async def test_token_redirect_uri_must_match(client: httpx.AsyncClient, seeded: Seeded) -> None:
    code = await get_code(client, seeded.email)
    r = await exchange(client, code, redirect_uri="https://127.0.0.1:8443/other")
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"


async def test_expired_code_is_invalid_grant(
    svc: AuthService, client: httpx.AsyncClient, seeded: Seeded
) -> None:
    code = await get_code(client, seeded.email)
    await svc.pool.execute("UPDATE auth_codes SET expires_at = now() - interval '1 second'")
    r = await exchange(client, code)
    assert r.json() == {"error": "invalid_grant", "error_description": "authorization code expired"}


@pytest.mark.parametrize(
    "over",
    [
        {"redirect_uri": "https://evil.example/callback"},
        {"redirect_uri": REDIRECT + "/"},  # exact match only
        {"redirect_uri": ""},
        {"client_id": "nope"},
    ],
)
async def test_untrusted_client_or_redirect_gets_400_never_a_redirect(
    client: httpx.AsyncClient, seeded: Seeded, over: dict[str, str]
) -> None:
    r = await client.get("/oauth/authorize", params=authorize_params(**over))
    assert r.status_code == 400 and "location" not in r.headers
    assert r.json()["error"]["code"] == "invalid_request"
    r = await client.get(
        "/oauth/authorize", params=authorize_params(**over), headers={"Accept": "text/html"}
    )
    assert r.status_code == 400 and "location" not in r.headers
    assert "cannot be used" in r.text
    fields = await get_form(client)
    r = await client.post(
        "/oauth/authorize", data={**fields, **over, "email": seeded.email, "password": PASSWORD}
    )
    assert r.status_code == 400 and "location" not in r.headers


@pytest.mark.parametrize(
    ("over", "error"),
    [
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge_method": None}, "invalid_request"),
        ({"code_challenge": None}, "invalid_request"),
        ({"code_challenge": "short"}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"state": None}, "invalid_request"),
        ({"scope": "chatflow admin:everything"}, "invalid_scope"),
    ],
)
async def test_bad_request_after_redirect_check_redirects_with_error(
    client: httpx.AsyncClient, seeded: Seeded, over: dict[str, str | None], error: str
) -> None:
    r = await client.get("/oauth/authorize", params=authorize_params(**over))  # type: ignore[arg-type]
    assert r.status_code == 302
    loc = urlsplit(r.headers["location"])
    assert f"{loc.scheme}://{loc.netloc}{loc.path}" == REDIRECT
    q = parse_qs(loc.query)
    assert q["error"] == [error] and "code" not in q
    if over.get("state", "") is not None:
        assert q["state"] == ["st-123"]


async def test_wrong_password_shows_the_form_again(
    client: httpx.AsyncClient, seeded: Seeded
) -> None:
    for email, password in ((seeded.email, "wrong"), ("nobody@chatflow.test", PASSWORD)):
        r = await login(client, email, password)
        assert r.status_code == 401
        assert "Incorrect email or password." in r.text
        fields = hidden_fields(r.text)
        assert fields["csrf"] == client.cookies.get("__Host-chatflow_csrf")
        assert fields["state"] == "st-123"


async def test_login_form_needs_the_csrf_cookie(client: httpx.AsyncClient, seeded: Seeded) -> None:
    fields = await get_form(client)
    client.cookies.clear()
    r = await client.post(
        "/oauth/authorize", data={**fields, "email": seeded.email, "password": PASSWORD}
    )
    assert r.status_code == 400 and "location" not in r.headers
    fields = await get_form(client)
    r = await client.post(
        "/oauth/authorize",
        data={**fields, "csrf": "forged", "email": seeded.email, "password": PASSWORD},
    )
    assert r.status_code == 400 and "location" not in r.headers


async def test_inactive_user_cannot_sign_in(
    svc: AuthService, client: httpx.AsyncClient, seeded: Seeded
) -> None:
    await svc.pool.execute("UPDATE users SET active = false")
    assert (await login(client, seeded.email)).status_code == 401


async def test_throttle_gives_429_after_n_failures(
    settings: AuthSettings, seeded: Seeded, svc: AuthService
) -> None:
    limited = await start(settings.model_copy(update={"login_max_failures": 3}), clean=False)
    transport = httpx.ASGITransport(app=limited.app())
    try:
        async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as c:
            for _ in range(3):
                assert (await login(c, seeded.email, "wrong")).status_code == 401
            r = await login(c, seeded.email)  # even the right password now waits
            assert r.status_code == 429
            assert r.json()["error"]["code"] == "throttled"
            assert 0 < int(r.headers["retry-after"]) <= 900
            # Another account from another address is not affected.
            other = await add_user(limited, "bob@chatflow.test", ["agent"], None)
            r = await login(c, other.email)
            assert r.status_code == 302
    finally:
        await limited.pool.close()
        await limited.redis.aclose()


async def test_wrong_passwords_from_elsewhere_do_not_lock_the_owner_out(
    settings: AuthSettings, seeded: Seeded, svc: AuthService
) -> None:
    """Failures count per account from one IP: a stranger's ten wrong passwords locked the
    agent out for the window (found by a trial). From many IPs, the account's own, higher
    limit still stops the guessing."""
    update = {"login_max_failures": 3, "login_max_failures_account": 5}
    limited = await start(settings.model_copy(update=update), clean=False)
    transport = httpx.ASGITransport(app=limited.app())
    try:
        async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as c:
            c.headers["X-Forwarded-For"] = "203.0.113.66"
            for _ in range(3):
                assert (await login(c, seeded.email, "wrong")).status_code == 401
            assert (await login(c, seeded.email)).status_code == 429  # the guesser waits
            c.headers["X-Forwarded-For"] = "198.51.100.10"  # the agent, at their desk
            assert (await login(c, seeded.email)).status_code == 302
            for n in range(5):  # a botnet: one guess from each of many addresses
                c.headers["X-Forwarded-For"] = f"192.0.2.{n + 1}"
                assert (await login(c, seeded.email, "wrong")).status_code == 401
            c.headers["X-Forwarded-For"] = "198.51.100.11"
            assert (await login(c, seeded.email)).status_code == 429
    finally:
        await limited.pool.close()
        await limited.redis.aclose()


async def test_throttle_per_ip(settings: AuthSettings, seeded: Seeded, svc: AuthService) -> None:
    limited = await start(settings.model_copy(update={"login_max_failures_ip": 2}), clean=False)
    transport = httpx.ASGITransport(app=limited.app())
    try:
        async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as c:
            c.headers["X-Forwarded-For"] = "203.0.113.7"
            for email in ("x1@chatflow.test", "x2@chatflow.test"):
                assert (await login(c, email, "wrong")).status_code == 401
            assert (await login(c, seeded.email)).status_code == 429
            c.headers["X-Forwarded-For"] = "203.0.113.8"  # the gateway says: someone else
            assert (await login(c, seeded.email)).status_code == 302
    finally:
        await limited.pool.close()
        await limited.redis.aclose()


async def test_outdated_hash_is_upgraded_on_login(
    svc: AuthService, client: httpx.AsyncClient, seeded: Seeded
) -> None:
    old = PasswordHasher(time_cost=2, memory_cost=8192, parallelism=1).hash(PASSWORD)
    await svc.pool.execute("UPDATE users SET password_hash = $1", old)
    assert svc.passwords.needs_rehash(old)
    await get_code(client, seeded.email)
    user = await storage.user_by_email(svc.pool, seeded.email)
    assert user is not None and user["password_hash"] != old
    assert not svc.passwords.needs_rehash(user["password_hash"])


async def test_verifier_rejects_tokens_for_other_audiences(
    svc: AuthService, client: httpx.AsyncClient, seeded: Seeded, bus: Bus
) -> None:
    tokens = await tokens_for(client, seeded.email)
    other = TokenVerifier(bus, svc.settings.jwt_issuer, "someone-else")
    with pytest.raises(InvalidToken):
        await other.verify(tokens["access_token"])


async def test_unstorable_input_is_a_client_error_not_a_500(
    client: httpx.AsyncClient, seeded: Seeded
) -> None:
    """NUL cannot be stored in PostgreSQL text; such input must be refused before it gets there."""
    r = await client.get("/oauth/authorize", params=authorize_params(client_id="web\x00"))
    assert r.status_code == 400
    r = await client.post(
        "/oauth/token", data={"grant_type": "refresh_token", "client_id": "a\x00"}
    )
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    for email in ("alice\x00@chatflow.test", "alice@chat\x01flow.test"):
        assert (await login(client, email)).status_code == 401


@pytest.mark.parametrize("path", ["/oauth/token", "/oauth/revoke"])
async def test_repeated_odd_form_parameter_is_400(client: httpx.AsyncClient, path: str) -> None:
    """Repeated names are echoed in error_description only as far as RFC 6749 §5.2 allows."""
    r = await client.post(
        path,
        content="%C3%A9=1&%C3%A9=2&a%22b=1&a%22b=2",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 400, r.text
    assert r.json() == {
        "error": "invalid_request",
        "error_description": "repeated parameters: ? ab",
    }
