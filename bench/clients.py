"""Benchmark client processes: agents holding WebSockets, observers timing frames, SMTP load.

Each runs as ``python -m bench.clients <role> ...``, prints ``READY`` once connected, waits for a
line on stdin, then prints one JSON result line. Times are CLOCK_MONOTONIC, which every process
on the machine shares, so the SMTP 250 in one process and the frame in another compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import ssl
import sys
import time
import uuid
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Origin, Subprotocol

from bench import wsraw

_WIRE = policy.SMTP  # CRLF line ends, as a mail client sends


def _ctx(ca: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca)


async def _stdin_line() -> str:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, sys.stdin.readline)


async def _open(url: str, token: str, ctx: ssl.SSLContext, origin: str) -> ClientConnection:
    for attempt in range(5):
        try:
            return await connect(
                url,
                subprotocols=[Subprotocol("chatflow.v1"), Subprotocol(f"bearer.{token}")],
                ssl=ctx,
                origin=Origin(origin),
                compression=None,
                open_timeout=30,
                max_queue=None,
            )
        except Exception:
            if attempt == 4:
                raise
            await asyncio.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def read_tokens(path: str) -> list[str]:
    return [json.loads(line)["token"] for line in Path(path).read_text().splitlines()]


CLOSE_BATCH = 10


async def agents(a: argparse.Namespace) -> dict[str, Any]:
    """Hold connections and count this run's message.added frames (observers do the timing).

    Light clients (``bench.wsraw``): they frame every byte but parse no JSON, so the holders'
    CPU does not crowd out the services on the same cores.
    """
    tokens = read_tokens(a.tokens)[a.start : a.start + a.count]
    ctx = _ctx(a.ca)
    sem = asyncio.Semaphore(50)

    async def one(tok: str) -> wsraw.FrameCounter:
        async with sem:
            for attempt in range(5):
                try:
                    return await wsraw.open_counter(a.url, tok, ctx, a.origin)
                except Exception:
                    if attempt == 4:
                        raise
                    await asyncio.sleep(0.2 * (attempt + 1))
            raise AssertionError("unreachable")

    conns = await asyncio.gather(*(one(t) for t in tokens))
    print("READY", flush=True)
    _, run, need = (await _stdin_line()).split()
    marker = f"<bench-{run}-".encode()
    for c in conns:
        c.marker = marker
        c.batch_reads(a.low_bytes)  # the load is about to start (bench.wsraw)
    closed_early = 0
    done = False
    draining = False

    async def keep(i: int) -> None:
        """As an agent's app does: a connection cut off (a slow consumer, 4008) reconnects and
        resumes after its last event id, so what it missed is replayed, not lost."""
        nonlocal closed_early
        while not done:
            c = conns[i]
            await asyncio.shield(c.lost)
            if done:
                return
            closed_early += 1
            await asyncio.sleep(0.5)
            fresh = await one(tokens[i])
            fresh.marker, fresh.count, fresh.last_id = marker, c.count, c.last_id
            fresh.frames, fresh.errors, fresh.resyncs = c.frames, c.errors, c.resyncs
            fresh.batch_reads(1 if draining else a.low_bytes)
            if c.last_id:
                fresh.send_text(
                    json.dumps({"type": "resume", "after": c.last_id.decode()}).encode()
                )
            conns[i] = fresh

    keepers = [asyncio.create_task(keep(i)) for i in range(len(conns))]
    print("ARMED", flush=True)
    _, _, need = (await _stdin_line()).split()
    draining = True  # the load is over: wake on any byte, so the last frames are counted
    for c in conns:
        c.batch_reads(1)
    deadline = time.monotonic() + a.drain
    while time.monotonic() < deadline:
        if min((c.count for c in conns), default=int(need)) >= int(need):
            break
        await asyncio.sleep(0.05)
    done = True
    for keeper in keepers:
        keeper.cancel()
    await asyncio.gather(*keepers, return_exceptions=True)
    # A few at a time: a thousand closes in one instant is a reconnect storm, not what is timed
    # here (and each costs the notifier presence cleanup in Redis).
    for k in range(0, len(conns), CLOSE_BATCH):
        for c in conns[k : k + CLOSE_BATCH]:
            c.close()
        await asyncio.sleep(0.1)
    await asyncio.wait([asyncio.ensure_future(c.lost) for c in conns], timeout=10)
    for c in conns:
        if c.transport is not None:
            c.transport.abort()
    return {
        "connections": len(conns),
        "frames": sum(c.count for c in conns),
        "closed_early": closed_early,
        "resyncs": sum(c.resyncs for c in conns),
        "frame_errors": sum(c.errors for c in conns),
        "all_frames": sum(c.frames for c in conns),
    }


async def _drain_seen(
    seen: list[dict[str, float]], counts: list[int], marker: str, need: int, limit_s: float
) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for i, conn in enumerate(seen):
            counts[i] = sum(1 for mid in conn if mid.startswith(marker))
        if min(counts, default=need) >= need:
            return
        await asyncio.sleep(0.05)


async def observers(a: argparse.Namespace) -> dict[str, Any]:
    """Time every message.added frame on each connection; also time send → send.ack."""
    tokens = read_tokens(a.tokens)[a.start : a.start + a.count]
    ctx = _ctx(a.ca)
    conns = [await _open(a.url, t, ctx, a.origin) for t in tokens]
    seen: list[dict[str, float]] = [{} for _ in conns]
    acks: dict[str, float] = {}
    ack_events: dict[str, asyncio.Event] = {}
    convs: list[str] = []

    async def reader(i: int, ws: ClientConnection) -> None:
        async for raw in ws:
            now = time.monotonic()
            f = json.loads(raw)
            if f.get("type") == "message.added":
                seen[i][f["message"]["message_id"]] = now
                if i == 0 and len(convs) < 1000:
                    convs.append(f["id_conversa"])
            elif f.get("type") == "send.ack" and i == 0:
                acks[f["client_id"]] = now
                if f["client_id"] in ack_events:
                    ack_events[f["client_id"]].set()

    tasks = [asyncio.create_task(reader(i, ws)) for i, ws in enumerate(conns)]
    print("READY", flush=True)
    _, run, need, sends = (await _stdin_line()).split()
    marker = f"<bench-{run}-"
    counts = [0] * len(conns)
    await _drain_seen(seen, counts, marker, int(need), a.drain)
    send_lat: list[float] = []
    if int(sends):
        n = int(sends)
        for k in range(min(n, len(convs))):
            cid = uuid.uuid4().hex
            ack_events[cid] = asyncio.Event()
            t0 = time.monotonic()
            await conns[0].send(
                json.dumps(
                    {
                        "type": "send",
                        "client_id": cid,
                        "id_conversa": convs[k],
                        "html": "<p>bench reply</p>",
                        "attachments": [],
                    }
                )
            )
            try:
                await asyncio.wait_for(ack_events[cid].wait(), 5)
            except TimeoutError:
                pass
            if cid in acks:
                send_lat.append(acks[cid] - t0)
            await asyncio.sleep(0.02)
    for ws in conns:
        await ws.close()
    for t in tasks:
        t.cancel()
    return {"seen": seen, "send_ack": send_lat}


_WORDS = (
    "order invoice refund delivery parcel tracking account password login error screen "
    "payment card bank transfer address street city weekend monday urgent please thanks "
    "hello support team customer number reference warehouse courier damaged missing "
    "replacement colour size return label printer broken update version phone email"
).split()


def _mail(size: int, i: int, run: str) -> bytes:
    """One message as the wire bytes: ``size`` octets of random-ish words (seeded by ``i``)."""
    rng = random.Random(f"{run}-{i}")
    words: list[str] = []
    length = 0
    while length < size:
        line = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 12)))
        words.append(line)
        length += len(line) + 2
    msg = EmailMessage()
    msg["From"] = f"Customer {i} <customer{i}@load.test>"
    msg["To"] = "support@chatflow.test"
    msg["Subject"] = f"Bench {run} message {i}"
    msg["Message-ID"] = f"<bench-{run}-{i}@load.test>"
    msg.set_content("\n".join(words)[:size] + "\n")
    return msg.as_bytes(policy=_WIRE)


async def smtp(a: argparse.Namespace) -> dict[str, Any]:
    """Send ``count`` messages at ``rate``/s (0 = as fast as possible) over ``conns`` sessions.

    Messages are numbered from ``first``, so several of these processes can share one run (one
    asyncio process of aiosmtplib over TLS is itself CPU-bound near 1,000 msg/s). The messages
    are serialized before GO, so what is timed is the SMTP sessions, not our own MIME writer.
    """
    ctx = _ctx(a.ca)
    clients = []
    for _ in range(a.conns):
        c = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=a.port, start_tls=True, tls_context=ctx, timeout=60
        )
        await c.connect()
        clients.append(c)
    ids = [f"<bench-{a.run}-{i}@load.test>" for i in range(a.first, a.first + a.count)]
    mails = [_mail(a.size, i, a.run) for i in range(a.first, a.first + a.count)]
    print("READY", flush=True)
    await _stdin_line()
    accepted: dict[str, float] = {}
    failed = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    cpu0 = time.process_time()
    start = time.monotonic()

    async def producer() -> None:
        for i in range(a.count):
            if a.rate > 0:
                target = start + i / a.rate
                delay = target - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await queue.put(i)
        for _ in clients:
            await queue.put(-1)

    async def worker(c: aiosmtplib.SMTP) -> None:
        nonlocal failed
        while (i := await queue.get()) >= 0:
            try:
                await c.sendmail(f"customer{i}@load.test", ["support@chatflow.test"], mails[i])
                accepted[ids[i]] = time.monotonic()
            except Exception:
                failed += 1

    await asyncio.gather(producer(), *(worker(c) for c in clients))
    elapsed = time.monotonic() - start
    cpu = time.process_time() - cpu0
    for c in clients:
        try:
            await c.quit()
        except Exception:  # noqa: S110
            pass
    return {
        "accepted": accepted,
        "failed": failed,
        "elapsed": elapsed,
        "started": start,
        "cpu_s": cpu,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["agents", "observers", "smtp"])
    p.add_argument("--url", default="")
    p.add_argument("--origin", default="")
    p.add_argument("--tokens", default="")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--ca", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--conns", type=int, default=10)
    p.add_argument("--rate", type=float, default=0)
    p.add_argument("--size", type=int, default=5000)
    p.add_argument("--run", default="x")
    p.add_argument("--first", type=int, default=0, help="smtp: number of the first message")
    p.add_argument(
        "--low-bytes",
        type=int,
        default=1,
        help="agents: while the load runs, wake for a socket once this many bytes wait"
        " (SO_RCVLOWAT; 1: on any byte)",
    )
    p.add_argument("--drain", type=float, default=60.0, help="seconds to wait for the last frames")
    a = p.parse_args()
    fn = {"agents": agents, "observers": observers, "smtp": smtp}[a.role]
    import uvloop

    result = uvloop.run(fn(a))
    # After uvloop, print() of a line longer than the pipe (64 KiB) while the reader is busy
    # with another child came out cut at 64 KiB (seen here): write the bytes ourselves.
    sys.stdout.flush()
    data = (json.dumps(result) + "\n").encode()
    while data:
        data = data[os.write(sys.stdout.fileno(), data) :]


if __name__ == "__main__":
    main()
