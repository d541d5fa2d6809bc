"""``make bench``: drive a stack of its own with real SMTP clients and real WebSocket agents.

Standard conditions (../CONTRACT): 5 KB messages; every agent a member of the one mailbox that
receives the mail; latency read by 10 observer connections in a process of their own while the
other agents are held by other processes. Writes ``bench/report.json`` and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from bench import calibrate
from bench import gateway as gateway_bench
from libs.common import testing
from libs.common.settings import ROOT
from tools.devstack import Ports, Stack

OBSERVERS = 10
PER_PROCESS = 250


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def ms(v: float) -> float:
    return round(v * 1000, 2)


class Child:
    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.clients", *args],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ready(self, timeout: float = 180) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "READY":
            raise RuntimeError(f"client failed to start: {line!r} (rc={self.proc.poll()})")

    def wait_for(self, word: str) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != word:
            raise RuntimeError(f"client said {line!r}, expected {word}")

    def say(self, line: str = "GO") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = 300) -> dict[str, Any]:
        assert self.proc.stdout is not None
        out = self.proc.stdout.readline()
        self.proc.wait(timeout)
        return dict(json.loads(out))


def machine() -> dict[str, Any]:
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) // 1024
    except OSError:
        pass
    cpu = ""
    try:
        cpu = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            "",
        )
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_mb": mem,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


VIA = {"via": "gateway"}


def ws_url(stack: Stack) -> str:
    """Agents connect through the gateway; ``--via notifier`` measures the notifier alone."""
    if VIA["via"] == "notifier":
        return f"wss://127.0.0.1:{stack.ports.notifier_ws}/ws"
    return f"wss://127.0.0.1:{stack.ports.gateway}/ws"


def scenario(
    stack: Stack,
    tokens: Path,
    agents: int,
    rate: float,
    seconds: float,
    sends: int,
    holder_low_bytes: int = 1,
) -> dict[str, Any]:
    """``holder_low_bytes``: the holders' ``SO_RCVLOWAT`` while the load runs (``bench.wsraw``)."""
    url = ws_url(stack)
    ca = str(stack.certs / "ca.pem")
    common = ["--url", url, "--origin", stack.origin, "--tokens", str(tokens), "--ca", ca]
    holders: list[Child] = []
    rest = agents - OBSERVERS
    start = OBSERVERS
    t0 = time.monotonic()
    while rest > 0:
        n = min(PER_PROCESS, rest)
        holders.append(
            Child(
                [
                    *("agents", *common, "--start", str(start), "--count", str(n)),
                    *("--low-bytes", str(holder_low_bytes)),
                ]
            )
        )
        start += n
        rest -= n
    for h in holders:
        h.ready()
    obs = Child(["observers", *common, "--start", "0", "--count", str(OBSERVERS)])
    obs.ready()
    connect_s = time.monotonic() - t0
    count = int(rate * seconds)
    run = uuid.uuid4().hex[:8]
    smtp = Child(
        [
            "smtp",
            "--ca",
            ca,
            "--port",
            str(stack.ports.smtp),
            "--conns",
            "10",
            "--rate",
            str(rate),
            "--count",
            str(count),
            "--size",
            "5000",
            "--run",
            run,
        ]
    )
    smtp.ready()
    for h in holders:
        h.say(f"RUN {run} 0")
        h.wait_for("ARMED")
    procs = {name: p.pid for name, p in stack.procs.items()}
    procs["holders"] = -1
    procs["redis"] = redis_pid(stack.redis_url)
    procs["postgres"] = -1
    pg0 = backends_cpu(stack.database_url)
    cpu0 = _cpu_of(procs, holders)
    busy0, total0 = machine_busy()
    smtp.say()
    sent = smtp.result()
    n = len(sent["accepted"])
    obs.say(f"DONE {run} {n} {sends}")
    seen = obs.result()
    # The holders close only once the observers are done: their closes must not crowd the
    # send → send.ack probe.
    for h in holders:
        h.say(f"DONE {run} {n}")
    cpu1 = _cpu_of(procs, holders)
    busy1, total1 = machine_busy()
    pg1 = backends_cpu(stack.database_url)
    cpu0["postgres"], cpu1["postgres"] = (
        0.0,
        sum(v - pg0.get(pid, 0.0) for pid, v in pg1.items() if v == v),
    )
    procs["smtp-client"] = -1
    cpu0["smtp-client"], cpu1["smtp-client"] = 0.0, float(sent["cpu_s"])
    held = [h.result() for h in holders]
    accepted: dict[str, float] = sent["accepted"]
    lat = [
        t_frame - accepted[mid]
        for conn in seen["seen"]
        for mid, t_frame in conn.items()
        if mid in accepted
    ]
    due = len(accepted) * agents
    received_obs = sum(1 for conn in seen["seen"] for mid in conn if mid in accepted)
    received = received_obs + sum(h["frames"] for h in held)
    return {
        "agents": agents,
        "rate_msg_s": rate,
        "holder_low_bytes": holder_low_bytes,
        "messages": count,
        "accepted": len(accepted),
        "smtp_failed": sent["failed"],
        "connect_s": round(connect_s, 2),
        "latency_250_to_frame_ms": {
            "p50": ms(statistics.median(lat)) if lat else None,
            "p99": ms(pct(lat, 99)),
            "max": ms(max(lat)) if lat else None,
            "samples": len(lat),
        },
        "frames_due": due,
        "frames_received": received,
        "observer_frames_due": len(accepted) * OBSERVERS,
        "observer_frames_received": received_obs,
        # Every frame the holders read (message.added, conversation.updated, badge, ...), to
        # turn CPU seconds into CPU per frame; and frames that broke the protocol (must be 0).
        "holder_frames_all": sum(h.get("all_frames", 0) for h in held),
        "holder_frame_errors": sum(h.get("frame_errors", 0) for h in held),
        # Holders cut off (4008 when the server side falls behind) reconnect and resume, as
        # the agents' app does: what they missed is replayed, so frames received stays exact.
        "holder_reconnects": sum(h.get("closed_early", 0) for h in held),
        "holder_resyncs": sum(h.get("resyncs", 0) for h in held),
        "send_to_ack_ms": {
            "p50": ms(statistics.median(seen["send_ack"])) if seen["send_ack"] else None,
            "p99": ms(pct(seen["send_ack"], 99)),
            "samples": len(seen["send_ack"]),
        },
        # CPU of each process while the mail flowed, per frame due (one mail to one agent), and
        # the machine's busy share: where the fan-out budget goes. ``postgres`` is the bench
        # database's backends; ``redis`` the whole server (nothing else uses it meanwhile).
        "cpu_us_per_frame_due": {
            name: round((cpu1[name] - cpu0[name]) * 1e6 / max(1, due), 1) for name in procs
        },
        "machine_cpu_busy": round((busy1 - busy0) / max(1e-9, total1 - total0), 2),
    }


