"""The admin API: who gets in, request rules, and the events every directory change writes."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from libs.common.bus import Bus
from libs.common.events import MailboxChanged, MembershipChanged, UserChanged
from services.auth.service import AuthService
from services.auth.tests.conftest import (
    WEB,
    Seeded,
    add_machine_client,
    authorize_params,
    bearer,
    envelopes,
    login,
    machine_token,
    payloads,
    refresh,
    token_of,
    tokens_for,
)

NEW_PASSWORD = "a-long-enough-password"


@pytest.fixture
async def admin(svc: AuthService, client: httpx.AsyncClient) -> dict[str, str]:
    """Authorization headers of an active admin."""
    return bearer(await token_of(client, svc, "root@chatflow.test", ["admin"]))


@pytest.fixture
def wakes(svc: AuthService, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts relay wake-ups (the relay itself does not run in these tests)."""
    calls: list[int] = []
    monkeypatch.setattr(svc.relay, "wake", lambda: calls.append(1))
    return calls


async def published(svc: AuthService, bus: Bus, type_: str, model: Any) -> list[Any]:
    """Run the relay, then every payload of ``type_`` on the bus."""
    while await svc.relay.publish_once():
        pass
    return await payloads(bus, type_, model)


def is_error(r: httpx.Response, status: int, code: str) -> bool:
    body = r.json()
    return r.status_code == status and body["error"]["code"] == code and body["error"]["message"]


# ---- access --------------------------------------------------------------------------------


