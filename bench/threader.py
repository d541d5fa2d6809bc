"""Threading at scale: a million messages already stored, then new mail through the consumer.

``python -m bench.threader --messages 1000000`` (or ``make bench BENCH_ARGS="--only threader"``)
makes a database and a stream prefix of its own, migrates the threader's schema and bulk-loads
generated conversations with COPY (one mailbox: the worst case for the list; four messages per
conversation; search vectors, thread keys and activity rows as the service writes them). Then:

- ``threaded_per_s``: ``--thread`` new ``mail.received`` events (replies to stored
  conversations, new conversations, mail with no link that the subject fallback places) are
  published at once and ``python -m services.threader run`` threads them; timed from its first
  to its last committed event (``processed_events``), with the service's CPU per message;
- ``list_p99_ms`` / ``search_*_p99_ms``: the conversation list (first page of 25, as the API
  asks it: snapshot + page in one transaction) and full-text searches for a rare and a common
  word, ``--queries`` times each, on a pool of the service's own role.

Prints one JSON line; everything it made is removed afterwards (``--keep`` keeps the database).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import io
import json
import os
import random
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from bench.sender import backend_cpu_s
from libs.common import db, testing
from libs.common.bus import connect
from libs.common.events import Envelope, MailReceived
from services.threader import storage
from services.threader.domain.fallback import subject_key
from services.threader.service import ThreaderService
from services.threader.settings import ThreaderSettings

MAILBOX = "mb-bench"
SUPPORT = "support@chatflow.test"
PER_CONVERSATION = 4
# fmt: off
WORDS = [
    "order", "invoice", "refund", "delivery", "account", "password", "printer", "tablet",
    "pedido", "entrega", "fatura", "reembolso", "senha", "conta", "garantia", "troca",
    "broken", "late", "missing", "charge", "upgrade", "cancel", "address", "shipping",
]
# fmt: on
NULL = "\\N"  # what COPY reads as NULL (an empty field is an empty string)
RARE = "zanzibarite"  # one conversation in 20,000 carries it
NOW = datetime.now(UTC).replace(microsecond=0)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def customer(i: int) -> tuple[str, str]:
    """Name and address of customer i (50 customers per company domain)."""
    return f"Customer {i}", f"c{i}@co{i // 50}.test"


def subject_of(conv: int) -> str:
    rng = random.Random(conv)
    return f"{rng.choice(WORDS).title()} {rng.choice(WORDS)} {conv % 9973}"


def _csv(rows: Iterator[list[Any]]) -> Iterator[bytes]:
    """CSV lines for COPY, in chunks of about 1 MB."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for row in rows:
        w.writerow([NULL if v is None else v for v in row])
        if buf.tell() > 1 << 20:
            yield buf.getvalue().encode()
            buf.seek(0)
            buf.truncate()
    if buf.tell():
        yield buf.getvalue().encode()


