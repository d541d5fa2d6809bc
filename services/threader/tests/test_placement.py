"""The threading rules past Message-IDs, through the real stream handlers and PostgreSQL.

Each fault case is a small mailbox with its stated grouping; every case is replayed in at least
50 arrival orders (random.Random(seed) shuffles, each order in a fresh mailbox) and must give
the same grouping every time.  Accuracy is reported as pairs of messages correctly put
together or apart.
"""

from __future__ import annotations

import base64
import itertools
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

from libs.common.events import Address, Envelope, MailReceived, MailStatus, SentMessage
from services.ingest.domain.mime_reader import read_message
from services.ingest.received import to_event
from services.ingest.storage import Mailbox
from services.threader.storage import Rules
from services.threader.stream import handlers
from services.threader.tests import test_threading as corp
from services.threader.tests.test_conversations import Env

OURS = "chatflow.test"
SUPPORT = f"support@{OURS}"
BASE = datetime.now(UTC).replace(microsecond=0) - timedelta(days=7)
H1 = bytes(range(1, 23))
H2 = bytes(range(30, 52))


Partition = frozenset[frozenset[str]]


def ti(header: bytes, levels: int = 0) -> str:
    return base64.b64encode(header + bytes([7] * 5 * levels)).decode()


@dataclass(frozen=True)
class M:
    """One message of a case; ``refs``/``irt`` name other labels (or raw ``<ids>``)."""

    label: str
    sender: str
    subject: str = "Order 7 is late"
    irt: tuple[str, ...] = ()
    refs: tuple[str, ...] = ()
    to: tuple[str, ...] = (SUPPORT,)
    cc: tuple[str, ...] = ()
    at: timedelta = timedelta(0)
    thread_index: str | None = None
    thread_topic: str | None = None
    out_in: str | None = None  # outbound: sent from this pre-created conversation

    @property
    def message_id(self) -> str:
        domain = OURS if self.out_in else self.sender.rpartition("@")[2]
        return f"<{self.label}.case@{domain}>"


@dataclass
class Case:
    name: str
    messages: list[M]
    expected: list[set[str]]
    conversations: list[str] = field(default_factory=list)  # made before any mail (POST)


def _ids(labels: Sequence[str], by_label: dict[str, M]) -> list[str]:
    return [x if x.startswith("<") else by_label[x].message_id for x in labels]


def inbound_payload(mailbox: str, m: M, by_label: dict[str, M]) -> dict[str, object]:
    """The ``mail.received`` payload of an inbound message of a case."""
    date = BASE + m.at
    return {
        "ingest_id": uuid.uuid4().hex,
        "mailbox_id": mailbox,
        "mailbox_address": SUPPORT,
        "message_id": m.message_id,
        "in_reply_to": _ids(m.irt, by_label),
        "references": _ids(m.refs, by_label),
        "from": {"address": m.sender},
        "to": [{"address": a} for a in m.to],
        "cc": [{"address": a} for a in m.cc],
        "subject": m.subject,
        "date": date,
        "received_at": date,
        "text": f"body of {m.label}",
        "thread_index": m.thread_index,
        "thread_topic": m.thread_topic,
    }


async def deliver(
    env: Env, mailbox: str, m: M, by_label: dict[str, M], convs: dict[str, str]
) -> None:
    on_received, on_status = handlers(env.svc)
    date = BASE + m.at
    if m.out_in:
        status = MailStatus(
            send_id=str(uuid.uuid4()),
            id_conversa=convs[m.out_in],
            mailbox_id=mailbox,
            status="sent",
            message=SentMessage.model_validate(
                {
                    "message_id": m.message_id,
                    "from": {"address": SUPPORT},
                    "to": [{"address": a} for a in m.to],
                    "cc": [{"address": a} for a in m.cc],
                    "subject": m.subject,
                    "date": date,
                    "in_reply_to": _ids(m.irt, by_label),
                    "references": _ids(m.refs, by_label),
                }
            ),
        )
        await on_status(Envelope.of(status, producer="sender"), "0-1")
        return
    payload = MailReceived.model_validate(inbound_payload(mailbox, m, by_label))
    await on_received(Envelope.of(payload, producer="ingest"), "0-1")


