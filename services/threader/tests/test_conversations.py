"""Conversation state, full-text search and cursor walks, against PostgreSQL and Redis.

ThreaderService runs in-process (no relay, no consumers): mail goes straight to the stream
handler, the API through ASGITransport, and the outbox is read from the table.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from joserfc.jwk import OKPKey

from libs.common import db, testing
from libs.common.bus import Bus
from libs.common.events import (
    Address,
    ConversationRead,
    Envelope,
    JwksPublished,
    MailReceived,
    MailStatus,
    MembershipChanged,
    SentMessage,
    UserChanged,
)
from services.threader import storage
from services.threader.service import ThreaderService
from services.threader.settings import ThreaderSettings
from services.threader.stream import agents_handler, handlers, reads_handler


@pytest.fixture(scope="session")
def signing_key() -> OKPKey:
    return OKPKey.generate_key("Ed25519", parameters={"kid": f"test-{uuid.uuid4().hex[:8]}"})


@pytest.fixture(scope="session")
async def migrated() -> AsyncIterator[str]:
    """A database of its own: the whole-stack tests' threader, on the run's shared database,
    would otherwise relay (publish and delete) the outbox rows these tests read."""
    name = f"chatflow_t_{testing.new_run_id()}_threader"
    url = await testing.create_database(name)
    s = ThreaderSettings.load(database_url=url)
    await db.migrate(
        s.database_url, s.own_database_url, s.db_role, s.db_schema, ThreaderService.migrations
    )
    yield url
    await testing.drop_database(name)


@dataclass
class Env:
    svc: ThreaderService
    client: httpx.AsyncClient
    key: OKPKey
    mailbox: str

    def token(self, sub: str = "agent-1", mailboxes: list[str] | None = None) -> dict[str, str]:
        return testing.bearer(
            self.key,
            self.svc.settings,
            sub=sub,
            roles=["agent"],
            mailboxes=[self.mailbox] if mailboxes is None else mailboxes,
        )

    async def mail(
        self,
        subject: str = "Help",
        *,
        text: str = "hello",
        reply_to: str | None = None,
        sender: Address | None = None,
        date: datetime | None = None,
        to: list[Address] | None = None,
        flags: dict[str, bool] | None = None,
    ) -> str:
        """Deliver one inbound message; returns its Message-ID."""
        mid = f"<{uuid.uuid4().hex}@customer.test>"
        now = datetime.now(UTC)
        payload = MailReceived.model_validate(
            {
                "ingest_id": uuid.uuid4().hex,
                "mailbox_id": self.mailbox,
                "mailbox_address": "support@chatflow.test",
                "message_id": mid,
                "in_reply_to": [reply_to] if reply_to else [],
                "references": [reply_to] if reply_to else [],
                "from": sender or Address(name="Ana", address="ana@customer.test"),
                "to": to or [Address(address="support@chatflow.test")],
                "subject": subject,
                "date": date or now,
                "received_at": now,
                "text": text,
                "flags": flags or {},
            }
        )
        on_received, _ = handlers(self.svc)
        await on_received(Envelope.of(payload, producer="ingest"), "0-1")
        return mid

    async def agent(
        self,
        user_id: str,
        *,
        active: bool = True,
        mailbox: str | None = None,
        account: bool = False,
        at: datetime | None = None,
    ) -> None:
        """Auth's word on an agent, through the handler: a membership of ``mailbox`` (this
        env's by default) or, with ``account``, the account itself."""
        payload: MembershipChanged | UserChanged
        if account:
            payload = UserChanged(user_id=user_id, email=f"{user_id}@chatflow.test", active=active)
        else:
            payload = MembershipChanged(
                user_id=user_id, mailbox_id=mailbox or self.mailbox, active=active
            )
        env = Envelope.of(payload, producer="auth")
        if at is not None:
            env.occurred_at = at
        await agents_handler(self.svc)(env, "0-1")

    async def conv_of(self, message_id: str) -> str:
        cid = await self.svc.pool.fetchval(
            "SELECT id_conversa FROM messages WHERE message_id = $1", message_id
        )
        return str(cid)

    async def updates(self, cid: str) -> list[dict[str, Any]]:
        """The conversation's announced states in order: ``conversation.updated`` payloads and
        the state a ``conversation.message_added`` carries."""
        rows = await self.svc.pool.fetch(
            """SELECT stream_type, envelope FROM outbox
               WHERE stream_type IN ('conversation.updated', 'conversation.message_added')
               ORDER BY id"""
        )
        out = []
        for r in rows:
            payload = json.loads(r["envelope"])["payload"]
            if r["stream_type"] == "conversation.message_added":
                payload = payload["conversation"]
            if payload["id_conversa"] == cid:
                out.append(payload)
        return out