class _Source:
    """An async iterator over bytes chunks for asyncpg's copy_to_table."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks

    def __aiter__(self) -> _Source:
        return self

    async def __anext__(self) -> bytes:
        try:
            return next(self.chunks)
        except StopIteration:
            raise StopAsyncIteration from None


def _lexemes(conv: int, subject: str, addr: str) -> str:
    words = {w.lower() for w in subject.split()} | {"customer", str(conv // 4 % 50_000)}
    words |= {p for p in addr.replace("@", " ").replace(".", " ").split()}
    words |= set(random.Random(conv * 7).sample(WORDS, 4))
    if conv % 20_000 == 7:
        words.add(RARE)
    return " ".join(f"'{w}'" for w in sorted(words))


def _jsonb(name: str, addr: str) -> str:
    return json.dumps({"name": name, "address": addr})


async def load(url: str, schema: str, messages: int) -> dict[str, Any]:
    """COPY ``messages`` messages in conversations of four; returns sizes and seconds."""
    convs = max(1, messages // PER_CONVERSATION)
    start = time.perf_counter()
    conn = await asyncpg.connect(url)
    try:

        def conversations() -> Iterator[list[Any]]:
            for c in range(convs):
                name, addr = customer(c % 50_000)
                last = NOW - timedelta(minutes=convs - c)
                participants = json.dumps(
                    [{"name": name, "address": addr}, {"name": "", "address": SUPPORT}]
                )
                subj = subject_of(c)
                yield [
                    str(uuid.UUID(int=c + 1)), c + 1, MAILBOX, "email", subj,
                    ["open", "pending", "closed"][c % 3], last - timedelta(hours=3), last,
                    last, PER_CONVERSATION, participants, _lexemes(c, subj, addr), c + 1,
                ]  # fmt: skip

        await conn.copy_to_table(
            "conversations",
            schema_name=schema,
            source=_Source(_csv(conversations())),
            format="csv",
            null=NULL,
            columns=[
                "id_conversa", "number", "mailbox_id", "channel", "subject", "status",
                "created_at", "last_message_at", "last_inbound_at", "message_count",
                "participants", "search", "activity_seq",
            ],
        )  # fmt: skip
        loaded_convs = time.perf_counter()

        def message_rows() -> Iterator[list[Any]]:
            for c in range(convs):
                name, addr = customer(c % 50_000)
                subj = subject_of(c)
                key = subject_key(subj)
                last = NOW - timedelta(minutes=convs - c)
                ids = [f"<m{c}.{k}@co{(c % 50_000) // 50}.test>" for k in range(PER_CONVERSATION)]
                for k in range(PER_CONVERSATION):
                    out = k % 2 == 1
                    mid = f"<o{c}.{k}.{c + 1}-aaaaaaaaaa@chatflow.test>" if out else ids[k]
                    ids[k] = mid
                    frm = _jsonb("", SUPPORT) if out else _jsonb(name, addr)
                    to = json.dumps(
                        [json.loads(_jsonb(name, addr) if out else _jsonb("", SUPPORT))]
                    )
                    refs = "{" + ",".join(f'"{i}"' for i in ids[:k]) + "}"
                    irt = "{" + (f'"{ids[k - 1]}"' if k else "") + "}"
                    yield [
                        str(uuid.UUID(int=(c << 3) + k + 1)), str(uuid.UUID(int=c + 1)), MAILBOX,
                        "email", mid, "out" if out else "in", frm, to, "[]",
                        ("Re: " if k else "") + subj,
                        last - timedelta(hours=3 * (PER_CONVERSATION - 1 - k)),
                        f"Message {k} about {subj}. Thanks, {name}.", "", "[]",
                        "sent" if out else None, irt, refs, "{}", key, k == 0, k > 0,
                    ]  # fmt: skip

        await conn.copy_to_table(
            "messages",
            schema_name=schema,
            source=_Source(_csv(message_rows())),
            format="csv",
            null=NULL,
            columns=[
                "id", "id_conversa", "mailbox_id", "channel", "message_id", "direction", "sender",
                "to_addrs", "cc_addrs", "subject", "date", "text_body", "html_body",
                "attachments", "status", "in_reply_to", "refs", "flags", "subject_key", "loose",
                "marked",
            ],
        )  # fmt: skip
        loaded_msgs = time.perf_counter()
        # Every message's own id is a key of its conversation (the references are among them).
        await conn.execute(
            f"""INSERT INTO {schema}.thread_keys (mailbox_id, message_id, id_conversa)
                SELECT mailbox_id, message_id, id_conversa FROM {schema}.messages"""
        )
        await conn.execute(
            f"""INSERT INTO {schema}.thread_keys (mailbox_id, message_id, id_conversa)
                SELECT mailbox_id, message_id || '#' ||
                       split_part(split_part(to_addrs -> 0 ->> 'address', '@', 2), '>', 1),
                       id_conversa
                FROM {schema}.messages WHERE direction = 'out'"""
        )
        await conn.execute(
            f"""INSERT INTO {schema}.activity (seq, id_conversa, last_message_at)
                SELECT activity_seq, id_conversa, last_message_at FROM {schema}.conversations"""
        )
        await conn.execute(f"SELECT setval('{schema}.activity_seq', $1)", convs + 1)
        await conn.execute(
            f"SELECT setval(pg_get_serial_sequence('{schema}.conversations', 'number'), $1)",
            convs + 1,
        )
        keys_done = time.perf_counter()
        await conn.execute(f"VACUUM ANALYZE {schema}.conversations")
        await conn.execute(f"VACUUM ANALYZE {schema}.messages")
        await conn.execute(f"VACUUM ANALYZE {schema}.thread_keys")
        await conn.execute(f"VACUUM ANALYZE {schema}.activity")
        size = await conn.fetchval(
            "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1"
            " AND c.relkind = 'r'",
            schema,
        )
    finally:
        await conn.close()
    end = time.perf_counter()
    return {
        "messages": convs * PER_CONVERSATION,
        "conversations": convs,
        "load_s": round(end - start, 1),
        "load_conversations_s": round(loaded_convs - start, 1),
        "load_messages_s": round(loaded_msgs - loaded_convs, 1),
        "load_keys_activity_s": round(keys_done - loaded_msgs, 1),
        "vacuum_analyze_s": round(end - keys_done, 1),
        "schema_mb": round(int(size) / 2**20),
    }


def new_mail(i: int, convs: int, rng: random.Random) -> MailReceived:
    """40% replies to a stored conversation, 40% new conversations, 20% with no link at all
    whose subject matches their customer's stored conversation (the subject fallback)."""
    kind = i % 5
    c = rng.randrange(convs)
    name, addr = customer(c % 50_000)
    refs: list[str] = []
    subj = f"Re: {subject_of(c)}"
    if kind in (0, 1):
        refs = [f"<m{c}.0@co{(c % 50_000) // 50}.test>"]
    elif kind in (2, 3):
        name, addr = f"New {i}", f"n{i}@new{i % 997}.test"
        subj = f"{rng.choice(WORDS).title()} question {i}"
    return MailReceived.model_validate(
        {
            "ingest_id": uuid.uuid4().hex,
            "mailbox_id": MAILBOX,
            "mailbox_address": SUPPORT,
            "message_id": f"<bench{i}.{uuid.uuid4().hex[:8]}@{addr.split('@')[1]}>",
            "in_reply_to": refs[-1:],
            "references": refs,
            "from": {"name": name, "address": addr},
            "to": [{"address": SUPPORT}],
            "subject": subj,
            "date": NOW,
            "received_at": NOW,
            "text": f"Hello, this is message {i}. " * 8,
        }
    )


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:13]) / os.sysconf("SC_CLK_TCK")


