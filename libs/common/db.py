"""PostgreSQL: one schema and one role per service, versioned SQL migrations, connection pools.

``migrate`` bootstraps the role and schema as the admin, then applies the service's migrations as
the service's own role under an advisory lock, so concurrent replicas starting at once migrate
once. Every service's schema also gets the shared ``outbox`` and ``processed_events`` tables.
"""

from __future__ import annotations

import hashlib
import logging
import re
import ssl
from pathlib import Path
from typing import Any

import asyncpg

log = logging.getLogger("chatflow.db")
COMMON_MIGRATIONS = Path(__file__).parent / "migrations"
_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")


def _ident(name: str) -> str:
    if not _IDENT.match(name):
        raise ValueError(f"unsafe SQL identifier {name!r}")
    return name


def _ssl_arg(url: str, ca: Path | None) -> Any:
    """Honour ``sslmode`` in the URL; verify against our CA for verify-* modes."""
    m = re.search(r"sslmode=([a-z-]+)", url)
    if not m or m.group(1) in ("disable", "allow", "prefer"):
        return None
    if m.group(1).startswith("verify") and ca and ca.exists():
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.check_hostname = m.group(1) == "verify-full"
        return ctx
    return "require"


async def connect_pool(
    url: str,
    schema: str,
    min_size: int = 2,
    max_size: int = 10,
    ca: Path | None = None,
    session_state: bool = False,
) -> asyncpg.Pool:
    """A pool on the service's schema.

    On release asyncpg always rolls back a transaction left open; by default it then also sends
    ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` — one more round trip per
    acquire, a tenth of a consumer's statements. Our code keeps no session state on pooled
    connections (transaction-scoped locks and ``SET LOCAL`` only), so that query is skipped,
    unless ``session_state``: a pool whose connections hold session advisory locks.
    """
    pool = await asyncpg.create_pool(
        _strip_sslmode(url),
        min_size=min_size,
        max_size=max_size,
        ssl=_ssl_arg(url, ca),
        server_settings={"search_path": _ident(schema), "application_name": f"chatflow-{schema}"},
        init=_init_connection,
        reset=None if session_state else _keep_session,
    )
    assert pool is not None
    return pool


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release without the reset query (see ``connect_pool``); asyncpg has rolled back already."""


async def _init_connection(conn: asyncpg.Connection) -> None:
    import json

    for t in ("json", "jsonb"):
        await conn.set_type_codec(t, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


def _strip_sslmode(url: str) -> str:
    url = re.sub(r"([?&])sslmode=[a-z-]+&?", r"\1", url)
    return url.rstrip("?&")


def read_migrations(folder: Path) -> list[tuple[str, str]]:
    """``NNNN_name.sql`` files in order, as (version, sql)."""
    files = sorted(p for p in folder.glob("*.sql") if re.match(r"^\d{4}_", p.name))
    return [(p.stem, p.read_text()) for p in files]


async def ensure_role_and_schema(admin_url: str, role: str, schema: str) -> None:
    """As admin: create the service role (login, no other rights) and its schema, owned by it."""
    role, schema = _ident(role), _ident(schema)
    conn = await asyncpg.connect(_strip_sslmode(admin_url), ssl=_ssl_arg(admin_url, None))
    try:
        await conn.execute("SELECT pg_advisory_lock(hashtext('chatflow.roles'))")
        exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
        if not exists:
            # Roles are cluster-wide but advisory locks are per database: a migration of another
            # database (another test run, another environment) may create the same role now.
            try:
                await conn.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE")
            except (asyncpg.UniqueViolationError, asyncpg.DuplicateObjectError):
                pass
        db = await conn.fetchval("SELECT current_database()")
        await conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        await conn.execute(f'REVOKE ALL ON DATABASE "{db}" FROM PUBLIC')
        await conn.execute(f'GRANT CONNECT, TEMPORARY ON DATABASE "{db}" TO {role}')
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {role}")
        await conn.execute(f"REVOKE ALL ON SCHEMA {schema} FROM PUBLIC")
        await conn.execute("SELECT pg_advisory_unlock(hashtext('chatflow.roles'))")
    finally:
        await conn.close()


async def migrate(admin_url: str, own_url: str, role: str, schema: str, folder: Path) -> list[str]:
    """Apply pending migrations; returns the versions applied now (empty when up to date)."""
    await ensure_role_and_schema(admin_url, role, schema)
    conn = await asyncpg.connect(
        _strip_sslmode(own_url),
        ssl=_ssl_arg(own_url, None),
        server_settings={"search_path": _ident(schema)},
    )
    applied: list[str] = []
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"migrate:{schema}")
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version text PRIMARY KEY,
                       checksum text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {
                r["version"]: r["checksum"]
                for r in await conn.fetch("SELECT version, checksum FROM schema_migrations")
            }
            steps = [(f"common_{v}", sql) for v, sql in read_migrations(COMMON_MIGRATIONS)]
            steps += read_migrations(folder)
            for version, sql in steps:
                checksum = hashlib.sha256(sql.encode()).hexdigest()
                if version in done:
                    if done[version] != checksum:
                        raise RuntimeError(
                            f"migration {schema}/{version} changed after it was applied"
                        )
                    continue
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)",
                    version,
                    checksum,
                )
                applied.append(version)
    finally:
        await conn.close()
    if applied:
        log.info("migrations applied", extra={"schema": schema, "versions": applied})
    return applied