async def precreate(env: Env, mailbox: str, names: Sequence[str]) -> dict[str, str]:
    """What POST /api/conversations does before its first mail leaves: an empty conversation."""
    out = {}
    for name in names:
        cid = uuid.uuid4()
        await env.svc.pool.execute(
            """INSERT INTO conversations (id_conversa, mailbox_id, channel, subject, created_at,
                                          last_message_at)
               VALUES ($1, $2, 'email', $3, clock_timestamp(), $4)""",
            cid,
            mailbox,
            name,
            BASE,
        )
        out[name] = str(cid)
    return out


async def play(env: Env, case: Case, order: Sequence[M], mailbox: str | None = None) -> Partition:
    mailbox = mailbox or f"mb-{uuid.uuid4().hex[:12]}"
    by_label = {m.label: m for m in case.messages}
    convs = await precreate(env, mailbox, case.conversations)
    for m in order:
        await deliver(env, mailbox, m, by_label, convs)
    return await grouping(env, mailbox, case)


async def grouping(env: Env, mailbox: str, case: Case) -> Partition:
    """The case's messages as the mailbox grouped them, each stored once."""
    rows = await env.svc.pool.fetch(
        "SELECT message_id, id_conversa FROM messages WHERE mailbox_id = $1", mailbox
    )
    label = {m.message_id: m.label for m in case.messages}
    groups: dict[str, set[str]] = {}
    for r in rows:
        groups.setdefault(str(r["id_conversa"]), set()).add(label[r["message_id"]])
    assert sum(map(len, groups.values())) == len(case.messages)
    return frozenset(frozenset(g) for g in groups.values())


async def conv_in(env: Env, mailbox: str, message_id: str) -> str:
    """The conversation of a message of one mailbox (the cases reuse ids across mailboxes)."""
    cid = await env.svc.pool.fetchval(
        "SELECT id_conversa FROM messages WHERE mailbox_id = $1 AND message_id = $2",
        mailbox,
        message_id,
    )
    return str(cid)


def pair_accuracy(expected: Partition, actual: Partition) -> tuple[int, int]:
    exp = {k: i for i, g in enumerate(expected) for k in g}
    act = {k: i for i, g in enumerate(actual) for k in g}
    pairs = list(itertools.combinations(sorted(exp), 2))
    return sum((exp[a] == exp[b]) == (act[a] == act[b]) for a, b in pairs), len(pairs)


ZOE, BOB = "zoe@customer.test", "bob@other.test"
NEWS, CASE = "Our new prices", "Your contract"

CASES = [
    Case(
        "subject-fallback",
        [
            M("z1", ZOE, "Question"),
            M("z2", ZOE, "Re: Question", at=timedelta(hours=1)),
            M("b1", BOB, "Question", at=timedelta(hours=2)),  # another customer: apart
            M("z4", ZOE, "Fwd: [Acme] RES: question", at=timedelta(hours=2)),
            M("z3", ZOE, "Re[2]: Question", at=timedelta(days=5)),  # outside the window
            M("z5", "ana@customer.test", "AW: Question", cc=(ZOE,), at=timedelta(hours=3)),
        ],
        [{"z1", "z2", "z4", "z5"}, {"b1"}, {"z3"}],
    ),
    Case(
        "outlook-thread-index",
        [
            M("o1", "ana@acme.test", "Rechnung", thread_index=ti(H1), thread_topic="Rechnung"),
            M("o2", "carl@partner.test", "AW: Rechnung", thread_index=ti(H1, 1)),
            M("o3", "ana@acme.test", "Andere Sache", thread_index=ti(H2)),
            M("o4", "ana@acme.test", "WG: AW: Rechnung", thread_index=ti(H1, 2)),
        ],
        [{"o1", "o2", "o4"}, {"o3"}],
    ),
    Case(
        "phantom-ancestor",
        [
            M("p1", "x@lists.test", "Patch", refs=("<ghost@lists.test>",)),
            M("p2", "y@else.test", "Re: Patch", irt=("<ghost@lists.test>",)),
            M("p3", "z@third.test", "Re: Patch", refs=("<ghost@lists.test>", "p1")),
            M("p4", "w@x.test", "Unrelated"),
        ],
        [{"p1", "p2", "p3"}, {"p4"}],
    ),
    Case(
        "broadcast",
        [
            M("n", SUPPORT, NEWS, to=("a@one.test", "b@two.test"), out_in=NEWS),
            M("ra", "a@one.test", f"Re: {NEWS}", irt=("n",), refs=("n",)),
            M("rc", "c@one.test", f"Re: {NEWS}", irt=("n",)),  # a's colleague
            M("rb", "b@two.test", f"Re: {NEWS}", irt=("n",), refs=("n",)),
            M("rb2", "b@two.test", f"Re: {NEWS}", irt=("rb",), refs=("n", "rb")),
        ],
        [{"n"}, {"ra", "rc"}, {"rb", "rb2"}],
        conversations=[NEWS],
    ),
    Case(
        "customer-and-colleagues",
        [
            M("o", SUPPORT, CASE, to=(ZOE,), cc=("consultant@gmail.com",), out_in=CASE),
            M("z", ZOE, f"Re: {CASE}", irt=("o",), refs=("o",)),
            M("k", "kim@customer.test", f"Re: {CASE}", irt=("o",)),  # same company
            M("c", "consultant@gmail.com", f"Re: {CASE}", irt=("o",), refs=("o",)),  # was in Cc
            M("f", "friend@gmail.com", f"Re: {CASE}", irt=("o",)),  # got it forwarded
        ],
        [{"o", "z", "k", "c"}, {"f"}],
        conversations=[CASE],
    ),
]


