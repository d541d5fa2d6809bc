"""Run the whole stack locally: migrate every schema, seed the demo, start all services.

``make run`` calls ``python -m tools.devstack run``; the end-to-end tests and the benchmark use
``Stack`` with ports, database and stream prefix of their own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import asyncpg

from libs.common.settings import ROOT

SERVICES = ("auth", "ingest", "threader", "sender", "notifier", "gateway")
COLORS = {
    "auth": 35,
    "ingest": 32,
    "threader": 36,
    "sender": 33,
    "notifier": 34,
    "gateway": 31,
    "smtp-sink": 37,
}


@dataclass
class Ports:
    gateway: int = 8443
    gateway_ops: int = 8101
    auth: int = 8102
    ingest: int = 8103
    threader: int = 8104
    sender: int = 8105
    notifier: int = 8106
    notifier_ws: int = 8116
    smtp: int = 2525
    sink: int = 2526

    @classmethod
    def free(cls) -> Ports:
        from libs.common.testing import free_port

        return cls(*(free_port() for _ in range(10)))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Ports:
        """The dev defaults, less what the environment overrides (the contract says every one
        is): each port from the variable its service reads, so that the URLs, origin and
        issuer the stack derives from them agree with where the services listen."""
        ports = cls()
        for name, var in PORT_VARS.items():
            value = environ.get(var)
            if value is None:
                continue
            if not value.isdigit() or not 0 < int(value) < 65536:
                raise ValueError(f"{var}={value!r} is not a TCP port")
            setattr(ports, name, int(value))
        return ports


# The variable each service reads its port from (``Stack.env`` sets them all).
PORT_VARS = {
    "gateway": "CHATFLOW_GATEWAY_PUBLIC_PORT",
    "gateway_ops": "CHATFLOW_GATEWAY_HTTP_PORT",
    "auth": "CHATFLOW_AUTH_HTTP_PORT",
    "ingest": "CHATFLOW_INGEST_HTTP_PORT",
    "threader": "CHATFLOW_THREADER_HTTP_PORT",
    "sender": "CHATFLOW_SENDER_HTTP_PORT",
    "notifier": "CHATFLOW_NOTIFIER_HTTP_PORT",
    "notifier_ws": "CHATFLOW_NOTIFIER_WS_PORT",
    "smtp": "CHATFLOW_INGEST_SMTP_PORT",
    "sink": "CHATFLOW_SENDER_RELAY_PORT",
}


class PortsBusy(Exception):
    """A port the stack would listen on is taken (another stack, most likely)."""


def check_ports(ports: Ports, host: str = "127.0.0.1") -> None:
    """Refuse to start when any port is in use, naming it and the variable that moves it.

    Without this a second ``make run`` reported the first one's services as ready (they
    answered its readiness URLs) while its own failed to bind.
    """
    busy: list[str] = []
    for name, var in PORT_VARS.items():
        port = getattr(ports, name)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
            try:
                s.bind((host, port))
            except OSError:
                busy.append(f"  {host}:{port} ({name}) is in use: free it or set {var}")
    if busy:
        raise PortsBusy(
            "cannot start: ports in use (is another stack running?)\n" + "\n".join(busy)
        )


@dataclass
class Stack:
    database_url: str = os.environ.get(
        "CHATFLOW_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/chatflow"
    )
    redis_url: str = os.environ.get("CHATFLOW_REDIS_URL", "redis://127.0.0.1:6379/0")
    stream_prefix: str = os.environ.get("CHATFLOW_STREAM_PREFIX", "chatflow:")
    ports: Ports = field(default_factory=Ports)
    var: Path = ROOT / "var"
    certs: Path = ROOT / "var/certs"
    extra_env: dict[str, str] = field(default_factory=dict)
    log_file: Path | None = None
    echo: bool = True
    inherit_env: bool = True
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def origin(self) -> str:
        return f"https://127.0.0.1:{self.ports.gateway}"

    @property
    def sink_dir(self) -> Path:
        return self.var / "sink"

    def env(self, service: str) -> dict[str, str]:
        p = self.ports
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATFLOW_")}
        # What the caller set wins over the dev defaults (tests start from a clean slate).
        inherited = {k: v for k, v in os.environ.items() if k.startswith("CHATFLOW_")}
        env.update(
            PYTHONUNBUFFERED="1",
            CHATFLOW_DATABASE_URL=self.database_url,
            CHATFLOW_REDIS_URL=self.redis_url,
            CHATFLOW_STREAM_PREFIX=self.stream_prefix,
            CHATFLOW_TLS_CERT=str(self.certs / "server.pem"),
            CHATFLOW_TLS_KEY=str(self.certs / "server.key"),
            CHATFLOW_TLS_CA=str(self.certs / "ca.pem"),
            CHATFLOW_JWT_ISSUER=self.origin,
            CHATFLOW_ALLOWED_ORIGINS=json.dumps([self.origin, f"https://localhost:{p.gateway}"]),
            CHATFLOW_GATEWAY_AUTH_URL=f"https://127.0.0.1:{p.auth}",
            CHATFLOW_GATEWAY_INGEST_URL=f"https://127.0.0.1:{p.ingest}",
            CHATFLOW_GATEWAY_THREADER_URL=f"https://127.0.0.1:{p.threader}",
            CHATFLOW_GATEWAY_SENDER_URL=f"https://127.0.0.1:{p.sender}",
            CHATFLOW_GATEWAY_NOTIFIER_URL=f"https://127.0.0.1:{p.notifier}",
            CHATFLOW_GATEWAY_NOTIFIER_WS_URL=f"wss://127.0.0.1:{p.notifier_ws}/ws",
            **{var: str(getattr(p, name)) for name, var in PORT_VARS.items()},
            CHATFLOW_AUTH_WEB_REDIRECT_URI=f"{self.origin}/callback",
        )
        if self.inherit_env:
            env.update(inherited)
        env.update(self.extra_env)
        return env

    # ---- one-shot steps -------------------------------------------------------------------------
    async def ensure_database(self) -> None:
        base, _, name = self.database_url.rpartition("/")
        name = name.split("?", 1)[0]
        conn = await asyncpg.connect(f"{base}/postgres")
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    def run_cmd(self, service: str, *args: str, stdin: str | None = None) -> str:
        out = subprocess.run(
            [sys.executable, "-m", f"services.{service}", *args],
            env=self.env(service),
            cwd=ROOT,
            input=stdin.encode() if stdin is not None else None,
            capture_output=True,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(
                f"{service} {' '.join(args)} failed ({out.returncode}):\n{out.stderr.decode()[-3000:]}"
            )
        return out.stdout.decode()

    def migrate(self) -> None:
        asyncio.run(self.ensure_database())
        for s in SERVICES:
            self.run_cmd(s, "migrate")

    def seed(self, password: str | None = None) -> str:
        extra = {"CHATFLOW_DEMO_PASSWORD": password} if password else {}
        self.extra_env.update(extra)
        return self.run_cmd("auth", "seed-demo")

    # ---- processes ----------------------------------------------------------------------------
    def _pump(self, name: str, stream: IO[bytes]) -> None:
        color = COLORS.get(name, 37)
        sink = self.log_file.open("ab") if self.log_file else None
        tty = sys.stdout.isatty()
        for line in iter(stream.readline, b""):
            text = line.decode(errors="replace").rstrip("\n")
            prefix = f"\033[{color}m{name:>9}\033[0m | " if tty else f"{name:>9} | "
            if self.echo:
                sys.stdout.write(prefix + text + "\n")
                sys.stdout.flush()
            if sink:
                sink.write(f"{name:>9} | {text}\n".encode())
                sink.flush()
        if sink:
            sink.close()

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        proc = subprocess.Popen(
            [sys.executable, *args],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        assert proc.stdout is not None
        threading.Thread(target=self._pump, args=(name, proc.stdout), daemon=True).start()

    def start_service(self, name: str) -> None:
        self._spawn(name, ["-m", f"services.{name}", "run"], self.env(name))

    def start(self, with_sink: bool = True) -> None:
        if with_sink:
            self._spawn(
                "smtp-sink",
                [
                    "-m",
                    "tools.smtp_sink",
                    "--port",
                    str(self.ports.sink),
                    "--maildir",
                    str(self.sink_dir),
                    "--cert",
                    str(self.certs / "server.pem"),
                    "--key",
                    str(self.certs / "server.key"),
                ],
                self.env("sender"),
            )
        for s in SERVICES:
            self.start_service(s)

    def ready_urls(self) -> dict[str, str]:
        p = self.ports
        return {
            "auth": f"https://127.0.0.1:{p.auth}/readyz",
            "ingest": f"https://127.0.0.1:{p.ingest}/readyz",
            "threader": f"https://127.0.0.1:{p.threader}/readyz",
            "sender": f"https://127.0.0.1:{p.sender}/readyz",
            "notifier": f"https://127.0.0.1:{p.notifier}/readyz",
            "gateway": f"https://127.0.0.1:{p.gateway_ops}/readyz",
        }

    def wait_ready(
        self,
        timeout: float = 60.0,
        only: tuple[str, ...] = SERVICES,
        stop: threading.Event | None = None,
    ) -> None:
        """Until every service in ``only`` answers ``/readyz``; returns early once ``stop``."""
        ctx = ssl.create_default_context(cafile=str(self.certs / "ca.pem"))
        deadline = time.monotonic() + timeout
        pending = {k: v for k, v in self.ready_urls().items() if k in only}
        while pending and time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                return
            for name, url in list(pending.items()):
                proc = self.procs.get(name)
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}")
                try:
                    with urllib.request.urlopen(url, context=ctx, timeout=2) as r:  # noqa: S310
                        if r.status == 200:
                            del pending[name]
                except Exception:  # noqa: S112
                    continue
            time.sleep(0.1)
        if pending:
            raise TimeoutError(f"not ready after {timeout}s: {sorted(pending)}")
        # Ready, and by our own processes: one that died meanwhile was not what answered.
        dead = [n for n in only if (pr := self.procs.get(n)) is not None and pr.poll() is not None]
        if dead:
            raise RuntimeError(f"exited while starting: {dead}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(15)

    def stop(self, timeout: float = 15.0) -> dict[str, int | None]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: dict[str, int | None] = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        return codes


class _Stopped(Exception):
    """Stopped on purpose before the stack was ready."""


def supervise(stack: Stack, stop: threading.Event, seeded: str, ready_timeout: float = 90.0) -> int:
    """Wait for the started stack, then until ``stop`` or a process exits; stop everything.

    Returns the exit code: 0 only when it started and was stopped on purpose (Ctrl-C).
    """
    rc = 0
    try:
        stack.wait_ready(ready_timeout, stop=stop)
        if stop.is_set():  # Ctrl-C while starting
            raise _Stopped
        print(
            "\nChatFLOW is running.\n"
            f"  web app + API   {stack.origin}  (CA: {stack.certs / 'ca.pem'})\n"
            f"  inbound SMTP    127.0.0.1:{stack.ports.smtp} (STARTTLS required)\n"
            f"  outbound sink   127.0.0.1:{stack.ports.sink} -> {stack.sink_dir}\n"
            f"{seeded.strip()}\n"
            "Ctrl-C stops everything.\n",
            flush=True,
        )
    except _Stopped:
        pass
    except Exception as exc:
        print(f"stack failed to start: {exc}", file=sys.stderr)
        rc = 1
        stop.set()
    while not stop.is_set():
        if any(pr.poll() is not None for pr in stack.procs.values()):
            dead = [n for n, pr in stack.procs.items() if pr.poll() is not None]
            print(f"service(s) exited: {dead}; stopping", file=sys.stderr)
            rc = 1
            break
        stop.wait(0.5)
    codes = stack.stop()
    print("stopped:", ", ".join(f"{k}={v}" for k, v in codes.items()))
    return rc


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.devstack")
    p.add_argument("cmd", choices=["run", "migrate"])
    a = p.parse_args(argv)
    try:
        stack = Stack(ports=Ports.from_env())
        if a.cmd == "run":
            check_ports(stack.ports)
    except (ValueError, PortsBusy) as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    try:
        stack.migrate()
    except Exception as exc:
        print(f"migration failed: {exc}", file=sys.stderr)
        sys.exit(1)
    print("migrated:", ", ".join(SERVICES))
    if a.cmd == "migrate":
        return
    seeded = stack.seed()
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stack.start()
    sys.exit(supervise(stack, stop, seeded))


if __name__ == "__main__":
    main()
