"""Collaborative drafts: the pure wire rules, then real notifiers, PostgreSQL, Redis and WSS clients
that hold their own pycrdt documents, as a browser with Yjs would."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import uuid
from datetime import timedelta
from typing import Any

import pycrdt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection

from libs.common import testing
from libs.common.events import Envelope, MailSend, MembershipChanged
from services.notifier.domain import drafts as d
from services.notifier.domain.drafts import DraftError, DraftLimits, SyncKind
from services.notifier.service import NotifierService

from .conftest import Env, Starter, mbx, message_added, recv_json, user, wait_closed, ws_connect

# ---- the wire, pure ----------------------------------------------------------------------------


def _doc_with(text: str) -> pycrdt.Doc:
    doc: pycrdt.Doc = pycrdt.Doc()
    doc.get("body", type=pycrdt.Text).insert(0, text)
    return doc


def test_parse_accepts_what_pycrdt_and_yjs_send() -> None:
    doc = _doc_with("hello")
    step1 = d.parse_sync(pycrdt.create_sync_message(doc))
    assert step1.kind is SyncKind.STEP1 and step1.payload == doc.get_state()
    assert not step1.is_update
    upd = d.parse_sync(pycrdt.create_update_message(doc.get_update()))
    assert upd.kind is SyncKind.UPDATE and upd.payload == doc.get_update() and upd.is_update
    reply = pycrdt.handle_sync_message(pycrdt.create_sync_message(pycrdt.Doc())[1:], doc)
    assert reply is not None
    step2 = d.parse_sync(reply)
    assert step2.kind is SyncKind.STEP2 and step2.is_update
    # and what we build is what pycrdt reads
    assert d.sync_message(SyncKind.UPDATE, doc.get_update()) == pycrdt.create_update_message(
        doc.get_update()
    )
    empty = d.parse_sync(pycrdt.create_update_message(d.EMPTY_UPDATE))
    assert empty.payload == d.EMPTY_UPDATE


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (b"", "bad_request"),
        (b"\x00\x02", "bad_request"),  # no length
        (b"\x01\x02\x00", "unsupported"),  # awareness
        (b"\x07\x00\x00", "unsupported"),
        (b"\x00\x05\x00", "bad_request"),  # unknown sync type
        (b"\x00\x02\x05\x00\x00", "bad_request"),  # says 5 bytes, has 2
        (b"\x00\x02\x01\x00\x00", "bad_request"),  # says 1 byte, has 2
        (b"\x00\x02\xff\xff\xff\xff\xff\xff\x01", "bad_request"),  # var-uint too long
        (b"\x00\x02\x80", "bad_request"),  # truncated var-uint
        (b"\x00\x02\x04garb", "bad_request"),  # not a Yjs update
        (b"\x00\x00\x03\xff\xff\xff", "bad_request"),  # not a state vector
    ],
)
def test_parse_refuses_bad_messages(message: bytes, code: str) -> None:
    with pytest.raises(DraftError) as exc:
        d.parse_sync(message)
    assert exc.value.code == code


def test_parse_never_lets_a_mangled_update_through_undecodable() -> None:
    """Random byte flips of a real update either fail parsing or decode and apply cleanly."""
    doc = _doc_with("hello world")
    doc.get("body", type=pycrdt.Text).insert(3, "XY")
    message = pycrdt.create_update_message(doc.get_update())
    rng = random.Random(7)
    accepted = 0
    for _ in range(2000):
        b = bytearray(message)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.getrandbits(8)
        try:
            parsed = d.parse_sync(bytes(b))
        except DraftError as exc:
            assert exc.code in ("bad_request", "unsupported")
            continue
        accepted += 1
        if parsed.is_update:
            pycrdt.Doc().apply_update(parsed.payload)
    assert accepted < 2000


@given(st.integers(min_value=0, max_value=2**35 - 1))
def test_var_uint_round_trip(n: int) -> None:
    encoded = d.write_var_uint(n)
    assert encoded == pycrdt.write_var_uint(n)
    assert d.read_var_uint(encoded + b"tail", 0) == (n, len(encoded))


def test_decode_data_caps_before_and_after_decoding() -> None:
    limits = DraftLimits(max_message_bytes=10)
    assert d.decode_data(base64.b64encode(b"x" * 10).decode(), limits) == b"x" * 10
    for data in (base64.b64encode(b"x" * 11).decode(), "A" * 10_000):
        with pytest.raises(DraftError) as exc:
            d.decode_data(data, limits)
        assert exc.value.code == "too_large"
    for data in ("not base64!", "QQ", "QUJD\n"):
        with pytest.raises(DraftError) as exc:
            d.decode_data(data, limits)
        assert exc.value.code == "bad_request"
    assert d.encode_data(b"\x00\x01") == "AAE="


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("reply", True),
        ("reply-2", True),
        ("a.b:c_d", True),
        ("x" * 64, True),
        ("x" * 65, False),
        ("", False),
        ("re ply", False),
        ("ré", False),
        ("a/b", False),
        (None, False),
        (3, False),
    ],
)
def test_draft_names(name: Any, ok: bool) -> None:
    assert d.valid_name(name) is ok


def test_epochs_sizes_and_compaction_decisions() -> None:
    assert not d.stale_epoch(None, 3)
    assert not d.stale_epoch(3, 3)
    assert d.stale_epoch(2, 3) and d.stale_epoch(4, 3)
    limits = DraftLimits(max_doc_bytes=100, compact_every=10, compact_bytes=50)
    assert d.fits(90, 10, limits) and not d.fits(91, 10, limits)
    assert not d.should_compact(0, 0, limits)
    assert not d.should_compact(9, 49, limits)
    assert d.should_compact(10, 1, limits)
    assert d.should_compact(1, 50, limits)


def test_compacted_keeps_the_text_and_drops_deleted_content() -> None:
    rng = random.Random(3)
    doc: pycrdt.Doc = pycrdt.Doc()
    text = doc.get("body", type=pycrdt.Text)
    log: list[bytes] = []
    for i in range(300):
        before = doc.get_state()
        if len(text) > 20 and rng.random() < 0.4:
            start = rng.randrange(len(text) - 10)
            del text[start : start + rng.randint(1, 10)]
        else:
            text.insert(rng.randint(0, len(text)), f"word{i} ")
        log.append(doc.get_update(before))
    snapshot = d.compacted(b"", log[:100])
    merged = d.compacted(snapshot, log[100:])
    fresh: pycrdt.Doc = pycrdt.Doc()
    fresh.apply_update(merged)
    assert str(fresh.get("body", type=pycrdt.Text)) == str(text)
    assert len(merged) < sum(len(u) for u in log)
    assert d.compacted(b"", []) == d.EMPTY_UPDATE


# ---- live --------------------------------------------------------------------------------------


class Editor:
    """A client of one draft: its own Yjs document, synced with the y-protocols handshake."""

    def __init__(
        self, ws: ClientConnection, id_conversa: str, draft: str = d.DEFAULT_DRAFT
    ) -> None:
        self.ws = ws
        self.id_conversa = id_conversa
        self.draft = draft
        self.doc: pycrdt.Doc = pycrdt.Doc()
        self.epoch: int | None = None
        self.cleared: list[dict[str, Any]] = []

    @property
    def text(self) -> str:
        return str(self.doc.get("body", type=pycrdt.Text))

    async def send(self, type_: str, message: bytes, **extra: Any) -> None:
        frame: dict[str, Any] = {
            "type": type_,
            "id_conversa": self.id_conversa,
            "draft": self.draft,
            "data": base64.b64encode(message).decode(),
        }
        if self.epoch is not None:
            frame["epoch"] = self.epoch
        frame.update(extra)
        await self.ws.send(json.dumps(frame))

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next draft frame or error; other frames (badges, presence) are skipped."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = max(0.01, deadline - asyncio.get_running_loop().time())
            frame = await recv_json(self.ws, left)
            if frame["type"].startswith("draft.") or frame["type"] == "error":
                return frame

    async def open(self) -> None:
        """Step 1 out; step 2 in; the server's step 1 in, our step 2 out."""
        await self.send("draft.sync", pycrdt.create_sync_message(self.doc))
        for _ in range(2):
            frame = await self.recv()
            assert frame["type"] == "draft.sync", frame
            self.epoch = frame["epoch"]
            reply = pycrdt.handle_sync_message(base64.b64decode(frame["data"])[1:], self.doc)
            if reply is not None:
                await self.send("draft.update", reply)

    async def type(self, index: int, text: str) -> None:
        before = self.doc.get_state()
        self.doc.get("body", type=pycrdt.Text).insert(index, text)
        await self.send("draft.update", pycrdt.create_update_message(self.doc.get_update(before)))

    async def pump_until(self, want: str, timeout: float = 10.0) -> None:
        """Apply others' updates until the text is ``want``."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.text != want:
            left = deadline - asyncio.get_running_loop().time()
            assert left > 0, f"text {self.text!r}, wanted {want!r}"
            frame = await self.recv(left)
            self.apply(frame)

    def apply(self, frame: dict[str, Any]) -> None:
        if frame["type"] == "draft.cleared":
            self.cleared.append(frame)
            return
        assert frame["type"] in ("draft.update", "draft.sync"), frame
        pycrdt.handle_sync_message(base64.b64decode(frame["data"])[1:], self.doc)


async def conversation(env: Env, svc: NotifierService, mailbox_id: str) -> str:
    """A conversation the notifier knows (it learns conversations from message_added)."""
    ev = message_added(mailbox_id)
    await env.publish(ev)

    async def known() -> bool:
        row = await svc.pool.fetchval(
            "SELECT 1 FROM conversations WHERE id_conversa = $1", ev.id_conversa
        )
        return row is not None

    await testing.eventually(known, timeout=10)
    return ev.id_conversa


async def test_two_editors_converge_and_a_later_one_gets_everything(
    env: Env, start: Starter
) -> None:
    svc = await start()
    box = mbx()
    cid = await conversation(env, svc, box)
    async with (
        ws_connect(svc, env.token(user(), [box])) as wa,
        ws_connect(svc, env.token(user(), [box])) as wb,
    ):
        a, b = Editor(wa, cid), Editor(wb, cid)
        await a.open()
        await b.open()
        assert a.epoch == b.epoch == 0 and a.text == b.text == ""
        # Both type at once, neither having seen the other's text.
        await asyncio.gather(a.type(0, "Dear Ana, "), b.type(0, "Kind regards."))
        await asyncio.gather(a.type(len(a.text), "[a]"), b.type(0, "[b]"))
        pieces = ("Dear Ana, ", "Kind regards.", "[a]", "[b]")

        async def settle(e: Editor) -> None:
            deadline = asyncio.get_running_loop().time() + 10
            while not all(p in e.text for p in pieces):
                e.apply(await e.recv(max(0.01, deadline - asyncio.get_running_loop().time())))

        await asyncio.gather(settle(a), settle(b))
        assert a.text == b.text  # the same order of the concurrent pieces on both sides
        server = svc.live.drafts.open[d.DraftKey(cid, "reply")].doc
        assert str(server.get("body", type=pycrdt.Text)) == a.text
        # A third editor, later, gets the whole state in the handshake.
        async with ws_connect(svc, env.token(user(), [box])) as wc:
            c = Editor(wc, cid)
            await c.open()
            assert c.text == a.text
            await c.type(0, ">> ")
            await a.pump_until(c.text)
            await b.pump_until(c.text)


async def test_offline_edits_reach_the_server_in_the_handshake(env: Env, start: Starter) -> None:
    svc = await start()
    box = mbx()
    cid = await conversation(env, svc, box)
    async with ws_connect(svc, env.token(user(), [box])) as wa:
        a = Editor(wa, cid)
        a.doc.get("body", type=pycrdt.Text).insert(0, "typed while offline")
        await a.open()  # the server's step 1 makes us send what it lacks
        async with ws_connect(svc, env.token(user(), [box])) as wb:
            b = Editor(wb, cid)
            await b.open()
            if b.text != a.text:
                await b.pump_until(a.text)
            assert b.text == "typed while offline"


async def test_draft_survives_a_restart_and_is_compacted(env: Env, start: Starter) -> None:
    svc = await start(draft_compact_every=5)
    assert svc.live.drafts.limits.compact_every == 5
    box, sub = mbx(), user()
    cid = await conversation(env, svc, box)
    async with ws_connect(svc, env.token(sub, [box])) as ws:
        a = Editor(ws, cid)
        await a.open()
        for i in range(12):
            await a.type(len(a.text), f"line {i}\n")
        want = a.text

        # every update is stored before it is fanned out; wait for the last one's row
        async def logged() -> bool:
            n = await svc.pool.fetchval(
                "SELECT pending FROM drafts WHERE id_conversa = $1 AND draft = 'reply'", cid
            )
            rows = await svc.pool.fetchval(
                "SELECT count(*) FROM draft_updates WHERE id_conversa = $1", cid
            )
            snap = await svc.pool.fetchval(
                "SELECT octet_length(snapshot) FROM drafts WHERE id_conversa = $1", cid
            )
            return n is not None and rows == n and rows < 12 and bool(snap)

        await testing.eventually(logged, timeout=10)  # compacted every 5: a snapshot, a short log
        svc.stop_event.set()
        assert (await wait_closed(ws, 10))[0] is not None
    svc2 = await start()
    async with ws_connect(svc2, env.token(sub, [box])) as ws:
        b = Editor(ws, cid)
        await b.open()
        assert b.text == want
        await b.type(0, "Hi,\n")
        want = b.text

        async def in_log() -> bool:
            rows = await svc2.pool.fetchval(
                "SELECT count(*) FROM draft_updates WHERE id_conversa = $1", cid
            )
            return bool(rows)

        await testing.eventually(in_log, timeout=10)
        await ws.send(json.dumps({"type": "draft.close", "id_conversa": cid}))

        # The last editor left: the log is merged into the snapshot.
        async def merged() -> bool:
            rows = await svc2.pool.fetchval(
                "SELECT count(*) FROM draft_updates WHERE id_conversa = $1", cid
            )
            return rows == 0 and d.DraftKey(cid, "reply") not in svc2.live.drafts.open

        await testing.eventually(merged, timeout=10)
    async with ws_connect(svc2, env.token(sub, [box])) as ws:
        c = Editor(ws, cid)
        await c.open()
        assert c.text == want


async def test_editors_on_two_replicas(env: Env, start: Starter) -> None:
    one, two = await start(), await start()
    box = mbx()
    cid = await conversation(env, one, box)
    async with (
        ws_connect(one, env.token(user(), [box])) as wa,
        ws_connect(two, env.token(user(), [box])) as wb,
    ):
        a, b = Editor(wa, cid), Editor(wb, cid)
        await a.open()
        await b.open()
        await a.type(0, "from one. ")
        await b.pump_until("from one. ")
        await b.type(len(b.text), "from two.")
        await a.pump_until("from one. from two.")
        # A reload on the other replica keeps it too.
        async with ws_connect(two, env.token(user(), [box])) as wc:
            c = Editor(wc, cid)
            await c.open()
            assert c.text == "from one. from two."


async def test_only_agents_of_the_mailbox_may_open(env: Env, start: Starter) -> None:
    svc = await start()
    box, other = mbx(), mbx()
    cid = await conversation(env, svc, box)
    async with ws_connect(svc, env.token(user(), [other])) as ws:
        outsider = Editor(ws, cid)
        await outsider.send("draft.sync", pycrdt.create_sync_message(outsider.doc))
        err = await outsider.recv()
        assert err["type"] == "error" and err["code"] == "not_found"
        assert err["id_conversa"] == cid and err["draft"] == "reply"
        # an unknown conversation answers the same
        ghost = Editor(ws, "c-does-not-exist")
        await ghost.send("draft.sync", pycrdt.create_sync_message(ghost.doc))
        assert (await ghost.recv())["code"] == "not_found"
        # and an update without opening is refused, not applied
        await outsider.send(
            "draft.update", pycrdt.create_update_message(_doc_with("x").get_update())
        )
        assert (await outsider.recv())["code"] == "not_open"
    assert d.DraftKey(cid, "reply") not in svc.live.drafts.open
    assert await svc.pool.fetchval("SELECT count(*) FROM drafts WHERE id_conversa = $1", cid) == 0


async def test_removed_member_is_no_longer_served(env: Env, start: Starter) -> None:
    svc = await start()
    box, sub = mbx(), user()
    cid = await conversation(env, svc, box)
    async with (
        ws_connect(svc, env.token(sub, [box])) as wa,
        ws_connect(svc, env.token(user(), [box])) as wb,
    ):
        a, b = Editor(wa, cid), Editor(wb, cid)
        await a.open()
        await b.open()
        await env.publish(MembershipChanged(user_id=sub, mailbox_id=box, active=False), "auth")
        await testing.eventually(
            lambda: all(box not in c.mailboxes for c in svc.hub.clients if c.identity.sub == sub)
        )
        await b.type(0, "secret")
        await a.type(0, "x")
        err = await a.recv()
        assert err["type"] == "error" and err["code"] == "not_found"
        assert a.text == "x"  # never got b's text


async def test_sending_the_reply_clears_the_draft_everywhere(env: Env, start: Starter) -> None:
    one, two = await start(), await start()
    box, sub = mbx(), user()
    cid = await conversation(env, one, box)
    async with (
        ws_connect(one, env.token(sub, [box])) as wa,
        ws_connect(two, env.token(user(), [box])) as wb,
    ):
        a, b = Editor(wa, cid), Editor(wb, cid)
        await a.open()
        await b.open()
        await a.type(0, "Your refund is on its way.")
        await b.pump_until("Your refund is on its way.")
        send = {
            "type": "send",
            "client_id": "c-1",
            "id_conversa": cid,
            "html": "<p>Your refund is on its way.</p>",
            "draft": "reply",
        }
        await wa.send(json.dumps(send))
        ack = await recv_json(wa)
        while ack["type"] != "send.ack":
            ack = await recv_json(wa)
        for e in (a, b):
            frame = await e.recv()
            assert frame == {
                "type": "draft.cleared",
                "id_conversa": cid,
                "draft": "reply",
                "epoch": 1,
            }
        assert (
            await one.pool.fetchval(
                "SELECT count(*) FROM draft_updates WHERE id_conversa = $1", cid
            )
            == 0
        )
        # An update from the old copy is refused with draft.cleared, not merged back.
        await b.type(0, "late ")
        refused = await b.recv()
        assert refused["type"] == "draft.cleared" and refused["epoch"] == 1
        # A copy of the sent draft reopened later (an offline tab) starts over, merges nothing.
        stale = Editor(wb, cid)
        stale.doc, stale.epoch = b.doc, 0
        await stale.send("draft.sync", pycrdt.create_sync_message(stale.doc))
        assert (await stale.recv())["type"] == "draft.cleared"
        # A retried send frame (lost ack) must not wipe the draft started after it.
        fresh = Editor(wb, cid)
        await fresh.open()
        assert fresh.epoch == 1 and fresh.text == ""
        await fresh.type(0, "next reply")
        await wa.send(json.dumps(send))
        await wa.send(json.dumps({"type": "ping"}))  # frames of one socket are handled in order
        while (await recv_json(wa))["type"] != "pong":
            pass

        async def stored() -> str:
            rows = await one.pool.fetch(
                "SELECT data FROM draft_updates WHERE id_conversa = $1 AND epoch = 1", cid
            )
            return "next reply" if rows else ""

        await testing.eventually(stored, timeout=5)
        async with ws_connect(one, env.token(user(), [box])) as wc:
            c = Editor(wc, cid)
            await c.open()
            assert (c.epoch, c.text) == (1, "next reply")
        assert not fresh.cleared


async def test_a_send_naming_a_bad_draft_is_refused_before_anything_is_sent(
    env: Env, start: Starter
) -> None:
    svc = await start()
    box = mbx()
    cid = await conversation(env, svc, box)
    async with ws_connect(svc, env.token(user(), [box])) as ws:
        for bad in ("bad name", 5):
            send = {"type": "send", "client_id": "c-9", "id_conversa": cid, "html": "<p>x</p>"}
            await ws.send(json.dumps({**send, "draft": bad}))
            err = await recv_json(ws)
            assert (err["type"], err["code"], err["client_id"]) == ("error", "bad_request", "c-9")
    assert await env.bus.redis.xlen(env.bus.stream("mail.send")) == 0


async def test_a_reply_sent_by_rest_clears_its_draft_everywhere(env: Env, start: Starter) -> None:
    """The threader's REST reply publishes ``mail.send`` naming the draft: editors on every
    replica see it cleared, once; an unnamed one, or a command replayed long after, clears
    nothing."""
    one, two = await start(), await start()
    box = mbx()
    cid = await conversation(env, one, box)
    async with (
        ws_connect(one, env.token(user(), [box])) as wa,
        ws_connect(two, env.token(user(), [box])) as wb,
    ):
        a, b = Editor(wa, cid), Editor(wb, cid)
        await a.open()
        await b.open()
        other = Editor(wb, cid, "notes")
        await other.open()
        await a.type(0, "We shipped it.")
        await b.pump_until("We shipped it.")

        def command(draft: str | None) -> MailSend:
            return MailSend(
                send_id=str(uuid.uuid4()),
                id_conversa=cid,
                mailbox_id=box,
                user_id="u-rest",
                html="<p>We shipped it.</p>",
                draft=draft,
            )

        await env.publish(command(None))
        stale = Envelope.of(command("notes"), producer="threader")
        await env.bus.publish(
            stale.model_copy(update={"occurred_at": stale.occurred_at - timedelta(minutes=10)})
        )
        sent = command("reply")
        await env.publish(sent)
        await env.publish(sent)  # the same command again (a redelivery): cleared once
        for e in (a, b):
            frame = await e.recv()
            assert frame == {
                "type": "draft.cleared",
                "id_conversa": cid,
                "draft": "reply",
                "epoch": 1,
            }
        await assert_no_frame(wa, 0.8)
        # The stale command came before the reply in the same stream: it was read and ignored.
        assert not await one.pool.fetchval(
            "SELECT count(*) FROM drafts WHERE id_conversa = $1 AND cleared_by IS NOT NULL"
            " AND draft = 'notes'",
            cid,
        )


async def assert_no_frame(ws: ClientConnection, seconds: float) -> None:
    try:
        frame = await asyncio.wait_for(ws.recv(), seconds)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected frame {frame!r}")


async def test_bad_draft_frames_get_errors_and_keep_the_connection(
    env: Env, start: Starter
) -> None:
    svc = await start(
        draft_max_message_bytes=64 * 1024,
        draft_max_doc_bytes=100 * 1024,
        draft_max_open_per_connection=2,
    )
    box = mbx()
    cid = await conversation(env, svc, box)
    async with ws_connect(svc, env.token(user(), [box])) as ws:
        a = Editor(ws, cid)
        await a.open()
        # one update over the message cap
        big = _doc_with("x" * 70_000).get_update()
        await a.send("draft.update", pycrdt.create_update_message(big))
        err = await a.recv()
        assert (err["type"], err["code"]) == ("error", "too_large")
        # updates under the cap until the document cap
        for i in range(3):
            await a.type(len(a.text), chr(65 + i) * 40_000)
        errors = []
        for _ in range(3):
            try:
                errors.append(await a.recv(1.0))
            except TimeoutError:
                break
        assert [e["code"] for e in errors] == ["too_large"]
        stored = await svc.pool.fetchval(
            """SELECT octet_length(snapshot) + pending_bytes FROM drafts
               WHERE id_conversa = $1""",
            cid,
        )
        assert stored <= 100 * 1024
        for frame, code in [
            ({"data": "!!!"}, "bad_request"),
            ({"data": base64.b64encode(b"\x01\x02\x00").decode()}, "unsupported"),
            ({"data": base64.b64encode(b"\x00\x02\x04garb").decode()}, "bad_request"),
            ({"draft": "no spaces please", "data": "AAA="}, "bad_request"),
            ({"id_conversa": "", "data": "AAA="}, "bad_request"),
            ({"epoch": -1, "data": "AAA="}, "bad_request"),
        ]:
            await ws.send(
                json.dumps({"type": "draft.update", "id_conversa": cid, "draft": "reply", **frame})
            )
            err = await a.recv()
            assert (err["type"], err["code"]) == ("error", code), (frame, err)
        # a bad draft name on a send: the send goes, the name is refused
        await ws.send(
            json.dumps(
                {
                    "type": "send",
                    "client_id": "s-1",
                    "id_conversa": cid,
                    "html": "<p>x</p>",
                    "draft": "bad name",
                }
            )
        )
        err = await a.recv()
        assert (err["type"], err["code"]) == ("error", "bad_request")
        # at most draft_max_open_per_connection drafts at once
        second = Editor(ws, cid, "second")
        await second.open()
        third = Editor(ws, cid, "third")
        await third.send("draft.sync", pycrdt.create_sync_message(third.doc))
        assert (await third.recv())["code"] == "too_many"
        await ws.send(json.dumps({"type": "draft.close", "id_conversa": cid, "draft": "second"}))
        await third.open()
        await ws.send(json.dumps({"type": "ping"}))
        while (await recv_json(ws))["type"] != "pong":
            pass
        # still editing
        await a.type(0, "ok")
        server = svc.live.drafts.open[d.DraftKey(cid, "reply")].doc

        def edited() -> bool:
            return str(server.get("body", type=pycrdt.Text)).startswith("ok")

        await testing.eventually(edited, timeout=5)
