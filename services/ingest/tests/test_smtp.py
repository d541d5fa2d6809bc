"""Ingest as an MX: the real IngestService, real SMTP/LMTP over real sockets, the real database.

Most tests share one in-process service (``mx`` in conftest, small limits); the kill test runs
``python -m services.ingest`` as a separate process and SIGKILLs it mid-stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import signal
import ssl
import time
import uuid
import warnings
from collections import Counter
from pathlib import Path

import aiosmtplib
import asyncpg
import pytest

from libs.common import db, testing
from libs.common.bus import connect
from libs.common.settings import ROOT
from services.ingest import storage
from services.ingest.settings import IngestSettings
from services.ingest.smtp import IngestHandler, normalize_line_endings
from services.ingest.tests.conftest import SALES, SUPPORT, Mx, Raw, message, new_mid, wait_port

FROM = "zoe@customer.test"


def client(mx: Mx, *, tls_: bool = True) -> aiosmtplib.SMTP:
    return aiosmtplib.SMTP(
        hostname="127.0.0.1", port=mx.port, start_tls=tls_, tls_context=mx.ca, timeout=15
    )


async def send(mx: Mx, raw: bytes, rcpts: list[str] | None = None) -> str:
    """One message on a fresh TLS connection; the server's 250 text."""
    async with client(mx) as c:
        _, text = await c.sendmail(FROM, rcpts or [SUPPORT], raw)
    return text


# ---- 1. TLS, limits, pipelining, recipients ---------------------------------------------------


async def test_starttls_is_required_before_mail(mx: Mx) -> None:
    plain = client(mx, tls_=False)
    await plain.connect()
    ehlo = await plain.ehlo()
    assert "STARTTLS" in ehlo.message
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await plain.mail(FROM)
    assert refused.value.code == 530
    assert "STARTTLS" in refused.value.message
    await plain.quit()
    mid = new_mid("tls")
    assert "queued as" in await send(mx, message(mid))
    assert len(await mx.stored(mid)) == 1


async def test_starttls_inside_tls_is_refused_and_the_session_goes_on(mx: Mx) -> None:
    """A second STARTTLS would start a handshake inside TLS and kill the session (found by a
    trial; stock aiosmtpd answers 220 too)."""
    s = await mx.raw()
    assert (await s.cmd("EHLO client.customer.test"))[0] == 250
    code, lines = await s.cmd("STARTTLS")
    assert code == 503 and "already" in lines[0]
    assert (await s.cmd("NOOP"))[0] == 250
    code, lines = await s.cmd("HELP STARTTLS")
    assert code == 250 and "STARTTLS" in lines[0]
    s.close()


def _tls11_context(mx: Mx) -> ssl.SSLContext:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ssl.create_default_context(cafile=str(mx.settings.tls_ca))
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    return ctx


async def test_a_tls_1_1_client_fails_the_handshake(
    mx: Mx, caplog: pytest.LogCaptureFixture
) -> None:
    old = _tls11_context(mx)
    # Control: the same client does complete TLS 1.1 with a server that allows it, so the
    # failure below is our server's refusal, not a client that cannot speak 1.1.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        lax = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        lax.minimum_version = ssl.TLSVersion.TLSv1
        lax.set_ciphers("DEFAULT:@SECLEVEL=0")
    lax.load_cert_chain(ROOT / "var/certs/server.pem", ROOT / "var/certs/server.key")
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=lax)
    port = server.sockets[0].getsockname()[1]
    _, w = await asyncio.open_connection("127.0.0.1", port, ssl=old, server_hostname="127.0.0.1")
    assert w.get_extra_info("ssl_object").version() == "TLSv1.1"
    w.close()
    server.close()

    s = await mx.raw(tls_=False)
    assert (await s.cmd("STARTTLS"))[0] == 220
    with caplog.at_level(logging.INFO):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await s.w.start_tls(old, server_hostname="127.0.0.1")
        s.close()
        # The client's fault: an info line, no error with a traceback per attempt.
        await testing.eventually(
            lambda: any(r.getMessage() == "TLS handshake failed" for r in caplog.records)
        )
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    modern = await mx.raw()  # and TLS 1.2+ still works
    assert modern.w.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
    modern.close()


