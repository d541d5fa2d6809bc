"""The WebSocket contract: the ``notifier.frame`` event, client frames, and server frame builders.

Server frames are plain dicts built here once per event; the replica that delivers them adds
``event_id`` (the frame's entry id in ``<prefix>notifier.frame``), which a client hands back in
``resume`` after a reconnect.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from libs.common.events import (
    ConversationMerged,
    ConversationMessageAdded,
    ConversationState,
    MailStatus,
    register,
)
from services.notifier.domain.drafts import DRAFT_NAME

FRAME_TYPE = "notifier.frame"
STREAM_ID = r"^\d{1,20}-\d{1,20}$"
# What client frames may hold: ids of conversations and uploads as we mint them, client ids on
# one line, html without NUL (PostgreSQL text cannot hold one: a send was acknowledged, then
# failed in the sender for ever; found by a trial). The REST routes refuse the same.
OBJECT_ID = r"^[A-Za-z0-9._:-]{1,200}$"
ONE_LINE = r"^[^\x00-\x1f\x7f]+$"
NO_NUL = r"^[^\x00]*$"
MAX_STREAM_PART = 2**64 - 1


class AccessChange(BaseModel):
    """A user's account (``mailbox_id`` None) or one membership was disabled or restored.

    It travels in the frames stream so every replica applies it in order with the frames around
    it (see ``services.notifier.access``); it is never sent to a client.
    """

    model_config = ConfigDict(extra="ignore")

    user_id: str
    mailbox_id: str | None = None
    active: bool
    changed_at: datetime


@register(FRAME_TYPE)
class NotifierFrame(BaseModel):
    """One server frame and its audience: members of ``mailbox_id`` (only ``user_id`` if set).

    An entry with ``access`` set is a directory change for the replicas instead; it keeps
    ``mailbox_id`` empty, so a replica that predates ``access`` delivers it to nobody.
    """

    model_config = ConfigDict(extra="ignore")

    mailbox_id: str
    user_id: str | None = None
    frame: dict[str, Any]
    access: AccessChange | None = None
    # The unread-badge change of the same event (``badge_store``), turned by each replica into
    # every agent's own ``badge`` frame; riding on the entry keeps one entry per event.
    badge: dict[str, Any] | None = None

    @classmethod
    def of_access(cls, change: AccessChange) -> NotifierFrame:
        return cls(mailbox_id="", frame={}, access=change)


# ---- client → server ---------------------------------------------------------------------------


class _ClientFrame(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)


class AuthFrame(_ClientFrame):
    type: Literal["auth"]
    token: str = Field(min_length=1, max_length=8192)


MAX_CLIENT_ID = 128


class SendFrame(_ClientFrame):
    type: Literal["send"]
    client_id: str = Field(min_length=1, max_length=MAX_CLIENT_ID, pattern=ONE_LINE)
    id_conversa: str = Field(min_length=1, max_length=200, pattern=OBJECT_ID)
    html: str = Field(min_length=1, max_length=2_000_000, pattern=NO_NUL)  # as the REST reply's
    attachments: list[Annotated[str, Field(max_length=100, pattern=OBJECT_ID)]] = Field(
        default_factory=list, max_length=50
    )
    # The draft it was written in, cleared once the send is taken; a bad name refuses the send.
    draft: str | None = Field(default=None, pattern=DRAFT_NAME.pattern)


class ResumeFrame(_ClientFrame):
    type: Literal["resume"]
    after: str = Field(pattern=STREAM_ID)

    @field_validator("after")
    @classmethod
    def _in_range(cls, v: str) -> str:
        """Both parts of a stream id are 64-bit: Redis refuses larger ones (an internal error
        for what is the client's bad frame), and there is nothing after the largest one."""
        parts = [int(part) for part in v.split("-")]
        if any(p > MAX_STREAM_PART for p in parts) or parts == [MAX_STREAM_PART] * 2:
            raise ValueError("not a stream id")
        return v


class PingFrame(_ClientFrame):
    type: Literal["ping"]


class ReadFrame(_ClientFrame):
    """Mark a conversation read for this agent (its badge goes to 0)."""

    type: Literal["read"]
    id_conversa: str = Field(min_length=1, max_length=200, pattern=OBJECT_ID)


class PresenceFrame(_ClientFrame):
    """``viewing`` (opened it), ``typing`` (repeat every few seconds while typing), ``left``."""

    type: Literal["viewing", "typing", "left"]
    id_conversa: str = Field(min_length=1, max_length=200, pattern=OBJECT_ID)


CLIENT_FRAMES: dict[str, type[_ClientFrame]] = {
    "send": SendFrame,
    "resume": ResumeFrame,
    "ping": PingFrame,
    "read": ReadFrame,
    "viewing": PresenceFrame,
    "typing": PresenceFrame,
    "left": PresenceFrame,
}
# Server frames that are state rather than history: not replayed by ``resume`` (badges are
# re-sent whole after auth, presence is only worth its current value).
EPHEMERAL = frozenset({"badge", "presence"})


# ---- server → client ---------------------------------------------------------------------------


# What a ``message.added`` frame tells of the message (CONTRACT.md); the rest is the API's.
MESSAGE_FIELDS = (
    "id",
    "message_id",
    "direction",
    "from",
    "subject",
    "date",
    "snippet",
    "automatic",
)


def message_added(ev: ConversationMessageAdded) -> dict[str, Any]:
    """The message and the conversation's state after it: one frame per mail for every agent
    (a ``conversation.updated`` repeating that state sends no frame of its own)."""
    m = ev.message.model_dump(mode="json", by_alias=True)
    return {
        "type": "message.added",
        "id_conversa": ev.id_conversa,
        "message": {k: m[k] for k in MESSAGE_FIELDS},
        "conversation": _state(ev.conversation),
    }


def conversation_updated(state: ConversationState) -> dict[str, Any]:
    return {"type": "conversation.updated", **_state(state)}


def _state(state: ConversationState) -> dict[str, Any]:
    """What an agent's list shows; not the signed thread token, which only mail needs."""
    return state.model_dump(mode="json", by_alias=True, exclude={"token"})


def conversation_merged(ev: ConversationMerged) -> dict[str, Any]:
    """``merged`` ids now answer as ``into``: a client showing one of them switches over."""
    return {"type": "conversation.merged", "into": ev.into, "merged": list(ev.merged)}


def send_status(ev: MailStatus) -> dict[str, Any]:
    return {
        "type": "send.status",
        "send_id": ev.send_id,
        "client_id": ev.client_id,
        "status": ev.status,
        "detail": ev.detail,
    }


def send_ack(client_id: str, send_id: str) -> dict[str, Any]:
    return {"type": "send.ack", "client_id": client_id, "send_id": send_id}


def error(code: str, message: str, client_id: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if client_id:
        out["client_id"] = client_id  # lets the client tie a failed send to its draft
    return out


RESYNC: dict[str, Any] = {"type": "resync"}
PONG: dict[str, Any] = {"type": "pong"}
