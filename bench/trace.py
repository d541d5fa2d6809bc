"""One mail at a time, each hop timed: ``python -m bench.trace --count 100``.

A stack of its own and one agent through the gateway. Each mail is sent alone over STARTTLS and
timed from its ``250`` to the agent's ``message.added`` frame; the stream entries' ids (Redis
server milliseconds) split that into ingest's publish, the threader's hop and the rest (notifier,
gateway, agent). ``ingest`` is negative when the event was out before the client had read its
250 (the group commit's writer publishes right after the commit, as the 250 goes out). The first
five mails warm up and are left out. Also prints the PostgreSQL CPU each service's backends
spent per mail. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import ssl
import time
import uuid
from typing import Any

import aiosmtplib
import asyncpg

from bench.clients import _mail, _open
from bench.run import bench_stack, cpu_seconds, pct
from libs.common import testing
from libs.common.bus import connect
from libs.common.settings import ROOT
from tools.devstack import Stack

WARMUP = 5


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.trace", description=__doc__)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--gap-ms", type=int, default=100, help="pause between two mails")
    a = p.parse_args(argv)
    run_id = testing.new_run_id()
    db = f"chatflow_trace_{run_id}"
    url = asyncio.run(testing.create_database(db))
    var = ROOT / "var" / f"trace-{run_id}"
    prefix = f"trace{run_id}:"
    stack = bench_stack(url, prefix, var)
    try:
        var.mkdir(parents=True, exist_ok=True)
        stack.migrate()
        stack.seed(uuid.uuid4().hex)
        tokens = var / "tokens.jsonl"
        stack.run_cmd(
            "auth", "bench-agents", "--count", "1", "--mailbox", "support@chatflow.test",
            "--out", str(tokens),
        )  # fmt: skip
        stack.start()
        stack.wait_ready(90)
        token = json.loads(tokens.read_text().splitlines()[0])["token"]
        print(json.dumps(asyncio.run(drive(stack, token, prefix, a.count, a.gap_ms / 1000))))
    finally:
        stack.stop()
        asyncio.run(testing.drop_database(db))
        asyncio.run(testing.drop_prefix(prefix))


async def _backends(database_url: str) -> dict[int, str]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT pid, usename FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    return {r["pid"]: r["usename"] for r in rows}


async def drive(stack: Stack, token: str, prefix: str, count: int, gap: float) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=str(stack.certs / "ca.pem"))
    ws = await _open(f"wss://127.0.0.1:{stack.ports.gateway}/ws", token, ctx, stack.origin)
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=stack.ports.smtp, start_tls=True, tls_context=ctx, timeout=60
    )
    await smtp.connect()
    frames: asyncio.Queue[float] = asyncio.Queue()

    async def reader() -> None:
        async for m in ws:
            if json.loads(m).get("type") == "message.added":
                frames.put_nowait(time.time())

    task = asyncio.create_task(reader())
    await asyncio.sleep(1)
    backends = await _backends(stack.database_url)
    pg0 = {pid: cpu_seconds(pid) for pid in backends}
    run = uuid.uuid4().hex[:8]
    sent: list[tuple[str, float, float]] = []
    for i in range(count):
        await smtp.sendmail(
            f"customer{i}@load.test", ["support@chatflow.test"], _mail(5000, i, run)
        )
        t250 = time.time()
        sent.append(
            (f"<bench-{run}-{i}@load.test>", t250, await asyncio.wait_for(frames.get(), 10))
        )
        await asyncio.sleep(gap)
    pg: dict[str, float] = collections.defaultdict(float)
    for pid, role in backends.items():
        pg[role] += cpu_seconds(pid) - pg0[pid]
    task.cancel()
    await ws.close()
    await smtp.quit()
    redis = connect(stack.redis_url)
    try:
        received = await _published(redis, prefix + "mail.received")
        placed = await _published(redis, prefix + "conversation.message_added")
    finally:
        await redis.aclose()
    hops: dict[str, list[float]] = {"total": [], "ingest": [], "threader": [], "to_agent": []}
    for mid, t250, t_frame in sent[WARMUP:]:
        hops["total"].append(t_frame - t250)
        if mid in received and mid in placed:
            hops["ingest"].append(received[mid] - t250)
            hops["threader"].append(placed[mid] - received[mid])
            hops["to_agent"].append(t_frame - placed[mid])
    return {
        "mails": len(sent) - WARMUP,
        "ms": {
            k: {q: round(pct(v, p) * 1000, 1) for q, p in (("p50", 50), ("p90", 90), ("max", 100))}
            for k, v in hops.items()
        },
        "postgres_cpu_ms_per_mail": {
            role.removeprefix("chatflow_"): round(v * 1000 / count, 2) for role, v in pg.items()
        },
    }


async def _published(redis: Any, stream: str) -> dict[str, float]:
    """Message-ID -> the time (s) its first entry was added (the entry id's milliseconds)."""
    out: dict[str, float] = {}
    for entry_id, fields in await redis.xrange(stream):
        payload = json.loads(fields[b"e"])["payload"]
        mid = payload.get("message_id") or (payload.get("message") or {}).get("message_id")
        if mid and mid not in out:
            out[mid] = int(entry_id.split(b"-")[0]) / 1000
    return out


if __name__ == "__main__":
    main()
