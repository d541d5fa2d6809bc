"""The notifier end to end: real PostgreSQL and Redis, the service in-process, WSS clients."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest
from joserfc.jwk import OKPKey
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from libs.common import testing
from libs.common.events import ConversationUpdated, Envelope, MailSend, MailStatus
from services.notifier import hub as hub_module
from services.notifier.domain.rules import stream_id
from services.notifier.frames import FRAME_TYPE
from services.notifier.service import NotifierService

from .conftest import (
    Env,
    Starter,
    assert_silent,
    client_ssl,
    mbx,
    message_added,
    recv_json,
    recv_type,
    user,
    wait_closed,
    ws_connect,
)


async def known_conversation(env: Env, ws: Any, mailbox_id: str) -> str:
    """Publish a message_added so the notifier learns the conversation; wait for its frame."""
    ev = message_added(mailbox_id)
    await env.publish(ev)
    frame = await recv_type(ws, "message.added")
    assert frame["id_conversa"] == ev.id_conversa
    return ev.id_conversa


async def mail_send_entries(env: Env) -> list[MailSend]:
    entries = await env.bus.redis.xrange(env.bus.stream("mail.send"))
    return [Envelope.from_json(f[b"e"]).payload_as(MailSend) for _, f in entries]


async def test_member_gets_message_added_and_non_member_does_not(env: Env, start: Starter) -> None:
    svc = await start()
    box, other = mbx(), mbx()
    async with (
        ws_connect(svc, env.token(user(), [box])) as member,
        ws_connect(svc, env.token(user(), [other])) as outsider,
    ):
        assert member.subprotocol == "chatflow.v1"
        ev = message_added(box)
        await env.publish(ev)
        frame = await recv_json(member)
        assert frame["type"] == "message.added"
        assert frame["event_id"]
        assert frame["id_conversa"] == ev.id_conversa
        m = frame["message"]
        assert set(m) == {
            "id",
            "message_id",
            "direction",
            "from",
            "subject",
            "date",
            "snippet",
            "automatic",
        }
        assert m["id"] == ev.message.id
        assert m["from"] == {"name": "Ana", "address": "ana@customer.test"}
        assert m["direction"] == "in" and m["snippet"] == "my order did not arrive"
        # event_id is the entry id on the frames stream
        [(entry_id, _)] = await env.bus.redis.xrange(env.bus.stream(FRAME_TYPE))
        assert frame["event_id"] == entry_id.decode()
        await assert_silent(outsider)


async def test_redelivered_event_gives_one_frame(env: Env, start: Starter) -> None:
    svc = await start()
    box = mbx()
    async with ws_connect(svc, env.token(user(), [box])) as ws:
        ev = Envelope.of(message_added(box), producer="threader")
        await env.bus.publish(ev)
        await env.bus.publish(ev)  # same envelope id again
        await recv_type(ws, "message.added")
        await assert_silent(ws, 0.8)
    assert await env.bus.redis.xlen(env.bus.stream(FRAME_TYPE)) == 1


async def test_a_frame_published_twice_is_delivered_once(env: Env, start: Starter) -> None:
    """An outbox row published directly and again after the grace (its writer died before
    deleting it) is a second entry with the same envelope: the broadcast readers skip it."""
    svc = await start()
    box = mbx()
    async with ws_connect(svc, env.token(user(), [box])) as ws:
        await env.bus.publish(Envelope.of(message_added(box), producer="threader"))
        await recv_type(ws, "message.added")
        [(_, fields)] = await env.bus.redis.xrange(env.bus.stream(FRAME_TYPE))
        await env.bus.redis.xadd(env.bus.stream(FRAME_TYPE), fields)  # the second copy
        await assert_silent(ws, 0.8)
        await env.bus.publish(Envelope.of(message_added(box), producer="threader"))
        await recv_type(ws, "message.added")  # the next frame still comes


async def test_conversation_updated_frame(env: Env, start: Starter) -> None:
    svc = await start()
    box = mbx()
    async with ws_connect(svc, env.token(user(), [box])) as ws:
        cid = await known_conversation(env, ws, box)
        state = message_added(box, cid, n=1).conversation
        upd = ConversationUpdated(**{**state.model_dump(), "status": "closed", "subject": "Done"})
        await env.publish(upd)
        frame = await recv_type(ws, "conversation.updated")
        assert frame["id_conversa"] == cid
        assert frame["status"] == "closed" and frame["subject"] == "Done"
        assert frame["mailbox_id"] == box and frame["message_count"] == 1
        assert frame["event_id"]


async def test_a_new_message_is_one_frame_carrying_the_conversation(
    env: Env, start: Starter
) -> None:
    """The threader announces a placement twice (message_added, then updated with the same
    state): agents get one frame for it, and a later real change still gets its own."""
    svc = await start()
    box = mbx()
    async with ws_connect(svc, env.token(user(), [box])) as ws:
        ev = message_added(box, subject="Invoice")
        await env.publish(ev)
        await env.publish(ConversationUpdated(**ev.conversation.model_dump()))
        frame = await recv_type(ws, "message.added")
        conv = frame["conversation"]
        assert conv["id_conversa"] == ev.id_conversa and conv["message_count"] == 1
        assert conv["subject"] == "Invoice" and conv["status"] == "open"
        assert "token" not in conv
        # Anything but a repeat: a badge is state, not a conversation frame.
        deadline = asyncio.get_running_loop().time() + 0.8
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                other = json.loads(await asyncio.wait_for(ws.recv(), left))
            except TimeoutError:
                break
            assert other["type"] == "badge", other
        assigned = {**ev.conversation.model_dump(), "assignee": "u-ana"}
        await env.publish(ConversationUpdated(**assigned))
        frame = await recv_type(ws, "conversation.updated")
        assert frame["assignee"] == "u-ana" and "token" not in frame


async def test_send_is_acked_and_becomes_one_mail_send(env: Env, start: Starter) -> None:
    svc = await start()
    box, sub = mbx(), user()
    async with ws_connect(svc, env.token(sub, [box])) as ws:
        cid = await known_conversation(env, ws, box)
        send = {
            "type": "send",
            "client_id": "draft-1",
            "id_conversa": cid,
            "html": "<p>We are on it</p>",
            "attachments": ["att-1"],
        }
        await ws.send(json.dumps(send))
        ack = await recv_type(ws, "send.ack")
        assert ack["client_id"] == "draft-1"
        uuid.UUID(ack["send_id"])
        await ws.send(json.dumps(send))  # a retry after a lost ack
        again = await recv_type(ws, "send.ack")
        assert again["send_id"] == ack["send_id"]

        await testing.eventually(lambda: mail_send_entries(env))
        await asyncio.sleep(0.5)  # give a wrong second publish the time to show up
        [cmd] = await mail_send_entries(env)
        assert cmd.send_id == ack["send_id"] and cmd.client_id == "draft-1"
        assert cmd.id_conversa == cid and cmd.mailbox_id == box and cmd.user_id == sub
        assert cmd.html == "<p>We are on it</p>" and cmd.attachments == ["att-1"]


async def test_a_client_id_reused_for_another_conversation_is_a_conflict(
    env: Env, start: Starter
) -> None:
    svc = await start()
    box, sub = mbx(), user()
    async with ws_connect(svc, env.token(sub, [box])) as ws:
        first = await known_conversation(env, ws, box)
        second = await known_conversation(env, ws, box)
        base = {"type": "send", "client_id": "x1", "html": "<p>hi</p>"}
        await ws.send(json.dumps({**base, "id_conversa": first}))
        await recv_type(ws, "send.ack")
        await ws.send(json.dumps({**base, "id_conversa": second}))
        err = await recv_type(ws, "error")
        assert err["code"] == "conflict" and err["client_id"] == "x1"
    await asyncio.sleep(0.3)
    assert [c.id_conversa for c in await mail_send_entries(env)] == [first]


async def test_send_to_unknown_or_foreign_conversation_is_not_found(
    env: Env, start: Starter
) -> None:
    svc = await start()
    box, theirs = mbx(), mbx()
    async with (
        ws_connect(svc, env.token(user(), [box])) as ws,
        ws_connect(svc, env.token(user(), [theirs])) as other,
    ):
        foreign = await known_conversation(env, other, theirs)
        for cid in (foreign, "c-does-not-exist"):
            await ws.send(
                json.dumps(
                    {"type": "send", "client_id": "x", "id_conversa": cid, "html": "<p>hi</p>"}
                )
            )
            err = await recv_type(ws, "error")
            assert err["code"] == "not_found" and err["client_id"] == "x"
    await asyncio.sleep(0.3)
    assert await mail_send_entries(env) == []


async def test_mail_status_reaches_the_sender_only(env: Env, start: Starter) -> None:
    svc = await start()
    box, sub = mbx(), user()
    async with (
        ws_connect(svc, env.token(sub, [box])) as ws,
        ws_connect(svc, env.token(user(), [box])) as colleague,
    ):
        cid = await known_conversation(env, ws, box)
        await recv_type(colleague, "message.added")
        await ws.send(
            json.dumps({"type": "send", "client_id": "d2", "id_conversa": cid, "html": "<p>ok</p>"})
        )
        ack = await recv_type(ws, "send.ack")

        def status(st: Any, attempt: int = 0, detail: str = "") -> MailStatus:
            return MailStatus(
                send_id=ack["send_id"],
                client_id="d2",
                id_conversa=cid,
                mailbox_id=box,
                user_id=sub,
                status=st,
                attempt=attempt,
                detail=detail,
            )

        await env.publish(status("sent", detail="250 ok"), producer="sender")
        frame = await recv_type(ws, "send.status")
        assert frame == {
            "type": "send.status",
            "event_id": frame["event_id"],
            "send_id": ack["send_id"],
            "client_id": "d2",
            "status": "sent",
            "detail": "250 ok",
        }
        # A late "queued" must not undo "sent".
        await env.publish(status("queued"), producer="sender")
        await assert_silent(ws, 0.8)
        await assert_silent(colleague, 0.1)


async def test_bad_tokens_close_4401(env: Env, start: Starter) -> None:
    svc = await start()
    stranger = OKPKey.generate_key("Ed25519", parameters={"kid": "stranger"})
    bad = [
        "not-a-token",
        env.token(user(), [mbx()], key=stranger),
        env.token(user(), [mbx()], aud="someone-else"),
        env.token(user(), [mbx()], exp_in=-3600),
    ]
    for token in bad:
        async with ws_connect(svc, token) as ws:
            assert await wait_closed(ws) == (4401, "unauthorized")


async def test_first_frame_auth_and_its_timeout(env: Env, start: Starter) -> None:
    svc = await start(ws_auth_timeout_s=0.5)
    box = mbx()
    async with ws_connect(svc, None) as ws:
        await ws.send(json.dumps({"type": "auth", "token": env.token(user(), [box])}))
        await ws.send(json.dumps({"type": "ping"}))
        assert await recv_json(ws) == {"type": "pong"}
        await env.publish(message_added(box))
        await recv_type(ws, "message.added")
    async with ws_connect(svc, None) as ws:
        assert await wait_closed(ws) == (4401, "unauthorized")
    async with ws_connect(svc, None) as ws:
        await ws.send(json.dumps({"type": "auth", "token": "nope"}))
        assert await wait_closed(ws) == (4401, "unauthorized")


async def test_token_expiry_closes_4401(env: Env, start: Starter) -> None:
    svc = await start()
    async with ws_connect(svc, env.token(user(), [mbx()], exp_in=1)) as ws:
        assert await wait_closed(ws, 5) == (4401, "token expired")


async def test_bad_frames_get_error_frames_and_connection_survives(
    env: Env, start: Starter
) -> None:
    svc = await start()
    box = mbx()
    async with ws_connect(svc, env.token(user(), [box])) as ws:
        cases: list[tuple[str | bytes, str]] = [
            ("{not json", "bad_request"),
            ("[1, 2]", "bad_request"),
            (json.dumps({"type": "launch"}), "unknown_type"),
            (json.dumps({"type": "send", "client_id": "c"}), "bad_request"),
            (json.dumps({"type": "resume", "after": "yesterday"}), "bad_request"),
            # The shape of a stream id, past 64 bits: Redis would refuse it (found by a trial).
            (json.dumps({"type": "resume", "after": "99999999999999999999-0"}), "bad_request"),
            (json.dumps({"type": "resume", "after": "1-18446744073709551616"}), "bad_request"),
            # Over the REST reply's limit too.
            (
                json.dumps(
                    {"type": "send", "client_id": "c", "id_conversa": "x", "html": "a" * 2_000_001}
                ),
                "bad_request",
            ),
            (b"\x00\x01", "bad_request"),
            # Found by a trial: the largest stream id (nothing is after it), NUL anywhere (a
            # send was acknowledged, then lost in the sender; ids were internal errors), and
            # nesting past the JSON parser's depth (the socket closed 1011 with no reason).
            (
                json.dumps({"type": "resume", "after": f"{2**64 - 1}-{2**64 - 1}"}),
                "bad_request",
            ),
            (
                json.dumps({"type": "send", "client_id": "c", "id_conversa": "x", "html": "a\0b"}),
                "bad_request",
            ),
            (
                json.dumps(
                    {
                        "type": "send",
                        "client_id": "c",
                        "id_conversa": "x",
                        "html": "<p>a</p>",
                        "attachments": ["\0"],
                    }
                ),
                "bad_request",
            ),
            (
                json.dumps({"type": "send", "client_id": "c\0", "id_conversa": "x", "html": "a"}),
                "bad_request",
            ),
            (json.dumps({"type": "typing", "id_conversa": "\0"}), "bad_request"),
            (json.dumps({"type": "read", "id_conversa": "\0"}), "bad_request"),
            (json.dumps({"type": "viewing", "id_conversa": "a\0"}), "bad_request"),
            (json.dumps({"type": "draft.sync", "id_conversa": "\0"}), "bad_request"),
            ('{"type":"ping","a":' + "[" * 100_000 + "]" * 100_000 + "}", "bad_request"),
        ]
        for raw, code in cases:
            await ws.send(raw)
            err = await recv_json(ws)
            assert err["type"] == "error" and err["code"] == code, (raw, err)
            assert isinstance(err["message"], str)
        # A client_id is echoed to tie the error to a draft, but not one past its own limit: a
        # 100 KB one came back whole, and so did its repr in the message (found by a trial).
        huge = {"type": "send", "client_id": "c" * 100_000, "id_conversa": "x", "html": "a"}
        await ws.send(json.dumps(huge))
        err = await recv_json(ws)
        assert err["code"] == "bad_request" and "client_id" not in err
        assert len(json.dumps(err)) < 1_000, len(json.dumps(err))
        await ws.send(json.dumps({"type": "send", "client_id": "c7", "html": "a"}))
        assert (await recv_json(ws))["client_id"] == "c7"
        await ws.send(json.dumps({"type": "ping"}))
        assert await recv_json(ws) == {"type": "pong"}
        await env.publish(message_added(box))
        await recv_type(ws, "message.added")


async def test_resume_replays_what_was_missed(env: Env, start: Starter) -> None:
    svc = await start()
    box, other, sub = mbx(), mbx(), user()
    async with ws_connect(svc, env.token(sub, [box])) as ws:
        cid = await known_conversation(env, ws, box)
        stream = await env.bus.redis.xrange(env.bus.stream(FRAME_TYPE))
        last_seen = stream[-1][0].decode()
    # While disconnected: two frames for our mailbox, one for another.
    await env.publish(message_added(box, cid, n=2, subject="second"))
    await env.publish(message_added(other))
    await env.publish(message_added(box, cid, n=3, subject="third"))

    async def four() -> bool:
        return await env.bus.redis.xlen(env.bus.stream(FRAME_TYPE)) == 4

    await testing.eventually(four)
    async with ws_connect(svc, env.token(sub, [box])) as ws:
        await ws.send(json.dumps({"type": "resume", "after": last_seen}))
        a = await recv_json(ws)
        b = await recv_json(ws)
        assert [a["message"]["subject"], b["message"]["subject"]] == ["second", "third"]
        assert stream_id(last_seen) < stream_id(a["event_id"]) < stream_id(b["event_id"])
        await assert_silent(ws)
        # Nothing missed since the last one: an empty replay.
        await ws.send(json.dumps({"type": "resume", "after": b["event_id"]}))
        await assert_silent(ws)
        # Live delivery goes on after a resume.
        await env.publish(message_added(box, cid, n=4, subject="fourth"))
        live = await recv_type(ws, "message.added")
        assert live["message"]["subject"] == "fourth"


async def test_a_resume_replays_a_frame_published_twice_once(env: Env, start: Starter) -> None:
    """An outbox row published twice is two entries with one envelope: a replay gives it once,
    and not at all when the client had its first copy before it went away."""
    svc = await start()
    box, sub = mbx(), user()
    frames_stream = env.bus.stream(FRAME_TYPE)
    async with ws_connect(svc, env.token(sub, [box])) as ws:
        cid = await known_conversation(env, ws, box)
        last_seen = (await env.bus.redis.xrange(frames_stream))[-1][0].decode()
        await env.publish(message_added(box, cid, n=2, subject="got it live"))
        live = await recv_type(ws, "message.added")
    [*_, (_, had)] = await env.bus.redis.xrange(frames_stream)
    await env.bus.redis.xadd(frames_stream, had)  # its second copy, while the client is away
    await env.publish(message_added(box, cid, n=3, subject="missed"))
    await _frames_at_least(env, 4)
    [*_, (_, missed)] = await env.bus.redis.xrange(frames_stream)
    await env.bus.redis.xadd(frames_stream, missed)  # and the missed frame's
    await _frames_at_least(env, 5)
    async with ws_connect(svc, env.token(sub, [box])) as ws:
        await ws.send(json.dumps({"type": "resume", "after": live["event_id"]}))
        replayed = await recv_type(ws, "message.added")
        assert replayed["message"]["subject"] == "missed"
        await assert_silent(ws, 0.8)
    # From before both: each frame once, the first copy of each.
    async with ws_connect(svc, env.token(sub, [box])) as ws:
        await ws.send(json.dumps({"type": "resume", "after": last_seen}))
        a = await recv_type(ws, "message.added")
        b = await recv_type(ws, "message.added")
        assert [a["message"]["subject"], b["message"]["subject"]] == ["got it live", "missed"]
        assert a["event_id"] == live["event_id"]
        await assert_silent(ws, 0.8)


async def test_resumes_over_the_same_entries_parse_each_entry_once(
    env: Env, start: Starter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica restart makes all its agents resume over the same entries: the second resume
    replays the same frames without parsing them again (each had parsed every entry)."""
    from services.notifier import ws as ws_module

    svc = await start()
    box, sub = mbx(), user()
    async with ws_connect(svc, env.token(sub, [box])) as ws:
        cid = await known_conversation(env, ws, box)
        last_seen = (await env.bus.redis.xrange(env.bus.stream(FRAME_TYPE)))[-1][0].decode()
    for n in range(2, 12):
        await env.publish(message_added(box, cid, n=n, subject=f"missed {n}"))
    await _frames_at_least(env, 11)
    parsed = 0
    real = ws_module._parse_envelope

    def counting(fields: dict[bytes, bytes]) -> Any:
        nonlocal parsed
        parsed += 1
        return real(fields)

    monkeypatch.setattr(ws_module, "_parse_envelope", counting)
    subjects, parses = [], []
    for _ in range(2):
        before = parsed
        async with ws_connect(svc, env.token(sub, [box])) as ws:
            await ws.send(json.dumps({"type": "resume", "after": last_seen}))
            got = [await recv_type(ws, "message.added") for _ in range(10)]
            await assert_silent(ws, 0.5)
        subjects.append([f["message"]["subject"] for f in got])
        parses.append(parsed - before)
    assert subjects[0] == subjects[1] == [f"missed {n}" for n in range(2, 12)]
    assert parses == [10, 0]  # the second resume parsed nothing


