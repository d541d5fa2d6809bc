"""The walking skeleton end to end, through real processes and sockets.

Mail in over SMTP+STARTTLS → conversation → ``message.added`` on the agent's WebSocket → reply
frame → ``send.ack`` → ``send.status`` sent → the reply at the SMTP sink, threaded → the
customer's answer lands in the same ``id_conversa``.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import uuid
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any

import aiosmtplib
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from libs.common import testing
from tests.conftest import maildir_messages
from tools.devstack import Stack

pytestmark = pytest.mark.xdist_group("stack")


async def next_frame(ws: ClientConnection, type_: str, timeout: float = 15.0) -> dict:  # type: ignore[type-arg]
    async def loop() -> dict:  # type: ignore[type-arg]
        while True:
            frame = json.loads(await ws.recv())
            if frame.get("type") == type_:
                return frame  # type: ignore[no-any-return]

    return await asyncio.wait_for(loop(), timeout)


async def smtp_send(stack: Stack, msg: EmailMessage, ca: ssl.SSLContext) -> None:
    await aiosmtplib.send(
        msg,
        hostname="127.0.0.1",
        port=stack.ports.smtp,
        start_tls=True,
        tls_context=ca,
        timeout=15,
    )


def customer_mail(subject: str, body: str, **headers: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Zoë Customer <zoe@customer.test>"
    msg["To"] = "support@chatflow.test"
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="customer.test")
    for k, v in headers.items():
        msg[k.replace("_", "-")] = v
    msg.set_content(body)
    return msg


async def test_mail_in_reply_out_answer_threads(
    stack: Stack, agent_token: str, ca_context: ssl.SSLContext
) -> None:
    async with connect(
        f"wss://127.0.0.1:{stack.ports.gateway}/ws",
        subprotocols=["chatflow.v1", f"bearer.{agent_token}"],  # type: ignore[list-item]
        ssl=ca_context,
        origin=stack.origin,  # type: ignore[arg-type]
    ) as ws:
        assert ws.subprotocol == "chatflow.v1"
        first = customer_mail(f"Order {uuid.uuid4().hex[:6]} never arrived", "Where is my order?")
        await smtp_send(stack, first, ca_context)
        # The stack is shared by the tests of this worker: skip frames of their mail.
        while True:
            added = await next_frame(ws, "message.added")
            if added["message"]["message_id"] == first["Message-ID"]:
                break
        assert added["message"]["subject"] == first["Subject"]
        assert added["message"]["from"]["address"] == "zoe@customer.test"
        assert added["event_id"]
        id_conversa = added["id_conversa"]

        client_id = uuid.uuid4().hex
        await ws.send(
            json.dumps(
                {
                    "type": "send",
                    "client_id": client_id,
                    "id_conversa": id_conversa,
                    "html": "<p>Hello Zoë, it <b>ships</b> today.</p>",
                    "attachments": [],
                }
            )
        )
        ack = await next_frame(ws, "send.ack")
        assert ack["client_id"] == client_id and ack["send_id"]
        while True:
            status = await next_frame(ws, "send.status", timeout=30)
            assert status["send_id"] == ack["send_id"]
            assert status["status"] in ("queued", "sent"), status["detail"]
            if status["status"] == "sent":
                break

        def our_reply() -> list[Any]:
            mails = [
                message_from_bytes(m, policy=policy.default)
                for m in maildir_messages(stack.sink_dir)
            ]
            return [m for m in mails if m["In-Reply-To"] == first["Message-ID"]]

        replies = await testing.eventually(our_reply, timeout=10)
        assert len(replies) == 1
        reply = replies[0]
        assert first["Message-ID"] in reply["References"]
        assert reply["Subject"].startswith("Re: ")
        assert reply["To"].addresses[0].addr_spec == "zoe@customer.test"
        body = reply.get_body(("plain",))
        assert body is not None and "ships" in body.get_content()

        answer = customer_mail(
            f"Re: {reply['Subject']}",
            "Thanks!",
            In_Reply_To=reply["Message-ID"],
            References=f"{first['Message-ID']} {reply['Message-ID']}",
        )
        await smtp_send(stack, answer, ca_context)
        while True:
            frame = await next_frame(ws, "message.added")
            if frame["message"]["message_id"] == answer["Message-ID"]:
                break
        assert frame["id_conversa"] == id_conversa

        # A client that drops References and In-Reply-To still reaches the conversation through
        # the signed token of our Reply-To address.
        reply_to = reply["Reply-To"].addresses[0].addr_spec
        assert reply_to.startswith("support+") and reply_to.endswith("@chatflow.test")
        token = reply_to.split("+", 1)[1].split("@", 1)[0]
        assert f".{token}@" in reply["Message-ID"]
        lost = customer_mail("Another question", "One more thing.")
        lost.replace_header("To", reply_to)
        await smtp_send(stack, lost, ca_context)
        while True:
            frame = await next_frame(ws, "message.added")
            if frame["message"]["message_id"] == lost["Message-ID"]:
                break
        assert frame["id_conversa"] == id_conversa

    async with httpx.AsyncClient(base_url=stack.origin, verify=ca_context) as http:
        r = await http.get(
            f"/api/conversations/{id_conversa}", headers={"Authorization": f"Bearer {agent_token}"}
        )
        assert r.status_code == 200, r.text
        conv = r.json()
        ids = [m["message_id"] for m in conv["messages"]]
        assert ids == [
            first["Message-ID"],
            reply["Message-ID"],
            answer["Message-ID"],
            lost["Message-ID"],
        ]
        assert [m["direction"] for m in conv["messages"]] == ["in", "out", "in", "in"]
        assert conv["unread"] is True
        auth = {"Authorization": f"Bearer {agent_token}"}
        assert (
            await http.post(f"/api/conversations/{id_conversa}/read", headers=auth)
        ).status_code == 204
        again = await http.get(f"/api/conversations/{id_conversa}", headers=auth)
        assert again.json()["unread"] is False
        listing = await http.get(
            "/api/conversations", headers={"Authorization": f"Bearer {agent_token}"}
        )
        assert listing.status_code == 200
        assert listing.json()["items"][0]["id_conversa"] == id_conversa


async def test_smtp_requires_starttls_and_refuses_relay(
    stack: Stack, ca_context: ssl.SSLContext
) -> None:
    plain = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=stack.ports.smtp, start_tls=False, timeout=10
    )
    await plain.connect()
    with pytest.raises(aiosmtplib.SMTPResponseException) as exc:
        await plain.mail("x@customer.test")
    assert exc.value.code == 530
    await plain.quit()
    tls = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=stack.ports.smtp,
        start_tls=True,
        tls_context=ca_context,
        timeout=10,
    )
    await tls.connect()
    await tls.mail("x@customer.test")
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
        await tls.rcpt("someone@elsewhere.test")
    assert refused.value.code == 550
    await tls.quit()


async def test_api_needs_a_token(stack: Stack, ca_context: ssl.SSLContext) -> None:
    async with httpx.AsyncClient(base_url=stack.origin, verify=ca_context) as http:
        r = await http.get("/api/conversations")
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "unauthorized"


async def test_each_service_role_sees_only_its_own_schema(stack: Stack) -> None:
    import asyncpg

    from tools.devstack import SERVICES

    base, _, db = stack.database_url.rpartition("/")
    host = base.split("@", 1)[1]
    for me in SERVICES:
        conn = await asyncpg.connect(f"postgresql://chatflow_{me}@{host}/{db}")
        try:
            assert await conn.fetchval(f"SELECT count(*) FROM {me}.outbox") is not None
            for other in SERVICES:
                if other == me:
                    continue
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.fetch(f"SELECT * FROM {other}.outbox LIMIT 1")
        finally:
            await conn.close()
    again = stack.run_cmd("threader", "migrate")  # a second migrate is a no-op
    assert again == ""


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/api/me/"),
        ("GET", "/api/mailboxes/"),
        ("GET", "/api/conversations/"),
        ("GET", "/api/push/vapid-key/"),
        ("POST", "/api/attachments/"),
        ("GET", "/api/admin/users/"),
    ],
)
async def test_a_trailing_slash_is_404_never_a_redirect_inside(
    stack: Stack, ca_context: ssl.SSLContext, agent_token: str, method: str, path: str
) -> None:
    """The services' apps answered ``/api/me/`` with a 307 to their own internal URL
    (``https://127.0.0.1:<service port>/api/me``), which the gateway passed on: a client saw
    where the services listen and was sent past the gateway. It is the contract's JSON 404."""
    async with httpx.AsyncClient(base_url=stack.origin, verify=ca_context) as http:
        r = await http.request(method, path, headers={"Authorization": f"Bearer {agent_token}"})
    assert r.status_code == 404, (r.status_code, r.headers.get("location"))
    assert "location" not in r.headers
    assert r.json()["error"]["code"] == "not_found"