async def test_only_an_active_admin_gets_in(
    svc: AuthService, client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    agent = bearer(await token_of(client, svc, "agent@chatflow.test", ["agent"]))
    await add_machine_client(svc, scopes="admin mail.send")
    robot = bearer((await machine_token(client)).json()["access_token"])
    routes = [
        ("GET", "/api/admin/users", None),
        ("POST", "/api/admin/users", {"email": "x"}),  # a bad body: still 401/403 first
        ("PATCH", f"/api/admin/users/{uuid.uuid4()}", {}),
        ("GET", "/api/admin/mailboxes", None),
        ("POST", "/api/admin/mailboxes", {"address": "a@b.test"}),
        ("PATCH", f"/api/admin/mailboxes/{uuid.uuid4()}", {}),
        ("PUT", f"/api/admin/mailboxes/{uuid.uuid4()}/members/{uuid.uuid4()}", None),
        ("DELETE", f"/api/admin/mailboxes/{uuid.uuid4()}/members/{uuid.uuid4()}", None),
        ("GET", "/api/admin/clients", None),
        ("POST", "/api/admin/clients", {"client_id": "m"}),
        ("PATCH", "/api/admin/clients/robot", {}),
    ]
    for method, path, body in routes:
        r = await client.request(method, path, json=body)
        assert is_error(r, 401, "unauthorized"), (method, path)
        assert r.headers["www-authenticate"] == "Bearer"
        r = await client.request(method, path, json=body, headers=agent)
        assert is_error(r, 403, "forbidden"), (method, path, r.text)
        r = await client.request(method, path, json=body, headers=robot)
        assert is_error(r, 403, "forbidden"), (method, path, r.text)

    assert (await client.get("/api/admin/users", headers=admin)).status_code == 200
    # The directory decides, not only the token: a demoted admin's live token stops working...
    await svc.pool.execute("UPDATE users SET roles = '{agent}' WHERE email = 'root@chatflow.test'")
    assert is_error(await client.get("/api/admin/users", headers=admin), 403, "forbidden")
    # ...and a disabled one's is 401, as on /api/me.
    await svc.pool.execute(
        "UPDATE users SET roles = '{admin}', active = false WHERE email = 'root@chatflow.test'"
    )
    assert is_error(await client.get("/api/admin/users", headers=admin), 401, "unauthorized")


# ---- users ---------------------------------------------------------------------------------


async def test_create_and_list_users(
    svc: AuthService,
    client: httpx.AsyncClient,
    admin: dict[str, str],
    bus: Bus,
    wakes: list[int],
) -> None:
    r = await client.post(
        "/api/admin/users",
        json={
            "email": " Dana@ChatFLOW.test ",
            "name": " Dana ",
            "role": "agent",
            "password": NEW_PASSWORD,
        },
        headers=admin,
    )
    assert r.status_code == 201, r.text
    dana = r.json()
    assert set(dana) == {"id", "email", "name", "roles", "active", "mailboxes"}
    assert (dana["email"], dana["name"], dana["roles"], dana["active"], dana["mailboxes"]) == (
        "dana@chatflow.test",
        "Dana",
        ["agent"],
        True,
        [],
    )
    assert wakes == [1]
    # The event committed with the row: it is in the outbox, then on the stream.
    assert await svc.pool.fetchval("SELECT count(*) FROM outbox WHERE stream_type = 'user.changed'")
    event = (await published(svc, bus, "user.changed", UserChanged))[-1]
    assert (event.user_id, event.email, event.roles, event.active) == (
        dana["id"],
        "dana@chatflow.test",
        ["agent"],
        True,
    )
    [env] = [e for e in await envelopes(bus, "user.changed") if e.payload["user_id"] == dana["id"]]
    assert env.correlation_id == r.headers["x-request-id"]  # traceable to the request

    # The password works (exactly as sent), and no hash ever leaves the service.
    assert (await login(client, "dana@chatflow.test", NEW_PASSWORD)).status_code == 302
    listing = (await client.get("/api/admin/users", headers=admin)).json()["users"]
    assert [u["email"] for u in listing] == ["dana@chatflow.test", "root@chatflow.test"]
    assert "hash" not in r.text and "argon2" not in str(listing)

    # Duplicates are 409 whatever the case, and write nothing.
    before = len(await envelopes(bus, "user.changed"))
    r = await client.post(
        "/api/admin/users",
        json={"email": "DANA@chatflow.test", "password": NEW_PASSWORD},
        headers=admin,
    )
    assert is_error(r, 409, "conflict")
    assert len(await published(svc, bus, "user.changed", UserChanged)) == before


@pytest.mark.parametrize(
    "body",
    [
        {"email": "erin@chatflow.test", "password": "short-pass"},  # 10 < 12
        {"email": "erin@chatflow.test", "password": "x" * 1025},
        {"email": "not-an-email", "password": NEW_PASSWORD},
        {"email": "erin@chatflow.test", "password": NEW_PASSWORD, "role": "owner"},
        {"email": "erin@chatflow.test", "password": NEW_PASSWORD, "roles": ["admin"]},
        {"email": "erin@chatflow.test", "password": NEW_PASSWORD, "name": None},
        {"email": "erin@chatflow.test", "password": 123456789012},
        {"email": "erin@chatflow.test", "password": NEW_PASSWORD, "name": "n" * 201},
        {"email": "erin@chatflow.test", "password": NEW_PASSWORD, "name": "Erin\u0000"},
        {"email": "erin\u0000@chatflow.test", "password": NEW_PASSWORD},
        {"password": NEW_PASSWORD},
        ["erin@chatflow.test"],
        "erin",
    ],
)
async def test_bad_user_bodies_are_422(
    svc: AuthService, client: httpx.AsyncClient, admin: dict[str, str], body: Any
) -> None:
    r = await client.post("/api/admin/users", json=body, headers=admin)
    assert is_error(r, 422, "invalid"), r.text
    assert await svc.pool.fetchval("SELECT count(*) FROM users") == 1


async def test_non_json_body_is_422(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    r = await client.post(
        "/api/admin/users",
        content=b"email=x@y.test&password=aaaaaaaaaaaaaa",
        headers={**admin, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert is_error(r, 422, "invalid")
    r = await client.post(
        "/api/admin/users",
        content=b"{not json",
        headers={**admin, "Content-Type": "application/json"},
    )
    assert is_error(r, 422, "invalid")


async def test_patch_user_and_disabling_ends_every_login(
    svc: AuthService,
    client: httpx.AsyncClient,
    admin: dict[str, str],
    seeded: Seeded,
    bus: Bus,
    wakes: list[int],
) -> None:
    first, second = await tokens_for(client, seeded.email), await tokens_for(client, seeded.email)
    url = f"/api/admin/users/{seeded.user_id}"
    baseline = len(await published(svc, bus, "user.changed", UserChanged))

    r = await client.patch(url, json={"name": "Alice A.", "role": "admin"}, headers=admin)
    assert r.status_code == 200, r.text
    assert (r.json()["name"], r.json()["roles"], r.json()["active"]) == (
        "Alice A.",
        ["admin"],
        True,
    )
    assert r.json()["mailboxes"] == [seeded.mailbox_id]
    r = await client.patch(url, json={"role": "admin"}, headers=admin)  # nothing changes
    assert r.status_code == 200 and r.json()["name"] == "Alice A."
    events = await published(svc, bus, "user.changed", UserChanged)
    assert len(events) == baseline + 1 and events[-1].roles == ["admin"]

    r = await client.patch(url, json={"active": False}, headers=admin)
    assert r.status_code == 200 and r.json()["active"] is False
    assert wakes == [1, 1, 1]
    events = await published(svc, bus, "user.changed", UserChanged)
    assert (events[-1].user_id, events[-1].active) == (seeded.user_id, False)
    # Both logins ended in that same transaction...
    live = "SELECT count(*) FROM refresh_tokens WHERE user_id = $1 AND revoked_at IS NULL"
    assert await svc.pool.fetchval(live, uuid.UUID(seeded.user_id)) == 0
    for t in (first, second):
        r = await refresh(client, t["refresh_token"])
        assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
        # ...the access tokens still verify (15 min) but the directory refuses them...
        r = await client.get("/api/me", headers=bearer(t["access_token"]))
        assert is_error(r, 401, "unauthorized")
    # ...and no new login starts.
    assert (await login(client, seeded.email)).status_code == 401

    r = await client.patch(url, json={"active": True}, headers=admin)
    assert r.json()["active"] is True
    assert (await login(client, seeded.email)).status_code == 302


async def test_patch_user_rules(
    svc: AuthService, client: httpx.AsyncClient, admin: dict[str, str], seeded: Seeded
) -> None:
    url = f"/api/admin/users/{seeded.user_id}"
    for body in ({"active": None}, {"active": "false"}, {"role": "root"}, {"email": "x@y.test"}):
        assert is_error(await client.patch(url, json=body, headers=admin), 422, "invalid"), body
    for bad in (str(uuid.uuid4()), "not-a-uuid"):
        r = await client.patch(f"/api/admin/users/{bad}", json={"name": "x"}, headers=admin)
        assert is_error(r, 404, "not_found")

    # The last active admin can neither be demoted nor disabled (nobody could undo it).
    root = (await client.get("/api/admin/users", headers=admin)).json()["users"][1]
    assert root["email"] == "root@chatflow.test"
    for body in ({"role": "agent"}, {"active": False}):
        r = await client.patch(f"/api/admin/users/{root['id']}", json=body, headers=admin)
        assert is_error(r, 409, "conflict")
    # With a second admin it can.
    assert (await client.patch(url, json={"role": "admin"}, headers=admin)).status_code == 200
    r = await client.patch(f"/api/admin/users/{root['id']}", json={"active": False}, headers=admin)
    assert r.status_code == 200 and r.json()["active"] is False


# ---- mailboxes and memberships -------------------------------------------------------------


async def test_mailboxes(
    svc: AuthService, client: httpx.AsyncClient, admin: dict[str, str], bus: Bus, wakes: list[int]
) -> None:
    r = await client.post(
        "/api/admin/mailboxes",
        json={"address": "Sales@ChatFLOW.test", "name": "Sales"},
        headers=admin,
    )
    assert r.status_code == 201, r.text
    box = r.json()
    assert box == {
        "id": box["id"],
        "address": "sales@chatflow.test",
        "name": "Sales",
        "active": True,
        "members": [],
    }
    [event] = await published(svc, bus, "mailbox.changed", MailboxChanged)
    assert (event.mailbox_id, event.address, event.name, event.active) == (
        box["id"],
        "sales@chatflow.test",
        "Sales",
        True,
    )
    r = await client.post(
        "/api/admin/mailboxes", json={"address": "sales@chatflow.test"}, headers=admin
    )
    assert is_error(r, 409, "conflict")
    for body in ({"address": "nope"}, {"name": "no address"}, {"address": "a@b.test", "x": 1}):
        r = await client.post("/api/admin/mailboxes", json=body, headers=admin)
        assert is_error(r, 422, "invalid"), body

    url = f"/api/admin/mailboxes/{box['id']}"
    r = await client.patch(url, json={"name": "Sales EU", "active": False}, headers=admin)
    assert (r.json()["name"], r.json()["active"]) == ("Sales EU", False)
    r = await client.patch(url, json={"address": "Vendas@chatflow.test"}, headers=admin)
    assert r.json()["address"] == "vendas@chatflow.test"
    assert (await client.patch(url, json={}, headers=admin)).status_code == 200  # no change
    events = await published(svc, bus, "mailbox.changed", MailboxChanged)
    assert [(e.address, e.name, e.active) for e in events[1:]] == [
        ("sales@chatflow.test", "Sales EU", False),
        ("vendas@chatflow.test", "Sales EU", False),
    ]
    assert len(wakes) == 4  # create and the three patches; the 409 rolled back, no wake

    other = await client.post(
        "/api/admin/mailboxes", json={"address": "ops@chatflow.test"}, headers=admin
    )
    r = await client.patch(
        f"/api/admin/mailboxes/{other.json()['id']}",
        json={"address": "vendas@chatflow.test"},
        headers=admin,
    )
    assert is_error(r, 409, "conflict")
    for bad in (str(uuid.uuid4()), "x"):
        r = await client.patch(f"/api/admin/mailboxes/{bad}", json={"name": "x"}, headers=admin)
        assert is_error(r, 404, "not_found")
    boxes = (await client.get("/api/admin/mailboxes", headers=admin)).json()["mailboxes"]
    assert [b["address"] for b in boxes] == ["ops@chatflow.test", "vendas@chatflow.test"]


async def test_memberships_and_the_tokens_they_shape(
    svc: AuthService,
    client: httpx.AsyncClient,
    admin: dict[str, str],
    seeded: Seeded,
    bus: Bus,
    wakes: list[int],
) -> None:
    box = (
        await client.post(
            "/api/admin/mailboxes", json={"address": "vip@chatflow.test"}, headers=admin
        )
    ).json()
    url = f"/api/admin/mailboxes/{box['id']}/members/{seeded.user_id}"
    baseline = len(await published(svc, bus, "membership.changed", MembershipChanged))

    r = await client.put(url, headers=admin)
    assert r.status_code == 201
    assert r.json() == {"mailbox_id": box["id"], "user_id": seeded.user_id, "member": True}
    assert (await client.put(url, headers=admin)).status_code == 200  # already: no event
    events = await published(svc, bus, "membership.changed", MembershipChanged)
    assert len(events) == baseline + 1
    assert (events[-1].user_id, events[-1].mailbox_id, events[-1].active) == (
        seeded.user_id,
        box["id"],
        True,
    )
    boxes = {
        b["address"]: b
        for b in (await client.get("/api/admin/mailboxes", headers=admin)).json()["mailboxes"]
    }
    assert boxes["vip@chatflow.test"]["members"] == [seeded.user_id]
    users = (await client.get("/api/admin/users", headers=admin)).json()["users"]
    alice = next(u for u in users if u["id"] == seeded.user_id)
    assert set(alice["mailboxes"]) == {seeded.mailbox_id, box["id"]}
    who = await svc.verifier.verify((await tokens_for(client, seeded.email))["access_token"])
    assert who.mailboxes == {seeded.mailbox_id, box["id"]}

    r = await client.delete(url, headers=admin)
    assert r.status_code == 204 and not r.content
    assert (await client.delete(url, headers=admin)).status_code == 204  # idempotent, no event
    events = await published(svc, bus, "membership.changed", MembershipChanged)
    assert len(events) == baseline + 2
    assert (events[-1].user_id, events[-1].mailbox_id, events[-1].active) == (
        seeded.user_id,
        box["id"],
        False,
    )
    who = await svc.verifier.verify((await tokens_for(client, seeded.email))["access_token"])
    assert who.mailboxes == {seeded.mailbox_id}
    assert len(wakes) == 5  # the mailbox, and each of the four membership requests

    ghost = str(uuid.uuid4())
    for method in ("PUT", "DELETE"):
        for path in (
            f"/api/admin/mailboxes/{ghost}/members/{seeded.user_id}",
            f"/api/admin/mailboxes/{box['id']}/members/{ghost}",
            f"/api/admin/mailboxes/{box['id']}/members/bad-id",
        ):
            r = await client.request(method, path, headers=admin)
            assert is_error(r, 404, "not_found"), (method, path)


# ---- machine clients -----------------------------------------------------------------------


async def test_machine_clients(
    svc: AuthService, client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    r = await client.post(
        "/api/admin/clients",
        json={"client_id": "crm-sync", "scopes": ["threads.read", "mail.send", "mail.send"]},
        headers=admin,
    )
    assert r.status_code == 201, r.text
    assert r.headers["cache-control"] == "no-store"
    created = r.json()
    secret = created.pop("client_secret")
    assert len(secret) >= 40
    assert created == {
        "client_id": "crm-sync",
        "public": False,
        "grant_types": ["client_credentials"],
        "scopes": ["threads.read", "mail.send"],
        "redirect_uris": [],
        "active": True,
    }
    stored = await svc.pool.fetchval(
        "SELECT secret_hash FROM oauth_clients WHERE client_id = 'crm-sync'"
    )
    assert stored.startswith("$argon2id$") and secret not in stored

    r = await machine_token(client, "crm-sync", secret)
    assert r.status_code == 200, r.text
    who = await svc.verifier.verify(r.json()["access_token"])
    assert who.sub == "crm-sync" and who.scopes == {"threads.read", "mail.send"}

    listing = (await client.get("/api/admin/clients", headers=admin)).json()["clients"]
    assert [c["client_id"] for c in listing] == ["chatflow-web", "crm-sync"]
    assert secret not in str(listing) and "argon2" not in str(listing)

    r = await client.post("/api/admin/clients", json={"client_id": "crm-sync"}, headers=admin)
    assert is_error(r, 409, "conflict")
    for body in (
        {"client_id": "has space"},
        {"client_id": ""},
        {"client_id": "ok", "scopes": ["two words"]},
        {"client_id": "ok", "scopes": ['quo"te']},
        {"client_id": "ok", "scopes": "mail.send"},
        {"client_id": "ok", "secret": "mine"},
    ):
        r = await client.post("/api/admin/clients", json=body, headers=admin)
        assert is_error(r, 422, "invalid"), body

    # Narrowing scopes applies to the next token; disabling stops authentication at once.
    r = await client.patch(
        "/api/admin/clients/crm-sync", json={"scopes": ["mail.send"]}, headers=admin
    )
    assert r.json()["scopes"] == ["mail.send"]
    assert (await machine_token(client, "crm-sync", secret)).json()["scope"] == "mail.send"
    r = await client.patch("/api/admin/clients/crm-sync", json={"active": False}, headers=admin)
    assert r.status_code == 200 and r.json()["active"] is False
    for attempt in (
        machine_token(client, "crm-sync", secret),
        client.post(
            "/oauth/token",
            data={
                "grant_type": "client_credentials",
                "client_id": "crm-sync",
                "client_secret": secret,
            },
        ),
    ):
        r = await attempt
        assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    r = await client.patch("/api/admin/clients/crm-sync", json={"active": True}, headers=admin)
    assert (await machine_token(client, "crm-sync", secret)).status_code == 200
    for ghost in ("ghost", "bad%00id"):
        r = await client.patch(f"/api/admin/clients/{ghost}", json={"active": False}, headers=admin)
        assert is_error(r, 404, "not_found")


async def test_disabling_the_web_client_ends_its_logins(
    svc: AuthService, client: httpx.AsyncClient, admin: dict[str, str], seeded: Seeded
) -> None:
    tokens = await tokens_for(client, seeded.email)
    r = await client.patch(f"/api/admin/clients/{WEB}", json={"active": False}, headers=admin)
    assert r.status_code == 200 and r.json()["public"] is True
    assert (
        await svc.pool.fetchval(
            "SELECT count(*) FROM refresh_tokens WHERE client_id = $1 AND revoked_at IS NULL", WEB
        )
        == 0
    )
    r = await refresh(client, tokens["refresh_token"])
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    r = await client.get("/oauth/authorize", params=authorize_params())
    assert r.status_code == 400 and "location" not in r.headers
    r = await client.patch(f"/api/admin/clients/{WEB}", json={"active": True}, headers=admin)
    assert (await client.get("/oauth/authorize", params=authorize_params())).status_code == 200
