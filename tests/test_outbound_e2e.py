"""An agent starts a conversation, through the real stack (gateway, auth, threader, sender,
ingest, the SMTP sink): upload a file, ``POST /api/conversations``, the mail at the sink with the
file, and the customer's answer -- through a relay that rewrote our Message-ID -- lands in the
same ``id_conversa``."""

from __future__ import annotations

import ssl
import uuid
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any

import httpx
import pytest

from libs.common import testing
from tests.conftest import maildir_messages
from tests.test_e2e_skeleton import smtp_send
from tools.devstack import Stack

pytestmark = pytest.mark.xdist_group("stack")


def sent_with(stack: Stack, send_id: str) -> EmailMessage | None:
    for raw in maildir_messages(stack.sink_dir):
        msg = message_from_bytes(raw, policy=policy.default)
        if uuid.UUID(send_id).hex in str(msg["Message-ID"]):
            assert isinstance(msg, EmailMessage)
            return msg
    return None


async def test_start_conversation_and_the_answer_threads_in(
    stack: Stack, agent_token: str, ca_context: ssl.SSLContext
) -> None:
    auth = {"Authorization": f"Bearer {agent_token}"}
    async with httpx.AsyncClient(base_url=stack.origin, verify=ca_context, timeout=30) as http:
        me = (await http.get("/api/me", headers=auth)).json()
        (box,) = [m for m in me["mailboxes"] if m["address"] == "support@chatflow.test"]

        # An upload goes to the sender through the gateway, and comes back for this agent.
        data = bytes(range(256)) * 64
        r = await http.post(
            "/api/attachments",
            files={"file": ("orçamento.pdf", data, "application/pdf")},
            headers=auth,
        )
        assert r.status_code == 201, r.text
        upload = r.json()
        assert upload["filename"] == "orçamento.pdf" and upload["size"] == len(data)
        r = await http.get(f"/api/attachments/{upload['id']}", headers=auth)
        assert r.status_code == 200 and r.content == data
        # An inbound attachment id still reaches ingest (which does not know this one).
        r = await http.get(f"/api/attachments/{uuid.uuid4()}", headers=auth)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"

        subject = f"Your quote {uuid.uuid4().hex[:6]}"
        r = await http.post(
            "/api/conversations",
            json={
                "mailbox": box["id"],
                "to": [{"name": "Zoë Customer", "address": "zoe@customer.test"}],
                "subject": subject,
                "html": "<p>Hello Zoë, here is <b>the quote</b>.</p>",
                "attachments": [upload["id"]],
                "client_id": uuid.uuid4().hex,
            },
            headers=auth,
        )
        assert r.status_code == 202, r.text
        started = r.json()
        id_conversa, send_id = started["id_conversa"], started["send_id"]

        first = await testing.eventually(lambda: sent_with(stack, send_id), timeout=30)
        assert first["To"].addresses[0].addr_spec == "zoe@customer.test"
        assert str(first["Subject"]).startswith(subject) and "[#" in str(first["Subject"])
        assert first["In-Reply-To"] is None and first["References"] is None
        (part,) = list(first.iter_attachments())
        assert part.get_filename() == "orçamento.pdf" and part.get_content() == data
        reply_to = first["Reply-To"].addresses[0].addr_spec
        assert reply_to.startswith("support+") and reply_to.endswith("@chatflow.test")

        async def our_message() -> dict[str, Any] | None:
            conv = (await http.get(f"/api/conversations/{id_conversa}", headers=auth)).json()
            return conv if conv["messages"] else None

        conv = await testing.eventually(our_message, timeout=30)
        assert [m["message_id"] for m in conv["messages"]] == [str(first["Message-ID"])]
        assert conv["messages"][0]["direction"] == "out"

        # The customer's client answers what a relay handed it: a Message-ID of the relay's own.
        rewritten = make_msgid(domain="relay.example")
        answer = EmailMessage()
        answer["From"] = "Zoë Customer <zoe@customer.test>"
        answer["To"] = reply_to
        answer["Subject"] = f"Re: {subject}"
        answer["Message-ID"] = make_msgid(domain="customer.test")
        answer["In-Reply-To"] = rewritten
        answer["References"] = rewritten
        answer.set_content("Thanks, the quote looks good.")
        await smtp_send(stack, answer, ca_context)

        async def answered() -> dict[str, Any] | None:
            r = await http.get(f"/api/conversations/{id_conversa}", headers=auth)
            conv = r.json()
            return conv if len(conv["messages"]) >= 2 else None

        conv = await testing.eventually(answered, timeout=30)
        assert conv["id_conversa"] == id_conversa
        assert [m["message_id"] for m in conv["messages"]] == [
            str(first["Message-ID"]),
            answer["Message-ID"],
        ]
        assert [m["direction"] for m in conv["messages"]] == ["out", "in"]


async def test_a_reply_goes_to_the_reply_to_of_a_web_form(
    stack: Stack, agent_token: str, ca_context: ssl.SSLContext
) -> None:
    """A contact form mails from noreply@ with the customer in Reply-To: the agent's reply
    reaches the customer, not the form (RFC 5322 3.6.2; found by a trial)."""
    from tests.test_threading_e2e import added, agent_socket, mail

    tag = uuid.uuid4().hex[:6]
    auth = {"Authorization": f"Bearer {agent_token}"}
    customer = f"real.{tag}@person-{tag}.test"
    async with (
        agent_socket(stack, agent_token, ca_context) as ws,
        httpx.AsyncClient(base_url=stack.origin, verify=ca_context) as http,
    ):
        form = mail(
            f"Noreply Form <noreply@forms-{tag}.test>",
            f"Contact form {tag}",
            "Someone filled in the form.",
            Reply_To=f"Real Person <{customer}>",
        )
        await smtp_send(stack, form, ca_context)
        conv = (await added(ws, form["Message-ID"]))["id_conversa"]
        detail = (await http.get(f"/api/conversations/{conv}", headers=auth)).json()
        assert [a["address"] for a in detail["messages"][0]["reply_to"]] == [customer]
        r = await http.post(
            f"/api/conversations/{conv}/replies", json={"html": "<p>Hello!</p>"}, headers=auth
        )
        assert r.status_code == 202, r.text
        send_id = r.json()["send_id"]

        async def delivered() -> EmailMessage | None:
            return sent_with(stack, send_id)

        msg = await testing.eventually(delivered, timeout=20)
        assert msg["To"].addresses[0].addr_spec == customer
