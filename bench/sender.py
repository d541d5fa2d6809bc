"""Outbound throughput: ``mail.send`` commands in, DKIM-signed 5 KB messages out at a local relay.

``python -m bench.sender --count 2000`` makes a database and a stream prefix of its own, a
2048-bit DKIM key, a STARTTLS relay (``bench/smtpsink.py``, or aiosmtpd with ``--sink aiosmtpd``;
in this process, on the dev certificate, under uvloop as the services run) and
starts ``python -m services.sender run`` against them (``--replicas`` of it). It publishes the
mailbox and one conversation, waits until the sender has them, then publishes ``count`` commands
at once and times from the first command to the last message accepted by the relay (250). The
relay checks the DKIM signature of a sample of messages with dkimpy, and that every message
came once (as many distinct Message-IDs as commands). Prints one JSON line:
``{"sent_per_s", "count", "dkim": true, ...}`` with the CPU each message cost the sender
processes (render workers included), the PostgreSQL backends of its database and the relay (this
process): on a shared machine those say more than the rate. Everything it made is removed
afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import dkim
import uvloop
from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bench import smtpsink
from libs.common import db, testing
from libs.common.bus import Bus, connect
from libs.common.events import (
    ConversationMessageAdded,
    ConversationState,
    MailboxChanged,
    MailSend,
    MessageSummary,
)
from libs.common.events import Envelope as Env
from libs.common.settings import ROOT
from libs.common.tls import server_context
from services.sender.service import SenderService
from services.sender.settings import SenderSettings
from services.sender.signing import public_record

SELECTOR = "bench"
DOMAIN = "chatflow.test"
MESSAGE_ID = re.compile(rb"^Message-ID:\s*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)
PARAGRAPH = "Thanks for writing in. We checked your order and it ships today from our warehouse. "


class Relay:
    """Accepts everything; keeps arrival times, sizes and a sample of raw messages."""

    def __init__(self, count: int, sample_every: int, pipelining: bool = True) -> None:
        self.pipelining = pipelining
        self.count = count
        self.sample_every = sample_every
        self.arrivals: list[float] = []
        self.sizes: list[int] = []
        self.samples: list[bytes] = []
        self.messages: list[bytes] = []  # all of them: their Message-IDs are counted afterwards
        self.done = asyncio.Event()

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        return testing.ehlo_pipelining(session, hostname, responses, self.pipelining)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.deliver(envelope.mail_from or "", envelope.rcpt_tos, envelope.original_content or b"")
        return "250 2.0.0 Ok: queued"

    def deliver(self, mail_from: str, rcpts: list[str], raw: bytes) -> None:
        self.arrivals.append(time.perf_counter())
        self.sizes.append(len(raw))
        self.messages.append(raw)
        if len(self.arrivals) % self.sample_every == 1:
            self.samples.append(raw)
        if len(self.arrivals) >= self.count:
            self.done.set()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(roots: list[int]) -> float:
    """CPU seconds of ``roots`` and every live descendant (the render workers)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    pids, todo = set(roots), list(roots)
    while todo:
        parent = todo.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in pids:
                pids.add(child)
                todo.append(child)
    return sum(_cpu_s(p) for p in pids)


async def backend_cpu_s(conn: asyncpg.Connection, db_name: str) -> float:
    """CPU seconds of the PostgreSQL backends serving the benchmark's database."""
    pids = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", db_name)
    return sum(_cpu_s(r["pid"]) for r in pids)