def arrival_orders(messages: list[M], seed: str, want: int = 60) -> list[list[M]]:
    """Every order when there are fewer than ``want``, else ``want`` distinct shuffles."""
    if len(messages) <= 4:
        return [list(p) for p in itertools.permutations(messages)]
    rng = random.Random(seed)
    seen: dict[tuple[str, ...], list[M]] = {tuple(m.label for m in messages): list(messages)}
    while len(seen) < want:
        order = rng.sample(messages, len(messages))
        seen.setdefault(tuple(m.label for m in order), order)
    return list(seen.values())


ACCURACY: dict[str, tuple[int, int]] = {}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_fault_case_grouping_in_any_arrival_order(env: Env, case: Case) -> None:
    expected = frozenset(frozenset(g) for g in case.expected)
    orders = arrival_orders(case.messages, f"placement-{case.name}")
    assert len(orders) >= min(50, len(list(itertools.permutations(case.messages))))
    right = total = 0
    for order in orders:
        got = await play(env, case, order)
        ok, n = pair_accuracy(expected, got)
        right, total = right + ok, total + n
        assert got == expected, [m.label for m in order]
    print(
        f"\n[placement] {case.name}: {len(orders)} arrival orders of {len(case.messages)} "
        f"messages, pairs right {right}/{total} ({100 * right / total:.1f}%)"
    )


# --------------------------------------------------------------------------- single rules


async def test_a_reply_to_a_broadcast_is_linked_to_it_in_the_api(env: Env) -> None:
    case = CASES[3]
    by_label = {m.label: m for m in case.messages}
    convs = await precreate(env, env.mailbox, case.conversations)
    for m in case.messages[:2]:
        await deliver(env, env.mailbox, m, by_label, convs)
    ra = await conv_in(env, env.mailbox, by_label["ra"].message_id)
    assert ra != convs[NEWS]
    r = await env.client.get(f"/api/conversations/{ra}", headers=env.token())
    assert r.status_code == 200
    assert r.json()["linked_to"] == convs[NEWS]
    listing = await env.client.get("/api/conversations", headers=env.token())
    item = next(i for i in listing.json()["items"] if i["id_conversa"] == ra)
    assert item["linked_to"] == convs[NEWS]


