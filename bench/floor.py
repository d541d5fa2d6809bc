"""The bare cost of the WebSocket fan-out on this machine, without any ChatFLOW code.

``python -m bench.floor --agents 1000 --rate 50`` starts one uvloop TLS server process and
client processes holding ``--agents`` TLS connections (250 each, as ``make bench`` does). At
``--rate`` a second the server writes one frame of ``--size`` bytes to every connection, one
``transport.write`` per connection, as the gateway does for a mail; the clients read every
frame as it comes. Ten connections spread over the fan-out order time each frame from the
server's first write to its arrival.

What is left out is everything the product does besides the last hop: SMTP, parsing, storage,
threading, badges, the streams and the notifier. So its CPU per frame and its latency are a
floor under ``make bench``'s real-time cases: what the machine spends just to put 50,000 TLS
frames a second on 1,000 sockets and take them off again, with the clients on the same cores.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

from libs.common.settings import ROOT

PER_PROCESS = 250
OBSERVERS = 10
STAMP = struct.Struct("!Q")  # the server's CLOCK_MONOTONIC, ns, when the fan-out began


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:13]) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))] if s else float("nan")


# ---- server -------------------------------------------------------------------------------------
class _Sink(asyncio.Protocol):
    def __init__(self, conns: list[asyncio.Transport]) -> None:
        self.conns = conns

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conns.append(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        pass


async def serve(a: argparse.Namespace) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(a.cert, a.key)
    conns: list[asyncio.Transport] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Sink(conns), "127.0.0.1", 0, ssl=ctx, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # every client connected
    while len(conns) < a.agents:  # noqa: ASYNC110 (every server-side handshake done)
        await asyncio.sleep(0.01)
    head = bytes([0x81, 126]) + (a.size - 4).to_bytes(2, "big")  # a WebSocket text frame
    pad = b"x" * (a.size - 4 - STAMP.size)
    interval = 1 / a.rate
    nxt = time.monotonic()
    for _ in range(a.frames):
        nxt += interval
        data = head + STAMP.pack(time.monotonic_ns()) + pad
        for t in conns:
            t.write(data)
        await asyncio.sleep(max(0.0, nxt - time.monotonic()))
    print("DONE", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    server.close()


# ---- clients ------------------------------------------------------------------------------------
class _Reader(asyncio.Protocol):
    def __init__(self, size: int, timed: bool, lat: list[float]) -> None:
        self.size, self.timed, self.lat = size, timed, lat
        self.buf = bytearray()
        self.frames = 0

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        buf = self.buf
        buf += data
        n = len(buf) // self.size
        if not n:
            return
        if self.timed:
            for k in range(n):
                (sent,) = STAMP.unpack_from(buf, k * self.size + 4)
                self.lat.append((now - sent) / 1e6)
        self.frames += n
        del buf[: n * self.size]


async def clients(a: argparse.Namespace) -> None:
    ctx = ssl.create_default_context(cafile=a.ca)
    loop = asyncio.get_running_loop()
    lat: list[float] = []
    timed = {int(x) for x in a.timed.split(",") if x}
    readers: list[_Reader] = []
    for i in range(a.count):
        _, r = await loop.create_connection(
            lambda i=i: _Reader(a.size, i in timed, lat),  # type: ignore[misc]
            "127.0.0.1",
            a.port,
            ssl=ctx,
            server_hostname="127.0.0.1",
        )
        readers.append(r)
    print("READY", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    deadline = time.monotonic() + 10  # the last frames may still be on their way
    while time.monotonic() < deadline and min(r.frames for r in readers) < a.frames:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    print(json.dumps({"frames": sum(r.frames for r in readers), "latency_ms": lat}), flush=True)


# ---- driver -------------------------------------------------------------------------------------
def options(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.floor")
    p.add_argument("role", nargs="?", default="run", choices=["run", "server", "clients"])
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--rate", type=float, default=50.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--size", type=int, default=1500, help="bytes per frame, header included")
    p.add_argument("--frames", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--timed", default="")
    p.add_argument(
        "--timed-at",
        choices=["spread", "first"],
        default="spread",
        help="which sockets time the frames: ten spread over the write order, or its first ten",
    )
    certs = ROOT / "var" / "certs"
    p.add_argument("--cert", default=str(certs / "server.pem"))
    p.add_argument("--key", default=str(certs / "server.key"))
    p.add_argument("--ca", default=str(certs / "ca.pem"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = options(argv)
    if a.role == "server":
        uvloop.run(serve(a))
        return
    if a.role == "clients":
        uvloop.run(clients(a))
        return
    print(json.dumps(run(a)), flush=True)


def _child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.floor", *args],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def run(a: argparse.Namespace) -> dict[str, Any]:
    frames = int(a.rate * a.seconds)
    common = ["--size", str(a.size), "--ca", a.ca, "--cert", a.cert, "--key", a.key]
    server = _child("server", "--frames", str(frames), "--agents", str(a.agents), *common)
    assert server.stdout is not None and server.stdin is not None
    port = server.stdout.readline().strip()
    step = max(1, a.agents // OBSERVERS)
    # Spread over the fan-out order (what an agent chosen at random sees), or its first ten.
    timed = set(range(0, a.agents, step)) if a.timed_at == "spread" else set(range(OBSERVERS))
    kids: list[subprocess.Popen[str]] = []
    for start in range(0, a.agents, PER_PROCESS):
        n = min(PER_PROCESS, a.agents - start)
        mine = ",".join(str(i - start) for i in timed if start <= i < start + n)
        kids.append(
            _child(
                "clients",
                *("--port", port, "--count", str(n), "--timed", mine, "--frames", str(frames)),
                *common,
            )
        )
        assert kids[-1].stdout is not None
        if kids[-1].stdout.readline().strip() != "READY":  # connected in order: fan-out order
            raise RuntimeError("client process failed to connect")
    procs = [server, *kids]
    cpu0 = [cpu_s(k.pid) for k in procs]
    t0 = time.monotonic()
    server.stdin.write("\n")
    server.stdin.flush()
    done = server.stdout.readline().strip()  # the last fan-out written
    time.sleep(0.5)  # and read, as a rule
    cpu1 = [cpu_s(k.pid) for k in procs]
    wall = time.monotonic() - t0
    if done != "DONE":
        raise RuntimeError(f"server said {done!r}")
    server.stdin.write("\n")
    server.stdin.flush()
    got, lat = 0, []
    for k in kids:
        assert k.stdin is not None and k.stdout is not None
        k.stdin.write("\n")
        k.stdin.flush()
        out = json.loads(k.stdout.readline())
        got += out["frames"]
        lat += out["latency_ms"]
    for k in procs:
        k.wait(30)
    due = frames * a.agents
    used = [b - x for x, b in zip(cpu0, cpu1, strict=True)]
    return {
        "agents": a.agents,
        "rate": a.rate,
        "frame_bytes": a.size,
        "timed_at": a.timed_at,
        "frames_due": due,
        "frames_received": got,
        "latency_ms": {
            "p50": round(pct(lat, 50), 2),
            "p99": round(pct(lat, 99), 2),
            "max": round(max(lat, default=float("nan")), 2),
            "samples": len(lat),
        },
        "cpu_us_per_frame": {
            "server": round(used[0] / due * 1e6, 2),
            "clients": round(sum(used[1:]) / due * 1e6, 2),
        },
        "cores_busy": round(sum(used) / wall, 2),
        "seconds": round(wall, 1),
    }


if __name__ == "__main__":
    main()