async def test_size_is_advertised_and_enforced(mx: Mx) -> None:
    limit = mx.settings.smtp_max_message_bytes
    s = await Raw.open(mx.port)
    code, lines = await s.cmd("EHLO client.customer.test")
    assert f"SIZE {limit}" in lines
    await s.starttls(mx.ca)
    code, lines = await s.cmd(f"MAIL FROM:<{FROM}> SIZE={limit + 1}")
    assert code == 552 and str(limit) in lines[0], lines
    # Declared small, sent big: refused at the end of DATA, and the session goes on.
    assert (await s.cmd(f"MAIL FROM:<{FROM}> SIZE=1000"))[0] == 250
    assert (await s.cmd(f"RCPT TO:<{SUPPORT}>"))[0] == 250
    assert (await s.cmd("DATA"))[0] == 354
    big = new_mid("big")
    body = (b"x" * 900 + b"\r\n") * (limit // 900 + 10)
    await s.send(message(big, body=body) + b".\r\n")
    code, lines = await s.reply()
    assert code == 552 and "Too much mail data" in lines[0], lines
    assert (await s.cmd(f"MAIL FROM:<{FROM}>"))[0] == 250
    assert (await s.cmd(f"RCPT TO:<{SUPPORT}>"))[0] == 250
    assert (await s.cmd("DATA"))[0] == 354
    ok = new_mid("afterbig")  # just under the limit (and read off the loop, in a thread)
    body = (b"o" * 900 + b"\r\n") * (limit * 8 // 10 // 902)
    await s.send(message(ok, body=body) + b".\r\n")
    assert (await s.reply())[0] == 250
    s.close()
    assert await mx.stored(big) == []
    (row,) = await mx.stored(ok)
    assert limit * 0.75 < len(row["raw"]) < limit


async def test_recipients_past_the_limit_get_452_and_plus_tags_reach_the_base_mailbox(
    mx: Mx,
) -> None:
    mid = new_mid("rcpts")
    async with client(mx) as c:
        await c.mail(FROM)
        limit = mx.settings.smtp_max_recipients
        for i in range(limit):
            assert (await c.rcpt(f"support+ticket{i}@chatflow.test")).code == 250
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await c.rcpt(f"support+ticket{limit}@chatflow.test")
        assert refused.value.code == 452
        assert (await c.data(message(mid, to="support+ticket0@chatflow.test"))).code == 250
    rows = await mx.stored(mid)
    assert [r["mailbox_id"] for r in rows] == ["mb-support"]  # five tags, one mailbox, once
    assert rows[0]["rcpt"].count("support+ticket") == limit


async def test_unknown_recipients_get_550_saying_we_do_not_relay(mx: Mx) -> None:
    async with client(mx) as c:
        await c.mail(FROM)
        for rcpt in ("nobody@chatflow.test", "someone@elsewhere.test", "nobody+support@x.test"):
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
                await c.rcpt(rcpt)
            assert refused.value.code == 550
            assert "no such mailbox here" in refused.value.message
            assert "does not relay" in refused.value.message


async def test_postmaster_is_accepted_for_our_domains_only(mx: Mx) -> None:
    """RFC 5321 4.5.1: postmaster, bare or at a domain we serve, in any case, is delivered (to
    the configured mailbox, else the domain's first by address); at another domain it is relay."""
    mids = [new_mid("pm") for _ in range(3)]
    for mid, rcpt in zip(
        mids, ("postmaster@chatflow.test", "PostMaster", "POSTMASTER@ChatFlow.Test"), strict=True
    ):
        assert "queued as" in await send(mx, message(mid), [rcpt])
    first = min(a for a in mx.svc.mailboxes if a.endswith("@chatflow.test"))
    for mid in mids:
        assert [r["mailbox_id"] for r in await mx.stored(mid)] == [mx.svc.mailboxes[first].id]
    async with client(mx) as c:
        await c.mail(FROM)
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await c.rcpt("postmaster@elsewhere.test")
        assert refused.value.code == 550
    handler = IngestHandler(mx.svc)
    saved = mx.svc.settings
    mx.svc.settings = saved.model_copy(update={"smtp_postmaster": SUPPORT.upper()})
    try:
        box = handler.postmaster("postmaster@chatflow.test")
        assert box is not None and box.address == SUPPORT
    finally:
        mx.svc.settings = saved


async def test_null_sender_bounces_are_accepted(mx: Mx) -> None:
    mid = new_mid("dsn")
    async with client(mx) as c:
        assert (await c.mail("")).code == 250  # MAIL FROM:<>, as every bounce is sent
        assert (await c.rcpt(SUPPORT)).code == 250
        assert (await c.data(message(mid))).code == 250
    assert len(await mx.stored(mid)) == 1


async def test_header_count_line_length_and_hops_are_refused_at_end_of_data(mx: Mx) -> None:
    settings = mx.settings
    many = b"".join(b"X-Filler-%d: y\r\n" % i for i in range(settings.smtp_max_header_fields))
    hops = b"".join(
        b"Received: from hop%d.test by mx; Tue, 1 Dec 2026 10:00:00 +0000\r\n" % i
        for i in range(settings.smtp_max_received_headers + 1)
    )
    long_line = b"y" * (settings.smtp_max_line_length + 1) + b"\r\n"
    cases = [
        (message(new_mid("hdrs"), headers=many), 554, "header fields"),
        (message(new_mid("hops"), headers=hops), 554, "mail loop"),
        (
            message(new_mid("long"), body=long_line),
            500,
            f"Line too long: the limit is {settings.smtp_max_line_length} octets",
        ),
        # Past aiosmtpd's own reader bound (a memory cap): the same refusal, same text.
        (
            message(new_mid("huge"), body=b"z" * 70_000 + b"\r\n"),
            500,
            f"Line too long: the limit is {settings.smtp_max_line_length} octets",
        ),
        # A long line made of LF-separated short lines is not long: it is normalized first.
        (message(new_mid("lfok"), body=b"short line\n" * 200 + b"\r\n"), 250, "queued"),
    ]
    raw = await mx.raw()
    for data, code, text in cases:
        assert (await raw.cmd(f"MAIL FROM:<{FROM}>"))[0] == 250
        assert (await raw.cmd(f"RCPT TO:<{SUPPORT}>"))[0] == 250
        assert (await raw.cmd("DATA"))[0] == 354
        await raw.send(data + b".\r\n")
        got, lines = await raw.reply()
        assert (got, text in lines[0]) == (code, True), lines
        mid = data.split(b"Message-ID: <", 1)[1].split(b">", 1)[0].decode()
        assert len(await mx.stored(mid)) == (1 if code == 250 else 0)
    raw.close()


async def test_a_silent_tls_handshake_is_dropped_without_plaintext(
    mx: Mx, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session timer must not write its 421 into a handshake: the handshake's own timeout
    (the idle time) ends it, with nothing in clear after the 220 (found by a trial)."""
    monkeypatch.setattr(mx.settings, "smtp_idle_timeout_s", 0.6)
    s = await Raw.open(mx.port)
    await s.cmd("EHLO client.customer.test")
    assert (await s.cmd("STARTTLS"))[0] == 220
    t0 = time.monotonic()
    assert await s.eof(timeout=5)  # closed, and read() gave no bytes before the end
    assert time.monotonic() - t0 < 3.0
    mid = new_mid("after-silent-handshake")
    assert "queued as" in await send(mx, message(mid))


async def test_idle_and_slow_sessions_are_closed_with_421(
    mx: Mx, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mx.settings, "smtp_idle_timeout_s", 0.6)
    monkeypatch.setattr(mx.settings, "smtp_session_max_s", 1.5)
    # Idle after EHLO.
    idle = await Raw.open(mx.port)
    await idle.cmd("EHLO client.customer.test")
    t0 = time.monotonic()
    code, lines = await idle.reply(timeout=5)
    assert code == 421 and "idle" in lines[0], lines
    assert 0.4 < time.monotonic() - t0 < 2.0
    assert await idle.eof()
    # A slowloris DATA: bytes keep coming, but DATA must finish within the idle time.
    slow = await mx.raw()
    await slow.cmd(f"MAIL FROM:<{FROM}>")
    await slow.cmd(f"RCPT TO:<{SUPPORT}>")
    assert (await slow.cmd("DATA"))[0] == 354
    got: tuple[int, list[str]] | None = None
    for _ in range(20):
        try:
            await slow.send(b"X-Slow: still sending\r\n")
            got = await slow.reply(timeout=0.25)
            break
        except TimeoutError:
            continue
    assert got is not None and got[0] == 421, got
    # Busy but endless: NOOPs reset the idle timer, the session cap still ends it.
    busy = await mx.raw()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5:
        with contextlib.suppress(ConnectionError):  # closed already: its 421 is still buffered
            await busy.send("NOOP\r\n")
        code, lines = await busy.reply()
        if code != 250:
            break
        await asyncio.sleep(0.2)
    assert code == 421 and "session time limit" in lines[0], (code, lines)
    assert 1.2 < time.monotonic() - t0 < 3.0


async def test_pipelined_mail_rcpt_rcpt_data_works(mx: Mx) -> None:
    s = await Raw.open(mx.port)
    await s.starttls(mx.ca)
    _, lines = await s.cmd("EHLO client.customer.test")
    assert "PIPELINING" in lines and not any(line.startswith("AUTH") for line in lines)
    mid = new_mid("pipe")
    await s.send(
        f"MAIL FROM:<{FROM}>\r\nRCPT TO:<{SUPPORT}>\r\nRCPT TO:<sales+lead@chatflow.test>\r\n"
        "DATA\r\n"
    )
    assert [(await s.reply())[0] for _ in range(4)] == [250, 250, 250, 354]
    await s.send(message(mid) + b".\r\nQUIT\r\n")  # end of data and QUIT pipelined too
    assert [(await s.reply())[0] for _ in range(2)] == [250, 221]
    rows = await mx.stored(mid)
    assert [r["mailbox_id"] for r in rows] == ["mb-sales", "mb-support"]


# ---- 2. SMTP smuggling ---------------------------------------------------------------------

SMUGGLE_ENDINGS = {
    "lf-dot-lf": b"\n.\n",
    "lf-dot-crlf": b"\n.\r\n",
    "cr-dot-cr": b"\r.\r",
    "crlf-dot-cr": b"\r\n.\r",
    "crlf-dot-lf": b"\r\n.\n",
    "crlf-nul-dot-crlf": b"\r\n\x00.\r\n",
}


@pytest.mark.parametrize("ending", list(SMUGGLE_ENDINGS), ids=list(SMUGGLE_ENDINGS))
async def test_smuggled_second_message_stays_inside_the_first(mx: Mx, ending: str) -> None:
    first, second = new_mid("carrier"), new_mid("smuggled")
    payload = (
        message(first, body=b"innocent body")
        + SMUGGLE_ENDINGS[ending]
        + f"MAIL FROM:<ceo@chatflow.test>\r\nRCPT TO:<{SALES}>\r\nDATA\r\n".encode()
        + message(second, to=SALES, subject="Wire the money")
        + b".\r\n"
    )
    s = await mx.raw()
    assert (await s.cmd(f"MAIL FROM:<{FROM}>"))[0] == 250
    assert (await s.cmd(f"RCPT TO:<{SUPPORT}>"))[0] == 250
    assert (await s.cmd("DATA"))[0] == 354
    await s.send(payload)
    code, lines = await s.reply()
    assert code == 250 and "queued as" in lines[0], lines
    # Exactly one reply for the whole payload: the next one answers our VRFY, not a smuggled
    # MAIL/RCPT/DATA.
    assert (await s.cmd(f"VRFY <{SUPPORT}>"))[0] == 252
    s.close()
    rows = await mx.stored(first)
    assert len(rows) == 1 and rows[0]["mailbox_id"] == "mb-support"
    assert b"MAIL FROM:<ceo@chatflow.test>" in rows[0]["raw"]  # content, never a command
    assert await mx.stored(second) == []
    count = await mx.pool.fetchval(
        "SELECT count(*) FROM messages WHERE mailbox_id = 'mb-sales' AND envelope_from = $1",
        "ceo@chatflow.test",
    )
    assert count == 0
    stored = bytes(rows[0]["raw"])
    assert b"\r" not in stored.replace(b"\r\n", b"") and b"\n" not in stored.replace(b"\r\n", b"")


async def test_bare_cr_and_lf_are_normalized_before_anyone_reads_the_message(mx: Mx) -> None:
    mid = new_mid("bare")
    sent = (
        b"From: Zoe <zoe@customer.test>\nTo: <support@chatflow.test>\n"
        b"Subject: hello\rBcc: hidden@attacker.test\r\n"
        + f"Message-ID: <{mid}>\r\n\r\n".encode()
        + b"line one\nline two\rline three\r\n"
    )
    text = await send(mx, sent)
    assert "queued as" in text
    (row,) = await mx.stored(mid)
    raw = bytes(row["raw"])
    assert raw == normalize_line_endings(sent)[0]
    assert raw.count(b"\r\n") == sent.count(b"\r\n") + 5
    assert b"\r" not in raw.replace(b"\r\n", b"") and b"\n" not in raw.replace(b"\r\n", b"")
    # What we read is what the stored bytes say to any reader: "Bcc" is its own header line.
    assert b"\r\nSubject: hello\r\nBcc: hidden@attacker.test\r\n" in raw
    await mx.drained()
    (event,) = await mx.events(mid)
    assert event.payload["subject"] == "hello"


async def test_plaintext_pipelined_behind_starttls_is_discarded(mx: Mx) -> None:
    s = await Raw.open(mx.port)
    await s.cmd("EHLO client.customer.test")
    # One write: STARTTLS and, behind it in the same plaintext packet, an injected session.
    await s.send("STARTTLS\r\nEHLO evil.test\r\nMAIL FROM:<evil@attacker.test>\r\n")
    code, lines = await s.reply()
    assert code == 220, lines
    await s.w.start_tls(mx.ca, server_hostname="127.0.0.1")
    # Had the injected EHLO+MAIL run inside TLS, we would now read their replies; instead the
    # first reply is to our own command, and the session has no EHLO and no sender.
    code, lines = await s.cmd(f"RCPT TO:<{SUPPORT}>")
    assert code == 503 and "HELO" in lines[0], (code, lines)
    code, lines = await s.cmd("EHLO client.customer.test")
    assert code == 250
    code, lines = await s.cmd(f"RCPT TO:<{SUPPORT}>")
    assert code == 503 and "need MAIL" in lines[0], (code, lines)
    s.close()


# ---- 3. 250 only after commit --------------------------------------------------------------


async def test_database_failure_is_451_and_stores_nothing_then_the_retry_succeeds(
    mx: Mx,
) -> None:
    mid = new_mid("dbfail")
    raw = message(mid)
    admin = await asyncpg.connect(mx.admin_url)
    try:
        # Fails at COMMIT, the very last step, after every INSERT of the delivery succeeded.
        await admin.execute(
            """CREATE FUNCTION ingest.t_refuse_commit() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN RAISE EXCEPTION 'test: commit refused'; END $$;
               CREATE CONSTRAINT TRIGGER t_refuse_commit AFTER INSERT ON ingest.outbox
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
               EXECUTE FUNCTION ingest.t_refuse_commit();"""
        )
        with pytest.raises(aiosmtplib.SMTPDataError) as failed:
            await send(mx, raw)
        assert failed.value.code == 451
    finally:
        await admin.execute(
            """DROP TRIGGER IF EXISTS t_refuse_commit ON ingest.outbox;
               DROP FUNCTION IF EXISTS ingest.t_refuse_commit();"""
        )
        await admin.close()
    assert await mx.stored(mid) == []
    digest = hashlib.sha256(raw).hexdigest()
    assert await mx.pool.fetchval("SELECT count(*) FROM blobs WHERE sha256 = $1", digest) == 0
    assert "queued as" in await send(mx, raw)  # the sender's retry is the only copy
    assert len(await mx.stored(mid)) == 1
    await mx.drained()
    assert len(await mx.events(mid)) == 1


# ---- 4. Idempotent retries -----------------------------------------------------------------


async def test_a_retry_of_a_committed_message_is_stored_once_and_announced_once(mx: Mx) -> None:
    mid = new_mid("retry")
    raw = message(mid)
    first = await send(mx, raw)
    again = await send(mx, raw)  # the client never saw our first 250
    stored_id = first.rsplit(" ", 1)[1]
    assert "queued as" in first and again.endswith(f"already have it as {stored_id}")
    # Concurrent identical retries wait on the unique index, then get the same answer.
    replies = await asyncio.gather(*(send(mx, raw) for _ in range(5)))
    assert all(r.endswith(f"already have it as {stored_id}") for r in replies)
    rows = await mx.stored(mid)
    assert [str(r["id"]) for r in rows] == [stored_id]
    # The same bytes for another mailbox are that mailbox's own message.
    assert "queued as" in await send(mx, raw, [SALES])
    assert [r["mailbox_id"] for r in await mx.stored(mid)] == ["mb-sales", "mb-support"]
    await mx.drained()
    events = await mx.events(mid)
    assert sorted(e.payload["mailbox_id"] for e in events) == ["mb-sales", "mb-support"]


async def test_raw_8bit_ids_are_read_and_announced(mx: Mx) -> None:
    """A Message-ID or References with raw UTF-8 or Latin-1 bytes (an IDN domain): 250, stored,
    announced with the id decoded (it was a 451 on every retry: the event could not be
    encoded; found by a trial)."""
    tag = new_mid("idn").split("@")[0]
    raw = (
        f"From: J <j@example.de>\r\nTo: <{SUPPORT}>\r\nSubject: IDN\r\n".encode()
        + f"Message-ID: <{tag}@m".encode()
        + b"\xc3\xbcller.de>\r\nIn-Reply-To: <x@m\xfcller.de>\r\n\r\nHallo\r\n"
    )
    assert "queued as" in await send(mx, raw)
    (row,) = await mx.stored(f"{tag}@müller.de")
    assert row["status"] == "accepted"
    await mx.drained()
    (event,) = await mx.events(f"{tag}@müller.de")
    assert event.payload["in_reply_to"] == ["<x@müller.de>"]


async def test_a_partly_unreadable_or_cut_body_is_flagged_on_the_event(mx: Mx) -> None:
    """Parts nested past the depth limit were dropped in silence (found by a trial): the
    event now says ``incomplete``; a body cut for size says ``truncated``."""
    deep = new_mid("deep")
    head = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
        for i in range(300)
    )
    raw = (
        f"From: Zoe <zoe@customer.test>\r\nTo: <{SUPPORT}>\r\nSubject: deep\r\n".encode()
        + f"Message-ID: <{deep}>\r\nMIME-Version: 1.0\r\n".encode()
        + head
        + b"Content-Type: text/plain\r\n\r\ndeep text\r\n"
    )
    assert "queued as" in await send(mx, raw)
    await mx.drained()
    (event,) = await mx.events(deep)
    assert event.payload["flags"]["incomplete"] is True
    assert event.payload["flags"]["truncated"] is False
    plain = new_mid("plain")
    assert "queued as" in await send(mx, message(plain))
    await mx.drained()
    (event,) = await mx.events(plain)
    assert (event.payload["flags"]["incomplete"], event.payload["flags"]["truncated"]) == (
        False,
        False,
    )


async def test_an_event_that_cannot_be_encoded_quarantines_instead_of_451(
    mx: Mx, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever a reader bug puts in the event, the message is kept: quarantined with the
    reason, answered 250, never a 451 that the client retries forever."""
    from services.ingest import smtp

    real = smtp.to_event

    def broken(*args: object, **kwargs: object) -> object:
        event = real(*args, **kwargs)  # type: ignore[arg-type]
        event.subject = "lone \udcff surrogate"
        return event

    monkeypatch.setattr(smtp, "to_event", broken)
    raw = message(new_mid("unencodable"))
    assert "queued as" in await send(mx, raw)
    row = await mx.pool.fetchrow(
        "SELECT status, reason FROM messages WHERE raw_sha256 = $1",
        hashlib.sha256(raw).hexdigest(),
    )
    assert row is not None and row["status"] == "quarantined"
    assert row["reason"].startswith("reader error: its fields could not be encoded")


# ---- 5. LMTP -------------------------------------------------------------------------------


async def test_lmtp_delivers_to_two_mailboxes_with_a_reply_per_recipient(mx: Mx) -> None:
    s = await Raw.open(mx.settings.lmtp_port)
    code, lines = await s.cmd("LHLO postfix.chatflow.test")
    assert code == 250 and "STARTTLS" in lines and "PIPELINING" in lines
    assert (await s.cmd("EHLO postfix.chatflow.test"))[0] == 500  # LMTP greets with LHLO only
    assert (await s.cmd(f"MAIL FROM:<{FROM}>"))[0] == 530
    await s.starttls(mx.ca, hello="LHLO")
    mid = new_mid("lmtp")
    raw = message(mid)
    for attempt in ("first", "redelivery"):
        assert (await s.cmd(f"MAIL FROM:<{FROM}>"))[0] == 250
        assert (await s.cmd(f"RCPT TO:<{SUPPORT}>"))[0] == 250
        assert (await s.cmd("RCPT TO:<nobody@chatflow.test>"))[0] == 550
        assert (await s.cmd("RCPT TO:<sales+lead@chatflow.test>"))[0] == 250
        assert (await s.cmd("DATA"))[0] == 354
        await s.send(raw + b".\r\n")
        replies = [await s.reply() for _ in range(2)]  # one per accepted RCPT, in order
        assert [c for c, _ in replies] == [250, 250], replies
        word = "queued as" if attempt == "first" else "already have it"
        assert all(word in lines[0] for _, lines in replies), replies
    assert (await s.cmd("NOOP"))[0] == 250  # and nothing else was pending
    s.close()
    rows = await mx.stored(mid)
    assert [r["mailbox_id"] for r in rows] == ["mb-sales", "mb-support"]
    assert [r["rcpt"] for r in rows] == ["sales+lead@chatflow.test", SUPPORT]
    await mx.drained()
    assert len(await mx.events(mid)) == 2


# ---- 6. Load ---------------------------------------------------------------------------------


async def test_100_concurrent_clients_5_messages_each_all_stored_once(mx: Mx) -> None:
    run = uuid.uuid4().hex[:8]

    async def one_client(i: int) -> list[int]:
        codes = []
        async with client(mx) as c:
            for j in range(5):
                errors, text = await c.sendmail(
                    FROM, [SUPPORT], message(f"c100.{run}.{i}.{j}@customer.test")
                )
                codes.append(250 if not errors and "queued as" in text else 0)
        return codes

    t0 = time.monotonic()
    results = await asyncio.gather(*(one_client(i) for i in range(100)))
    elapsed = time.monotonic() - t0
    assert [c for codes in results for c in codes] == [250] * 500
    rows = await mx.pool.fetch(
        "SELECT message_id, count(*) AS n FROM messages WHERE message_id LIKE $1 "
        "GROUP BY message_id",
        f"<c100.{run}.%",
    )
    assert len(rows) == 500 and all(r["n"] == 1 for r in rows)
    await mx.drained()
    events = [e for e in await mx.events() if f"c100.{run}." in e.payload["message_id"]]
    assert len(events) == 500
    print(f"100 clients x 5 messages: {elapsed:.2f}s ({500 / elapsed:.0f} msg/s)")


# ---- 4b. The kill test: a real process, SIGKILLed mid-stream --------------------------------


async def test_sigkill_mid_stream_loses_nothing_and_duplicates_nothing(
    stream_prefix: str, tmp_path: Path
) -> None:
    name = f"chatflow_t_{testing.new_run_id()}_kill"
    url = await testing.create_database(name)
    prefix = f"{stream_prefix}kill{testing.new_run_id()}:"
    smtp_port, http_port = testing.free_port(), testing.free_port()
    env = testing.service_env(
        url,
        prefix,
        CHATFLOW_INGEST_SMTP_PORT=str(smtp_port),
        CHATFLOW_INGEST_HTTP_PORT=str(http_port),
        CHATFLOW_INGEST_OUTBOX_POLL_MS="100",
        CHATFLOW_LOG_LEVEL="WARNING",
    )
    log = tmp_path / "ingest.log"
    bus_redis = None
    procs = []
    try:
        migrate = testing.start_python(["services.ingest", "migrate"], env, log)
        assert await asyncio.to_thread(migrate.wait, 30) == 0, log.read_text()[-3000:]
        own = IngestSettings.load(database_url=url).own_database_url
        pool = await db.connect_pool(own, "ingest", 1, 4)
        async with pool.acquire() as conn:
            await storage.upsert_mailbox(conn, "mb-kill", SUPPORT, "Support", True)

        async def start() -> None:
            procs.append(testing.start_python(["services.ingest", "run"], env, log))
            await wait_port(smtp_port, 30)

        await start()
        ca = ssl.create_default_context(cafile=str(ROOT / "var/certs/ca.pem"))
        run = uuid.uuid4().hex[:8]
        total, kill_after = 1000, 300
        todo: asyncio.Queue[int] = asyncio.Queue()
        for i in range(total):
            todo.put_nowait(i)
        raws = {i: message(f"kill.{run}.{i}@customer.test") for i in range(total)}
        acked: dict[int, str] = {}
        attempts = Counter[str]()
        killed = asyncio.Event()

        async def worker() -> None:
            c: aiosmtplib.SMTP | None = None
            while True:
                try:
                    i = todo.get_nowait()
                except asyncio.QueueEmpty:
                    break
                while i not in acked:  # retry this very message until it gets a 250
                    try:
                        if c is None:
                            c = aiosmtplib.SMTP(
                                hostname="127.0.0.1",
                                port=smtp_port,
                                start_tls=True,
                                tls_context=ca,
                                timeout=10,
                            )
                            await c.connect()
                        errors, text = await c.sendmail(FROM, [SUPPORT], raws[i])
                        assert not errors
                        acked[i] = text
                        attempts["ok"] += 1
                    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                        attempts[type(exc).__name__] += 1
                        if c is not None:
                            c.close()
                        c = None
                        await asyncio.sleep(0.05)
                if len(acked) >= kill_after and not killed.is_set():
                    killed.set()
            if c is not None:
                try:
                    await c.quit()
                except aiosmtplib.SMTPException:
                    c.close()

        async def killer() -> dict[str, float]:
            await killed.wait()
            at = len(acked)
            procs[-1].send_signal(signal.SIGKILL)
            await asyncio.to_thread(procs[-1].wait, 10)
            down = time.monotonic()
            await start()
            return {"acked_at_kill": at, "restart_s": time.monotonic() - down}

        t0 = time.monotonic()
        kill_task = asyncio.create_task(killer())
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(10))), 60)
        kill_info = await asyncio.wait_for(kill_task, 30)
        elapsed = time.monotonic() - t0

        assert len(acked) == total
        rows = await pool.fetch(
            "SELECT id, message_id FROM messages WHERE message_id LIKE $1", f"<kill.{run}.%"
        )
        per_mid = Counter(r["message_id"] for r in rows)
        assert len(per_mid) == total and set(per_mid.values()) == {1}  # every 250, once
        await testing.eventually(
            lambda: pool.fetchval("SELECT count(*) = 0 FROM outbox"), timeout=20
        )
        bus_redis = connect(testing.REDIS_URL)
        entries = await bus_redis.xrange(f"{prefix}mail.received")
        envs = [json.loads(fields[b"e"]) for _, fields in entries]
        by_mid: dict[str, set[str]] = {}
        for e in envs:
            by_mid.setdefault(e["payload"]["message_id"], set()).add(e["id"])
        assert set(by_mid) == set(per_mid)
        assert all(len(ids) == 1 for ids in by_mid.values())  # one mail.received per message
        assert {e["payload"]["ingest_id"] for e in envs} == {str(r["id"]) for r in rows}
        duplicates = sum("already have it" in t for t in acked.values())
        print(
            f"kill test: {total} messages in {elapsed:.1f}s; SIGKILL after "
            f"{kill_info['acked_at_kill']:.0f} acks, back in {kill_info['restart_s']:.1f}s; "
            f"attempts {dict(attempts)}; retries answered as duplicates: {duplicates}; "
            f"stream entries {len(entries)} for {len(by_mid)} events"
        )
        await pool.close()
    finally:
        testing.stop(procs)
        if bus_redis is not None:
            await bus_redis.aclose()
        await testing.drop_prefix(prefix)
        await testing.drop_database(name)