@pytest.fixture
async def env(migrated: str, bus: Bus, signing_key: OKPKey) -> AsyncIterator[Env]:
    await bus.publish(
        Envelope.of(JwksPublished(keys=[signing_key.as_dict(private=False)]), producer="auth")
    )
    settings = ThreaderSettings.load(
        database_url=migrated,
        stream_prefix=bus.prefix,
        http_port=testing.free_port(),
        db_pool_min=1,
        db_pool_max=4,
    )
    svc = ThreaderService(settings)
    await svc.connect()
    await svc.on_start()
    transport = httpx.ASGITransport(app=svc.app())
    async with httpx.AsyncClient(transport=transport, base_url="http://threader") as client:
        yield Env(svc, client, signing_key, f"mb-{uuid.uuid4().hex[:10]}")
    await svc.pool.close()
    await svc.redis.aclose()


# ---- state ------------------------------------------------------------------------------------


async def test_patch_status_and_assignee_writes_updated_event(env: Env) -> None:
    cid = await env.conv_of(await env.mail("Order late"))
    before = len(await env.updates(cid))
    r = await env.client.patch(
        f"/api/conversations/{cid}",
        json={"status": "pending", "assignee": "me"},
        headers=env.token("agent-7"),
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "pending"
    assert r.json()["assignee"] == "agent-7"
    events = await env.updates(cid)
    assert len(events) == before + 1
    assert events[-1]["status"] == "pending"
    assert events[-1]["assignee"] == "agent-7"

    # Unchanged values: answered, nothing announced.
    r = await env.client.patch(
        f"/api/conversations/{cid}", json={"status": "pending"}, headers=env.token()
    )
    assert r.status_code == 200 and r.json()["assignee"] == "agent-7"
    assert len(await env.updates(cid)) == before + 1

    r = await env.client.patch(
        f"/api/conversations/{cid}", json={"assignee": None}, headers=env.token()
    )
    assert r.json()["assignee"] is None and r.json()["status"] == "pending"
    assert len(await env.updates(cid)) == before + 2
    assert (await env.updates(cid))[-1]["assignee"] is None
    detail = await env.client.get(f"/api/conversations/{cid}", headers=env.token())
    assert detail.json()["assignee"] is None


async def test_the_list_follows_arrival_not_the_senders_clock(env: Env) -> None:
    """A Date: in 2100 does not pin a conversation to the top, nor one in 1990 bury the reply
    that just came (found by a trial); each message keeps its own date."""

    async def order() -> list[str]:
        r = await env.client.get("/api/conversations", headers=env.token())
        return [i["id_conversa"] for i in r.json()["items"]]

    old_mid = await env.mail("Old question")
    old = await env.conv_of(old_mid)
    future = await env.conv_of(
        await env.mail("From the future", date=datetime(2100, 1, 1, tzinfo=UTC))
    )
    assert (await order())[:2] == [future, old]
    item = next(
        i
        for i in (await env.client.get("/api/conversations", headers=env.token())).json()["items"]
        if i["id_conversa"] == future
    )
    assert datetime.fromisoformat(item["last_message_at"]) < datetime.now(UTC) + timedelta(
        minutes=1
    )
    reply = await env.mail(
        "Re: Old question", reply_to=old_mid, date=datetime(1990, 1, 1, tzinfo=UTC)
    )
    assert await env.conv_of(reply) == old
    assert (await order())[:2] == [old, future]
    detail = (await env.client.get(f"/api/conversations/{old}", headers=env.token())).json()
    assert detail["messages"][0]["date"].startswith("1990-01-01")


async def test_a_read_on_the_websocket_clears_unread_in_the_list(env: Env) -> None:
    """``conversation.read`` from the notifier (the ``read`` frame) is the REST list's too; one
    for another mailbox, or our own echo, changes nothing (found by a trial)."""
    cid = await env.conv_of(await env.mail("Read me"))

    async def unread(sub: str = "agent-1") -> bool:
        r = await env.client.get("/api/conversations", headers=env.token(sub))
        return next(i["unread"] for i in r.json()["items"] if i["id_conversa"] == cid)

    assert await unread()
    on_read = reads_handler(env.svc)

    def read(producer: str, mailbox: str | None = None, user: str = "agent-1") -> Envelope:
        event = ConversationRead(
            id_conversa=cid,
            mailbox_id=mailbox or env.mailbox,
            user_id=user,
            read_at=datetime.now(UTC),
        )
        return Envelope.of(event, producer=producer)

    await on_read(read("notifier", mailbox="mb-other"), "0-1")
    await on_read(read("threader"), "0-1")
    assert await unread()
    await on_read(read("notifier"), "0-1")
    assert not await unread()
    assert await unread("agent-2")  # per agent
    await env.mail(
        "Re: Read me",
        reply_to=await env.svc.pool.fetchval(
            "SELECT message_id FROM messages WHERE id_conversa = $1::uuid", cid
        ),
    )
    assert await unread()


async def test_participants_are_the_other_side_not_the_mailbox_itself(env: Env) -> None:
    """The mailbox's own address and its +token addresses are not participants (they showed
    up as such after a customer wrote; found by a trial); the customer's colleagues are."""
    mid = await env.mail(
        "Invoice",
        to=[
            Address(address="Support+10-abc@chatflow.test"),
            Address(address="support@chatflow.test"),
            Address(name="Bo", address="bo@customer.test"),
        ],
    )
    cid = await env.conv_of(mid)
    conv = (await env.client.get(f"/api/conversations/{cid}", headers=env.token())).json()
    assert [p["address"] for p in conv["participants"]] == ["ana@customer.test", "bo@customer.test"]


async def test_an_agent_taken_out_of_the_mailbox_loses_it_before_the_token_expires(
    env: Env,
) -> None:
    """The token still lists the mailbox, but auth's membership.changed has taken the agent
    out: 404 for the conversation and its reply, nothing in the list; back in, back again
    (over REST a removed agent could read and reply for the token's life; found by a trial)."""
    cid = await env.conv_of(await env.mail("Private matter"))
    h = env.token("agent-9")
    url = f"/api/conversations/{cid}"
    assert (await env.client.get(url, headers=h)).status_code == 200
    await env.agent("agent-9", active=False)
    assert (await env.client.get(url, headers=h)).status_code == 404
    reply = await env.client.post(f"{url}/replies", json={"html": "<p>x</p>"}, headers=h)
    assert reply.status_code == 404
    assert (await env.client.get("/api/conversations", headers=h)).json()["items"] == []
    assert (await env.client.get(url, headers=env.token("agent-1"))).status_code == 200
    await env.agent("agent-9", active=True)
    assert (await env.client.get(url, headers=h)).status_code == 200


async def test_only_an_agent_of_the_mailbox_can_be_assigned(env: Env) -> None:
    cid = await env.conv_of(await env.mail("Who takes it?"))

    async def assign(who: str | None) -> httpx.Response:
        return await env.client.patch(
            f"/api/conversations/{cid}", json={"assignee": who}, headers=env.token("agent-1")
        )

    nobody = await assign("agent-unknown")
    assert nobody.status_code == 422
    assert "not an agent of this conversation's mailbox" in nobody.json()["error"]["message"]
    await env.agent("agent-elsewhere", mailbox="mb-other")
    assert (await assign("agent-elsewhere")).status_code == 422
    assert (await assign("me")).json()["assignee"] == "agent-1"  # the caller's token suffices
    await env.agent("agent-3")
    assert (await assign("agent-3")).json()["assignee"] == "agent-3"
    # Taken out of the mailbox, or the account disabled: no longer assignable.
    t0 = datetime.now(UTC)
    await env.agent("agent-3", active=False, at=t0)
    assert (await assign("agent-3")).status_code == 422
    await env.agent("agent-3", active=True, at=t0 - timedelta(seconds=5))  # older: ignored
    assert (await assign("agent-3")).status_code == 422
    await env.agent("agent-3", active=True, at=t0 + timedelta(seconds=1))
    await env.agent("agent-3", active=False, account=True)
    assert (await assign("agent-3")).status_code == 422
    await env.agent("agent-3", active=True, account=True)
    assert (await assign("agent-3")).status_code == 200
    assert (await assign(None)).json()["assignee"] is None
    # Nothing of the refusals was stored or announced.
    states = await env.updates(cid)
    assert [s["assignee"] for s in states] == [None, "agent-1", "agent-3", None]


@pytest.mark.parametrize(
    "body",
    [
        {"status": "done"},
        {"status": None},
        {"assignee": ""},
        {"assignee": "a\nb"},
        {"assignee": "x" * 201},
        {"assignee": 5},
        {"other": 1},
    ],
)
async def test_patch_refuses_bad_values(env: Env, body: dict[str, Any]) -> None:
    cid = await env.conv_of(await env.mail())
    r = await env.client.patch(f"/api/conversations/{cid}", json=body, headers=env.token())
    assert r.status_code == 422, r.text


async def test_patch_outside_mailboxes_is_404(env: Env) -> None:
    cid = await env.conv_of(await env.mail())
    for target in (cid, str(uuid.uuid4()), "not-a-uuid"):
        r = await env.client.patch(
            f"/api/conversations/{target}",
            json={"status": "closed"},
            headers=env.token(mailboxes=["other-box"]),
        )
        assert r.status_code == 404, target
    row = await env.svc.pool.fetchrow(
        "SELECT status FROM conversations WHERE id_conversa=$1::uuid", cid
    )
    assert row["status"] == "open"


async def test_inbound_mail_reopens_closed_conversation(env: Env) -> None:
    first = await env.mail("Broken")
    cid = await env.conv_of(first)
    r = await env.client.patch(
        f"/api/conversations/{cid}", json={"status": "closed"}, headers=env.token()
    )
    assert r.json()["status"] == "closed"
    await env.mail("Re: Broken", reply_to=first)
    detail = await env.client.get(f"/api/conversations/{cid}", headers=env.token())
    assert detail.json()["status"] == "open"
    assert (await env.updates(cid))[-1]["status"] == "open"


async def test_list_filters(env: Env) -> None:
    a = await env.conv_of(await env.mail("A"))
    b = await env.conv_of(await env.mail("B"))
    c = await env.conv_of(await env.mail("C"))
    h = env.token("agent-1")
    await env.agent("agent-2")
    await env.client.patch(f"/api/conversations/{a}", json={"assignee": "me"}, headers=h)
    await env.client.patch(
        f"/api/conversations/{b}", json={"assignee": "agent-2", "status": "closed"}, headers=h
    )
    await env.client.post(f"/api/conversations/{c}/read", headers=h)

    async def ids(**params: Any) -> set[str]:
        r = await env.client.get("/api/conversations", params=params, headers=h)
        assert r.status_code == 200, r.text
        return {i["id_conversa"] for i in r.json()["items"]}

    assert await ids() == {a, b, c}
    assert await ids(assignee="me") == {a}
    assert await ids(assignee="agent-2") == {b}
    assert await ids(status="closed") == {b}
    assert await ids(status="open") == {a, c}
    assert await ids(unread="true") == {a, b}
    assert await ids(unread="false") == {c}
    assert await ids(unread="true", assignee="me", status="open") == {a}


# ---- search -----------------------------------------------------------------------------------


def test_fold_drops_accents() -> None:
    assert storage.fold("Ação São Paulo ÉCOLE naïve ﬁ") == "acao sao paulo ecole naive fi"
    # NFKD first, then the marks: a no-break space becomes a space, ¼ three characters.
    assert storage.fold("A\u00a0B ¼ e\u0301\u0327 ǅ") == "a b 1\u20444 e dz"
    assert storage.fold("Plain ASCII, <ana@x.test>") == "plain ascii, <ana@x.test>"


async def test_full_text_search(env: Env) -> None:
    acao = await env.conv_of(await env.mail("Ação necessária", text="por favor"))
    reemb = await env.conv_of(await env.mail("Pedido 42", text="Quero dois reembolsos do pedido"))
    refund = await env.conv_of(await env.mail("Order", text="Where are my refunds?"))
    person = await env.conv_of(
        await env.mail("Hi", sender=Address(name="João Müller", address="jm@acme.example"))
    )
    first = await env.mail("Invoice", text="nothing here")
    invoice = await env.conv_of(first)
    await env.mail("Re: Invoice", text="segunda mensagem sobre fatura", reply_to=first)
    h = env.token()

    async def found(q: str) -> set[str]:
        r = await env.client.get("/api/conversations", params={"q": q}, headers=h)
        assert r.status_code == 200, r.text
        return {i["id_conversa"] for i in r.json()["items"]}

    assert await found("acao") == {acao}
    assert await found("AÇÃO") == {acao}
    assert await found("necessaria") == {acao}
    assert await found("reembolso") == {reemb}
    assert await found("refund") == {refund}
    assert await found("joao") == {person}
    assert await found("muller") == {person}
    assert await found("jm@acme.example") == {person}
    assert await found("acme") == {person}
    assert await found("fatura") == {invoice}  # a later message's body
    assert await found("refund OR reembolso") == {refund, reemb}
    coded = await env.conv_of(await env.mail("Access check 9955e5a84e", text="x"))
    # The parser splits such a word into a phrase; on our position-less vectors it must still hit.
    assert await found("Access check 9955e5a84e") == {coded}
    assert await found('"check 9955e5a84e"') == {coded}
    assert await found("zzzz-nothing") == set()
    assert await found("!!! ' \" & | :*") == set()  # no syntax error reaches PostgreSQL
    plan = await env.svc.pool.fetchval(
        "SELECT indexdef FROM pg_indexes WHERE indexname = 'conversations_search'"
    )
    assert "gin" in plan


async def test_search_results_keep_order_and_cursor(env: Env) -> None:
    base = datetime.now(UTC) - timedelta(hours=1)
    made = [
        await env.conv_of(await env.mail(f"reembolso {i}", date=base + timedelta(minutes=i)))
        for i in range(5)
    ]
    await env.mail("other", date=base + timedelta(minutes=10))
    h = env.token()
    seen: list[str] = []
    params: dict[str, Any] = {"q": "reembolsos", "limit": 2}
    while True:
        r = (await env.client.get("/api/conversations", params=params, headers=h)).json()
        seen += [i["id_conversa"] for i in r["items"]]
        if not r["next_cursor"]:
            break
        params["cursor"] = r["next_cursor"]
    assert seen == list(reversed(made))


# ---- cursor walks -----------------------------------------------------------------------------


async def test_walk_is_stable_while_mail_arrives(env: Env) -> None:
    base = datetime.now(UTC) - timedelta(days=1)
    firsts: dict[str, str] = {}
    for i in range(60):
        mid = await env.mail(f"ticket {i}", date=base + timedelta(minutes=i))
        firsts[await env.conv_of(mid)] = mid
    order = list(firsts)[::-1]  # newest first
    h = env.token()
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 25}
    page = 0
    while True:
        r = await env.client.get("/api/conversations", params=params, headers=h)
        assert r.status_code == 200, r.text
        body = r.json()
        seen += [i["id_conversa"] for i in body["items"]]
        # Between pages: replies to conversations not yet seen (they jump to the top), to
        # one already seen, and brand-new conversations.
        page += 1
        not_seen = [c for c in order if c not in seen]
        for cid in not_seen[:3] + not_seen[-2:] + seen[:1]:
            await env.mail("Re: more", reply_to=firsts[cid])
        await env.mail(f"new during walk {page}")
        if not body["next_cursor"]:
            break
        params["cursor"] = body["next_cursor"]
    assert page == 3
    assert len(seen) == len(set(seen)), "a conversation came twice in one walk"
    assert seen == order, "the walk must follow the order of its first page"
    # A fresh walk shows the conversations that moved on top.
    top = (await env.client.get("/api/conversations", params={"limit": 5}, headers=h)).json()
    assert top["items"][0]["subject"] == "new during walk 3"