def html_for(size: int) -> str:
    """HTML whose composed message (text + html parts, headers, DKIM) is about ``size`` bytes."""
    # The plain-text alternative repeats the words: the html carries a bit under half the bytes.
    target = max(200, size // 2 - 900)
    body = (PARAGRAPH * (target // len(PARAGRAPH) + 1))[:target]
    return f"<p>{body}</p>"


async def _wait(predicate: Any, timeout: float, what: str) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


async def run(
    count: int,
    size: int,
    replicas: int,
    rsa_backend: str,
    extra_env: dict[str, str],
    pipelining: bool = True,
    sink: str = "lean",
) -> dict[str, Any]:
    run_id = testing.new_run_id()
    db_name = f"chatflow_bench_{run_id}_sender"
    prefix = f"bench{run_id}:"
    url = await testing.create_database(db_name)
    procs: list[subprocess.Popen[bytes]] = []
    redis = connect(testing.REDIS_URL)
    server: asyncio.AbstractServer | None = None
    tmp = tempfile.TemporaryDirectory(prefix="bench-sender-")
    try:
        settings = SenderSettings.load(database_url=url)
        await db.migrate(
            url,
            settings.own_database_url,
            settings.db_role,
            settings.db_schema,
            SenderService.migrations,
        )
        keys = Path(tmp.name)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        (keys / f"{DOMAIN}.{SELECTOR}.key").write_bytes(pem)
        record = public_record(pem)

        relay = Relay(count, max(1, count // 20), pipelining)
        relay_port = testing.free_port()
        ctx = server_context(ROOT / "var/certs/server.pem", ROOT / "var/certs/server.key")
        if sink == "aiosmtpd":
            server = await asyncio.get_running_loop().create_server(
                lambda: SMTP(
                    relay, hostname="relay.bench.test", tls_context=ctx, require_starttls=True
                ),
                host="127.0.0.1",
                port=relay_port,
            )
        else:
            server = await smtpsink.serve(
                relay.deliver,
                host="127.0.0.1",
                port=relay_port,
                hostname="relay.bench.test",
                tls_context=ctx,
                pipelining=pipelining,
            )

        ports = []
        for i in range(replicas):
            port = testing.free_port()
            ports.append(port)
            env = testing.service_env(
                url,
                prefix,
                CHATFLOW_SENDER_HTTP_PORT=str(port),
                CHATFLOW_SENDER_RELAY_PORT=str(relay_port),
                CHATFLOW_SENDER_DKIM_KEYS_DIR=str(keys),
                CHATFLOW_SENDER_DKIM_RSA=rsa_backend,
                CHATFLOW_LOG_LEVEL="WARNING",
                CHATFLOW_OUTBOX_POLL_MS="100",
                CHATFLOW_CONSUMER_BLOCK_MS="200",
                **extra_env,
            )
            log = Path(tmp.name) / f"sender{i}.log"
            procs.append(testing.start_python(["services.sender", "run"], env, log))
        for port, proc in zip(ports, procs, strict=True):

            async def up(port: int = port, proc: subprocess.Popen[bytes] = proc) -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"sender exited with {proc.returncode}")
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    return False
                w.close()
                return True

            await _wait(up, 30, "sender did not start")

        bus = Bus(redis, prefix)
        conv = str(uuid.uuid4())
        now = datetime.now(UTC)
        await bus.publish(
            Env.of(
                MailboxChanged(mailbox_id="mb-bench", address=f"support@{DOMAIN}", name="Support"),
                "bench",
            )
        )
        await bus.publish(
            Env.of(
                ConversationMessageAdded(
                    id_conversa=conv,
                    mailbox_id="mb-bench",
                    message=MessageSummary.model_validate(
                        {
                            "id": str(uuid.uuid4()),
                            "message_id": f"<{uuid.uuid4().hex}@customer.test>",
                            "direction": "in",
                            "from": {"name": "Zoe Customer", "address": "zoe@customer.test"},
                            "to": [{"address": f"support@{DOMAIN}"}],
                            "subject": "Where is my order?",
                            "date": now,
                        }
                    ),
                    conversation=ConversationState(
                        id_conversa=conv,
                        mailbox_id="mb-bench",
                        number=1042,
                        subject="Where is my order?",
                        last_message_at=now,
                    ),
                ),
                "bench",
            )
        )
        pool = await asyncpg.connect(
            settings.own_database_url, server_settings={"search_path": settings.db_schema}
        )
        try:

            async def has_view() -> bool:
                return bool(
                    await pool.fetchval(
                        "SELECT count(*) FROM thread_messages t JOIN mailboxes m ON m.id = t.mailbox_id"
                    )
                )

            await _wait(has_view, 30, "the sender never saw the conversation")
        finally:
            await pool.close()

        html = html_for(size)
        commands = [
            Env.of(
                MailSend(
                    send_id=str(uuid.uuid4()),
                    id_conversa=conv,
                    mailbox_id="mb-bench",
                    user_id="u-bench",
                    html=html,
                ),
                "bench",
            )
            for _ in range(count)
        ]
        entries = [(bus.stream("mail.send"), e.to_json()) for e in commands]
        admin = await asyncpg.connect(testing.ADMIN_URL)
        roots = [p.pid for p in procs]
        sender_cpu, pg_cpu = tree_cpu_s(roots), await backend_cpu_s(admin, db_name)
        own_cpu = time.process_time()
        started = time.perf_counter()
        for i in range(0, len(entries), 500):
            await bus.publish_raw(entries[i : i + 500])
        await asyncio.wait_for(relay.done.wait(), timeout=max(120, count / 5))
        elapsed = relay.arrivals[-1] - started
        # Every send's last state change (and its event) is committed just after its 250.
        await asyncio.sleep(0.5)
        sender_cpu = tree_cpu_s(roots) - sender_cpu
        pg_cpu = await backend_cpu_s(admin, db_name) - pg_cpu
        own_cpu = time.process_time() - own_cpu
        await admin.close()

        failed = 0
        statuses: Any = await redis.xrange(bus.stream("mail.status"))
        for _, fields in statuses:
            if Env.from_json(fields[b"e"]).payload["status"] == "failed":
                failed += 1
        verified = all(
            dkim.verify(raw, dnsfunc=lambda name, timeout=5: record) for raw in relay.samples
        )
        first = relay.arrivals[0] - started
        ids = {m.group(1) for raw in relay.messages if (m := MESSAGE_ID.search(raw))}
        return {
            "sent_per_s": round(count / elapsed, 1),
            "count": count,
            "dkim": verified and bool(relay.samples),
            "dkim_rsa": rsa_backend,
            "message_bytes": round(statistics.mean(relay.sizes)),
            "seconds": round(elapsed, 3),
            "first_message_s": round(first, 3),
            "steady_per_s": round((count - 1) / (relay.arrivals[-1] - relay.arrivals[0]), 1)
            if count > 1
            else None,
            "failed": failed,
            # Each command once at the relay, none twice: as many Message-IDs as messages.
            "distinct_message_ids": len(ids),
            # CPU per message: the sender processes (and their render workers), the PostgreSQL
            # backends of its database, and this process (the relay: aiosmtpd, DKIM checks).
            "sender_cpu_ms_per_msg": round(sender_cpu * 1000 / count, 3),
            "postgres_cpu_ms_per_msg": round(pg_cpu * 1000 / count, 3),
            "relay_cpu_ms_per_msg": round(own_cpu * 1000 / count, 3),
            "replicas": replicas,
            "relay_pipelining": pipelining,
            "sink": sink,
            "render_workers": int(extra_env.get("CHATFLOW_SENDER_RENDER_WORKERS", "0")),
            "cpus": os.cpu_count(),
        }
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

        async def exited() -> bool:
            return all(p.poll() is not None for p in procs)

        with contextlib.suppress(TimeoutError):
            await _wait(exited, 15, "")  # not blocking: the relay above answers their QUITs
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if server is not None:
            server.close()
        await testing.drop_prefix(prefix)
        await redis.aclose()
        await testing.drop_database(db_name)
        tmp.cleanup()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.sender", description=__doc__)
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--size", type=int, default=5000, help="approximate message size in bytes")
    p.add_argument("--replicas", type=int, default=1, help="sender processes")
    p.add_argument(
        "--render-workers",
        type=int,
        default=0,
        help="compose/sign processes per sender (render_workers); 0 = in its event loop "
        "(the default: composing is cheap enough that the hand-off to a process costs more)",
    )
    p.add_argument(
        "--rsa", choices=["openssl", "dkimpy"], default="openssl", help="DKIM RSA backend"
    )
    p.add_argument(
        "--no-pipelining",
        action="store_true",
        help="the relay does not offer PIPELINING (RFC 2920): one command per round trip",
    )
    p.add_argument(
        "--sink",
        choices=["lean", "aiosmtpd"],
        default="lean",
        help="the relay: bench/smtpsink.py (default) or aiosmtpd (~1 ms of CPU per message more)",
    )
    p.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="extra sender settings"
    )
    a = p.parse_args(argv)
    if a.count < 1:
        p.error("--count must be at least 1")
    extra = {"CHATFLOW_SENDER_RENDER_WORKERS": str(a.render_workers)}
    extra.update(item.split("=", 1) for item in a.env)
    result = uvloop.run(run(a.count, a.size, a.replicas, a.rsa, extra, not a.no_pipelining, a.sink))
    print(json.dumps(result), flush=True)
    ok = result["dkim"] and not result["failed"] and result["distinct_message_ids"] == a.count
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
