"""Operator commands: ``python -m services.auth <command>``.

Each command commits its rows and their outbox events together, then runs relay passes itself
(no relay runs in a CLI process) so the events reach Redis before it exits. Passwords and
secrets are read from stdin, never from argv, where other users could see them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from libs.common import db, outbox
from libs.common.bus import Bus, connect
from libs.common.outbox import OutboxRelay
from libs.common.settings import ServiceSettings
from libs.common.tokens import TokenVerifier
from services.auth import directory, keys, storage
from services.auth.domain import oauth
from services.auth.domain.claims import access_claims
from services.auth.domain.directory import ROLES, normalize_email, normalize_roles
from services.auth.domain.oauth import Client
from services.auth.passwords import Passwords
from services.auth.settings import AuthSettings

Command = Callable[[argparse.Namespace, ServiceSettings], Awaitable[int]]
DEMO_MAILBOX = ("support@chatflow.test", "ChatFLOW Support")
DEMO_USERS = (
    ("agent@chatflow.test", "Demo Agent", "agent"),
    ("admin@chatflow.test", "Demo Admin", "admin"),
)
DEMO_PASSWORD_ENV = "CHATFLOW_DEMO_PASSWORD"  # noqa: S105 (the variable name)
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
MIN_SECRET = 16


def register(sub: Any) -> dict[str, Command]:
    sub.add_parser("seed-demo", help="create the demo mailbox, agent, admin and web client")

    p = sub.add_parser("create-user", help="create a user")
    p.add_argument("--email", required=True)
    p.add_argument("--name", default="")
    p.add_argument("--role", action="append", choices=ROLES, help="repeatable; default agent")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")

    p = sub.add_parser("create-mailbox", help="create a mailbox")
    p.add_argument("--address", required=True)
    p.add_argument("--name", default="")

    p = sub.add_parser("add-member", help="make a user a member of a mailbox")
    p.add_argument("--email", required=True)
    p.add_argument("--mailbox", required=True, help="mailbox address")

    p = sub.add_parser(
        "create-client",
        help="register (or update) an OAuth client; confidential with --secret-stdin",
    )
    p.add_argument("--client-id", required=True)
    p.add_argument("--scopes", default="", help="allowed scopes, space-separated")
    p.add_argument("--secret-stdin", action="store_true", help="read the client secret from stdin")
    p.add_argument("--redirect-uri", action="append", default=[], help="repeatable")
    p.add_argument("--grant-type", action="append", choices=oauth.GRANT_TYPES, help="repeatable")

    p = sub.add_parser(
        "rotate-key",
        help="publish a new signing key now; it signs after a lead, the old one stays published",
    )
    p.add_argument(
        "--lead-s",
        type=float,
        default=None,
        help="seconds between publishing and signing (default: the key_publish_lead_s setting; "
        "shorter than the verifiers' refetch interval only in tests)",
    )

    p = sub.add_parser(
        "bench-agents",
        help="DEV/BENCH ONLY: create N agents and write long-lived tokens for them to a file",
    )
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--mailbox", required=True, help="mailbox address the agents join")
    p.add_argument("--out", type=Path, required=True, help="JSON lines {email, token}")

    return {
        "seed-demo": seed_demo,
        "create-user": create_user,
        "create-mailbox": create_mailbox,
        "add-member": add_member,
        "create-client": create_client,
        "rotate-key": rotate_key,
        "bench-agents": bench_agents,
    }


# ---- plumbing --------------------------------------------------------------------------------


@dataclass
class Ctx:
    settings: AuthSettings
    pool: Any
    bus: Bus

    async def deliver(self) -> int:
        """Publish what we committed to the outbox (this process runs no relay)."""
        relay = OutboxRelay(self.pool, self.bus, self.settings.db_schema)
        total = 0
        while n := await relay.publish_once():
            total += n
        return total


@asynccontextmanager
async def connected(settings: ServiceSettings) -> AsyncIterator[Ctx]:
    s = cast(AuthSettings, settings)
    pool = await db.connect_pool(s.own_database_url, s.db_schema, 1, 2, ca=s.tls_ca)
    redis = connect(s.redis_url, str(s.tls_ca))
    try:
        yield Ctx(s, pool, Bus(redis, s.stream_prefix, s.stream_maxlen))
    finally:
        await pool.close()
        await redis.aclose()


async def read_secret(what: str) -> str:
    line = await asyncio.to_thread(sys.stdin.readline)
    value = line.rstrip("\r\n")
    if not value:
        raise SystemExit(f"error: no {what} on stdin")
    return value


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


# ---- commands --------------------------------------------------------------------------------


async def seed_demo(args: argparse.Namespace, settings: ServiceSettings) -> int:
    """Idempotent: creates what is missing, never changes an existing password unless asked."""
    s = cast(AuthSettings, settings)
    env_password = os.environ.get(DEMO_PASSWORD_ENV) or None
    passwords = Passwords(s)
    notes: list[str] = []
    async with connected(s) as ctx:
        async with ctx.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('auth.seed-demo'))")
            box, _ = await directory.ensure_mailbox(conn, *DEMO_MAILBOX)
            for email, name, role in DEMO_USERS:
                user = await storage.user_by_email(conn, email)
                if user is None:
                    password = env_password or secrets.token_urlsafe(12)
                    hashed = await passwords.hash(password)
                    user = await directory.create_user(conn, email, name, hashed, [role])
                    notes.append(
                        f"{email}: created with ${DEMO_PASSWORD_ENV}"
                        if env_password
                        else f"{email} password: {password}"
                    )
                else:
                    user = await directory.ensure_user_roles(conn, user, [role])
                    if env_password:
                        hashed = await passwords.hash(env_password)
                        await storage.set_password(conn, user["id"], hashed)
                        notes.append(f"{email}: exists; password set from ${DEMO_PASSWORD_ENV}")
                    else:
                        notes.append(f"{email}: exists; password unchanged")
                await directory.add_members(conn, [user["id"]], box["id"])
            redirect_uri = oauth.check_redirect_uri(s.web_redirect_uri)
            await storage.upsert_client(
                conn,
                Client(
                    s.web_client_id,
                    True,
                    None,
                    (redirect_uri,),
                    ("authorization_code", "refresh_token"),
                    " ".join(oauth.parse_scope(s.web_scopes)),
                ),
            )
        await ctx.deliver()
    for note in notes:
        print(note)
    print(f"mailbox {DEMO_MAILBOX[0]}: {box['id']}; client {s.web_client_id} -> {redirect_uri}")
    return 0


async def create_user(args: argparse.Namespace, settings: ServiceSettings) -> int:
    s = cast(AuthSettings, settings)
    try:
        email = normalize_email(args.email)
        roles = normalize_roles(args.role or ["agent"])
    except ValueError as exc:
        return fail(str(exc))
    generated = not args.password_stdin
    password = secrets.token_urlsafe(12) if generated else await read_secret("password")
    hashed = await Passwords(s).hash(password)
    async with connected(s) as ctx:
        async with ctx.pool.acquire() as conn, conn.transaction():
            if await storage.user_by_email(conn, email) is not None:
                return fail(f"user {email} already exists")
            user = await directory.create_user(conn, email, args.name, hashed, roles)
        await ctx.deliver()
    print(f"created user {email} ({user['id']}) roles {','.join(roles)}")
    if generated:
        print(f"{email} password: {password}")
    return 0


async def create_mailbox(args: argparse.Namespace, settings: ServiceSettings) -> int:
    try:
        address = normalize_email(args.address)
    except ValueError as exc:
        return fail(str(exc))
    async with connected(settings) as ctx:
        async with ctx.pool.acquire() as conn, conn.transaction():
            if await storage.mailbox_by_address(conn, address) is not None:
                return fail(f"mailbox {address} already exists")
            box = await directory.create_mailbox(conn, address, args.name)
        await ctx.deliver()
    print(f"created mailbox {address} ({box['id']})")
    return 0


async def add_member(args: argparse.Namespace, settings: ServiceSettings) -> int:
    try:
        email, address = normalize_email(args.email), normalize_email(args.mailbox)
    except ValueError as exc:
        return fail(str(exc))
    async with connected(settings) as ctx:
        async with ctx.pool.acquire() as conn, conn.transaction():
            user = await storage.user_by_email(conn, email)
            box = await storage.mailbox_by_address(conn, address)
            if user is None or box is None:
                return fail(f"no user {email}" if user is None else f"no mailbox {address}")
            added = await directory.add_members(conn, [user["id"]], box["id"])
        await ctx.deliver()
    print(f"{email} {'added to' if added else 'is already a member of'} {address}")
    return 0


async def create_client(args: argparse.Namespace, settings: ServiceSettings) -> int:
    s = cast(AuthSettings, settings)
    if not _CLIENT_ID.match(args.client_id):
        return fail("client id must be 1-100 of A-Z a-z 0-9 . _ -")
    confidential = bool(args.secret_stdin)
    default = ["client_credentials"] if confidential else ["authorization_code", "refresh_token"]
    grant_types = list(dict.fromkeys(args.grant_type or default))
    try:
        scopes = " ".join(oauth.parse_scope(args.scopes))
        redirect_uris = [oauth.check_redirect_uri(u) for u in args.redirect_uri]
    except (ValueError, oauth.OAuth2Error) as exc:
        return fail(str(exc))
    if not confidential and "client_credentials" in grant_types:
        return fail("client_credentials needs a confidential client (--secret-stdin)")
    if "authorization_code" in grant_types and not redirect_uris:
        return fail("authorization_code needs at least one --redirect-uri")
    secret_hash = None
    if confidential:
        secret = await read_secret("client secret")
        if len(secret) < MIN_SECRET:
            return fail(f"client secret must be at least {MIN_SECRET} characters")
        secret_hash = await Passwords(s).hash(secret)
    client = Client(
        args.client_id,
        not confidential,
        secret_hash,
        tuple(redirect_uris),
        tuple(grant_types),
        scopes,
    )
    async with connected(s) as ctx:
        await storage.upsert_client(ctx.pool, client)
    kind = "confidential" if confidential else "public"
    print(f"client {args.client_id} ({kind}) grants {','.join(grant_types)} scopes {scopes!r}")
    return 0


async def rotate_key(args: argparse.Namespace, settings: ServiceSettings) -> int:
    s = cast(AuthSettings, settings)
    lead = s.key_publish_lead_s if args.lead_s is None else args.lead_s
    if lead < 0:
        return fail("--lead-s must not be negative")
    if lead <= TokenVerifier.min_refetch_s:
        print(
            f"warning: a lead of {lead:g}s does not exceed the verifiers' refetch interval "
            f"({TokenVerifier.min_refetch_s:g}s); tokens may fail to verify for a moment",
            file=sys.stderr,
        )
    async with connected(s) as ctx:
        async with ctx.pool.acquire() as conn, conn.transaction():
            kid, signs_from = await keys.rotate(conn, lead)
            await keys.publish(conn, s)
        await ctx.deliver()
    print(
        f"published signing key {kid}; it signs from {signs_from.isoformat()} (in {lead:g}s), "
        f"when the previous key retires (published {s.retired_key_grace_s}s more); "
        f"replicas pick up the schedule within {s.key_cache_s:g}s"
    )
    return 0


async def bench_agents(args: argparse.Namespace, settings: ServiceSettings) -> int:
    """DEV/BENCH ONLY. Tokens live ``bench_token_ttl_s`` (2 h) and skip the login flow, so a
    benchmark can open thousands of sessions at once. Never run this against production."""
    s = cast(AuthSettings, settings)
    if args.count < 1:
        return fail("--count must be at least 1")
    try:
        address = normalize_email(args.mailbox)
    except ValueError as exc:
        return fail(str(exc))
    password = secrets.token_urlsafe(16)
    hashed = await Passwords(s).hash(password)  # once: every bench agent shares it
    emails = [f"bench-agent-{i}@chatflow.test" for i in range(1, args.count + 1)]
    async with connected(s) as ctx:
        async with ctx.pool.acquire() as conn, conn.transaction():
            box = await storage.mailbox_by_address(conn, address)
            if box is None:
                return fail(f"no mailbox {address}")
            users = await storage.upsert_bench_users(conn, emails, hashed, ["agent"])
            await outbox.add(conn, *[directory.user_event(u) for u in users])
            await directory.add_members(conn, [u["id"] for u in users], box["id"])
            await keys.ensure_active(conn)
            await keys.publish(conn, s)
        boxes = await storage.mailbox_ids_by_user(ctx.pool, [u["id"] for u in users])
        key = await keys.KeyRing(ctx.pool, s).active()
        now = int(time.time())
        lines = []
        for u in users:
            claims = access_claims(
                issuer=s.jwt_issuer,
                audience=s.jwt_audience,
                sub=str(u["id"]),
                client_id=s.bench_client_id,
                scope=" ".join(oauth.parse_scope(s.web_scopes)),
                roles=u["roles"],
                mailboxes=boxes[u["id"]],
                ttl_s=s.bench_token_ttl_s,
                now=now,
            )
            lines.append(json.dumps({"email": u["email"], "token": keys.sign(key, claims)}))
        await ctx.deliver()
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # bearer tokens inside
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"bench agents password: {password}")
    print(f"wrote {len(lines)} tokens (valid {s.bench_token_ttl_s}s) to {args.out}")
    return 0