def wait_drained(stack: Stack, timeout: float = 300.0) -> float:
    """Wait until every consumer group of the stack's streams has read and acked everything.

    Creating 5,000 agents publishes 10,000 directory events that every service consumes at
    startup; measured while that backlog drains, a case measured it, not the steady state.
    Returns the seconds waited.
    """

    async def lagging() -> int:
        from libs.common.bus import connect

        r = connect(stack.redis_url)
        try:
            behind = 0
            async for key in r.scan_iter(match=f"{stack.stream_prefix}*", _type="stream"):
                for g in await r.xinfo_groups(key):
                    behind += int(g.get("pending") or 0) + int(g.get("lag") or 0)
            return behind
        finally:
            await r.aclose()

    started = time.monotonic()
    time.sleep(1)
    while asyncio.run(lagging()) and time.monotonic() - started < timeout:
        time.sleep(0.5)
    return round(time.monotonic() - started, 1)


def redis_pid(url: str) -> int:
    """The local Redis server's pid (from INFO), or -1 when it is not on this machine."""

    async def ask() -> int:
        from libs.common.bus import connect

        r = connect(url)
        try:
            info = await r.info("server")
        finally:
            await r.aclose()
        return int(info.get("process_id", -1))

    try:
        pid = asyncio.run(ask())
    except Exception:
        return -1
    return pid if Path(f"/proc/{pid}").exists() else -1