async def test_old_cursor_without_snapshot_still_works(env: Env) -> None:
    base = datetime.now(UTC) - timedelta(hours=2)
    made = [
        await env.conv_of(await env.mail(f"x {i}", date=base + timedelta(minutes=i)))
        for i in range(3)
    ]
    row = await env.svc.pool.fetchrow(
        "SELECT last_message_at, id_conversa FROM conversations WHERE id_conversa = $1::uuid",
        made[2],
    )
    import base64

    old = base64.urlsafe_b64encode(
        json.dumps([row["last_message_at"].isoformat(), str(row["id_conversa"])]).encode()
    ).decode()
    r = await env.client.get("/api/conversations", params={"cursor": old}, headers=env.token())
    assert [i["id_conversa"] for i in r.json()["items"]] == [made[1], made[0]]
    bad = base64.urlsafe_b64encode(
        json.dumps([row["last_message_at"].isoformat(), str(row["id_conversa"]), "x"]).encode()
    ).decode()
    r = await env.client.get("/api/conversations", params={"cursor": bad}, headers=env.token())
    assert r.status_code == 400


async def test_an_answer_that_lost_its_references_finds_its_conversation_by_token(env: Env) -> None:
    from services.threader.domain import tokens

    cid = await env.conv_of(await env.mail("Broken tablet"))
    number = await env.svc.pool.fetchval(
        "SELECT number FROM conversations WHERE id_conversa = $1::uuid", cid
    )
    token = tokens.sign(number, env.svc.token_secret)
    assert (await env.updates(cid))[-1]["token"] == token  # what our outbound mail will carry

    by_reply_to = await env.mail(
        "Re: Broken tablet", to=[Address(address=f"support+{token}@chatflow.test")]
    )
    assert await env.conv_of(by_reply_to) == cid
    # (another subject: the same one from the same customer would join by the subject fallback)
    forged = await env.mail(
        "Screen cracked", to=[Address(address=f"support+{number}-aaaaaaaaaa@chatflow.test")]
    )
    assert await env.conv_of(forged) != cid

    # The [#number] of a subject counts only from someone already in the conversation.
    from_customer = await env.mail(f"Still broken [#{number}]")
    assert await env.conv_of(from_customer) == cid
    stranger = Address(name="Eve", address="eve@elsewhere.test")
    from_stranger = await env.mail(f"Question [#{number}]", sender=stranger)
    assert await env.conv_of(from_stranger) != cid