async def test_frames_delivered_before_the_resume_frame_are_not_replayed(
    env: Env, start: Starter
) -> None:
    """A client reconnects while mail flows: frames reach the new connection live before its
    ``resume`` is read; the replay gives what it missed, not those a second time."""
    svc = await start()
    box, sub = mbx(), user()
    async with ws_connect(svc, env.token(sub, [box])) as ws:
        cid = await known_conversation(env, ws, box)
        stream = await env.bus.redis.xrange(env.bus.stream(FRAME_TYPE))
        last_seen = stream[-1][0].decode()
    await env.publish(message_added(box, cid, n=2, subject="missed"))
    await _frames_at_least(env, 2)
    async with ws_connect(svc, env.token(sub, [box])) as ws:
        await env.publish(message_added(box, cid, n=3, subject="live"))
        live = await recv_type(ws, "message.added")
        assert live["message"]["subject"] == "live"
        await ws.send(json.dumps({"type": "ping"}))  # other frames may come first
        assert (await recv_type(ws, "pong"))["type"] == "pong"
        await ws.send(json.dumps({"type": "resume", "after": last_seen}))
        replayed = await recv_type(ws, "message.added")
        assert replayed["message"]["subject"] == "missed"
        await assert_silent(ws, 0.8)


async def test_a_late_resume_after_many_live_frames_replays_only_what_was_missed(
    env: Env, start: Starter
) -> None:
    """Neither the number of frames delivered live since the reconnect nor the time before the
    ``resume`` brings any back (the ids kept were capped at 256 and dropped after 10 s, so a
    late resume repeated frames; found by a trial)."""
    svc = await start()
    box, sub = mbx(), user()
    async with ws_connect(svc, env.token(sub, [box])) as ws:
        cid = await known_conversation(env, ws, box)
        last_seen = (await env.bus.redis.xrange(env.bus.stream(FRAME_TYPE)))[-1][0].decode()
    await env.publish(message_added(box, cid, n=2, subject="missed"))
    await _frames_at_least(env, 2)
    async with ws_connect(svc, env.token(sub, [box])) as ws:
        for i in range(300):
            await env.publish(message_added(box, cid, n=3 + i, subject=f"live {i}"))
        for i in range(300):
            assert (await recv_type(ws, "message.added"))["message"]["subject"] == f"live {i}"
        await ws.send(json.dumps({"type": "viewing", "id_conversa": cid}))
        await ws.send(json.dumps({"type": "resume", "after": last_seen}))
        replayed = await recv_type(ws, "message.added")
        assert replayed["message"]["subject"] == "missed"
        await assert_silent(ws, 0.8, skip=("presence", "badge"))
        await env.publish(message_added(box, cid, n=400, subject="after"))
        assert (await recv_type(ws, "message.added"))["message"]["subject"] == "after"


