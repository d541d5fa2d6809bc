"""Test support: a database and a Redis key prefix of the run's own, and service processes.

Each pytest worker creates ``chatflow_t_<hex>`` and uses the stream prefix ``t<hex>:`` so runs,
``make run`` and CI never collide; both are removed at the end.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from libs.common.settings import ROOT

ADMIN_URL = os.environ.get(
    "CHATFLOW_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("CHATFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# The public email collections beside the checkout (read from there, never copied in).
CORPORA = ROOT.parent / "shared" / "corpora"


_HANDED: set[int] = set()


def bearer(
    key: Any,
    settings: Any,
    *,
    sub: str,
    roles: list[str],
    mailboxes: list[str],
    scope: str = "",
    client_id: str = "spa",
) -> dict[str, str]:
    """An Authorization header with a token as auth signs one (Ed25519, every claim checked),
    signed by ``key`` (a joserfc OKPKey the service under test trusts)."""
    from joserfc import jwt

    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "sub": sub,
        "iat": now,
        "nbf": now,
        "exp": now + 900,
        "jti": uuid.uuid4().hex,
        "roles": roles,
        "mailboxes": mailboxes,
        "scope": scope,
        "client_id": client_id,
    }
    tok = jwt.encode({"alg": "Ed25519", "kid": key.kid}, claims, key, ["Ed25519"])
    return {"Authorization": f"Bearer {tok}"}


def free_port() -> int:
    """A port to start a server on later.

    Not from the kernel's ephemeral range (32768-60999 here): between our check and the server's
    bind, any outgoing connection (to PostgreSQL, Redis) could take such a port. Each pytest-xdist
    worker draws from its own band so two workers never hand out the same one.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    low = 20000 + (index % 4) * 3000
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(low, low + 3000)
        if port in _HANDED:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED.add(port)
        return port
    raise RuntimeError("no free port left in this worker's band")


def with_db(admin_url: str, db: str) -> str:
    base, _, _ = admin_url.rpartition("/")
    return f"{base}/{db}"


async def create_database(name: str) -> str:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_db(ADMIN_URL, name)


async def drop_database(name: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def drop_prefix(prefix: str) -> None:
    r = aioredis.from_url(REDIS_URL)
    try:
        keys = [k async for k in r.scan_iter(match=f"{prefix}*", count=1000)]
        for i in range(0, len(keys), 500):
            await r.delete(*keys[i : i + 500])
    finally:
        await r.aclose()


def new_run_id() -> str:
    return uuid.uuid4().hex[:10]


def service_env(database_url: str, prefix: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATFLOW_")}
    env.update(
        CHATFLOW_DATABASE_URL=database_url,
        CHATFLOW_REDIS_URL=REDIS_URL,
        CHATFLOW_STREAM_PREFIX=prefix,
        CHATFLOW_TLS_CERT=str(ROOT / "var/certs/server.pem"),
        CHATFLOW_TLS_KEY=str(ROOT / "var/certs/server.key"),
        CHATFLOW_TLS_CA=str(ROOT / "var/certs/ca.pem"),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def start_python(
    module_args: list[str], env: Mapping[str, str], log: Path
) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", *module_args],
        env=dict(env),
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )


def wait_port(
    port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open in {timeout}s")


async def eventually(fn: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:  # noqa: ASYNC109
    """Poll ``fn`` (sync or async) until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met in {timeout}s (last value {last!r})")


def stop(procs: Iterator[subprocess.Popen[bytes]] | list[subprocess.Popen[bytes]]) -> None:
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def ehlo_pipelining(session: Any, hostname: str, responses: list[str], on: bool) -> list[str]:
    """An aiosmtpd ``handle_EHLO`` body for test sinks: PIPELINING (RFC 2920) offered, when
    ``on``, as the relays they stand in for do (Postfix, Exim)."""
    session.host_name = hostname
    if on:
        responses.insert(-1, "250-PIPELINING")
    return responses


class RedisServer:
    """A ``redis-server`` of the test's own that keeps nothing on disk, as the shared one.

    For tests of what a Redis restart does: ``restart`` kills it (SIGKILL, like a crash) and
    starts it again, empty, on the same port, so clients' pooled connections go stale.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no"),
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_port(self.port, 10, self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.start()