async def test_a_stranger_naming_our_message_by_its_token_gets_a_linked_conversation(
    env: Env,
) -> None:
    """Our Message-IDs carry the signed token, so a forwarded copy of our reply names the
    customer's conversation: someone we never wrote to who answers it (by In-Reply-To, or by
    References alone, or by the token's Reply-To address) must not join it, or our next reply
    goes to them. They get a conversation linked to it; the customer's colleague joins."""
    from services.threader.domain import tokens

    cid = await env.conv_of(await env.mail("Broken tablet"))
    number = await env.svc.pool.fetchval(
        "SELECT number FROM conversations WHERE id_conversa = $1::uuid", cid
    )
    token = tokens.sign(number, env.svc.token_secret)
    ours = f"<{uuid.uuid4().hex}.{token}@chatflow.test>"  # as the sender mints them

    async def linked(conv: str) -> str | None:
        value = await env.svc.pool.fetchval(
            "SELECT linked_to FROM conversations WHERE id_conversa = $1::uuid", conv
        )
        return None if value is None else str(value)

    mallory = Address(name="Mallory", address="mallory@evil.test")
    by_reply = await env.conv_of(await env.mail("Re: Broken tablet", reply_to=ours, sender=mallory))
    assert by_reply != cid
    assert await linked(by_reply) == cid
    trudy = Address(name="Trudy", address="trudy@other.test")
    by_address = await env.conv_of(
        await env.mail(
            "Fwd: Broken tablet",
            sender=trudy,
            to=[Address(address=f"support+{token}@chatflow.test")],
        )
    )
    assert by_address not in (cid, by_reply)
    assert await linked(by_address) == cid
    participants = await env.svc.pool.fetchval(
        "SELECT participants FROM conversations WHERE id_conversa = $1::uuid", cid
    )
    assert [p["address"] for p in participants] == ["ana@customer.test"]
    # Ana's colleague, same organisation, answering our message: the customer's conversation.
    colleague = Address(name="Bea", address="bea@customer.test")
    assert await env.conv_of(await env.mail("Re: tablet", reply_to=ours, sender=colleague)) == cid