async def _frames_at_least(env: Env, n: int) -> None:
    async def enough() -> bool:
        return bool(await env.bus.redis.xlen(env.bus.stream(FRAME_TYPE)) >= n)

    await testing.eventually(enough)


async def test_resume_after_a_trimmed_id_asks_for_resync(env: Env, start: Starter) -> None:
    svc = await start()
    box = mbx()
    async with ws_connect(svc, env.token(user(), [box])) as ws:
        await known_conversation(env, ws, box)
        old = (await env.bus.redis.xrange(env.bus.stream(FRAME_TYPE)))[0][0].decode()
        await env.publish(message_added(box))
        await recv_type(ws, "message.added")
        await env.bus.redis.xtrim(env.bus.stream(FRAME_TYPE), maxlen=1, approximate=False)
        await ws.send(json.dumps({"type": "resume", "after": old}))
        assert await recv_json(ws) == {"type": "resync"}


async def test_two_replicas_deliver_exactly_once(env: Env, start: Starter) -> None:
    a = await start()
    b = await start()
    box = mbx()
    async with (
        ws_connect(a, env.token(user(), [box])) as on_a,
        ws_connect(b, env.token(user(), [box])) as on_b,
    ):
        events = [message_added(box) for _ in range(5)]
        for ev in events:
            await env.publish(ev)
        for ws in (on_a, on_b):
            got = [await recv_type(ws, "message.added") for _ in events]
            assert sorted(f["id_conversa"] for f in got) == sorted(e.id_conversa for e in events)
            assert len({f["event_id"] for f in got}) == len(events)
            await assert_silent(ws)
    assert await env.bus.redis.xlen(env.bus.stream(FRAME_TYPE)) == len(events)