async def thread_run(url: str, prefix: str, schema: str, count: int, convs: int) -> dict[str, Any]:
    """Publish ``count`` mail.received at once; time the service threading all of them."""
    redis = connect(testing.REDIS_URL)
    rng = random.Random(42)
    envs = [Envelope.of(new_mail(i, convs, rng), producer="ingest") for i in range(count)]
    for i in range(0, count, 500):
        async with redis.pipeline(transaction=False) as pipe:
            for env in envs[i : i + 500]:
                pipe.xadd(f"{prefix}mail.received", {"e": env.to_json()})
            await pipe.execute()
    tmp = tempfile.TemporaryDirectory(prefix="bench-threader-")
    log = Path(tmp.name) / "threader.log"
    service_env = testing.service_env(
        url,
        prefix,
        CHATFLOW_THREADER_HTTP_PORT=str(testing.free_port()),
        CHATFLOW_LOG_LEVEL="WARNING",
        CHATFLOW_CONSUMER_BLOCK_MS="200",
    )
    proc = testing.start_python(["services.threader", "run"], service_env, log)
    conn = await asyncpg.connect(url)
    db_name = urlsplit(url).path.lstrip("/")
    pg0 = pg = 0.0
    try:
        start = cpu0 = None
        first_at = 0.0
        deadline = time.monotonic() + max(600.0, count / 5)
        done = 0
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"threader exited: {log.read_text()[-2000:]}")
            done = await conn.fetchval(
                f"SELECT count(*) FROM {schema}.processed_events WHERE consumer = 'threader'"
            )
            if done and start is None:
                start, first_at, cpu0 = done, time.perf_counter(), _cpu(proc.pid)
                pg0 = await backend_cpu_s(conn, db_name)
            if done >= count:
                break
            await asyncio.sleep(0.2)
        elapsed = time.perf_counter() - first_at
        cpu = _cpu(proc.pid) - (cpu0 or 0.0)
        pg = await backend_cpu_s(conn, db_name) - pg0  # the service's backends (and this poll)
        span = await conn.fetchrow(
            f"""SELECT min(processed_at) AS a, max(processed_at) AS b, count(*) AS n
                FROM {schema}.processed_events WHERE consumer = 'threader'"""
        )
    finally:
        await conn.close()
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
        if proc.poll() is None:
            proc.kill()
        await testing.drop_prefix(prefix)
        await redis.aclose()
        tmp.cleanup()
    db_span = (span["b"] - span["a"]).total_seconds() if span["n"] > 1 else float("nan")
    n = int(span["n"])
    return {
        "threaded": n,
        "threaded_per_s": round((n - 1) / db_span, 1) if db_span == db_span and db_span else None,
        "poll_elapsed_s": round(elapsed, 2),
        "service_cpu_ms_per_msg": round(1000 * cpu / max(1, n - (start or 0)), 3),
        "postgres_cpu_ms_per_msg": round(1000 * pg / max(1, n - (start or 0)), 3),
        "complete": n >= count,
    }