# ---- reads and bounces --------------------------------------------------------------------------


async def test_mark_read_announces_conversation_read(env: Env) -> None:
    cid = await env.conv_of(await env.mail("Where is my order"))
    r = await env.client.post(f"/api/conversations/{cid}/read", headers=env.token("agent-9"))
    assert r.status_code == 204, r.text
    rows = await env.svc.pool.fetch(
        "SELECT envelope FROM outbox WHERE stream_type = 'conversation.read' ORDER BY id"
    )
    mine = [
        json.loads(r["envelope"])["payload"]
        for r in rows
        if json.loads(r["envelope"])["payload"]["id_conversa"] == cid
    ]
    assert len(mine) == 1
    assert mine[0]["user_id"] == "agent-9" and mine[0]["mailbox_id"] == env.mailbox


async def test_a_bounce_marks_our_sent_message_failed(env: Env) -> None:
    cid = await env.conv_of(await env.mail("Refund"))
    _, on_status = handlers(env.svc)
    our_id = f"<{uuid.uuid4().hex}.tok@chatflow.test>"
    sent = SentMessage.model_validate(
        {
            "message_id": our_id,
            "from": Address(name="Support", address="support@chatflow.test"),
            "to": [Address(address="ana@customer.test")],
            "subject": "Re: Refund",
            "date": datetime.now(UTC),
            "text": "done",
            "attachments": [
                {"id": "up_1", "filename": "a.pdf", "content_type": "application/pdf", "size": 3}
            ],
        }
    )

    def status(value: str) -> Envelope:
        st = MailStatus(
            send_id=uuid.uuid4().hex,
            id_conversa=cid,
            mailbox_id=env.mailbox,
            status=value,  # type: ignore[arg-type]
            message=sent,
        )
        return Envelope.of(st, producer="sender")

    await on_status(status("sent"), "0-1")
    stored = "SELECT status FROM messages WHERE message_id = $1"
    assert await env.svc.pool.fetchval(stored, our_id) == "sent"
    failed = status("failed")
    await on_status(failed, "0-2")
    await on_status(failed, "0-2")  # redelivered: the same effect
    assert await env.svc.pool.fetchval(stored, our_id) == "failed"
    detail = await env.client.get(f"/api/conversations/{cid}", headers=env.token())
    (ours,) = [m for m in detail.json()["messages"] if m["direction"] == "out"]
    assert ours["status"] == "failed"
    assert [(a["id"], a["filename"]) for a in ours["attachments"]] == [("up_1", "a.pdf")]


