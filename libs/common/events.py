"""The event envelope of the contract and the registry of payload schemas.

Every stream entry is one JSON envelope. Payload models are registered by ``(type, version)`` so a
consumer validates what it reads and a producer cannot publish what it could not read back.
"""

from __future__ import annotations

import builtins
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from libs.common import ids

P = TypeVar("P", bound=BaseModel)
_REGISTRY: dict[tuple[str, int], type[BaseModel]] = {}


class EventError(ValueError):
    """An entry that can never be handled: bad JSON, unknown type or a payload that fails its schema."""


class register:
    """``@register("mail.received", 1)`` on a payload model adds it to the registry.

    A class, not a closure, so type checkers keep the decorated model's own type.
    """

    def __init__(self, type_: str, version: int = 1) -> None:
        self.type_ = type_
        self.version = version

    def __call__(self, model: type[P]) -> type[P]:
        _REGISTRY[(self.type_, self.version)] = model
        model.event_type = self.type_  # type: ignore[attr-defined]
        model.event_version = self.version  # type: ignore[attr-defined]
        return model


def registered() -> dict[tuple[str, int], type[BaseModel]]:
    return dict(_REGISTRY)


def now() -> datetime:
    return datetime.now(UTC)


class Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=lambda: str(ids.uuid4()))
    type: str
    version: int = 1
    occurred_at: datetime = Field(default_factory=now)
    producer: str
    correlation_id: str = Field(default_factory=lambda: str(ids.uuid4()))
    payload: dict[str, Any]
    _parsed: BaseModel | None = PrivateAttr(default=None)  # the payload as from_json read it

    @classmethod
    def of(cls, payload: BaseModel, producer: str, correlation_id: str | None = None) -> Envelope:
        type_ = getattr(payload, "event_type", None)
        if type_ is None:
            raise EventError(f"{type(payload).__name__} is not a registered event payload")
        return cls(
            type=type_,
            version=payload.event_version,  # type: ignore[attr-defined]
            producer=producer,
            payload=payload.model_dump(mode="json"),
            # Given: no id drawn for it only to be replaced.
            correlation_id=correlation_id or str(ids.uuid4()),
        )

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, raw: str | bytes) -> Envelope:
        try:
            env = cls.model_validate_json(raw)
        except ValidationError as exc:
            raise EventError(f"invalid envelope: {_short(exc)}") from exc
        # Validates the payload as well, and keeps the result for ``payload_as``: a consumer
        # validated every payload twice (a tenth of the threader's CPU per message at volume).
        env._parsed = env.parsed()
        return env

    @classmethod
    def from_entry(cls, fields: dict[bytes, bytes]) -> Envelope:
        """The envelope of a stream entry (its one field ``e``)."""
        data = fields.get(b"e")
        if data is None:
            raise EventError("entry has no 'e' field")
        return cls.from_json(data)

    def parsed(self) -> BaseModel:
        model = _REGISTRY.get((self.type, self.version))
        if model is None:
            raise EventError(f"unknown event type {self.type!r} version {self.version}")
        try:
            return model.model_validate(self.payload)
        except ValidationError as exc:
            raise EventError(f"invalid {self.type} v{self.version} payload: {_short(exc)}") from exc

    def payload_as(self, model: builtins.type[P]) -> P:  # `type` is a field here
        parsed = self._parsed if self._parsed is not None else self.parsed()
        if not isinstance(parsed, model):
            raise EventError(f"{self.type} is not {model.__name__}")
        return parsed


def _short(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()[:5]
    )


# ---- payload schemas ---------------------------------------------------------------------------


class _Payload(BaseModel):
    # ``from`` is a keyword in Python: fields named ``from_`` travel as "from".
    model_config = ConfigDict(extra="ignore", populate_by_name=True, serialize_by_alias=True)


class Address(_Payload):
    name: str = ""
    address: str


class AttachmentRef(_Payload):
    id: str
    filename: str
    content_type: str
    size: int
    content_id: str | None = None
    inline: bool = False


@register("auth.jwks")
class JwksPublished(_Payload):
    """The public signing keys; verifiers follow the newest entry of this stream."""

    keys: list[dict[str, Any]]


@register("mailbox.changed")
class MailboxChanged(_Payload):
    mailbox_id: str
    address: str
    name: str = ""
    active: bool = True


@register("user.changed")
class UserChanged(_Payload):
    user_id: str
    email: str
    name: str = ""
    roles: list[str] = []
    active: bool = True


@register("membership.changed")
class MembershipChanged(_Payload):
    user_id: str
    mailbox_id: str
    active: bool = True


class MailFlags(_Payload):
    generated_message_id: bool = False
    date_fallback: bool = False
    auto_submitted: bool = False
    bounce: bool = False
    # The text or HTML was cut for size (the whole text is an attachment, message.txt).
    truncated: bool = False
    # Some of the body could not be read (parts nested too deep, too many parts, or no body
    # at all): what was read is here, the raw message is kept by ingest.
    incomplete: bool = False


