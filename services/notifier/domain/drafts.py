"""Pure rules of collaborative drafts: keys, limits, the y-protocols sync wire, compaction.

A draft is a Yjs document named by (conversation, draft name). Its frames carry y-protocols
*sync* messages exactly as y-websocket puts them on the wire (``0`` = sync, then ``0`` step 1 with
a state vector, ``1`` step 2 or ``2`` update with a Yjs update, each a var-uint length-prefixed
byte string), base64-encoded because our frames are JSON text. Checking them here, before any
of it touches a document, is what lets a bad frame get an error instead of hurting the draft.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

import pycrdt

DEFAULT_DRAFT = "reply"
DRAFT_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MESSAGE_SYNC = 0  # y-protocols: 1 is awareness, which presence covers in this product
EMPTY_UPDATE = b"\x00\x00"  # a Yjs update with no structs and no deletions


class DraftKey(NamedTuple):
    id_conversa: str
    draft: str


class SyncKind(IntEnum):
    STEP1 = 0  # payload: the sender's state vector; answered with step 2
    STEP2 = 1  # payload: what the receiver lacked (a Yjs update)
    UPDATE = 2  # payload: a Yjs update


@dataclass(frozen=True)
class SyncMessage:
    kind: SyncKind
    payload: bytes

    @property
    def is_update(self) -> bool:
        return self.kind is not SyncKind.STEP1


@dataclass(frozen=True)
class DraftLimits:
    """What one connection may make a replica hold and store."""

    max_message_bytes: int = 256 * 1024  # one decoded sync message
    max_doc_bytes: int = 1024 * 1024  # snapshot plus update log of one draft
    compact_every: int = 200  # updates in the log before they are merged into the snapshot
    compact_bytes: int = 256 * 1024  # or this many bytes of log
    max_open_per_connection: int = 16


class DraftError(Exception):
    """A frame we refuse; ``code`` is the error frame's code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def valid_name(name: object) -> bool:
    return isinstance(name, str) and DRAFT_NAME.fullmatch(name) is not None


def decode_data(data: str, limits: DraftLimits) -> bytes:
    """Base64 to bytes, refusing anything over the cap before decoding it."""
    if len(data) > 4 * ((limits.max_message_bytes + 2) // 3):
        raise DraftError(
            "too_large", f"a draft message is at most {limits.max_message_bytes} bytes"
        )
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise DraftError("bad_request", "data: not base64") from None
    if len(raw) > limits.max_message_bytes:
        raise DraftError(
            "too_large", f"a draft message is at most {limits.max_message_bytes} bytes"
        )
    return raw


def encode_data(message: bytes) -> str:
    return base64.b64encode(message).decode("ascii")


def read_var_uint(buf: bytes, pos: int) -> tuple[int, int]:
    """lib0's var-uint at ``pos``: (value, position after it); ValueError past the end."""
    value = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated var-uint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 35:  # lengths fit in far fewer bits; longer is garbage
            raise ValueError("var-uint too long")


def write_var_uint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)


def parse_sync(message: bytes) -> SyncMessage:
    """One y-protocols sync message, its length prefix checked against what is there."""
    if len(message) < 3:
        raise DraftError("bad_request", "data: not a y-protocols sync message")
    if message[0] != MESSAGE_SYNC:
        raise DraftError("unsupported", "only y-protocols sync messages are accepted on drafts")
    try:
        kind = SyncKind(message[1])
    except ValueError:
        raise DraftError("bad_request", "data: unknown sync message type") from None
    try:
        length, start = read_var_uint(message, 2)
    except ValueError:
        raise DraftError("bad_request", "data: truncated sync message") from None
    if start + length != len(message):
        raise DraftError("bad_request", "data: sync message length does not match")
    payload = message[start:]
    check_payload(kind, payload)
    return SyncMessage(kind, payload)


def check_payload(kind: SyncKind, payload: bytes) -> None:
    """Decode the state vector or update without applying it anywhere."""
    try:
        if kind is SyncKind.STEP1:
            pycrdt.get_update(EMPTY_UPDATE, payload)  # decodes the state vector
        elif payload != EMPTY_UPDATE:
            pycrdt.get_state(payload)  # decodes the whole update
    except ValueError:
        what = "state vector" if kind is SyncKind.STEP1 else "update"
        raise DraftError("bad_request", f"data: not a Yjs {what}") from None


def sync_message(kind: SyncKind, payload: bytes) -> bytes:
    return bytes([MESSAGE_SYNC, kind]) + write_var_uint(len(payload)) + payload


def stale_epoch(client_epoch: int | None, epoch: int) -> bool:
    """The client's copy belongs to a draft that was sent (cleared) since: it must start over.

    A client that names no epoch opens whatever the draft is now.
    """
    return client_epoch is not None and client_epoch != epoch


def fits(stored_bytes: int, incoming: int, limits: DraftLimits) -> bool:
    return stored_bytes + incoming <= limits.max_doc_bytes


def should_compact(pending: int, pending_bytes: int, limits: DraftLimits) -> bool:
    """Merge the update log into the snapshot once it is long enough to slow a load down."""
    return pending > 0 and (
        pending >= limits.compact_every or pending_bytes >= limits.compact_bytes
    )


def compacted(snapshot: bytes, updates: list[bytes]) -> bytes:
    """The snapshot and the log as one update, encoded from a document (deleted content GC'd)."""
    doc: pycrdt.Doc = pycrdt.Doc()
    for u in (snapshot, *updates):
        if u and u != EMPTY_UPDATE:
            doc.apply_update(u)
    return doc.get_update()
