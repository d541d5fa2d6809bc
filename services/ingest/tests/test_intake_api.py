"""Ingest's HTTP side and what follows a stored message, against the real service (``mx``):
``POST /api/messages/raw``, the admin quarantine, ``cid:`` images linked in ``mail.received``,
and ``mail.bounced`` for a DSN that came by SMTP.

HTTP goes over TLS to the service's own port with tokens signed by a key published on its
``auth.jwks`` stream, the way auth publishes it.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiosmtplib
import httpx
import pytest
from joserfc.jwk import OKPKey

from libs.common import testing
from libs.common.events import Envelope, JwksPublished, MembershipChanged
from services.ingest import smtp
from services.ingest.bounces import BounceScanner
from services.ingest.tests.conftest import SALES, SUPPORT, Mx, message, new_mid
from services.ingest.tests.test_dsn import postfix


@pytest.fixture(scope="module")
async def key(mx: Mx) -> OKPKey:
    k = OKPKey.generate_key("Ed25519", parameters={"kid": f"t-{uuid.uuid4().hex[:8]}"})
    jwks = JwksPublished(keys=[k.as_dict(private=False)])
    await mx.bus.publish(Envelope.of(jwks, "auth"))
    return k


@pytest.fixture
async def http(mx: Mx) -> AsyncIterator[httpx.AsyncClient]:
    base = f"https://127.0.0.1:{mx.settings.http_port}"
    async with httpx.AsyncClient(base_url=base, verify=mx.ca, timeout=20) as c:
        yield c


def bearer(key: OKPKey, mx: Mx, *, roles: list[str], scope: str = "", **kw: Any) -> dict[str, str]:
    return testing.bearer(
        key,
        mx.settings,
        sub=kw.get("sub", "client-crm"),
        roles=roles,
        mailboxes=kw.get("mailboxes", []),
        scope=scope,
        client_id=kw.get("client_id", "crm"),
    )


def machine(key: OKPKey, mx: Mx) -> dict[str, str]:
    return bearer(key, mx, roles=[], scope="ingest:submit")


def admin(key: OKPKey, mx: Mx) -> dict[str, str]:
    return bearer(key, mx, roles=["admin"], sub="admin-1", client_id="chatflow-web")


RFC822 = {"Content-Type": "message/rfc822"}


async def submit(
    http: httpx.AsyncClient, headers: dict[str, str], raw: bytes, mailbox: str = SUPPORT, **q: str
) -> httpx.Response:
    return await http.post(
        "/api/messages/raw",
        params={"mailbox": mailbox, **q},
        content=raw,
        headers={**headers, **RFC822},
    )


# ---- POST /api/messages/raw ---------------------------------------------------------------------


async def test_submitted_message_takes_the_smtp_path(
    mx: Mx, http: httpx.AsyncClient, key: OKPKey
) -> None:
    mid = new_mid("api")
    # LF-only, as scripts write: normalized exactly as SMTP normalizes it.
    raw = message(mid).replace(b"\r\n", b"\n")
    r = await submit(http, machine(key, mx), raw)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "accepted" and body["reason"] is None
    (row,) = await mx.stored(mid)
    assert str(row["id"]) == body["ingest_id"] and row["status"] == "accepted"
    assert bytes(row["raw"]) == raw.replace(b"\n", b"\r\n")
    peer = await mx.pool.fetchval("SELECT peer FROM messages WHERE id = $1", row["id"])
    assert peer == "api:crm"
    await mx.drained()
    (ev,) = await mx.events(mid)
    assert ev.payload["ingest_id"] == body["ingest_id"]
    assert ev.payload["mailbox_id"] == "mb-support"

    again = await submit(http, machine(key, mx), raw)
    assert again.status_code == 200
    assert again.json() == {"ingest_id": body["ingest_id"], "status": "duplicate", "reason": None}
    await mx.drained()
    assert len(await mx.events(mid)) == 1 and len(await mx.stored(mid)) == 1


async def test_mailbox_by_id_or_tagged_address_and_unknown_is_404(
    mx: Mx, http: httpx.AsyncClient, key: OKPKey
) -> None:
    mid = new_mid("byid")
    r = await submit(http, machine(key, mx), message(mid, to=SALES), mailbox="mb-sales")
    assert r.status_code == 202
    mid2 = new_mid("tag")
    r = await submit(http, machine(key, mx), message(mid2), mailbox="Support+abc@chatflow.test")
    assert r.status_code == 202
    assert [x["mailbox_id"] for x in await mx.stored(mid)] == ["mb-sales"]
    assert [x["mailbox_id"] for x in await mx.stored(mid2)] == ["mb-support"]
    for box in ("nobody@chatflow.test", "mb-nope"):
        r = await submit(http, machine(key, mx), message(new_mid("x")), mailbox=box)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


async def test_who_may_submit(mx: Mx, http: httpx.AsyncClient, key: OKPKey) -> None:
    raw = message(new_mid("who"))
    assert (await submit(http, {}, raw)).status_code == 401
    agent = bearer(key, mx, roles=["agent"], mailboxes=["mb-support"], sub="agent-1")
    r = await submit(http, agent, raw)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    no_scope = bearer(key, mx, roles=[], scope="something:else")
    assert (await submit(http, no_scope, raw)).status_code == 403
    assert (await submit(http, admin(key, mx), raw)).status_code == 202


async def test_size_type_and_content_limits(mx: Mx, http: httpx.AsyncClient, key: OKPKey) -> None:
    h = machine(key, mx)
    big = message(new_mid("big"), body=b"x" * 900 + b"\r\n") * 120  # > 100,000 (fixture limit)
    r = await submit(http, h, big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: refused while reading
        for _ in range(30):
            yield b"y" * 5000 + b"\r\n"

    r = await http.post(
        "/api/messages/raw", params={"mailbox": SUPPORT}, content=chunks(), headers={**h, **RFC822}
    )
    assert r.status_code == 413
    r = await http.post(
        "/api/messages/raw",
        params={"mailbox": SUPPORT},
        content=message(new_mid("t")),
        headers={**h, "Content-Type": "text/plain"},
    )
    assert r.status_code == 415
    long_line = message(new_mid("line"), body=b"z" * 1200 + b"\r\n")
    r = await submit(http, h, long_line)
    assert r.status_code == 422 and "Line too long" in r.json()["error"]["message"]
    assert (await submit(http, h, b"  \r\n")).status_code == 422
    r = await submit(http, h, message(new_mid("mf")), mail_from="a@b.test>\r\nRCPT TO:<x@y>")
    assert r.status_code == 422


# ---- the admin quarantine -----------------------------------------------------------------------


async def test_quarantine_list_raw_and_reprocess(
    mx: Mx, http: httpx.AsyncClient, key: OKPKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = machine(key, mx)
    junk = f"not a message at all {uuid.uuid4().hex}\r\n".encode()
    r = await submit(http, h, junk, mail_from="robot@crm.test")
    assert r.status_code == 202
    junk_id = r.json()["ingest_id"]
    assert r.json()["status"] == "quarantined"
    assert r.json()["reason"] == "unreadable: no header fields found"

    # A reader bug: this message is kept aside until the fix is deployed.
    real = smtp.read_message

    def buggy(raw: bytes) -> Any:
        if b"X-Trigger: reader-bug" in raw:
            raise RuntimeError("reader bug")
        return real(raw)

    monkeypatch.setattr(smtp, "read_message", buggy)
    mid = new_mid("bug")
    r = await submit(http, h, message(mid, headers=b"X-Trigger: reader-bug\r\n"))
    bug_id = r.json()["ingest_id"]
    assert r.json()["status"] == "quarantined"
    assert r.json()["reason"] == "reader error: RuntimeError: reader bug"

    page = await http.get("/api/admin/quarantine", params={"limit": 1}, headers=admin(key, mx))
    assert page.status_code == 200, page.text
    first = page.json()
    assert [i["id"] for i in first["items"]] == [bug_id]  # newest first
    item = first["items"][0]
    assert item["mailbox"] == SUPPORT and item["mailbox_id"] == "mb-support"
    assert item["rcpt"] == [SUPPORT] and item["envelope_from"] == ""
    assert item["reason"].startswith("reader error") and item["size"] > 100
    assert first["next_cursor"]
    nxt = await http.get(
        "/api/admin/quarantine",
        params={"limit": 1, "cursor": first["next_cursor"]},
        headers=admin(key, mx),
    )
    (older,) = nxt.json()["items"]
    assert older["id"] == junk_id and older["envelope_from"] == "robot@crm.test"
    assert older["size"] == len(junk)

    raw = await http.get(f"/api/admin/quarantine/{junk_id}/raw", headers=admin(key, mx))
    assert raw.status_code == 200 and raw.content == junk
    assert raw.headers["content-type"].startswith("message/rfc822")
    assert raw.headers["content-disposition"] == f'attachment; filename="quarantined-{junk_id}.eml"'
    assert raw.headers["x-content-type-options"] == "nosniff"

    agent = bearer(key, mx, roles=["agent"], mailboxes=["mb-support"], sub="agent-1")
    for path in ("/api/admin/quarantine", f"/api/admin/quarantine/{junk_id}/raw"):
        assert (await http.get(path, headers=agent)).status_code == 403
        assert (await http.get(path, headers=h)).status_code == 403  # machine token, no admin
    assert (
        await http.post(f"/api/admin/quarantine/{bug_id}/reprocess", headers=h)
    ).status_code == 403
    for bad in ("nope", str(uuid.uuid4())):
        r = await http.get(f"/api/admin/quarantine/{bad}/raw", headers=admin(key, mx))
        assert r.status_code == 404
    bad_cursor = await http.get(
        "/api/admin/quarantine", params={"cursor": "!!"}, headers=admin(key, mx)
    )
    assert bad_cursor.status_code == 400

    # Still broken: stays quarantined, with the new reason.
    again = await http.post(f"/api/admin/quarantine/{junk_id}/reprocess", headers=admin(key, mx))
    assert again.json() == {
        "ingest_id": junk_id,
        "status": "quarantined",
        "reason": "unreadable: no header fields found",
    }
    # The fix is deployed: the message reads now, is accepted and announced, once.
    monkeypatch.setattr(smtp, "read_message", real)
    fixed = await http.post(f"/api/admin/quarantine/{bug_id}/reprocess", headers=admin(key, mx))
    assert fixed.status_code == 200
    assert fixed.json() == {"ingest_id": bug_id, "status": "accepted", "reason": None}
    (row,) = await mx.stored(mid)
    assert row["status"] == "accepted" and str(row["id"]) == bug_id
    await mx.drained()
    (ev,) = await mx.events(mid)
    assert ev.payload["ingest_id"] == bug_id
    gone = await http.post(f"/api/admin/quarantine/{bug_id}/reprocess", headers=admin(key, mx))
    assert gone.status_code == 404
    left = await http.get("/api/admin/quarantine", params={"limit": 200}, headers=admin(key, mx))
    assert bug_id not in [i["id"] for i in left.json()["items"]]


# ---- cid: images --------------------------------------------------------------------------------

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def related(mid: str) -> bytes:
    png = base64.encodebytes(PNG).replace(b"\n", b"\r\n")
    return (
        b"From: Zoe <zoe@customer.test>\r\nTo: <support@chatflow.test>\r\nSubject: screenshot\r\n"
        + f"Message-ID: <{mid}>\r\n".encode()
        + b"MIME-Version: 1.0\r\nContent-Type: multipart/related; boundary=rel\r\n\r\n"
        b"--rel\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        b'<p>See <img src="cid:shot.1@customer.test" alt="shot"> and '
        b'<img src="CID:Logo%40Customer.test"> and <img src="cid:missing@x">'
        b' and <img src="https://tracker.test/p.gif"></p>\r\n'
        # No Content-Disposition at all, only a Content-ID.
        b"--rel\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n"
        b"Content-ID: <shot.1@customer.test>\r\n\r\n" + png + b"--rel\r\n"
        b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: inline; filename=logo.png\r\n"
        b"Content-ID: <logo@customer.test>\r\n\r\n" + png + b"--rel--\r\n"
    )


async def _related_received(mx: Mx, mid: str) -> Envelope:
    """``related(mid)`` sent over SMTP; its ``mail.received`` event once relayed."""
    async with aiosmtplib.SMTP(
        hostname="127.0.0.1", port=mx.port, start_tls=True, tls_context=mx.ca, timeout=15
    ) as c:
        await c.sendmail("zoe@customer.test", [SUPPORT], related(mid))
    await mx.drained()
    (ev,) = await mx.events(mid)
    return ev


async def test_cid_images_point_at_their_stored_parts(mx: Mx) -> None:
    mid = new_mid("cid")
    ev = await _related_received(mx, mid)
    atts = {a["content_id"]: a for a in ev.payload["attachments"]}
    shot, logo = atts["shot.1@customer.test"], atts["logo@customer.test"]
    assert shot["inline"] and logo["inline"]
    html = ev.payload["html"]
    assert f'src="/api/attachments/{shot["id"]}" data-attachment-id="{shot["id"]}"' in html
    assert f'src="/api/attachments/{logo["id"]}"' in html
    assert 'src="cid:missing@x"' in html
    # The remote image stays blocked until the agent consents.
    assert '<img data-remote-src="https://tracker.test/p.gif">' in html
    stored = await mx.pool.fetchval(
        "SELECT count(*) FROM attachments WHERE id = $1::uuid AND content_id = $2",
        shot["id"],
        "shot.1@customer.test",
    )
    assert stored == 1


# ---- mail.bounced -------------------------------------------------------------------------------


async def bounced(mx: Mx) -> list[Envelope]:
    entries = await mx.bus.redis.xrange(mx.bus.stream("mail.bounced"))
    return [Envelope.from_json(f[b"e"]) for _, f in entries]


async def test_a_dsn_by_smtp_is_announced_once(mx: Mx) -> None:
    original = f"<{uuid.uuid4().hex}.17-ab@chatflow.test>"
    dsn = postfix(original)
    auto = new_mid("auto")
    async with aiosmtplib.SMTP(
        hostname="127.0.0.1", port=mx.port, start_tls=True, tls_context=mx.ca, timeout=15
    ) as c:
        await c.sendmail("", [SUPPORT], dsn)
        await c.sendmail("", [SUPPORT], dsn)  # a retry: stored once, announced once
        # Sent like a bounce but naming nothing: checked and forgotten.
        await c.sendmail("", [SUPPORT], message(auto))

    async def found() -> list[Envelope]:
        return [e for e in await bounced(mx) if e.payload["original_message_id"] == original]

    (ev,) = await testing.eventually(found, timeout=15)
    p = ev.payload
    assert p["mailbox_id"] == "mb-support" and p["structured"] is True
    assert p["recipients"] == [
        {
            "address": "nobody@customer.test",
            "action": "failed",
            "status": "5.1.1",
            "diagnostic": "550 5.1.1 <nobody@customer.test>: Recipient address rejected: "
            "User unknown in virtual mailbox table",
            "remote_mta": "mail.customer.test",
        }
    ]
    ingest_id = await mx.pool.fetchval(
        "SELECT id::text FROM messages WHERE message_id = $1",
        "<20261203120000.8A1B2C3D4E@mx.customer.test>",
    )
    assert p["ingest_id"] == ingest_id

    async def auto_checked() -> bool:
        n = await mx.pool.fetchval(
            """SELECT count(*) FROM bounce_checks c JOIN messages m ON m.id = c.message_id
               WHERE m.message_id = $1 AND c.original_message_id IS NULL""",
            f"<{auto}>",
        )
        return bool(n == 1)

    await testing.eventually(auto_checked, timeout=15)
    await mx.svc.bounces.scan_once()  # nothing left to announce
    await mx.drained()
    assert len(await found()) == 1


async def test_replicas_scanning_at_once_announce_a_bounce_once(
    mx: Mx, http: httpx.AsyncClient, key: OKPKey
) -> None:
    original = f"<{uuid.uuid4().hex}.race@chatflow.test>"
    r = await submit(http, machine(key, mx), postfix(original).replace(b"8A1B2C3D4E", b"RACE1"))
    assert r.status_code == 202
    # The service's own scanner was woken by the submit; three more "replicas" race it.
    others = [BounceScanner(mx.svc) for _ in range(3)]
    await asyncio.gather(*(s.scan_once() for s in others))

    async def found() -> list[Envelope]:
        return [e for e in await bounced(mx) if e.payload["original_message_id"] == original]

    await testing.eventually(found, timeout=15)
    await mx.drained()
    assert len(await found()) == 1
    checks = await mx.pool.fetchval(
        "SELECT count(*) FROM bounce_checks WHERE original_message_id = $1", original
    )
    assert checks == 1


async def test_an_agent_taken_out_of_the_mailbox_downloads_nothing_more(
    mx: Mx, http: httpx.AsyncClient, key: OKPKey
) -> None:
    """Auth's membership.changed reaches ingest: the agent's token still lists the mailbox, the
    attachment is 404 at once; back in the mailbox, it downloads again (found by a trial)."""
    ev = await _related_received(mx, new_mid("roster"))
    url = f"/api/attachments/{ev.payload['attachments'][0]['id']}"
    sub = f"agent-{uuid.uuid4().hex[:6]}"
    agent = bearer(key, mx, roles=["agent"], mailboxes=["mb-support"], sub=sub)
    assert (await http.get(url, headers=agent)).status_code == 200

    async def member(active: bool) -> None:
        change = MembershipChanged(user_id=sub, mailbox_id="mb-support", active=active)
        await mx.bus.publish(Envelope.of(change, "auth"))

    await member(False)
    await testing.eventually(lambda: _status(http, url, agent, 404), timeout=10, interval=0.05)
    await member(True)
    await testing.eventually(lambda: _status(http, url, agent, 200), timeout=10, interval=0.05)


async def _status(http: httpx.AsyncClient, url: str, headers: dict[str, str], code: int) -> bool:
    return (await http.get(url, headers=headers)).status_code == code
