"""Migrations are idempotent and each service role is fenced into its own schema."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from libs.common import db
from libs.common.tests.helpers import MIGRATIONS, ROLE, SCHEMA, own_url


async def test_applying_twice_changes_nothing(database_url: str) -> None:
    await db.migrate(database_url, own_url(database_url), ROLE, SCHEMA, MIGRATIONS)
    again = await db.migrate(database_url, own_url(database_url), ROLE, SCHEMA, MIGRATIONS)
    assert again == []


async def test_changed_migration_is_refused(database_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "0001_t.sql").write_text("CREATE TABLE t (a int);")
    url = own_url(database_url).replace(ROLE, "chatflow_migtest")
    assert await db.migrate(database_url, url, "chatflow_migtest", "migtest", folder) == [
        "common_0001_outbox_inbox",
        "common_0002_mailbox_agents",
        "common_0003_outbox_direct",
        "0001_t",
    ]
    (folder / "0001_t.sql").write_text("CREATE TABLE t (a int, b int);")
    with pytest.raises(RuntimeError, match="changed after it was applied"):
        await db.migrate(database_url, url, "chatflow_migtest", "migtest", folder)


async def test_a_service_role_cannot_read_another_schema(database_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "0001_secret.sql").write_text(
        "CREATE TABLE secrets (v text); INSERT INTO secrets VALUES ('x');"
    )
    other_url = own_url(database_url).replace(ROLE, "chatflow_othertest")
    await db.migrate(database_url, other_url, "chatflow_othertest", "othertest", folder)
    await db.migrate(database_url, own_url(database_url), ROLE, SCHEMA, MIGRATIONS)
    conn = await asyncpg.connect(own_url(database_url))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("SELECT * FROM othertest.secrets")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CREATE TABLE public.sneaky (a int)")
    finally:
        await conn.close()


async def test_a_released_connection_keeps_no_transaction_and_a_lock_pool_no_locks(
    database_url: str,
) -> None:
    """The cheap release (no reset query) still rolls back what a holder left open; a pool made
    for session locks (``session_state``) still drops them on release."""
    await db.migrate(database_url, own_url(database_url), ROLE, SCHEMA, MIGRATIONS)
    pool = await db.connect_pool(own_url(database_url), SCHEMA, 1, 1)
    locks = await db.connect_pool(own_url(database_url), SCHEMA, 1, 1, session_state=True)
    try:
        conn = await pool.acquire()
        await conn.execute("BEGIN")
        await conn.execute("CREATE TEMP TABLE left_open (a int)")
        await pool.release(conn)
        async with pool.acquire() as again:
            assert not again.is_in_transaction()
            assert await again.fetchval("SELECT to_regclass('pg_temp.left_open')") is None
        held = await locks.acquire()
        assert await held.fetchval("SELECT pg_try_advisory_lock(4242)")
        await locks.release(held)
        async with locks.acquire() as again:
            assert (
                await again.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
                )
                == 0
            )
    finally:
        await pool.close()
        await locks.close()
