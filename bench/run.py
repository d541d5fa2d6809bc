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
    stack: Stack, tokens: Path, agents: int, rate: float, seconds: float, sends: int
) -> dict[str, Any]:
    url = ws_url(stack)
    ca = str(stack.certs / "ca.pem")
    common = ["--url", url, "--origin", stack.origin, "--tokens", str(tokens), "--ca", ca]
    holders: list[Child] = []
    rest = agents - OBSERVERS
    start = OBSERVERS
    t0 = time.monotonic()
    while rest > 0:
        n = min(PER_PROCESS, rest)
        holders.append(Child(["agents", *common, "--start", str(start), "--count", str(n)]))
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
    smtp.say()
    sent = smtp.result()
    n = len(sent["accepted"])
    obs.say(f"DONE {run} {n} {sends}")
    for h in holders:
        h.say(f"DONE {run} {n}")
    seen = obs.result()
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
        "send_to_ack_ms": {
            "p50": ms(statistics.median(seen["send_ack"])) if seen["send_ack"] else None,
            "p99": ms(pct(seen["send_ack"], 99)),
            "samples": len(seen["send_ack"]),
        },
    }


def throughput(stack: Stack, tokens: Path, count: int, size: int) -> dict[str, Any]:
    """SMTP messages/s accepted with the durable commit, and end to end to an observer."""
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
    run = uuid.uuid4().hex[:8]
    smtp = Child(
        [
            "smtp",
            "--ca",
            ca,
            "--port",
            str(stack.ports.smtp),
            "--conns",
            "20",
            "--rate",
            "0",
            "--count",
            str(count),
            "--size",
            str(size),
            "--run",
            run,
        ]
    )
    smtp.ready()
    smtp.say()
    sent = smtp.result()
    obs.say(f"DONE {run} {len(sent['accepted'])} 0")
    seen = obs.result()
    accepted = sent["accepted"]
    times = [t for mid, t in seen["seen"][0].items() if mid in accepted]
    first = min(accepted.values()) if accepted else 0
    e2e = (len(times) / (max(times) - first)) if times and max(times) > first else None
    return {
        "size_bytes": size,
        "messages": count,
        "accepted": len(accepted),
        "accepted_per_s": round(len(accepted) / sent["elapsed"], 1),
        "delivered_to_websocket": len(times),
        "end_to_end_per_s": round(e2e, 1) if e2e else None,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="make bench")
    p.add_argument("--agents", default="100,1000", help="comma-separated agent counts")
    p.add_argument("--rate", type=float, default=50.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--full", action="store_true", help="also the 5,000 agents at 20 msg/s case")
    p.add_argument("--throughput", type=int, default=2000, help="messages for the throughput run")
    p.add_argument("--out", default=str(ROOT / "bench/report.json"))
    p.add_argument("--via", choices=["gateway", "notifier"], default="gateway")
    p.add_argument("--gateway-requests", type=int, default=2000)
    a = p.parse_args(argv)
    VIA["via"] = a.via
    cases = [(int(n), a.rate) for n in a.agents.split(",") if n]
    if a.full:
        cases.append((5000, 20.0))
    biggest = max(n for n, _ in cases)
    run_id = testing.new_run_id()
    db = f"chatflow_bench_{run_id}"
    url = asyncio.run(testing.create_database(db))
    var = ROOT / "var" / f"bench-{run_id}"
    stack = Stack(
        database_url=url,
        stream_prefix=f"bench{run_id}:",
        ports=Ports.free(),
        var=var,
        log_file=var / "stack.log",
        echo=False,
        inherit_env=False,
        extra_env={
            "CHATFLOW_LOG_LEVEL": "WARNING",
            # The latency probe sends thousands of requests as one agent.
            "CHATFLOW_GATEWAY_RATE_LIMIT_PER_USER": "1000000",
            "CHATFLOW_GATEWAY_RATE_LIMIT_PER_IP": "1000000",
        },
    )
    report: dict[str, Any] = {
        "machine": machine(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
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
        time.sleep(1)
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
            res = scenario(stack, tokens, n, rate, a.seconds, sends=50)
            print(json.dumps(res), flush=True)
            report["latency"].append(res)
        report["throughput_5kb"] = throughput(stack, tokens, a.throughput, 5000)
        print(json.dumps(report["throughput_5kb"]), flush=True)
    finally:
        stack.stop()
        asyncio.run(testing.drop_database(db))
        asyncio.run(testing.drop_prefix(f"bench{run_id}:"))
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"report written to {a.out}")


if __name__ == "__main__":
    main()