async def test_a_reply_to_a_broadcast_by_its_token_alone_is_not_joined(env: Env) -> None:
    from services.threader.domain import tokens

    convs = await precreate(env, env.mailbox, [NEWS])
    n = M("n", SUPPORT, NEWS, to=("a@one.test", "b@two.test"), out_in=NEWS)
    await deliver(env, env.mailbox, n, {"n": n}, convs)
    number = await env.svc.pool.fetchval(
        "SELECT number FROM conversations WHERE id_conversa = $1::uuid", convs[NEWS]
    )
    token = tokens.sign(number, env.svc.token_secret)
    answer = await env.mail("Re: Our new prices", to=[Address(address=f"support+{token}@{OURS}")])
    cid = await env.conv_of(answer)
    assert cid != convs[NEWS]
    row = await env.svc.pool.fetchrow(
        "SELECT linked_to FROM conversations WHERE id_conversa = $1::uuid", cid
    )
    assert str(row["linked_to"]) == convs[NEWS]


async def _close(env: Env, cid: str, quiet_for: timedelta) -> None:
    await env.svc.pool.execute(
        """UPDATE conversations SET status = 'closed', last_message_at = now() - $2::interval
           WHERE id_conversa = $1::uuid""",
        cid,
        quiet_for,
    )


async def test_new_mail_reopens_a_closed_conversation_younger_than_the_age(env: Env) -> None:
    first = await env.mail("Printer jam")
    cid = await env.conv_of(first)
    await _close(env, cid, timedelta(days=2))
    again = await env.mail("Re: Printer jam", reply_to=first)
    assert await env.conv_of(again) == cid
    status = await env.svc.pool.fetchval(
        "SELECT status FROM conversations WHERE id_conversa = $1::uuid", cid
    )
    assert status == "open"


async def test_mail_after_the_reopen_age_starts_a_linked_conversation(env: Env) -> None:
    env.svc.rules = Rules(reopen_max_age=timedelta(days=30))
    first = await env.mail("Printer jam")
    old = await env.conv_of(first)
    await _close(env, old, timedelta(days=31))
    late = await env.mail("Re: Printer jam", reply_to=first)
    new = await env.conv_of(late)
    assert new != old
    r = await env.client.get(f"/api/conversations/{new}", headers=env.token())
    assert r.json()["linked_to"] == old and r.json()["status"] == "open"
    r_old = await env.client.get(f"/api/conversations/{old}", headers=env.token())
    assert r_old.json()["status"] == "closed" and r_old.json()["message_count"] == 1
    # The thread goes on in the new conversation, whichever of its messages the next one names.
    for parent in (first, late):
        follow = await env.mail("Re: Printer jam", reply_to=parent)
        assert await env.conv_of(follow) == new


async def test_an_auto_reply_or_a_bounce_joins_but_reopens_nothing(env: Env) -> None:
    """Machine-sent mail (Auto-Submitted, a DSN) to a closed conversation joins it, also past
    the reopen age, and leaves it closed and where it was in the list; it is marked automatic
    (found by a trial: an out-of-office reopened the case and made it unread)."""
    env.svc.rules = Rules(reopen_max_age=timedelta(days=30))
    first = await env.mail("Printer jam")
    cid = await env.conv_of(first)
    for quiet, flags in (
        (timedelta(days=2), {"auto_submitted": True}),
        (timedelta(days=31), {"bounce": True}),
    ):
        await _close(env, cid, quiet)
        before = await env.svc.pool.fetchval(
            "SELECT last_message_at FROM conversations WHERE id_conversa = $1::uuid", cid
        )
        auto = await env.mail("Automatic reply: Printer jam", reply_to=first, flags=flags)
        assert await env.conv_of(auto) == cid
        r = (await env.client.get(f"/api/conversations/{cid}", headers=env.token())).json()
        assert r["status"] == "closed"
        assert datetime.fromisoformat(r["last_message_at"]) == before
        assert [m["automatic"] for m in r["messages"]][-1] is True
        assert r["messages"][0]["automatic"] is False
        assert (await env.updates(cid))[-1]["status"] == "closed"
    # A person writing again is handled as before: past the age, a new conversation linked.
    human = await env.mail("Re: Printer jam", reply_to=first)
    assert await env.conv_of(human) != cid


async def test_reopen_age_zero_always_reopens(env: Env) -> None:
    env.svc.rules = Rules(reopen_max_age=timedelta(0))
    first = await env.mail("Old case")
    cid = await env.conv_of(first)
    await _close(env, cid, timedelta(days=3650))
    assert await env.conv_of(await env.mail("Re: Old case", reply_to=first)) == cid


