"""Auth test fixtures: the service in-process against the run's PostgreSQL and Redis."""

from __future__ import annotations

import argparse
import base64
import html
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from pydantic import BaseModel

from libs.common import db, testing
from libs.common.bus import Bus
from libs.common.events import Envelope
from services.auth import directory, storage
from services.auth.domain.oauth import Client
from services.auth.service import AuthService
from services.auth.settings import AuthSettings

WEB = "chatflow-web"
REDIRECT = "https://127.0.0.1:8443/callback"
VERIFIER = "v" * 20 + "-._~" + "x" * 30  # 54 unreserved characters
PASSWORD = "correct horse battery staple"
SECRET = "machine-secret-0123456789"
TABLES = (
    "memberships, auth_codes, refresh_tokens, oauth_clients, users, mailboxes, signing_keys, outbox"
)


@pytest.fixture(scope="session")
async def migrated(database_url: str, stream_prefix: str) -> AuthSettings:
    s = AuthSettings.load(
        database_url=database_url,
        stream_prefix=stream_prefix,
        http_port=testing.free_port(),
        # Cheap hashes keep the suite fast; production uses the argon2 defaults.
        argon2_time_cost=1,
        argon2_memory_kib=8192,
        argon2_parallelism=1,
    )
    assert isinstance(s, AuthSettings)
    await db.migrate(
        s.database_url, s.own_database_url, s.db_role, s.db_schema, AuthService.migrations
    )
    return s


@pytest.fixture
def settings(migrated: AuthSettings, bus: Bus) -> AuthSettings:
    """The run's settings under this test's own stream prefix (streams and throttle keys)."""
    return migrated.model_copy(update={"stream_prefix": bus.prefix})


async def start(settings: AuthSettings, clean: bool = True) -> AuthService:
    svc = AuthService(settings)
    await svc.connect()
    if clean:
        await svc.pool.execute(f"TRUNCATE {TABLES}")
    await svc.on_start()
    await svc.relay.publish_once()
    return svc


@pytest.fixture
async def svc(settings: AuthSettings) -> AsyncIterator[AuthService]:
    service = await start(settings)
    yield service
    await service.pool.close()
    await service.redis.aclose()


@pytest.fixture
async def client(svc: AuthService) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=svc.app())
    async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as c:
        yield c


@dataclass
class Seeded:
    user_id: str
    mailbox_id: str
    email: str


@pytest.fixture
async def seeded(svc: AuthService) -> Seeded:
    """An agent in one mailbox and the public web client."""
    return await add_user(svc, "alice@chatflow.test", ["agent"], "help@chatflow.test")


async def add_user(
    svc: AuthService, email: str, roles: list[str], mailbox: str | None, password: str = PASSWORD
) -> Seeded:
    async with svc.pool.acquire() as conn, conn.transaction():
        await storage.upsert_client(
            conn,
            Client(
                WEB, True, None, (REDIRECT,), ("authorization_code", "refresh_token"), "chatflow"
            ),
        )
        user = await directory.create_user(
            conn, email, email.split("@")[0].title(), await svc.passwords.hash(password), roles
        )
        box_id = ""
        if mailbox:
            box, _ = await directory.ensure_mailbox(conn, mailbox, mailbox.split("@")[0].title())
            await directory.add_members(conn, [user["id"]], box["id"])
            box_id = str(box["id"])
    return Seeded(str(user["id"]), box_id, email)


async def envelopes(bus: Bus, type_: str) -> list[Envelope]:
    """Every envelope on the ``type_`` stream, oldest first."""
    entries: Any = await bus.redis.xrange(bus.stream(type_))
    return [Envelope.from_json(fields[b"e"]) for _, fields in entries]


M = TypeVar("M", bound=BaseModel)


async def payloads(bus: Bus, type_: str, model: type[M]) -> list[M]:
    """The validated payloads of the ``type_`` stream, oldest first."""
    return [cast(M, e.payload_as(model)) for e in await envelopes(bus, type_)]


def authorize_params(**over: str) -> dict[str, str]:
    params = {
        "response_type": "code",
        "client_id": WEB,
        "redirect_uri": REDIRECT,
        "state": "st-123",
        "code_challenge": create_s256_code_challenge(VERIFIER),
        "code_challenge_method": "S256",
        "scope": "chatflow",
    }
    params.update(over)
    return {k: v for k, v in params.items() if v is not None}


def hidden_fields(page: str) -> dict[str, str]:
    found = re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page)
    return {html.unescape(k): html.unescape(v) for k, v in found}


async def get_form(client: httpx.AsyncClient, **over: str) -> dict[str, str]:
    r = await client.get("/oauth/authorize", params=authorize_params(**over))
    assert r.status_code == 200, r.text
    fields = hidden_fields(r.text)
    assert client.cookies.get("__Host-chatflow_csrf") == fields["csrf"]
    return fields


async def login(
    client: httpx.AsyncClient, email: str, password: str = PASSWORD, **over: str
) -> httpx.Response:
    fields = await get_form(client, **over)
    return await client.post(
        "/oauth/authorize", data={**fields, "email": email, "password": password}
    )


async def get_code(client: httpx.AsyncClient, email: str, **over: str) -> str:
    r = await login(client, email, **over)
    assert r.status_code == 302, r.text
    q = parse_qs(urlsplit(r.headers["location"]).query)
    return q["code"][0]


async def exchange(
    client: httpx.AsyncClient, code: str, verifier: str = VERIFIER, redirect_uri: str = REDIRECT
) -> httpx.Response:
    return await client.post(
        "/oauth/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "code_verifier": verifier,
            "redirect_uri": redirect_uri,
            "client_id": WEB,
        },
    )


async def tokens_for(client: httpx.AsyncClient, email: str) -> dict[str, Any]:
    r = await exchange(client, await get_code(client, email))
    assert r.status_code == 200, r.text
    return dict(r.json())


async def refresh(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.post(
        "/oauth/token",
        data={"grant_type": "refresh_token", "refresh_token": token, "client_id": WEB},
    )


def basic(client_id: str, secret: str) -> dict[str, str]:
    raw = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def token_of(
    client: httpx.AsyncClient, svc: AuthService, email: str, roles: list[str]
) -> str:
    """An access token of a new user with ``roles`` (signed in through the code flow)."""
    await add_user(svc, email, roles, None)
    return str((await tokens_for(client, email))["access_token"])


async def add_machine_client(
    svc: AuthService, client_id: str = "robot", scopes: str = "mail.send", secret: str = SECRET
) -> str:
    """A confidential client_credentials client; returns its secret."""
    client = Client(
        client_id, False, await svc.passwords.hash(secret), (), ("client_credentials",), scopes
    )
    await storage.upsert_client(svc.pool, client)
    return secret


async def machine_token(
    client: httpx.AsyncClient, client_id: str = "robot", secret: str = SECRET
) -> httpx.Response:
    return await client.post(
        "/oauth/token", data={"grant_type": "client_credentials"}, headers=basic(client_id, secret)
    )


def cli(*argv: str) -> tuple[Any, argparse.Namespace]:
    """The command function and parsed args, through the same parser ``main`` builds."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd")
    commands = AuthService.commands(sub)
    args = parser.parse_args(list(argv))
    return commands[args.cmd], args
