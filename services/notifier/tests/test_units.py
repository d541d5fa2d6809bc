"""Pure parts: frame shapes, stream-id rules, settings parsing, the hub's fan-out bookkeeping."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from libs.common.events import Envelope, MailStatus
from libs.common.tokens import Identity
from services.notifier import frames
from services.notifier import hub as hub_module
from services.notifier.domain.rules import in_audience, is_after, needs_resync, status_rank
from services.notifier.frames import NotifierFrame
from services.notifier.hub import Client, Hub
from services.notifier.settings import NotifierSettings
from services.notifier.ws import render

from .conftest import message_added


def ident(sub: str, *mailboxes: str) -> Identity:
    return Identity(sub, ("agent",), frozenset(mailboxes), frozenset(), "spa", "j", 0, {})


class FakeConn:
    def __init__(self) -> None:
        self.closed: tuple[int, str] | None = None
        self.transport = None

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


def test_stream_id_rules() -> None:
    assert is_after("10-1", "9-9") and is_after("10-10", "10-9") and not is_after("10-1", "10-1")
    assert is_after("1-0", None)
    assert not needs_resync("5-0", "5-0") and not needs_resync("6-0", "5-0")
    assert needs_resync("4-9", "5-0") and needs_resync("4-9", None)
    assert status_rank("sent") > status_rank("deferred") > status_rank("queued")


def test_audience() -> None:
    assert in_audience({"a"}, "u", "a", None) and in_audience({"a"}, "u", "a", "u")
    assert not in_audience({"a"}, "u", "a", "v") and not in_audience({"b"}, "u", "a", None)


def test_frame_is_a_registered_event_that_round_trips() -> None:
    nf = NotifierFrame(mailbox_id="m", user_id=None, frame={"type": "resync"})
    env = Envelope.from_json(Envelope.of(nf, producer="notifier").to_json())
    assert env.type == "notifier.frame" and env.payload_as(NotifierFrame) == nf


def test_message_added_shape_and_render() -> None:
    ev = message_added("mb")
    frame = frames.message_added(ev)
    text = render("17-0", frame)
    assert text.startswith('{"type":"message.added","event_id":"17-0"')
    data = json.loads(text)
    assert data["message"]["from"]["address"] == "ana@customer.test"
    assert "to" not in data["message"]


def test_send_status_shape() -> None:
    st = MailStatus(
        send_id="s",
        client_id="c",
        id_conversa="x",
        mailbox_id="m",
        status="failed",
        detail="550 no",
        next_attempt_at=datetime.now(UTC),
    )
    assert frames.send_status(st) == {
        "type": "send.status",
        "send_id": "s",
        "client_id": "c",
        "status": "failed",
        "detail": "550 no",
    }


def test_allowed_origins_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATFLOW_NOTIFIER_ALLOWED_ORIGINS", '["https://a.test", "https://b.test"]')
    assert NotifierSettings.load().allowed_origins == ["https://a.test", "https://b.test"]


def test_defaults() -> None:
    s = NotifierSettings.load()
    assert (s.http_port, s.ws_port, s.ws_path) == (8106, 8116, "/ws")
    assert not s.allow_missing_origin and "https://localhost:8443" in s.allowed_origins


async def test_hub_index_holds_during_resume_and_kicks_on_overflow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    sent: list[tuple[Any, list[bytes]]] = []
    monkeypatch.setattr(hub_module, "write", lambda conn, chunks: sent.append((conn, chunks)))
    h = Hub(slow_bytes=100, max_held=2)
    a, b, c = (
        Client(FakeConn(), ident(s, *m))
        for s, m in (("ua", ("m1",)), ("ub", ("m1", "m2")), ("uc", ("m2",)))  # type: ignore[arg-type]
    )
    for cl in (a, b, c):
        h.add(cl)
    assert h.deliver("m1", None, "1-0", "x") == 2
    assert h.deliver("m2", "uc", "2-0", "y") == 1
    assert sent == []  # queued: written once per connection at the end of the loop's turn
    await asyncio.sleep(0)
    x, y = hub_module.encode("x"), hub_module.encode("y")
    assert x == b"\x81\x01x"  # FIN + text, unmasked, length 1
    assert {(id(conn), tuple(chunks)) for conn, chunks in sent} == {
        (id(a.conn), (x,)),
        (id(b.conn), (x,)),
        (id(c.conn), (y,)),
    }
    sent.clear()
    h.deliver("m1", None, "2-1", "p")
    h.deliver("m1", None, "2-2", "q")
    assert h.send([a], "badge") == 1  # joins a's write, after the frames queued before it
    await asyncio.sleep(0)  # frames of one turn: one write each, in order
    p, q, badge = (hub_module.encode(t) for t in ("p", "q", "badge"))
    assert sorted((len(chunks), chunks[:2] == [p, q]) for _, chunks in sent) == [
        (2, True),
        (3, True),
    ]
    assert [chunks for conn, chunks in sent if conn is a.conn] == [[p, q, badge]]
    sent.clear()
    b.resuming = True
    assert h.deliver("m1", None, "3-0", "z") == 1 and b.held == [("3-0", "m1", "z")]
    h.deliver("m2", None, "4-0", "w")
    h.deliver("m2", None, "5-0", "v")  # third held frame: over max_held
    await asyncio.sleep(0)
    assert b.closing and b.conn.closed == (4008, "slow consumer")  # type: ignore[attr-defined]
    assert b not in h.clients and b not in h.by_mailbox["m1"]
    h.remove(a)
    assert "m1" not in h.by_mailbox


def test_hub_drops_and_restores_one_users_mailbox() -> None:
    h = Hub(slow_bytes=100, max_held=2)
    mine = Client(FakeConn(), ident("u", "m1", "m2"))  # type: ignore[arg-type]
    other = Client(FakeConn(), ident("v", "m1"))  # type: ignore[arg-type]
    trimmed = Client(FakeConn(), ident("u", "m1", "m2"), {"m2"})  # type: ignore[arg-type]
    for c in (mine, other, trimmed):
        h.add(c)
    assert trimmed.mailboxes == {"m2"} and trimmed not in h.by_mailbox["m1"]
    assert h.drop_mailbox("u", "m1") == 1
    assert mine.mailboxes == {"m2"} and h.by_mailbox["m1"] == {other}
    assert h.drop_mailbox("u", "m3") == 0
    assert h.restore_mailbox("u", "m1") == 2  # both name m1 in their token
    assert h.restore_mailbox("u", "m9") == 0  # not in the token: needs a new one
    assert h.by_mailbox["m1"] == {mine, other, trimmed}
    h.remove(mine)
    h.remove(trimmed)
    assert h.of_user("u") == [] and h.by_mailbox == {"m1": {other}}


def test_access_state_newest_change_wins() -> None:
    from datetime import timedelta

    from services.notifier.access import AccessState
    from services.notifier.frames import AccessChange

    st = AccessState()
    t = datetime.now(UTC)
    assert st.apply(AccessChange(user_id="u", active=False, changed_at=t))
    assert st.is_disabled("u")
    stale = AccessChange(user_id="u", active=True, changed_at=t - timedelta(seconds=1))
    assert not st.apply(stale) and st.is_disabled("u")
    assert st.apply(AccessChange(user_id="u", active=True, changed_at=t + timedelta(seconds=1)))
    assert not st.is_disabled("u")
    assert st.apply(AccessChange(user_id="u", mailbox_id="m1", active=False, changed_at=t))
    assert st.effective("u", frozenset({"m1", "m2"})) == {"m2"}
    assert st.apply(AccessChange(user_id="u", mailbox_id="m1", active=True, changed_at=t))
    assert st.effective("u", frozenset({"m1", "m2"})) == {"m1", "m2"} and st.rows.removed == {}
    # An access entry parses as a frame for nobody on a replica that predates ``access``.
    nf = NotifierFrame.of_access(AccessChange(user_id="u", active=False, changed_at=t))
    raw = json.loads(Envelope.of(nf, producer="notifier").to_json())["payload"]
    assert raw["mailbox_id"] == "" and raw["frame"] == {}