@register("mail.received")
class MailReceived(_Payload):
    """An inbound email, stored raw by ingest and read into the channel-neutral message fields."""

    ingest_id: str
    mailbox_id: str
    mailbox_address: str
    channel: Literal["email"] = "email"
    message_id: str
    in_reply_to: list[str] = []
    references: list[str] = []
    from_: Address = Field(alias="from")
    to: list[Address] = []
    cc: list[Address] = []
    reply_to: list[Address] = []
    subject: str = ""
    date: datetime
    received_at: datetime
    text: str = ""
    html: str = ""
    attachments: list[AttachmentRef] = []
    flags: MailFlags = MailFlags()
    # Outlook's thread headers, as sent (base64 Thread-Index, one-line Thread-Topic): the
    # threader uses them where References are missing.
    thread_index: str | None = None
    thread_topic: str | None = None


class MessageSummary(_Payload):
    id: str
    message_id: str
    direction: Literal["in", "out"]
    from_: Address = Field(alias="from")
    to: list[Address] = []
    cc: list[Address] = []
    subject: str = ""
    date: datetime
    snippet: str = ""
    in_reply_to: list[str] = []
    references: list[str] = []
    # Where its sender asked replies to go (Reply-To); empty: to ``from``.
    reply_to: list[Address] = []
    # Sent by a machine, not a person: an auto-reply, a bounce (Auto-Submitted, Precedence,
    # X-Autoreply, a DSN). It joins its conversation but reopens nothing and raises no badge.
    automatic: bool = False


class ConversationState(_Payload):
    id_conversa: str
    mailbox_id: str
    number: int | None = None  # the short ticket number shown as [#number] in subjects
    # The signed token our mail carries in Message-ID and Reply-To (number-hmac).
    token: str | None = None
    channel: str = "email"
    subject: str = ""
    status: Literal["open", "pending", "closed"] = "open"
    assignee: str | None = None
    message_count: int = 0
    last_message_at: datetime
    participants: list[Address] = []


@register("conversation.message_added")
class ConversationMessageAdded(_Payload):
    """A message was placed in a conversation; ``conversation`` is its state after it (no
    ``conversation.updated`` follows for the same change)."""

    id_conversa: str
    mailbox_id: str
    channel: str = "email"
    message: MessageSummary
    conversation: ConversationState


@register("conversation.updated")
class ConversationUpdated(ConversationState):
    """A conversation changed without a new message (status, assignee, a conversation an agent
    started); the state after the change."""


@register("conversation.merged")
class ConversationMerged(_Payload):
    mailbox_id: str
    into: str
    merged: list[str]


@register("conversation.read")
class ConversationRead(_Payload):
    """An agent marked a conversation read (REST or the WebSocket ``read`` frame): their unread
    badge of it goes to 0."""

    id_conversa: str
    mailbox_id: str
    user_id: str
    read_at: datetime


class NewConversation(_Payload):
    """Set on the ``mail.send`` that opens an outbound conversation: it has no messages yet, so
    this is what the sender threads it by (the threader's number and signed token)."""

    number: int
    token: str
    subject: str


@register("mail.send")
class MailSend(_Payload):
    """A command: send this reply (or first message) of a conversation."""

    send_id: str
    client_id: str = ""
    id_conversa: str
    mailbox_id: str
    user_id: str = ""
    html: str
    attachments: list[str] = []
    to: list[Address] | None = None
    cc: list[Address] | None = None
    subject: str | None = None
    # Sent by automation rather than typed by an agent: carries Auto-Submitted (RFC 3834).
    automatic: bool = False
    conversation: NewConversation | None = None
    # The collaborative draft (Yjs) the reply was written in: the notifier empties it for every
    # editor once the command is on the stream, whichever route (WebSocket or REST) sent it.
    draft: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:-]{1,64}$")


class SentMessage(_Payload):
    message_id: str
    from_: Address = Field(alias="from")
    to: list[Address] = []
    cc: list[Address] = []
    subject: str = ""
    date: datetime
    text: str = ""
    html: str = ""
    in_reply_to: list[str] = []
    references: list[str] = []
    attachments: list[AttachmentRef] = []


@register("mail.status")
class MailStatus(_Payload):
    send_id: str
    client_id: str = ""
    id_conversa: str
    mailbox_id: str
    user_id: str = ""
    status: Literal["queued", "sent", "deferred", "failed"]
    detail: str = ""
    attempt: int = 0
    next_attempt_at: datetime | None = None
    message: SentMessage | None = None


class BouncedRecipient(_Payload):
    address: str
    action: Literal["failed", "delayed", "delivered", "relayed", "expanded"]
    status: str = ""  # RFC 3463 enhanced code, e.g. "5.1.1"
    diagnostic: str = ""  # the remote server's reply, one line
    remote_mta: str = ""


@register("mail.bounced")
class MailBounced(_Payload):
    """A delivery status notification that names the Message-ID of the message it reports on.

    Published by ingest for a stored bounce (RFC 3464 report, or a plain one it could read);
    the sender marks its send with that Message-ID failed when a recipient failed.
    """

    ingest_id: str
    mailbox_id: str
    original_message_id: str
    reporting_mta: str = ""
    structured: bool = True  # False: read from a plain-text bounce, not a delivery-status part
    recipients: list[BouncedRecipient] = []
    received_at: datetime