async def test_subject_window_zero_turns_the_fallback_off(env: Env) -> None:
    env.svc.rules = Rules(subject_window=timedelta(0))
    a = await env.mail("Question")
    b = await env.mail("Re: Question")
    assert await env.conv_of(a) != await env.conv_of(b)


async def test_another_ticket_system_that_strips_our_headers_finds_us_by_number(env: Env) -> None:
    cid = await env.conv_of(await env.mail("Broken tablet"))
    number = await env.svc.pool.fetchval(
        "SELECT number FROM conversations WHERE id_conversa = $1::uuid", cid
    )
    relayed = await env.mail(f"[Ticket#20260301] Re: Screen still broken [#{number}]")
    assert await env.conv_of(relayed) == cid


async def test_outlook_headers_travel_from_ingest_into_the_payload() -> None:
    raw = (
        "From: Ana <ana@acme.test>\r\nTo: support@chatflow.test\r\nSubject: AW: Rechnung\r\n"
        "Message-ID: <o2@acme.test>\r\nDate: Mon, 2 Mar 2026 09:00:00 +0000\r\n"
        f"Thread-Topic: Rechnung\r\nThread-Index: {ti(H1, 1)}\r\n\r\nHallo\r\n"
    ).encode()
    read = read_message(raw)
    box = Mailbox("mb-1", SUPPORT, "Support")
    event = to_event(read, "ing-1", box, [], BASE)
    assert event.thread_index == ti(H1, 1) and event.thread_topic == "Rechnung"
    plain = to_event(read_message(raw.replace(b"Thread-", b"X-Old-")), "ing-2", box, [], BASE)
    assert plain.thread_index is None and plain.thread_topic is None


# --------------------------------------------------------------------------- corpora, end to end


def _corpus(name: str) -> tuple[list[bytes], list[set[bytes]]]:
    """Raw messages of a corpus set and the threads the corpus states, as groups of raws."""
    if name.startswith("notmuch-"):
        data = corp.load_json(corp.NOTMUCH / "expected-threads.json")["sets"][name[8:]]
        raws: list[bytes] = []
        groups: list[set[bytes]] = []
        for th in data["threads"]:
            group = {(corp.NOTMUCH / f).read_bytes() for e in th["messages"] for f in e["files"]}
            raws.extend(sorted(group))
            groups.append(group)
        return raws, groups
    raws = corp.read_mbox(corp.MAILKIT / "generated-references.mbox")
    by_key = {f"seq{i:02d}": raw for i, raw in enumerate(raws, 1)}
    return raws, [{by_key[m.key] for m in th} for th in corp.mailkit_threads()]


def _labelled(raws: list[bytes], groups: list[set[bytes]]) -> tuple[dict[bytes, str], Partition]:
    """Label every raw by the Message-ID ingest reads from it (a re-delivered id is one
    message in the product), and the stated partition over those labels."""
    label = {raw: read_message(raw).message_id for raw in raws}
    parts: dict[str, set[str]] = {}
    for g in groups:
        ids = {label[r] for r in g}
        merged = set(ids).union(*(parts[i] for i in ids if i in parts))
        for i in merged:
            parts[i] = merged
    return label, frozenset(frozenset(g) for g in {id(g): g for g in parts.values()}.values())


async def _play_raw(env: Env, raws: Sequence[bytes]) -> tuple[str, Partition]:
    mailbox = f"mb-{uuid.uuid4().hex[:12]}"
    box = Mailbox(mailbox, SUPPORT, "Support")
    on_received, _ = handlers(env.svc)
    for raw in raws:
        event = to_event(read_message(raw), uuid.uuid4().hex, box, [], BASE)
        await on_received(Envelope.of(event, producer="ingest"), "0-1")
    rows = await env.svc.pool.fetch(
        "SELECT message_id, id_conversa FROM messages WHERE mailbox_id = $1", mailbox
    )
    groups: dict[str, set[str]] = {}
    for r in rows:
        groups.setdefault(str(r["id_conversa"]), set()).add(r["message_id"])
    return mailbox, frozenset(frozenset(g) for g in groups.values())


