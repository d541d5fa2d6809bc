"""A tiny service schema for testing the shared mechanisms, and a process to kill mid-work."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from libs.common import db, inbox, outbox
from libs.common.bus import Bus, Consumer, connect
from libs.common.events import Envelope, MailboxChanged
from libs.common.service import Service
from libs.common.service import main as service_main
from libs.common.settings import ServiceSettings

MIGRATIONS = Path(__file__).parent / "migrations"
ROLE, SCHEMA = "chatflow_commontest", "commontest"


def own_url(admin_url: str) -> str:
    p = urlsplit(admin_url)
    return urlunsplit((p.scheme, f"{ROLE}@{p.hostname}:{p.port}", p.path, "", ""))


async def setup_schema(admin_url: str) -> asyncpg.Pool:
    await db.migrate(admin_url, own_url(admin_url), ROLE, SCHEMA, MIGRATIONS)
    return await db.connect_pool(own_url(admin_url), SCHEMA, 1, 4)


def make_handler(pool: asyncpg.Pool, name: str, hang_file: str | None = None):  # type: ignore[no-untyped-def]
    async def handle(env: Envelope, entry_id: str) -> None:
        async with pool.acquire() as conn, conn.transaction():
            if not await inbox.first_time(conn, "effects", env.id):
                return
            await conn.execute(
                "INSERT INTO effects (event_id, handled_by) VALUES ($1, $2)", env.id, name
            )
            if hang_file:
                Path(hang_file).write_text(entry_id)
                await asyncio.sleep(3600)  # killed here, before commit

    return handle


def sample(i: int = 0) -> Envelope:
    return Envelope.of(MailboxChanged(mailbox_id=f"m{i}", address=f"box{i}@chatflow.test"), "test")


async def _consumer_proc(admin_url: str, redis_url: str, prefix: str, hang_file: str) -> None:
    pool = await setup_schema(admin_url)
    bus = Bus(connect(redis_url), prefix)
    c = Consumer(
        bus, "g", ["mailbox.changed"], make_handler(pool, "doomed", hang_file), block_ms=200
    )
    await c.run()


async def _outbox_proc(
    admin_url: str, redis_url: str, prefix: str, ready_file: str, n: int
) -> None:
    """Commits n outbox rows, then hangs inside a relay pass before XADD (killed there)."""
    pool = await setup_schema(admin_url)
    async with pool.acquire() as conn, conn.transaction():
        await outbox.add(conn, *[sample(i) for i in range(n)])
    bus = Bus(connect(redis_url), prefix)

    async def hang(entries: object) -> list[str]:
        Path(ready_file).write_text("ready")
        await asyncio.sleep(3600)
        return []

    bus.publish_raw = hang  # type: ignore[method-assign,assignment]
    await outbox.OutboxRelay(pool, bus, SCHEMA).publish_once()


class SlowSettings(ServiceSettings):
    service = "commontest"


class SlowService(Service):
    """A real service whose handler takes a second: for the graceful-stop test."""

    name = "commontest"
    settings_cls = SlowSettings
    migrations = MIGRATIONS

    async def on_start(self) -> None:
        async def handle(env: Envelope, entry_id: str) -> None:
            Path(os.environ["SLOW_STARTED"]).write_text(env.id)
            await asyncio.sleep(1.0)
            async with self.pool.acquire() as conn, conn.transaction():
                if await inbox.first_time(conn, "effects", env.id):
                    await conn.execute(
                        "INSERT INTO effects (event_id, handled_by) VALUES ($1, 'slow')", env.id
                    )

        self.consumer(["mailbox.changed"], handle, group="g")


if __name__ == "__main__":
    kind, *args = sys.argv[1:]
    if kind == "service":
        service_main(SlowService, ["run"])
    elif kind == "consumer":
        asyncio.run(_consumer_proc(*args))
    elif kind == "outbox":
        asyncio.run(_outbox_proc(args[0], args[1], args[2], args[3], int(args[4])))
    else:
        os._exit(2)
