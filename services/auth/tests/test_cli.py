"""Operator commands: seeding, directory changes and their events, bench tokens."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import httpx
import pytest

from libs.common.bus import Bus
from libs.common.events import MailboxChanged, MembershipChanged, UserChanged
from libs.common.tokens import TokenVerifier
from services.auth.service import AuthService
from services.auth.tests.conftest import cli, envelopes, exchange, get_code, login, payloads

events = envelopes


async def run(svc: AuthService, *argv: str, stdin: str | None = None) -> int:
    fn, args = cli(*argv)
    old = sys.stdin
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        return int(await fn(args, svc.settings))
    finally:
        sys.stdin = old


async def test_seed_demo_is_idempotent_and_announces_the_directory(
    svc: AuthService,
    client: httpx.AsyncClient,
    bus: Bus,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CHATFLOW_DEMO_PASSWORD", raising=False)
    await svc.relay.publish_once()
    assert len(await events(bus, "auth.jwks")) == 1

    assert await run(svc, "seed-demo") == 0
    out = capsys.readouterr().out
    passwords = dict(re.findall(r"^(\S+@chatflow\.test) password: (\S+)$", out, re.M))
    assert set(passwords) == {"agent@chatflow.test", "admin@chatflow.test"}

    [box] = await payloads(bus, "mailbox.changed", MailboxChanged)
    assert (box.address, box.name, box.active) == (
        "support@chatflow.test",
        "ChatFLOW Support",
        True,
    )
    members = await payloads(bus, "membership.changed", MembershipChanged)
    assert len(members) == 2 and {m.mailbox_id for m in members} == {box.mailbox_id}
    users = {u.email: u for u in await payloads(bus, "user.changed", UserChanged)}
    assert users["agent@chatflow.test"].roles == ["agent"]
    assert users["admin@chatflow.test"].roles == ["admin"]
    assert {m.user_id for m in members} == {u.user_id for u in users.values()}
    assert await svc.pool.fetchval("SELECT count(*) FROM outbox") == 0

    # The printed password signs in through the web client seed-demo registered.
    code = await get_code(client, "agent@chatflow.test", password=passwords["agent@chatflow.test"])
    assert (await exchange(client, code)).status_code == 200

    counts = await _counts(svc)
    hashes = await svc.pool.fetch("SELECT email, password_hash FROM users ORDER BY email")
    assert await run(svc, "seed-demo") == 0
    out = capsys.readouterr().out
    assert "password:" not in out
    assert out.count("exists; password unchanged") == 2
    assert await _counts(svc) == counts
    assert await svc.pool.fetch("SELECT email, password_hash FROM users ORDER BY email") == hashes
    assert len(await events(bus, "mailbox.changed")) == 1  # nothing changed, nothing announced
    assert len(await events(bus, "membership.changed")) == 2


async def test_seed_demo_takes_the_password_from_the_environment(
    svc: AuthService,
    client: httpx.AsyncClient,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CHATFLOW_DEMO_PASSWORD", raising=False)
    assert await run(svc, "seed-demo") == 0
    monkeypatch.setenv("CHATFLOW_DEMO_PASSWORD", "demo-password-42")
    assert await run(svc, "seed-demo") == 0
    out = capsys.readouterr().out
    assert "demo-password-42" not in out
    assert (await login(client, "admin@chatflow.test", "demo-password-42")).status_code == 302


async def _counts(svc: AuthService) -> list[int]:
    return [
        await svc.pool.fetchval(f"SELECT count(*) FROM {t}")
        for t in ("users", "mailboxes", "memberships", "oauth_clients")
    ]


async def test_directory_commands_write_events(
    svc: AuthService, bus: Bus, client: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        await run(svc, "create-mailbox", "--address", "Billing@ChatFLOW.test", "--name", "Billing")
        == 0
    )
    assert await run(svc, "create-mailbox", "--address", "billing@chatflow.test") == 1
    assert (
        await run(
            svc,
            "create-user",
            "--email",
            "Carol@chatflow.test",
            "--name",
            "Carol",
            "--role",
            "agent",
            "--role",
            "admin",
            "--password-stdin",
            stdin="carol-password-1\n",
        )
        == 0
    )
    assert (
        await run(
            svc, "create-user", "--email", "carol@chatflow.test", "--password-stdin", stdin="x\n"
        )
        == 1
    )
    assert (
        await run(
            svc,
            "add-member",
            "--email",
            "carol@chatflow.test",
            "--mailbox",
            "billing@chatflow.test",
        )
        == 0
    )
    assert (
        await run(
            svc,
            "add-member",
            "--email",
            "carol@chatflow.test",
            "--mailbox",
            "billing@chatflow.test",
        )
        == 0
    )
    assert (
        await run(
            svc, "add-member", "--email", "dan@chatflow.test", "--mailbox", "billing@chatflow.test"
        )
        == 1
    )
    out = capsys.readouterr().out
    assert "carol-password-1" not in out and "is already a member of" in out

    [box] = await payloads(bus, "mailbox.changed", MailboxChanged)
    [user] = await payloads(bus, "user.changed", UserChanged)
    [member] = await payloads(bus, "membership.changed", MembershipChanged)
    assert box.address == "billing@chatflow.test" and box.name == "Billing"
    assert user.email == "carol@chatflow.test" and user.roles == ["agent", "admin"]
    assert (member.user_id, member.mailbox_id, member.active) == (
        user.user_id,
        box.mailbox_id,
        True,
    )
    assert all(e.producer == "auth" for e in await events(bus, "user.changed"))


async def test_create_client_validates(svc: AuthService) -> None:
    assert await run(svc, "create-client", "--client-id", "spa") == 1  # no redirect URI
    assert (
        await run(
            svc, "create-client", "--client-id", "spa", "--redirect-uri", "http://example.com/cb"
        )
        == 1
    )  # http off loopback
    assert (
        await run(
            svc, "create-client", "--client-id", "spa", "--redirect-uri", "http://127.0.0.1:5173/cb"
        )
        == 0
    )
    assert (
        await run(svc, "create-client", "--client-id", "m2m", "--grant-type", "client_credentials")
        == 1
    )  # public
    assert (
        await run(svc, "create-client", "--client-id", "m2m", "--secret-stdin", stdin="short\n")
        == 1
    )


async def test_bench_agents_writes_verifiable_long_lived_tokens(
    svc: AuthService, bus: Bus, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run(svc, "create-mailbox", "--address", "bench@chatflow.test", "--name", "B") == 0
    box_id = str(await svc.pool.fetchval("SELECT id FROM mailboxes"))
    out = tmp_path / "tokens.jsonl"
    assert (
        await run(
            svc,
            "bench-agents",
            "--count",
            "5",
            "--mailbox",
            "bench@chatflow.test",
            "--out",
            str(out),
        )
        == 0
    )
    assert "bench agents password: " in capsys.readouterr().out
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["email"] for x in lines] == [f"bench-agent-{i}@chatflow.test" for i in range(1, 6)]
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    verifier = TokenVerifier(bus, svc.settings.jwt_issuer, svc.settings.jwt_audience)
    for x in lines:
        who = await verifier.verify(x["token"])
        assert who.roles == ("agent",) and who.mailboxes == {box_id}
        assert who.claims["exp"] - who.claims["iat"] == svc.settings.bench_token_ttl_s
    hashes = await svc.pool.fetch("SELECT DISTINCT password_hash FROM users")
    assert len(hashes) == 1  # hashed once, shared
    assert len(await events(bus, "membership.changed")) == 5
    assert len(await events(bus, "user.changed")) == 5
    # Running it again reuses the users.
    assert (
        await run(
            svc,
            "bench-agents",
            "--count",
            "5",
            "--mailbox",
            "bench@chatflow.test",
            "--out",
            str(out),
        )
        == 0
    )
    assert await svc.pool.fetchval("SELECT count(*) FROM users") == 5
    assert len(await events(bus, "membership.changed")) == 5
