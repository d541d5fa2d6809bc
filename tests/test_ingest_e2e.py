"""Ingest's other doors and what a bounce does, through the real stack and its gateway.

- A machine client with the ``ingest:submit`` scope posts a raw message to
  ``/api/messages/raw``; it lands in the agent's conversations like mail that came by SMTP.
- An admin lists the quarantine through ``/api/admin/quarantine`` (routed to ingest, not auth).
- The agent replies over the WebSocket, the reply is sent, a DSN for it arrives by SMTP: the
  agent sees ``send.status`` failed with the remote server's reason.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import uuid
from collections.abc import AsyncIterator
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any

import aiosmtplib
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from services.ingest.tests.test_intake_api import PNG, related
from tests.conftest import DEMO_PASSWORD
from tests.oauth_client import login
from tools.devstack import Stack

pytestmark = pytest.mark.xdist_group("stack")
SECRET = "ingest-machine-secret-" + "y" * 20


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
async def http(stack: Stack, ca_context: ssl.SSLContext) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.origin, verify=ca_context, timeout=20) as client:
        yield client


@pytest.fixture(scope="module")
async def machine(stack: Stack, http: httpx.AsyncClient) -> str:
    client_id = f"crm-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(
        stack.run_cmd,
        "auth",
        "create-client",
        "--client-id",
        client_id,
        "--scopes",
        "ingest:submit",
        "--secret-stdin",
        stdin=SECRET + "\n",
    )
    r = await http.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", "scope": "ingest:submit"},
        auth=(client_id, SECRET),
    )
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


async def conversation(http: httpx.AsyncClient, token: str, subject: str) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while loop.time() < deadline:
        r = await http.get("/api/conversations", params={"q": subject}, headers=bearer(token))
        assert r.status_code == 200, r.text
        if r.json()["items"]:
            cid = r.json()["items"][0]["id_conversa"]
            return dict((await http.get(f"/api/conversations/{cid}", headers=bearer(token))).json())
        await asyncio.sleep(0.2)
    raise AssertionError(f"no conversation {subject!r}")


async def test_a_machine_submits_raw_mail_through_the_gateway(
    http: httpx.AsyncClient, machine: str, agent_token: str
) -> None:
    subject = f"Submitted by the CRM {uuid.uuid4().hex[:8]}"
    mid = make_msgid(domain="crm.customer.test")
    raw = (
        f"From: Zoe <zoe@customer.test>\r\nTo: support@chatflow.test\r\nSubject: {subject}\r\n"
        f"Message-ID: {mid}\r\nContent-Type: text/plain\r\n\r\nfrom the web form\r\n"
    ).encode()
    r = await http.post(
        "/api/messages/raw",
        params={"mailbox": "support@chatflow.test"},
        content=raw,
        headers={**bearer(machine), "Content-Type": "message/rfc822"},
    )
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "accepted"
    conv = await conversation(http, agent_token, subject)
    assert [m["message_id"] for m in conv["messages"]] == [mid]
    # The agent may not submit; the same bytes again are a duplicate.
    r = await http.post(
        "/api/messages/raw",
        params={"mailbox": "support@chatflow.test"},
        content=raw,
        headers={**bearer(agent_token), "Content-Type": "message/rfc822"},
    )
    assert r.status_code == 403
    r = await http.post(
        "/api/messages/raw",
        params={"mailbox": "support@chatflow.test"},
        content=raw,
        headers={**bearer(machine), "Content-Type": "message/rfc822"},
    )
    assert r.status_code == 200 and r.json()["status"] == "duplicate"


async def test_inline_images_reach_the_agent_as_attachment_urls(
    http: httpx.AsyncClient, machine: str, agent_token: str
) -> None:
    mid = make_msgid(domain="customer.test")
    raw = related(mid.strip("<>"))
    subject = f"screenshot {uuid.uuid4().hex[:8]}"
    raw = raw.replace(b"Subject: screenshot", f"Subject: {subject}".encode())
    r = await http.post(
        "/api/messages/raw",
        params={"mailbox": "support@chatflow.test"},
        content=raw,
        headers={**bearer(machine), "Content-Type": "message/rfc822"},
    )
    assert r.status_code == 202, r.text
    conv = await conversation(http, agent_token, subject)
    (msg,) = conv["messages"]
    att_ids = {a["id"] for a in msg["attachments"]}
    linked = re.findall(
        r'src="/api/attachments/([0-9a-f-]{36})" data-attachment-id="\1"', msg["html"]
    )
    assert len(linked) == 2 and set(linked) == att_ids
    img = await http.get(f"/api/attachments/{linked[0]}", headers=bearer(agent_token))
    assert img.status_code == 200 and img.content == PNG
    assert 'data-remote-src="https://tracker.test/p.gif"' in msg["html"]


async def test_admins_see_the_quarantine_through_the_gateway(
    stack: Stack,
    http: httpx.AsyncClient,
    machine: str,
    agent_token: str,
    ca_context: ssl.SSLContext,
) -> None:
    junk = f"no headers here {uuid.uuid4().hex}\r\n".encode()
    r = await http.post(
        "/api/messages/raw",
        params={"mailbox": "support@chatflow.test"},
        content=junk,
        headers={**bearer(machine), "Content-Type": "message/rfc822"},
    )
    assert r.status_code == 202 and r.json()["status"] == "quarantined"
    qid = r.json()["ingest_id"]
    admin = await login(stack.origin, "admin@chatflow.test", DEMO_PASSWORD, ca_context)
    page = await http.get("/api/admin/quarantine", headers=bearer(admin["access_token"]))
    assert page.status_code == 200, page.text
    assert qid in [i["id"] for i in page.json()["items"]]
    raw = await http.get(f"/api/admin/quarantine/{qid}/raw", headers=bearer(admin["access_token"]))
    assert raw.status_code == 200 and raw.content == junk
    assert raw.headers["x-content-type-options"] == "nosniff"
    assert raw.headers["content-disposition"].startswith("attachment;")
    assert (await http.get("/api/admin/quarantine", headers=bearer(agent_token))).status_code == 403
    # The rest of /api/admin is still auth's.
    users = await http.get("/api/admin/users", headers=bearer(admin["access_token"]))
    assert users.status_code == 200, users.text


async def frame(ws: ClientConnection, type_: str, timeout: float = 30.0) -> dict[str, Any]:
    async def loop() -> dict[str, Any]:
        while True:
            f = json.loads(await ws.recv())
            if f["type"] == type_:
                return dict(f)

    return await asyncio.wait_for(loop(), timeout)


def dsn_for(message_id: str, rcpt: str) -> bytes:
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.customer.test>\r\n"
        "To: support@chatflow.test\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        f"Message-ID: {make_msgid(domain='mx.customer.test')}\r\nAuto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.customer.test\r\n\r\n"
        f"Final-Recipient: rfc822; {rcpt}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 <{rcpt}>: User unknown\r\n"
        "--b\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: support@chatflow.test\r\nTo: {rcpt}\r\nMessage-ID: {message_id}\r\n"
        "--b--\r\n"
    ).encode()


async def test_a_bounce_of_our_reply_reaches_the_agent_as_failed(
    stack: Stack, agent_token: str, ca_context: ssl.SSLContext
) -> None:
    customer = f"gone-{uuid.uuid4().hex[:6]}@customer.test"
    async with connect(
        f"wss://127.0.0.1:{stack.ports.gateway}/ws",
        subprotocols=["chatflow.v1", f"bearer.{agent_token}"],  # type: ignore[list-item]
        ssl=ca_context,
        origin=stack.origin,  # type: ignore[arg-type]
    ) as ws:
        first = EmailMessage()
        first["From"], first["To"] = customer, "support@chatflow.test"
        first["Subject"] = f"Bounce me {uuid.uuid4().hex[:6]}"
        first["Message-ID"] = make_msgid(domain="customer.test")
        first.set_content("hello")
        await aiosmtplib.send(
            first,
            hostname="127.0.0.1",
            port=stack.ports.smtp,
            start_tls=True,
            tls_context=ca_context,
            timeout=15,
        )
        added = await frame(ws, "message.added")
        while added["message"]["message_id"] != first["Message-ID"]:
            added = await frame(ws, "message.added")
        await ws.send(
            json.dumps(
                {
                    "type": "send",
                    "client_id": uuid.uuid4().hex,
                    "id_conversa": added["id_conversa"],
                    "html": "<p>On its way.</p>",
                    "attachments": [],
                }
            )
        )
        ack = await frame(ws, "send.ack")
        while True:
            st = await frame(ws, "send.status")
            if st["send_id"] == ack["send_id"] and st["status"] == "sent":
                break
        # Our Message-ID is in the threaded reply; the DSN names it.
        reply = await frame(ws, "message.added")
        while reply["message"]["direction"] != "out":
            reply = await frame(ws, "message.added")
        async with aiosmtplib.SMTP(
            hostname="127.0.0.1", port=stack.ports.smtp, start_tls=True, tls_context=ca_context
        ) as c:
            await c.sendmail(
                "", ["support@chatflow.test"], dsn_for(reply["message"]["message_id"], customer)
            )
        while True:
            st = await frame(ws, "send.status")
            if st["send_id"] == ack["send_id"] and st["status"] == "failed":
                break
        assert st["detail"] == f"bounced: {customer}: 550 5.1.1 <{customer}>: User unknown"
