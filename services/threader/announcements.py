"""The events a placement announces, as outbox entries (stream type, envelope JSON).

``announcement`` builds them through the payload models, as every producer does. The set-based
placement of a batch announces a hundred messages inside its transaction, with the mailbox's
placement lock held, so their cost is paid by every batch waiting behind it: building and
validating the models, then dumping them, was ~65 us per message, a tenth of a batch's time in
the lock. ``message_added`` writes the same JSON from plain values (``pydantic_core.to_json``,
the serializer the models use) in ~10 us: the summary of each message is made before the lock
(``summary``), and the conversation's state is the write's row. A test checks that both give the
same bytes.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import pydantic_core

from libs.common import ids
from libs.common.events import (
    Address,
    ConversationMerged,
    ConversationMessageAdded,
    Envelope,
    now,
)
from services.threader import storage
from services.threader.domain import tokens

Entry = tuple[str, str]  # (stream type, envelope JSON), as ``outbox.stage_entries`` takes them
MESSAGE_ADDED = "conversation.message_added"
_VERSION: int = ConversationMessageAdded.event_version  # type: ignore[attr-defined]


def announcement(env: Envelope, placed: storage.Placed, token_secret: bytes) -> list[Envelope]:
    """``conversation.message_added`` carries the conversation's new state, so a placement is
    not also a ``conversation.updated`` (that one is for changes without a message: status,
    assignee): one event per mail for every consumer instead of two."""
    conv = storage.state(placed.conversation, token_secret)
    events = [
        Envelope.of(
            ConversationMessageAdded(
                id_conversa=conv.id_conversa,
                mailbox_id=conv.mailbox_id,
                channel=conv.channel,
                message=storage.summary(placed.message, placed.text),
                conversation=conv,
            ),
            producer="threader",
            correlation_id=env.correlation_id,
        ),
    ]
    if placed.merged:
        events.append(
            Envelope.of(
                ConversationMerged(
                    mailbox_id=conv.mailbox_id, into=conv.id_conversa, merged=placed.merged
                ),
                producer="threader",
                correlation_id=env.correlation_id,
            )
        )
    return events


def entries(events: Sequence[Envelope]) -> list[Entry]:
    return [(e.type, e.to_json()) for e in events]


def _address(a: Address | Mapping[str, Any]) -> dict[str, str]:
    if type(a) is dict:  # the common case first: isinstance of a model goes through ABCMeta
        return {"name": a.get("name") or "", "address": a["address"]}
    if isinstance(a, Address):
        return {"name": a.name, "address": a.address}
    return {"name": a.get("name") or "", "address": a["address"]}


def summary(
    *,
    message_uuid: uuid.UUID,
    message_id: str,
    sender: Address,
    to: Sequence[Address],
    cc: Sequence[Address],
    subject: str,
    date: datetime,
    text: str,
    in_reply_to: Sequence[str],
    references: Sequence[str],
    reply_to: Sequence[Address],
    automatic: bool,
) -> dict[str, Any]:
    """An inbound message's ``MessageSummary`` as plain values, in the model's field order."""
    return {
        "id": str(message_uuid),
        "message_id": message_id,
        "direction": "in",
        "from": _address(sender),
        "to": [_address(a) for a in to],
        "cc": [_address(a) for a in cc],
        "subject": subject,
        "date": date,
        "snippet": storage.snippet(text),
        "in_reply_to": list(in_reply_to),
        "references": list(references),
        "reply_to": [_address(a) for a in reply_to],
        "automatic": automatic,
    }


@lru_cache(maxsize=4096)
def _token(number: int, secret: bytes) -> str:
    return tokens.sign(number, secret)


def message_added(
    correlation_id: str,
    conversation: Mapping[str, Any],
    message: dict[str, Any],
    token_secret: bytes,
) -> Entry:
    """``announcement``'s ``conversation.message_added`` for a message with no merge:
    ``conversation`` holds ``storage.state``'s columns, ``message`` is ``summary``'s."""
    number = conversation["number"]
    id_conversa = str(conversation["id_conversa"])
    mailbox_id = conversation["mailbox_id"]
    channel = conversation["channel"]
    envelope = {
        "id": str(ids.uuid4()),
        "type": MESSAGE_ADDED,
        "version": _VERSION,
        "occurred_at": now(),
        "producer": "threader",
        "correlation_id": correlation_id,
        "payload": {
            "id_conversa": id_conversa,
            "mailbox_id": mailbox_id,
            "channel": channel,
            "message": message,
            "conversation": {
                "id_conversa": id_conversa,
                "mailbox_id": mailbox_id,
                "number": number,
                "token": _token(number, token_secret) if token_secret else None,
                "channel": channel,
                "subject": conversation["subject"],
                "status": conversation["status"],
                "assignee": conversation["assignee"],
                "message_count": conversation["message_count"],
                "last_message_at": conversation["last_message_at"],
                "participants": [_address(p) for p in conversation["participants"]],
            },
        },
    }
    return MESSAGE_ADDED, pydantic_core.to_json(envelope).decode()
