"""Threading through the whole stack: SMTP in, the threader's grouping, the API and the WebSocket.

Replies, a forward, a reply that arrives before its original and two conversations merged by a
message that names both: each seen in the ``message.added`` frames and in the API, where a
merged id answers with its survivor (``merged_from`` and ``Content-Location``) and a frame on
the socket names the merged id and its survivor.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import uuid
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import DEMO_PASSWORD
from tests.oauth_client import login
from tests.test_e2e_skeleton import smtp_send
from tools.devstack import Stack

pytestmark = pytest.mark.xdist_group("stack")


def mail(sender: str, subject: str, body: str, **headers: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "support@chatflow.test"
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2])
    for k, v in headers.items():
        msg[k.replace("_", "-")] = v
    msg.set_content(body)
    return msg


SEEN: list[dict[str, Any]] = []


def agent_socket(stack: Stack, token: str, ca_context: ssl.SSLContext) -> connect:
    """The agent's WebSocket through the gateway, as the web app opens it."""
    return connect(
        f"wss://127.0.0.1:{stack.ports.gateway}/ws",
        subprotocols=["chatflow.v1", f"bearer.{token}"],  # type: ignore[list-item]
        ssl=ca_context,
        origin=stack.origin,  # type: ignore[arg-type]
    )


async def added(ws: ClientConnection, message_id: str, timeout: float = 20.0) -> dict[str, Any]:
    """The ``message.added`` frame of one message; every frame read is kept in ``SEEN``."""

    async def loop() -> dict[str, Any]:
        while True:
            frame = json.loads(await ws.recv())
            SEEN.append(frame)
            if (
                frame.get("type") == "message.added"
                and frame["message"]["message_id"] == message_id
            ):
                return frame

    return await asyncio.wait_for(loop(), timeout)


def _announces(frame: dict[str, Any], merged: str, into: str) -> bool:
    if frame.get("type") != "conversation.merged":
        return False
    return frame.get("into") == into and merged in (frame.get("merged") or [])


async def merge_announced(ws: ClientConnection, merged: str, into: str) -> None:
    if any(_announces(f, merged, into) for f in SEEN):
        return
    while not _announces(frame := json.loads(await ws.recv()), merged, into):
        SEEN.append(frame)


async def test_replies_forward_out_of_order_and_merge(
    stack: Stack, agent_token: str, ca_context: ssl.SSLContext
) -> None:
    tag = uuid.uuid4().hex[:6]
    customer = f"Iris <iris.{tag}@acme-{tag}.test>"
    auth = {"Authorization": f"Bearer {agent_token}"}
    async with (
        agent_socket(stack, agent_token, ca_context) as ws,
        httpx.AsyncClient(base_url=stack.origin, verify=ca_context) as http,
    ):
        # A question, a reply to it, and a forward of it into support: one conversation.
        first = mail(customer, f"Invoice {tag} is wrong", "The total is off.")
        await smtp_send(stack, first, ca_context)
        conv = (await added(ws, first["Message-ID"]))["id_conversa"]
        again = mail(
            customer,
            f"RE: Invoice {tag} is wrong",
            "Any news?",
            In_Reply_To=first["Message-ID"],
            References=first["Message-ID"],
        )
        await smtp_send(stack, again, ca_context)
        assert (await added(ws, again["Message-ID"]))["id_conversa"] == conv
        forward = mail(
            customer,
            f"Fwd: Invoice {tag} is wrong",
            "---------- Forwarded message ----------\nThe total is off.",
            References=f"{first['Message-ID']} {again['Message-ID']}",
        )
        await smtp_send(stack, forward, ca_context)
        assert (await added(ws, forward["Message-ID"]))["id_conversa"] == conv
        # A forward with no link at all still joins: same customer, same subject, same week.
        bare = mail(customer, f"ENC: [acme] Invoice {tag} is wrong", "Forwarded again")
        await smtp_send(stack, bare, ca_context)
        assert (await added(ws, bare["Message-ID"]))["id_conversa"] == conv
        # Another customer with the same subject and no link is another conversation.
        other = mail(f"Otto <otto@other-{tag}.test>", f"Invoice {tag} is wrong", "Mine too")
        await smtp_send(stack, other, ca_context)
        assert (await added(ws, other["Message-ID"]))["id_conversa"] != conv

        # Out of order: the answer arrives before the message it answers.
        original = mail(customer, f"Delivery {tag}", "Where is it?")
        answer = mail(
            f"Kim <kim.{tag}@acme-{tag}.test>",
            f"Re: Delivery {tag}",
            "Same question here.",
            In_Reply_To=original["Message-ID"],
            References=original["Message-ID"],
        )
        await smtp_send(stack, answer, ca_context)
        early = (await added(ws, answer["Message-ID"]))["id_conversa"]
        await smtp_send(stack, original, ca_context)
        assert (await added(ws, original["Message-ID"]))["id_conversa"] == early

        # A merge: one message names both conversations; the older one survives.
        both = mail(
            customer,
            f"Re: Invoice {tag} and delivery",
            "Both at once.",
            References=f"{first['Message-ID']} {original['Message-ID']}",
        )
        await smtp_send(stack, both, ca_context)
        assert (await added(ws, both["Message-ID"]))["id_conversa"] == conv
        # The socket says so too: a frame names the merged id and its survivor (today the
        # notifier's badge frame, ``{"type": "badge", "id_conversa", "merged": [...]}``).
        await asyncio.wait_for(merge_announced(ws, early, conv), 20)

        r = await http.get(f"/api/conversations/{early}", headers=auth)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id_conversa"] == conv and body["merged_from"] == early
        assert r.headers["content-location"] == f"/api/conversations/{conv}"
        ids = {m["message_id"] for m in body["messages"]}
        assert ids == {
            m["Message-ID"] for m in (first, again, forward, bare, original, answer, both)
        }
        listing = await http.get("/api/conversations", headers=auth, params={"q": tag})
        found = {i["id_conversa"] for i in listing.json()["items"]}
        assert conv in found and early not in found


