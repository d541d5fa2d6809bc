"""The set-based placement's announcement (``announcements.message_added``, plain values) is
the same JSON, byte for byte, as the models' path (``announcements.announcement``)."""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from libs.common import ids
from libs.common.events import Address, ConversationMessageAdded, ConversationRead, Envelope
from services.threader import announcements, storage

NAMES = ["", "Zoé Ñúñez", "Kim \u2028 Lee", 'Bob "the" O\'Neil', "李雷", "x" * 200]


def _address(rng: random.Random) -> Address:
    return Address(
        name=rng.choice(NAMES), address=f"p{rng.randrange(99)}@co{rng.randrange(5)}.test"
    )


def _case(rng: random.Random) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], str]:
    """(conversation state, stored message row, summary inputs, text)."""
    sender, to = _address(rng), [_address(rng) for _ in range(rng.randrange(1, 3))]
    cc = [_address(rng) for _ in range(rng.randrange(0, 3))]
    reply_to = [_address(rng)] if rng.random() < 0.3 else []
    refs = [f"<r{i}@co.test>" for i in range(rng.randrange(0, 4))]
    date = datetime(2026, 12, 4, 3, 4, 5, rng.choice([0, 123456]), tzinfo=UTC)
    text = rng.choice(["", "hi", "  spaced\n\ttext  ", "é" * 300, "word " * 100])
    flags = rng.choice([{}, {"auto_submitted": True}, {"bounce": True}])
    message_uuid = uuid.uuid4()
    subject = rng.choice(["", "Re: Printer", "Fatura nº 7 — atraso"])
    row = {
        "id": message_uuid,
        "message_id": f"<m{rng.randrange(10**6)}@co.test>",
        "direction": "in",
        "sender": sender.model_dump(),
        "to_addrs": [a.model_dump() for a in to],
        "cc_addrs": [a.model_dump() for a in cc],
        "subject": subject,
        "date": date,
        "in_reply_to": refs[-1:],
        "refs": refs,
        "reply_to": [a.model_dump() for a in reply_to],
        "flags": flags,
    }
    summary = announcements.summary(
        message_uuid=message_uuid,
        message_id=row["message_id"],
        sender=sender,
        to=to,
        cc=cc,
        subject=subject,
        date=date,
        text=text,
        in_reply_to=refs[-1:],
        references=refs,
        reply_to=reply_to,
        automatic=storage.is_automatic(flags),
    )
    people = [_address(rng).model_dump() for _ in range(rng.randrange(0, 4))]
    conv = {
        "id_conversa": uuid.uuid4(),
        "mailbox_id": "mb-é",
        "number": rng.randrange(1, 10**7),
        "channel": "email",
        "subject": subject,
        "status": rng.choice(["open", "pending", "closed"]),
        "assignee": rng.choice([None, "agent-1"]),
        "message_count": rng.randrange(1, 500),
        "last_message_at": date + timedelta(seconds=rng.randrange(10**6)),
        "participants": people,
    }
    return conv, row, summary, text


@pytest.mark.parametrize("secret", [b"", b"k" * 32])
def test_message_added_is_the_models_json_byte_for_byte(
    secret: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(f"announce-{secret!r}")
    for _ in range(300):
        conv, row, summary, text = _case(rng)
        cause = Envelope.of(
            ConversationRead(id_conversa="x", mailbox_id="mb", user_id="u", read_at=row["date"]),
            producer="ingest",
        )  # only its correlation id is read
        placed = storage.Placed(conv, row, [], text)
        (model,) = announcements.announcement(cause, placed, secret)
        want = model.to_json()
        # The envelope's own id and time, which each path draws for itself.
        at, envelope_id = model.occurred_at, uuid.UUID(model.id)
        monkeypatch.setattr(announcements, "now", lambda: at)  # noqa: B023 (used at once)
        monkeypatch.setattr(ids, "uuid4", lambda: envelope_id)  # noqa: B023
        stream_type, got = announcements.message_added(cause.correlation_id, conv, summary, secret)
        monkeypatch.undo()
        assert stream_type == model.type
        assert got == want
        # And it reads back as the payload the consumers validate.
        ConversationMessageAdded.model_validate(json.loads(got)["payload"])