def _cpu_of(procs: dict[str, int], holders: list[Child]) -> dict[str, float]:
    """CPU seconds so far per process name; ``holders`` sums the holder processes."""
    out = {name: cpu_seconds(pid) if pid > 0 else 0.0 for name, pid in procs.items()}
    out["holders"] = sum(cpu_seconds(h.proc.pid) for h in holders)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its reaped children (``/proc/<pid>/stat``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    ticks = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from ``/proc/stat``."""
    vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tck = os.sysconf("SC_CLK_TCK")
    idle = vals[3] + vals[4]
    return (sum(vals) - idle) / tck, sum(vals) / tck


def backends_cpu(database_url: str) -> dict[int, float]:
    """CPU seconds so far of each PostgreSQL backend connected to the bench's database."""

    async def pids() -> list[int]:
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid()"
            )
        finally:
            await conn.close()
        return [r["pid"] for r in rows]

    return {pid: cpu_seconds(pid) for pid in asyncio.run(pids())}


SMTP_CONNS = 20
SMTP_PORTS: list[int] = []  # --ingest-replicas: one SMTP port per ingest process
SMTP_PROCS = 2  # client processes sharing the 20 sessions (one is CPU-bound near 1,000 msg/s)


def smtp_load(stack: Stack, count: int, size: int, run: str) -> dict[str, Any]:
    """``count`` messages of ``size`` octets as fast as 20 STARTTLS sessions take them.

    Returns the accepted Message-IDs with their 250 times, the rate, and CPU per message of
    ingest, of the load clients and of the whole machine (PostgreSQL included) while it ran.
    """
    ca = str(stack.certs / "ca.pem")
    ports = SMTP_PORTS or [stack.ports.smtp]
    procs = min(max(SMTP_PROCS, len(ports)), SMTP_CONNS)
    kids: list[Child] = []
    for k in range(procs):
        share = count // procs + (1 if k < count % procs else 0)
        first = k * (count // procs) + min(k, count % procs)
        kids.append(
            Child(
                [
                    "smtp",
                    "--ca",
                    ca,
                    "--port",
                    str(ports[k % len(ports)]),
                    "--conns",
                    str(SMTP_CONNS // procs + (1 if k < SMTP_CONNS % procs else 0)),
                    "--rate",
                    "0",
                    "--count",
                    str(share),
                    "--first",
                    str(first),
                    "--size",
                    str(size),
                    "--run",
                    run,
                ]
            )
        )
    for kid in kids:
        kid.ready()
    ingest = [p.pid for name, p in stack.procs.items() if name.startswith("ingest")]
    pg0 = backends_cpu(stack.database_url)
    cpu0, (busy0, total0) = sum(map(cpu_seconds, ingest)), machine_busy()
    for kid in kids:
        kid.say()
    results = [kid.result() for kid in kids]
    cpu1, (busy1, total1) = sum(map(cpu_seconds, ingest)), machine_busy()
    pg1 = backends_cpu(stack.database_url)
    pg = sum(v - pg0.get(pid, 0.0) for pid, v in pg1.items() if v == v)
    accepted: dict[str, float] = {}
    for r in results:
        accepted.update(r["accepted"])
    begin = min(r["started"] for r in results)
    end = max([begin, *accepted.values()])
    elapsed = max(r["started"] + r["elapsed"] for r in results) - begin
    n = max(1, len(accepted))
    return {
        "accepted": accepted,
        "elapsed": elapsed,
        "summary": {
            "size_bytes": size,
            "clients": SMTP_CONNS,
            "client_processes": procs,
            "ingest_processes": len(ingest),
            "messages": count,
            "accepted": len(accepted),
            "failed": sum(r["failed"] for r in results),
            "accepted_per_s": round(len(accepted) / (end - begin), 1) if end > begin else None,
            "cpu_ms_per_msg": {
                "ingest": round((cpu1 - cpu0) * 1000 / n, 3),
                "postgres_backends": round(pg * 1000 / n, 3),
                "clients": round(sum(r["cpu_s"] for r in results) * 1000 / n, 3),
                "machine": round((busy1 - busy0) * 1000 / n, 3),
            },
            "machine_cpu_busy": round((busy1 - busy0) / max(1e-9, total1 - total0), 2),
        },
    }


def throughput(stack: Stack, tokens: Path | None, count: int, size: int) -> dict[str, Any]:
    """SMTP messages/s accepted with the durable commit, and end to end to an observer.

    Without ``tokens`` (``--only ingest``) there is no observer: the accepted rate alone.
    """
    run = uuid.uuid4().hex[:8]
    if tokens is None:
        return smtp_load(stack, count, size, run)["summary"]
    url = ws_url(stack)
    ca = str(stack.certs / "ca.pem")
    obs = Child(
        [
            "observers",
            "--url",
            url,
            "--origin",
            stack.origin,
            "--tokens",
            str(tokens),
            "--ca",
            ca,
            "--start",
            "0",
            "--count",
            "1",
        ]
    )
    obs.ready()
    load = smtp_load(stack, count, size, run)
    accepted = load["accepted"]
    obs.say(f"DONE {run} {len(accepted)} 0")
    seen = obs.result()
    times = [t for mid, t in seen["seen"][0].items() if mid in accepted]
    first = min(accepted.values()) if accepted else 0
    e2e = (len(times) / (max(times) - first)) if times and max(times) > first else None
    return {
        **load["summary"],
        "delivered_to_websocket": len(times),
        "end_to_end_per_s": round(e2e, 1) if e2e else None,
    }


def bench_stack(url: str, prefix: str, var: Path, **env: str) -> Stack:
    """A stack of the bench's own: its database and prefix, free ports, quiet logs in ``var``."""
    return Stack(
        database_url=url,
        stream_prefix=prefix,
        ports=Ports.free(),
        var=var,
        log_file=var / "stack.log",
        echo=False,
        inherit_env=False,
        extra_env={"CHATFLOW_LOG_LEVEL": "WARNING", **env},
    )


def ingest_only(url: str, prefix: str, var: Path, a: argparse.Namespace) -> dict[str, Any]:
    """``--only ingest``: ingest alone (its schema, one mailbox), SMTP throughput only."""
    stack = bench_stack(url, prefix, var)
    out: dict[str, Any] = {}
    try:
        var.mkdir(parents=True, exist_ok=True)
        asyncio.run(stack.ensure_database())
        stack.run_cmd("ingest", "migrate")
        asyncio.run(_add_mailbox(stack))
        stack.start_service("ingest")
        SMTP_PORTS[:] = [stack.ports.smtp]
        for i in range(1, a.ingest_replicas):
            # Another replica, as a second MX would be: its own SMTP and HTTP ports, the same
            # database (the outbox relays share the rows with SKIP LOCKED).
            env = stack.env("ingest")
            port = testing.free_port()
            env.update(
                CHATFLOW_INGEST_SMTP_PORT=str(port),
                CHATFLOW_INGEST_HTTP_PORT=str(testing.free_port()),
            )
            stack._spawn(f"ingest{i}", ["-m", "services.ingest", "run"], env)
            SMTP_PORTS.append(port)
        stack.wait_ready(60, only=("ingest",))
        for port in SMTP_PORTS:
            testing.wait_port(port, 60)
        for size, count in ((5000, a.throughput), (500_000, a.throughput_large)):
            res = throughput(stack, None, count, size)
            print(json.dumps(res), flush=True)
            out[f"throughput_{size // 1000}kb"] = res
    finally:
        stack.stop()
    return out


async def _add_mailbox(stack: Stack) -> None:
    from libs.common import db
    from services.ingest import storage
    from services.ingest.settings import IngestSettings

    settings = IngestSettings.load(database_url=stack.database_url)
    pool = await db.connect_pool(settings.own_database_url, settings.db_schema, 1, 2)
    try:
        async with pool.acquire() as conn:
            await storage.upsert_mailbox(conn, "mb-bench", "support@chatflow.test", "Bench", True)
    finally:
        await pool.close()


def bench_ingest(a: argparse.Namespace) -> None:
    """``make bench BENCH_ARGS="--only ingest"``: its own database and prefix, then the report."""
    run_id = testing.new_run_id()
    db = f"chatflow_bench_{run_id}"
    url = asyncio.run(testing.create_database(db))
    report: dict[str, Any] = {
        "machine": machine(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        report["calibration_before"] = calibrate.measure()
        report.update(ingest_only(url, f"bench{run_id}:", ROOT / "var" / f"bench-{run_id}", a))
        report["calibration_after"] = calibrate.measure()
    finally:
        asyncio.run(testing.drop_database(db))
        asyncio.run(testing.drop_prefix(f"bench{run_id}:"))
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"report written to {a.out}")


def bench_sender(out: str) -> None:
    """``bench.sender`` with one and two sender processes, each in a process of its own."""
    report: dict[str, Any] = {"machine": machine(), "calibration_before": calibrate.measure()}
    for replicas in (1, 2):
        run = subprocess.run(
            [sys.executable, "-m", "bench.sender", "--count", "4000", "--replicas", f"{replicas}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        line = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else "{}"
        report[f"sender_{replicas}"] = json.loads(line)
        print(line, flush=True)
        if run.returncode:
            raise SystemExit(f"bench.sender --replicas {replicas} failed: {run.stderr[-2000:]}")
    report["calibration_after"] = calibrate.measure()
    Path(out).write_text(json.dumps(report, indent=2))
    print(f"report written to {out}")


def bench_floor(out: str) -> None:
    """The real-time cases' two sizes with nothing but the TLS fan-out (``bench.floor``)."""
    from bench import floor

    report: dict[str, Any] = {"machine": machine(), "calibration_before": calibrate.measure()}
    report["floor"] = [
        floor.run(floor.options(["--agents", "1000", "--rate", "50", "--size", "1500"])),
        floor.run(floor.options(["--agents", "5000", "--rate", "20", "--size", "1500"])),
    ]
    report["calibration_after"] = calibrate.measure()
    Path(out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="make bench")
    p.add_argument("--agents", default="100,1000", help="comma-separated agent counts")
    p.add_argument("--rate", type=float, default=50.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--full", action="store_true", help="also the 5,000 agents at 20 msg/s case")
    p.add_argument("--throughput", type=int, default=2000, help="messages for the throughput run")
    p.add_argument("--out", default=str(ROOT / "bench/report.json"))
    p.add_argument(
        "--holder-low-bytes",
        type=int,
        default=6000,
        help="while a case runs, each holder's socket wakes it once this many bytes wait"
        " (SO_RCVLOWAT; 1: on any byte); the observers, which time the frames, read at once",
    )
    p.add_argument("--via", choices=["gateway", "notifier"], default="gateway")
    p.add_argument("--gateway-requests", type=int, default=2000)
    p.add_argument(
        "--throughput-large", type=int, default=100, help="messages for the 500 KB throughput run"
    )
    p.add_argument(
        "--ingest-replicas",
        type=int,
        default=1,
        help="with --only ingest: ingest processes, each its own SMTP port, clients spread",
    )
    p.add_argument(
        "--only",
        choices=["ingest", "threader", "sender", "floor"],
        help="ingest: ingest alone, SMTP throughput (5 KB, 500 KB) without the WebSocket agents;"
        " threader: threading with a million messages stored (python -m bench.threader --help);"
        " sender: 4,000 DKIM-signed 5 KB replies to a local relay, with one sender process"
        " and with two (python -m bench.sender --help);"
        " floor: the bare TLS fan-out without ChatFLOW, 1,000 sockets at 50 frames/s and 5,000"
        " at 20 (python -m bench.floor --help)",
    )
    a = p.parse_args(argv)
    VIA["via"] = a.via
    if a.only == "ingest":
        bench_ingest(a)
        return
    if a.only == "threader":
        from bench import threader

        threader.main(["--out", a.out])
        return
    if a.only == "sender":
        bench_sender(a.out)
        return
    if a.only == "floor":
        bench_floor(a.out)
        return
    cases = [(int(n), a.rate) for n in a.agents.split(",") if n]
    if a.full:
        cases.append((5000, 20.0))
    biggest = max(n for n, _ in cases)
    run_id = testing.new_run_id()
    db = f"chatflow_bench_{run_id}"
    url = asyncio.run(testing.create_database(db))
    var = ROOT / "var" / f"bench-{run_id}"
    # The latency probe sends thousands of requests as one agent.
    stack = bench_stack(
        url,
        f"bench{run_id}:",
        var,
        CHATFLOW_GATEWAY_RATE_LIMIT_PER_USER="1000000",
        CHATFLOW_GATEWAY_RATE_LIMIT_PER_IP="1000000",
    )
    report: dict[str, Any] = {
        "machine": machine(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        # The machine's speed against the one the targets assume, before and after (it varies).
        report["calibration_before"] = calibrate.measure()
        print(json.dumps(report["calibration_before"]), flush=True)
        var.mkdir(parents=True, exist_ok=True)
        stack.migrate()
        stack.seed(uuid.uuid4().hex)
        tokens = var / "tokens.jsonl"
        stack.run_cmd(
            "auth",
            "bench-agents",
            "--count",
            str(biggest),
            "--mailbox",
            "support@chatflow.test",
            "--out",
            str(tokens),
        )
        stack.start()
        stack.wait_ready(90)
        report["startup_backlog_s"] = wait_drained(stack)
        first_token = json.loads(tokens.read_text().splitlines()[0])["token"]
        report["gateway_added_latency"] = gateway_bench.measure(
            stack.origin,
            f"https://127.0.0.1:{stack.ports.threader}",
            first_token,
            stack.certs / "ca.pem",
            a.gateway_requests,
        )
        print(json.dumps(report["gateway_added_latency"]), flush=True)
        report["latency"] = []
        for n, rate in cases:
            wait_drained(stack)  # the case before may still be delivering
            res = scenario(
                stack, tokens, n, rate, a.seconds, sends=50, holder_low_bytes=a.holder_low_bytes
            )
            print(json.dumps(res), flush=True)
            report["latency"].append(res)
        report["throughput_5kb"] = throughput(stack, tokens, a.throughput, 5000)
        print(json.dumps(report["throughput_5kb"]), flush=True)
        report["throughput_500kb"] = throughput(stack, tokens, a.throughput_large, 500_000)
        print(json.dumps(report["throughput_500kb"]), flush=True)
        stack.stop()
        report["calibration_after"] = calibrate.measure()
    finally:
        stack.stop()
        asyncio.run(testing.drop_database(db))
        asyncio.run(testing.drop_prefix(f"bench{run_id}:"))
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"report written to {a.out}")


if __name__ == "__main__":
    main()
