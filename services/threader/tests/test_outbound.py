"""POST /api/conversations: a conversation an agent starts, its first mail.send, and the
customer's answer threading into it, against PostgreSQL and Redis (ThreaderService in-process,
the API through ASGITransport, the outbox read from its table)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from joserfc.jwk import OKPKey

from libs.common import db, testing
from libs.common.bus import Bus
from libs.common.events import (
    Address,
    Envelope,
    JwksPublished,
    MailReceived,
    MailSend,
    MailStatus,
    SentMessage,
)
from services.threader.domain import tokens
from services.threader.service import ThreaderService
from services.threader.settings import ThreaderSettings
from services.threader.stream import handlers


@pytest.fixture(scope="module")
def signing_key() -> OKPKey:
    return OKPKey.generate_key("Ed25519", parameters={"kid": f"t-{uuid.uuid4().hex[:8]}"})


@dataclass
class Env:
    svc: ThreaderService
    client: httpx.AsyncClient
    key: OKPKey
    mailbox: str

    def auth(
        self, mailboxes: list[str] | None = None, roles: list[str] | None = None
    ) -> dict[str, str]:
        return testing.bearer(
            self.key,
            self.svc.settings,
            sub="agent-1",
            roles=["agent"] if roles is None else roles,
            mailboxes=[self.mailbox] if mailboxes is None else mailboxes,
        )

    def body(self, **kw: Any) -> dict[str, Any]:
        values: dict[str, Any] = {
            "mailbox": self.mailbox,
            "to": [{"name": "Zoë Customer", "address": "zoe@customer.test"}],
            "cc": [{"address": "boss@customer.test"}, {"address": "ZOE@customer.test"}],
            "subject": "Your refund is on its way",
            "html": "<p>Hello Zoë</p>",
        }
        values.update(kw)
        return values

    async def start(self, **kw: Any) -> httpx.Response:
        return await self.client.post(
            "/api/conversations", json=self.body(**kw), headers=self.auth()
        )

    async def events(self, type_: str) -> list[dict[str, Any]]:
        rows = await self.svc.pool.fetch(
            "SELECT envelope FROM outbox WHERE stream_type = $1 ORDER BY id", type_
        )
        return [json.loads(r["envelope"])["payload"] for r in rows]


@pytest.fixture
async def env(database_url: str, bus: Bus, signing_key: OKPKey) -> AsyncIterator[Env]:
    s = ThreaderSettings.load(
        database_url=database_url,
        stream_prefix=bus.prefix,
        http_port=testing.free_port(),
        db_pool_min=1,
        db_pool_max=4,
    )
    await db.migrate(
        s.database_url, s.own_database_url, s.db_role, s.db_schema, ThreaderService.migrations
    )
    await bus.publish(Envelope.of(JwksPublished(keys=[signing_key.as_dict(private=False)]), "auth"))
    svc = ThreaderService(s)
    await svc.connect()
    await svc.on_start()
    transport = httpx.ASGITransport(app=svc.app())
    async with httpx.AsyncClient(transport=transport, base_url="http://threader") as client:
        yield Env(svc, client, signing_key, f"mb-{uuid.uuid4().hex[:10]}")
    await svc.pool.close()
    await svc.redis.aclose()


def mine(events: list[dict[str, Any]], id_conversa: str) -> list[dict[str, Any]]:
    return [e for e in events if e["id_conversa"] == id_conversa]


async def test_start_creates_the_conversation_and_commands_its_first_mail(env: Env) -> None:
    r = await env.start(attachments=["up_0123456789abcdef0123456789abcdef"], client_id="c-1")
    assert r.status_code == 202, r.text
    started = r.json()
    assert set(started) == {"id_conversa", "send_id"}
    cid = started["id_conversa"]

    conv = (await env.client.get(f"/api/conversations/{cid}", headers=env.auth())).json()
    assert conv["status"] == "open" and conv["subject"] == "Your refund is on its way"
    assert conv["mailbox"] == env.mailbox and conv["messages"] == []
    assert [p["address"] for p in conv["participants"]] == [
        "zoe@customer.test",
        "boss@customer.test",
    ]
    listing = (await env.client.get("/api/conversations", headers=env.auth())).json()
    assert listing["items"][0]["id_conversa"] == cid

    (cmd,) = mine(await env.events("mail.send"), cid)
    send = MailSend.model_validate(cmd)
    assert send.send_id == started["send_id"] and send.client_id == "c-1"
    assert send.mailbox_id == env.mailbox and send.user_id == "agent-1"
    assert [a.address for a in send.to or []] == ["zoe@customer.test"]
    assert [a.address for a in send.cc or []] == ["boss@customer.test", "ZOE@customer.test"]
    assert send.attachments == ["up_0123456789abcdef0123456789abcdef"]
    assert send.conversation is not None and send.conversation.number == conv["number"]
    assert send.conversation.subject == "Your refund is on its way"
    assert send.conversation.token == tokens.sign(conv["number"], env.svc.token_secret)
    assert send.automatic is False
    (updated,) = mine(await env.events("conversation.updated"), cid)
    assert updated["status"] == "open" and updated["number"] == conv["number"]


async def test_a_retry_with_the_same_client_id_starts_nothing_new(env: Env) -> None:
    first = (await env.start(client_id="again")).json()
    second = await env.start(client_id="again", subject="Changed my mind")
    assert second.status_code == 202 and second.json() == first
    assert len(mine(await env.events("mail.send"), first["id_conversa"])) == 1
    assert (
        await env.svc.pool.fetchval(
            "SELECT count(*) FROM conversations WHERE mailbox_id = $1", env.mailbox
        )
        == 1
    )
    # Without a client_id every request is a new conversation.
    a, b = (await env.start()).json(), (await env.start()).json()
    assert a["id_conversa"] != b["id_conversa"]


@pytest.mark.parametrize(
    ("changes", "status"),
    [
        ({"mailbox": "mb-not-mine"}, 404),
        ({"to": []}, 422),
        ({"to": [{"address": "not an address"}]}, 422),
        ({"to": [{"name": "x\r\nBcc: e@x.test", "address": "a@b.test"}]}, 422),
        ({"subject": "hi\r\nBcc: evil@x.test"}, 422),
        ({"subject": ""}, 422),
        ({"html": ""}, 422),
        ({"html": "nul\x00"}, 422),
        ({"attachments": ["../etc"]}, 422),
    ],
)
async def test_bad_starts_are_refused(env: Env, changes: dict[str, Any], status: int) -> None:
    r = await env.client.post("/api/conversations", json=env.body(**changes), headers=env.auth())
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"]
    assert (
        await env.svc.pool.fetchval(
            "SELECT count(*) FROM conversations WHERE mailbox_id = $1", env.mailbox
        )
        == 0
    )


async def test_only_agents_start_conversations(env: Env) -> None:
    r = await env.client.post("/api/conversations", json=env.body(), headers=env.auth(roles=[]))
    assert r.status_code == 403
    assert (await env.client.post("/api/conversations", json=env.body())).status_code == 401


async def test_the_answer_threads_in_even_with_our_message_id_rewritten(env: Env) -> None:
    """What the sender reports as sent joins the conversation; the customer's answer, whose
    In-Reply-To names an id a relay made up, finds it by the token of our Reply-To."""
    started = (await env.start()).json()
    cid = started["id_conversa"]
    (cmd,) = mine(await env.events("mail.send"), cid)
    opening = MailSend.model_validate(cmd).conversation
    assert opening is not None
    ours = f"<{uuid.UUID(started['send_id']).hex}.{opening.token}@chatflow.test>"
    now = datetime.now(UTC)
    on_received, on_status = handlers(env.svc)
    sent = MailStatus(
        send_id=started["send_id"],
        id_conversa=cid,
        mailbox_id=env.mailbox,
        status="sent",
        message=SentMessage.model_validate(
            {
                "message_id": ours,
                "from": {"address": "support@chatflow.test"},
                "to": [{"address": "zoe@customer.test"}],
                "subject": f"Your refund is on its way [#{opening.number}]",
                "date": now,
                "text": "Hello Zoë",
            }
        ),
    )
    await on_status(Envelope.of(sent, producer="sender"), "0-1")
    rewritten = f"<{uuid.uuid4().hex}@relay.example>"
    answer = MailReceived.model_validate(
        {
            "ingest_id": uuid.uuid4().hex,
            "mailbox_id": env.mailbox,
            "mailbox_address": "support@chatflow.test",
            "message_id": f"<{uuid.uuid4().hex}@customer.test>",
            "in_reply_to": [rewritten],
            "references": [rewritten],
            "from": Address(name="Zoë", address="zoe@customer.test"),
            "to": [Address(address=f"support+{opening.token}@chatflow.test")],
            "subject": "Re: Your refund is on its way",
            "date": now,
            "received_at": now,
            "text": "Thanks!",
        }
    )
    await on_received(Envelope.of(answer, producer="ingest"), "0-2")
    conv = (await env.client.get(f"/api/conversations/{cid}", headers=env.auth())).json()
    assert [m["direction"] for m in conv["messages"]] == ["out", "in"]
    assert [m["message_id"] for m in conv["messages"]] == [ours, answer.message_id]


async def test_a_rest_reply_names_its_draft_in_the_command(env: Env) -> None:
    """So the notifier can empty the collaborative draft it was written in."""
    cid = (await env.start()).json()["id_conversa"]
    url = f"/api/conversations/{cid}/replies"
    r = await env.client.post(
        url, json={"html": "<p>Done.</p>", "draft": "reply"}, headers=env.auth()
    )
    assert r.status_code == 202, r.text
    for bad in ("", "has space", "x" * 65, 5):
        r = await env.client.post(url, json={"html": "<p>x</p>", "draft": bad}, headers=env.auth())
        assert r.status_code == 422, bad
    r = await env.client.post(url, json={"html": "  \n "}, headers=env.auth())  # no content
    assert r.status_code == 422, r.text
    sends = [MailSend.model_validate(e) for e in mine(await env.events("mail.send"), cid)]
    assert [s.draft for s in sends] == [None, "reply"]  # the start's command, then the reply


async def test_a_rest_reply_to_an_address_the_sender_would_refuse_is_a_422(env: Env) -> None:
    """The API checks recipients by the composer's rule (libs.common.addresses): a 202 followed
    by a failed send.status was all an agent got for these before (found by a trial)."""
    cid = (await env.start()).json()["id_conversa"]
    url = f"/api/conversations/{cid}/replies"
    before = len(mine(await env.events("mail.send"), cid))
    for bad in (
        "a,victim@evil.test",
        "(c)x@example.com",
        '"q"@example.com',
        "x@[127.0.0.1]",
        "x@-evil.test",
        "x@localhost",
        "jösé@exämple.test",
        "x@example.123",
    ):
        for field in ("to", "cc"):
            body = {"html": "<p>x</p>", field: [{"address": bad}]}
            r = await env.client.post(url, json=body, headers=env.auth())
            assert r.status_code == 422, (bad, field, r.text)
    ok = {"html": "<p>x</p>", "to": [{"address": "zoe@exämple.test"}]}  # an IDN domain is fine
    assert (await env.client.post(url, json=ok, headers=env.auth())).status_code == 202
    assert len(mine(await env.events("mail.send"), cid)) == before + 1


async def test_a_rest_replys_client_id_makes_a_retry_one_send_and_a_reuse_a_409(env: Env) -> None:
    """The same client_id again on the same conversation answers with the first send (one
    mail.send); on another conversation, or on a start, it is a 409 instead of a 202 that the
    sender then dropped in silence (found by a trial)."""
    a = (await env.start(client_id="start-a")).json()["id_conversa"]
    b = (await env.start(client_id="start-b")).json()["id_conversa"]
    body = {"html": "<p>Done.</p>", "client_id": "reply-1"}
    first = await env.client.post(f"/api/conversations/{a}/replies", json=body, headers=env.auth())
    again = await env.client.post(f"/api/conversations/{a}/replies", json=body, headers=env.auth())
    assert first.status_code == again.status_code == 202
    assert first.json()["send_id"] == again.json()["send_id"]
    replies = [s for s in mine(await env.events("mail.send"), a) if s["client_id"] == "reply-1"]
    assert [s["send_id"] for s in replies] == [first.json()["send_id"]]
    other = await env.client.post(f"/api/conversations/{b}/replies", json=body, headers=env.auth())
    assert other.status_code == 409
    assert "another conversation" in other.json()["error"]["message"]
    started = {"html": "<p>x</p>", "client_id": "start-a"}
    assert (
        await env.client.post(f"/api/conversations/{a}/replies", json=started, headers=env.auth())
    ).status_code == 409
    assert (await env.start(client_id="reply-1")).status_code == 409
    # Without a client_id every reply is its own send, as before.
    plain = {"html": "<p>Again.</p>"}
    ids = {
        (
            await env.client.post(f"/api/conversations/{a}/replies", json=plain, headers=env.auth())
        ).json()["send_id"]
        for _ in range(2)
    }
    assert len(ids) == 2
