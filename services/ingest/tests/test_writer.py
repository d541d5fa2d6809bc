"""Group commit (``writer.py``) against the real database: batching, isolation, retries in a batch.

Jobs are built by ``IngestHandler.job`` exactly as SMTP builds them, and committed by a writer of
the test's own (one task), so how they group is decided by the test, not by timing: jobs handed
over in one scheduling round all wait in the queue before the writer task runs.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib

import aiosmtplib
import asyncpg
import pytest
from aiosmtpd.smtp import Session

from libs.common.outbox import Staged
from services.ingest.smtp import IngestEnvelope, IngestHandler, Prepared, writer_for
from services.ingest.tests.conftest import SUPPORT, Mx, message, new_mid
from services.ingest.writer import Job, Writer


async def _job(mx: Mx, raw: bytes) -> tuple[Job, Prepared]:
    handler = IngestHandler(mx.svc)
    envelope = IngestEnvelope()
    envelope.original_content = raw
    envelope.mail_from = "zoe@customer.test"
    box = mx.svc.mailboxes[SUPPORT]
    envelope.rcpt_tos.append(SUPPORT)
    envelope.boxes.append(box)
    session = Session(asyncio.get_running_loop())
    prepared = await handler.prepare(session, envelope)
    assert isinstance(prepared, Prepared)
    return handler.job(prepared, [box], session, envelope), prepared


def _writer(mx: Mx) -> tuple[Writer, list[int]]:
    """A writer of the test's own; ``wakes`` counts its publishes (one per commit)."""
    wakes: list[int] = []

    async def publish(staged: Staged) -> None:
        wakes.append(1)
        await mx.svc.relay.publish(staged)

    return Writer(mx.svc.pool, publish, tasks=1), wakes


async def _outbox_rows_for(mx: Mx, mids: list[str]) -> int:
    """``mail.received`` rows committed for these Message-IDs (in the outbox or already relayed)."""
    await mx.drained()
    events = await mx.events()
    return sum(1 for e in events if e.payload["message_id"] in {f"<{m}>" for m in mids})


async def test_jobs_waiting_together_commit_in_one_transaction(mx: Mx) -> None:
    writer, wakes = _writer(mx)
    mids = [new_mid("batch") for _ in range(12)]
    jobs = [(await _job(mx, message(m)))[0] for m in mids]
    results = await asyncio.gather(*(writer.write(j) for j in jobs))
    assert (writer.batches, writer.jobs, writer.fallbacks) == (1, 12, 0)
    assert wakes == [1]  # published once, after the commit
    assert all(new for ((_, new),) in results)
    for mid, ((id_, _),) in zip(mids, results, strict=True):
        (row,) = await mx.stored(mid)
        assert str(row["id"]) == id_
    assert await _outbox_rows_for(mx, mids) == 12


async def test_a_bad_delivery_costs_only_its_own_job(mx: Mx) -> None:
    writer, _ = _writer(mx)
    mids = [new_mid("isolated") for _ in range(5)]
    jobs = [(await _job(mx, message(m)))[0] for m in mids]
    jobs[2].copies[0].row.status = "bogus"  # violates the table's CHECK: the batch fails
    results = await asyncio.gather(*(writer.write(j) for j in jobs), return_exceptions=True)
    assert isinstance(results[2], asyncpg.CheckViolationError)
    assert all(isinstance(r, list) and r[0][1] for i, r in enumerate(results) if i != 2)
    assert (writer.batches, writer.fallbacks) == (1, 1)
    assert [len(await mx.stored(m)) for m in mids] == [1, 1, 0, 1, 1]
    assert await _outbox_rows_for(mx, mids) == 4


async def test_the_same_message_twice_in_one_batch_is_stored_and_announced_once(mx: Mx) -> None:
    writer, _ = _writer(mx)
    mid = new_mid("twice")
    raw = message(mid)
    jobs = [(await _job(mx, raw))[0] for _ in range(3)]
    results = await asyncio.gather(*(writer.write(j) for j in jobs))
    assert writer.batches == 1
    ids = {r[0][0] for r in results}
    assert len(ids) == 1
    assert [r[0][1] for r in results] == [True, False, False]
    assert len(await mx.stored(mid)) == 1
    assert await _outbox_rows_for(mx, [mid]) == 1
    # And a later batch (another writer, as another replica would be) sees the stored one.
    other, _ = _writer(mx)
    ((again, new),) = await other.write((await _job(mx, raw))[0])
    assert (again, new) == (ids.pop(), False)


async def test_a_failed_job_is_an_exception_for_its_session_and_nothing_is_kept(mx: Mx) -> None:
    writer, _ = _writer(mx)
    mid = new_mid("alone")
    job, _ = await _job(mx, message(mid))
    job.copies[0].row.raw_sha256 = "not-a-stored-blob"  # its blob is missing (FK)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await writer.write(job)
    assert await mx.stored(mid) == []


async def test_smtp_sessions_share_the_services_writer(mx: Mx) -> None:
    writer = writer_for(mx.svc)
    assert writer_for(mx.svc) is writer
    before = writer.jobs

    async def one(i: int) -> None:
        async with aiosmtplib.SMTP(
            hostname="127.0.0.1", port=mx.port, start_tls=True, tls_context=mx.ca, timeout=15
        ) as c:
            await c.sendmail("zoe@customer.test", [SUPPORT], message(new_mid(f"shared{i}")))

    await asyncio.gather(*(one(i) for i in range(8)))
    assert writer.jobs - before == 8


def _with_attachment(mid: str, data: bytes) -> bytes:
    body = base64.b64encode(data)
    return message(
        mid,
        headers=b'Content-Type: multipart/mixed; boundary="b1"\r\nMIME-Version: 1.0\r\n',
        body=b"--b1\r\nContent-Type: text/plain\r\n\r\nSee the invoice.\r\n"
        b'--b1\r\nContent-Type: application/pdf; name="invoice.pdf"\r\n'
        b"Content-Disposition: attachment\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + body
        + b"\r\n--b1--\r\n",
    )


async def test_attachments_are_stored_for_new_messages_only(mx: Mx) -> None:
    """The one-statement batch inserts attachment rows (and blobs) for the copies it inserts,
    none for a retry in the same batch or a later one; two messages sharing a file share its blob."""
    writer, _ = _writer(mx)
    pdf = b"%PDF-1.4 " + new_mid("pdf").encode()
    a, b = new_mid("att-a"), new_mid("att-b")
    jobs = [(await _job(mx, _with_attachment(m, pdf)))[0] for m in (a, a, b)]
    results = await asyncio.gather(*(writer.write(j) for j in jobs))
    assert writer.batches == 1
    assert [r[0][1] for r in results] == [True, False, True]
    (retry,) = await writer.write((await _job(mx, _with_attachment(a, pdf)))[0])
    assert retry == (results[0][0][0], False)
    rows = await mx.pool.fetch(
        """SELECT a.message_id, a.filename, a.size, b.data FROM attachments a
           JOIN blobs b ON b.sha256 = a.sha256 WHERE a.message_id = ANY($1::uuid[])""",
        [results[0][0][0], results[2][0][0]],
    )
    assert sorted((str(r["message_id"]), r["filename"], r["data"]) for r in rows) == sorted(
        (results[i][0][0], "invoice.pdf", pdf) for i in (0, 2)
    )
    digest = hashlib.sha256(pdf).hexdigest()
    assert await mx.pool.fetchval("SELECT count(*) FROM blobs WHERE sha256 = $1", digest) == 1
    assert await _outbox_rows_for(mx, [a, b]) == 2