async def test_a_conversation_is_assigned_only_to_an_agent_of_its_mailbox(
    stack: Stack, agent_token: str, ca_context: ssl.SSLContext
) -> None:
    """Auth's membership events reach the threader: the demo admin, a member of the support
    mailbox, can be assigned; an id auth never announced is refused with the reason."""
    tag = uuid.uuid4().hex[:6]
    admin = await login(stack.origin, "admin@chatflow.test", DEMO_PASSWORD, ca_context)
    auth = {"Authorization": f"Bearer {agent_token}"}
    async with (
        agent_socket(stack, agent_token, ca_context) as ws,
        httpx.AsyncClient(base_url=stack.origin, verify=ca_context) as http,
    ):
        me = await http.get("/api/me", headers={"Authorization": f"Bearer {admin['access_token']}"})
        admin_id = me.json()["id"]
        first = mail(f"Lena <lena.{tag}@shop-{tag}.test>", f"Refund {tag}", "Please refund.")
        await smtp_send(stack, first, ca_context)
        conv = (await added(ws, first["Message-ID"]))["id_conversa"]
        url = f"/api/conversations/{conv}"
        stranger = await http.patch(url, json={"assignee": str(uuid.uuid4())}, headers=auth)
        assert stranger.status_code == 422, stranger.text
        assert "not an agent" in stranger.json()["error"]["message"]
        done = await http.patch(url, json={"assignee": admin_id}, headers=auth)
        assert done.status_code == 200, done.text
        assert done.json()["assignee"] == admin_id


async def test_an_out_of_office_reply_leaves_a_closed_conversation_closed(
    stack: Stack, agent_token: str, ca_context: ssl.SSLContext
) -> None:
    """Through SMTP, ingest's Auto-Submitted flag reaches the threader and the socket: the
    auto-reply joins the conversation, marked, and reopens nothing."""
    tag = uuid.uuid4().hex[:6]
    customer = f"Noor <noor.{tag}@firm-{tag}.test>"
    auth = {"Authorization": f"Bearer {agent_token}"}
    async with (
        agent_socket(stack, agent_token, ca_context) as ws,
        httpx.AsyncClient(base_url=stack.origin, verify=ca_context) as http,
    ):
        first = mail(customer, f"Contract {tag}", "Please send the contract.")
        await smtp_send(stack, first, ca_context)
        conv = (await added(ws, first["Message-ID"]))["id_conversa"]
        url = f"/api/conversations/{conv}"
        assert (await http.patch(url, json={"status": "closed"}, headers=auth)).status_code == 200
        ooo = mail(
            customer,
            f"Automatic reply: Contract {tag}",
            "I am out of the office until Monday.",
            In_Reply_To=first["Message-ID"],
            Auto_Submitted="auto-replied",
        )
        await smtp_send(stack, ooo, ca_context)
        frame = await added(ws, ooo["Message-ID"])
        assert frame["id_conversa"] == conv and frame["message"]["automatic"] is True
        assert frame["conversation"]["status"] == "closed"
        detail = (await http.get(url, headers=auth)).json()
        assert detail["status"] == "closed"
        assert [m["automatic"] for m in detail["messages"]] == [False, True]


async def test_a_read_frame_on_the_socket_is_read_in_the_rest_list(
    stack: Stack, agent_token: str, ca_context: ssl.SSLContext
) -> None:
    """The notifier's conversation.read reaches the threader: the list's unread follows."""
    tag = uuid.uuid4().hex[:6]
    auth = {"Authorization": f"Bearer {agent_token}"}
    async with (
        agent_socket(stack, agent_token, ca_context) as ws,
        httpx.AsyncClient(base_url=stack.origin, verify=ca_context) as http,
    ):
        first = mail(f"Ivo <ivo.{tag}@shop-{tag}.test>", f"Unread {tag}", "Hello?")
        await smtp_send(stack, first, ca_context)
        conv = (await added(ws, first["Message-ID"]))["id_conversa"]

        async def unread() -> bool:
            items = (await http.get("/api/conversations", headers=auth)).json()["items"]
            return bool(next(i["unread"] for i in items if i["id_conversa"] == conv))

        assert await unread()
        await ws.send(json.dumps({"type": "read", "id_conversa": conv}))
        deadline = asyncio.get_running_loop().time() + 10
        while await unread():
            assert asyncio.get_running_loop().time() < deadline, "still unread in the list"
            await asyncio.sleep(0.3)  # the gateway rate-limits the agent: poll gently