@pytest.mark.skipif(not testing.CORPORA.is_dir(), reason="corpora not found")
async def test_search_document_keeps_the_lexemes_of_the_whole_text(env: Env) -> None:
    """Each word once gives the lexemes of the whole folded text, over the corpora's bodies: the
    same set, or more where brackets made a tag of words (or of an address) in the text."""
    from email import message_from_bytes, policy

    texts: list[str] = []
    for path in sorted(testing.CORPORA.rglob("*.eml"))[:400]:
        try:
            msg = message_from_bytes(path.read_bytes(), policy=policy.default)
            part = msg.get_body(preferencelist=("plain", "html"))
            body = part.get_content() if part is not None else ""
        except Exception:  # noqa: S112 (a corpus of broken mail: what won't read is not text)
            continue
        if isinstance(body, str) and body.strip() and "\x00" not in body:
            texts.append(body)
    texts.append("ação-rápida foo.bar@x.example http://a.example/b?c=d 1.5e3 <a href='x y'> z")
    assert len(texts) > 100
    # Texts within the cap (past it, the whole text is cut mid-word; the words once reach further).
    texts = [t for t in texts if len(storage.fold(f"s  {t}")) <= storage._DOC_LIMIT]
    whole = [storage.fold(f"s  {t}") for t in texts]
    deduped = [storage.search_document("s", [], t) for t in texts]
    # No subject: the body's first word starts the document ("~zeca" there was a path).
    texts.append("~zeca foo")
    whole.append(storage.fold("  ~zeca foo"))
    deduped.append(storage.search_document("", [], "~zeca foo"))
    rows = await env.svc.pool.fetch(
        f"""SELECT array_to_string(tsvector_to_array({storage._TSV.format("w")}), ' ') AS w,
                   array_to_string(tsvector_to_array({storage._TSV.format("d")}), ' ') AS d
            FROM unnest($1::text[], $2::text[]) AS u (w, d)""",
        whole,
        deduped,
    )
    same = 0
    for text, r in zip(texts, rows, strict=True):
        w, d = set(r["w"].split()), set(r["d"].split())
        assert w <= d, (sorted(w - d)[:10], text[:200])
        same += w == d
    assert same >= 0.8 * len(texts), (same, len(texts))