async def queries(own_url: str, schema: str, n: int) -> dict[str, Any]:
    """List and search latency as the API runs them (snapshot + page in one transaction)."""
    pool = await db.connect_pool(own_url, schema, 1, 2)
    out: dict[str, Any] = {}
    try:
        for label, q in (("list", None), ("search_rare", RARE), ("search_common", "refund")):
            times: list[float] = []
            rows = 0
            for _ in range(n):
                t0 = time.perf_counter()
                async with pool.acquire() as conn, conn.transaction():
                    as_of = await storage.snapshot(conn, [MAILBOX])
                    page = await storage.list_conversations(
                        conn,
                        user_id="agent-1",
                        mailboxes=[MAILBOX],
                        status=None,
                        q=q,
                        after=None,
                        limit=26,
                        as_of=as_of,
                    )
                times.append(time.perf_counter() - t0)
                rows = len(page)
            out[f"{label}_p50_ms"] = round(1000 * statistics.median(times), 2)
            out[f"{label}_p99_ms"] = round(1000 * pct(times, 99), 2)
            out[f"{label}_rows"] = rows
    finally:
        await pool.close()
    return out


async def run(a: argparse.Namespace) -> dict[str, Any]:
    run_id = testing.new_run_id()
    name = f"chatflow_bench_threader_{run_id}"
    url = await testing.create_database(name)
    prefix = f"benchthr{run_id}:"
    try:
        s = ThreaderSettings.load(database_url=url, stream_prefix=prefix)
        await db.migrate(
            s.database_url, s.own_database_url, s.db_role, s.db_schema, ThreaderService.migrations
        )
        report: dict[str, Any] = {"bench": "threader", **await load(url, s.db_schema, a.messages)}
        report["queries_before"] = await queries(s.own_database_url, s.db_schema, a.queries)
        convs = report["conversations"]
        report.update(await thread_run(url, prefix, s.db_schema, a.thread, convs))
        report.update(await queries(s.own_database_url, s.db_schema, a.queries))
        report["machine"] = f"{os.cpu_count()} cores, shared with other work"
        return report
    finally:
        if not a.keep:
            await testing.drop_database(name)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--messages", type=int, default=1_000_000, help="messages stored before")
    p.add_argument("--thread", type=int, default=5000, help="new messages to thread")
    p.add_argument("--queries", type=int, default=300, help="samples per query kind")
    p.add_argument("--keep", action="store_true", help="keep the database afterwards")
    p.add_argument("--out", help="also write the report (JSON) to this file")
    a = p.parse_args(argv)
    report = asyncio.run(run(a))
    print(json.dumps(report), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