async def test_slow_consumer_is_closed_and_others_still_served(
    env: Env, start: Starter, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = await start()
    box, slow_sub = mbx(), user()
    async with (
        ws_connect(svc, env.token(slow_sub, [box])) as slow,
        ws_connect(svc, env.token(user(), [box])) as fine,
    ):
        await slow.send(json.dumps({"type": "ping"}))
        await recv_json(slow)
        [slow_conn] = [c.conn for c in svc.hub.clients if c.identity.sub == slow_sub]
        real = hub_module.buffered
        monkeypatch.setattr(hub_module, "buffered", lambda c: 10**9 if c is slow_conn else real(c))
        await env.publish(message_added(box))
        await recv_type(fine, "message.added")
        assert await wait_closed(slow) == (4008, "slow consumer")
        assert all(c.identity.sub != slow_sub for c in svc.hub.clients)


async def test_wrong_origin_and_path_are_refused(env: Env, start: Starter) -> None:
    svc = await start(allow_missing_origin=False)
    token = env.token(user(), [mbx()])
    with pytest.raises(InvalidStatus) as exc:
        async with ws_connect(svc, token, origin="https://evil.example"):
            pass
    assert exc.value.response.status_code == 403
    with pytest.raises(InvalidStatus) as exc:
        async with ws_connect(svc, token):  # no Origin, not allowed here
            pass
    assert exc.value.response.status_code == 403
    async with ws_connect(svc, token, origin="https://localhost:8443") as ws:
        await ws.send(json.dumps({"type": "ping"}))
        assert await recv_json(ws) == {"type": "pong"}
    with pytest.raises(InvalidStatus) as exc:
        async with connect(
            f"wss://127.0.0.1:{svc.cfg.ws_port}/nope",
            ssl=client_ssl(svc.cfg),
            origin="https://localhost:8443",
        ):
            pass
    assert exc.value.response.status_code == 404


async def test_ops_port_reports_ready(env: Env, start: Starter) -> None:
    svc: NotifierService = await start()
    async with httpx.AsyncClient(verify=client_ssl(svc.cfg)) as http:
        r = await http.get(f"https://127.0.0.1:{svc.cfg.http_port}/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"]["websocket"] is True


async def test_frames_arriving_during_a_resume_come_once_and_in_order(
    env: Env, start: Starter, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = await start()
    box, sub = mbx(), user()
    async with ws_connect(svc, env.token(sub, [box])) as ws:
        cid = await known_conversation(env, ws, box)
        last_seen = (await env.bus.redis.xrange(env.bus.stream(FRAME_TYPE)))[-1][0].decode()
    await env.publish(message_added(box, cid, n=2, subject="missed"))

    async def two() -> bool:
        return await env.bus.redis.xlen(env.bus.stream(FRAME_TYPE)) == 2

    await testing.eventually(two)

    redis = svc.bus.redis
    real_xrange = redis.xrange
    calls = 0

    async def slow_xrange(*args: Any, **kwargs: Any) -> Any:
        # The first read of the replay stalls while a live frame is delivered meanwhile; the
        # replay then sees that frame too, and the client must still get it once.
        nonlocal calls
        calls += 1
        if calls == 1:
            await env.publish(message_added(box, cid, n=3, subject="live"))
            await asyncio.sleep(1.0)
        return await real_xrange(*args, **kwargs)

    async with ws_connect(svc, env.token(sub, [box])) as ws:
        monkeypatch.setattr(redis, "xrange", slow_xrange)
        await ws.send(json.dumps({"type": "resume", "after": last_seen}))
        got = [await recv_json(ws), await recv_json(ws)]
        assert [f["message"]["subject"] for f in got] == ["missed", "live"]
        await assert_silent(ws, 0.8)
    assert calls >= 2