# Pairs where the product deliberately differs from what a corpus states (checked, not hidden).
# MailKit's JWZ step 5 joins "same subject 1" x2 and "lkjhlkjh" x2 by identical subject alone;
# neither carries a Re/Fwd marker, so the subject fallback keeps each pair apart (2 pairs).
CORPUS_DISAGREE: dict[str, int] = {"mailkit": 2, "notmuch-default": 0, "notmuch-threading": 0}


@pytest.mark.parametrize("name", sorted(CORPUS_DISAGREE))
async def test_corpus_through_ingest_and_the_database_in_50_orders(env: Env, name: str) -> None:
    """The corpora's stated threads through the whole product path (ingest's reader, the
    mail.received payload, the threader's handler and SQL), in 50 arrival orders."""
    if not corp.CORPORA.exists():
        pytest.skip("shared/corpora absent")
    raws, groups = _corpus(name)
    _, expected = _labelled(raws, groups)
    rng = random.Random(f"corpus-{name}")
    orders = [list(raws)] + [rng.sample(raws, len(raws)) for _ in range(49)]
    first: Partition | None = None
    for order in orders:
        _, got = await _play_raw(env, order)
        first = first or got
        assert got == first, "the grouping depends on the arrival order"
    assert first is not None
    ok, total = pair_accuracy(expected, first)
    print(
        f"\n[placement] corpus {name} through the database: {len(raws)} raw messages, "
        f"{len(expected)} stated threads / {len(first)} found, 50 orders identical, "
        f"pairs right {ok}/{total} ({100 * ok / total:.2f}%)"
    )
    assert total - ok == CORPUS_DISAGREE[name]


async def test_our_answer_to_one_customer_of_a_broadcast_keeps_the_others_apart(env: Env) -> None:
    box = f"mb-{uuid.uuid4().hex[:12]}"
    convs = await precreate(env, box, [NEWS])
    n = M("n", SUPPORT, NEWS, to=("a@one.test", "b@two.test"), out_in=NEWS)
    ra = M("ra", "a@one.test", f"Re: {NEWS}", irt=("n",), refs=("n",))
    by_label = {"n": n, "ra": ra}
    for m in (n, ra):
        await deliver(env, box, m, by_label, convs)
    conv_a = await conv_in(env, box, ra.message_id)
    convs["A"] = conv_a
    # The agent answers a in a's conversation; the answer names the broadcast and a's reply.
    oa = M(
        "oa", SUPPORT, f"Re: {NEWS}", to=("a@one.test",), irt=("ra",), refs=("n", "ra"), out_in="A"
    )
    rb = M("rb", "b@two.test", f"Re: {NEWS}", irt=("n",), refs=("n",))
    ra2 = M("ra2", "a@one.test", f"Re: {NEWS}", irt=("oa",), refs=("n", "ra", "oa"))
    by_label |= {"oa": oa, "rb": rb, "ra2": ra2}
    for m in (oa, rb, ra2):
        await deliver(env, box, m, by_label, convs)
    assert await conv_in(env, box, n.message_id) == convs[NEWS]  # the broadcast stays alone
    assert await conv_in(env, box, oa.message_id) == conv_a
    assert await conv_in(env, box, ra2.message_id) == conv_a
    conv_b = await conv_in(env, box, rb.message_id)
    assert conv_b not in (conv_a, convs[NEWS])
    merged = await env.svc.pool.fetchval(
        "SELECT count(*) FROM conversations WHERE mailbox_id = $1 AND merged_into IS NOT NULL", box
    )
    assert merged == 0


async def test_an_answer_from_someone_we_never_wrote_to_is_linked_not_joined(env: Env) -> None:
    case = CASES[4]
    by_label = {m.label: m for m in case.messages}
    box = f"mb-{uuid.uuid4().hex[:12]}"
    convs = await precreate(env, box, case.conversations)
    for label in ("o", "z", "f"):
        await deliver(env, box, by_label[label], by_label, convs)
    assert await conv_in(env, box, by_label["z"].message_id) == convs[CASE]
    friend = await conv_in(env, box, by_label["f"].message_id)
    assert friend != convs[CASE]
    linked = await env.svc.pool.fetchval(
        "SELECT linked_to FROM conversations WHERE id_conversa = $1::uuid", friend
    )
    assert str(linked) == convs[CASE]
