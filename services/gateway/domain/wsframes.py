"""RFC 6455 framing, only as much as the gateway's own WebSocket code needs (pure: no I/O).

The agents' sockets are parsed by websockets' sans-I/O protocol (``services.gateway.wsedge``);
this module reads the first-frame ``auth`` before that, and the trunk's frames from the notifier
(``services.gateway.trunk``): ``parse_frame`` reads one whole frame at a position of a buffer
that grows as bytes arrive; the builders make the frames the gateway writes (masked on a trunk,
where it is the client).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CONTROL = frozenset({OP_CLOSE, OP_PING, OP_PONG})
MAX_REASON = 123  # a close frame's payload is at most 125 bytes, 2 of them the code


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key`` (RFC 6455 §4.2.2)."""
    digest = hashlib.sha1(key.encode() + GUID).digest()  # noqa: S324 (the RFC's choice)
    return base64.b64encode(digest).decode()


def mask(data: bytes, key: bytes) -> bytes:
    """XOR with the 4-byte masking key; the same call masks and unmasks."""
    n = len(data)
    if not n:
        return b""
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


def _head(opcode: int, n: int, masked: bool) -> bytes:
    bit = 0x80 if masked else 0
    if n < 126:
        return bytes((0x80 | opcode, bit | n))
    if n < 65536:
        return bytes((0x80 | opcode, bit | 126)) + n.to_bytes(2, "big")
    return bytes((0x80 | opcode, bit | 127)) + n.to_bytes(8, "big")


def server_frame(opcode: int, payload: bytes = b"") -> bytes:
    """A whole frame as a server sends it (unmasked)."""
    return _head(opcode, len(payload), False) + payload


def client_frame(opcode: int, payload: bytes, key: bytes) -> bytes:
    """A whole frame as a client sends it: masked with ``key`` (4 random bytes)."""
    if len(key) != 4:
        raise ValueError("a masking key is 4 bytes")
    return _head(opcode, len(payload), True) + key + mask(payload, key)


def close_payload(code: int, reason: str = "") -> bytes:
    """Code and reason, the reason cut to 123 bytes of UTF-8 (never mid-character)."""
    data = reason.encode()[:MAX_REASON].decode(errors="ignore").encode()
    return code.to_bytes(2, "big") + data


def parse_close(payload: bytes) -> tuple[int | None, str]:
    """A close frame's code (None without one: 1005 on the wire) and reason."""
    if len(payload) < 2:
        return None, ""
    return int.from_bytes(payload[:2], "big"), payload[2:].decode(errors="replace")


@dataclass(frozen=True, slots=True)
class Header:
    """One frame's header; ``start`` is where the frame begins in the buffer."""

    start: int
    fin: bool
    rsv: int
    opcode: int
    masked: bool
    length: int


def _parse_header(buf: bytes | bytearray, pos: int) -> tuple[Header, int] | None:
    """The header at ``pos`` and its size, or None while it is incomplete."""
    avail = len(buf) - pos
    if avail < 2:
        return None
    b0, b1 = buf[pos], buf[pos + 1]
    n, size = b1 & 0x7F, 2
    if n == 126:
        if avail < 4:
            return None
        n, size = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
    elif n == 127:
        if avail < 10:
            return None
        n, size = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
    masked = bool(b1 & 0x80)
    if masked:
        size += 4
        if avail < size:
            return None
    header = Header(pos, bool(b0 & 0x80), (b0 >> 4) & 0x7, b0 & 0x0F, masked, n)
    return header, size


@dataclass(frozen=True, slots=True)
class Frame:
    fin: bool
    opcode: int
    payload: bytes  # unmasked
    masked: bool
    rsv: int
    size: int  # bytes the whole frame took on the wire


def parse_frame(buf: bytes | bytearray, max_payload: int, pos: int = 0) -> Frame | None:
    """The whole frame at ``pos`` in ``buf``, or None while it is incomplete; its ``size``
    counts from ``pos``.

    Raises ``ValueError`` for a frame longer than ``max_payload`` (before it has all arrived).
    """
    found = _parse_header(buf, pos)
    if found is None:
        return None
    header, size = found
    if header.length > max_payload:
        raise ValueError("frame too big")
    start = pos + size
    end = start + header.length
    if len(buf) < end:
        return None
    payload = bytes(buf[start:end])
    if header.masked:
        payload = mask(payload, bytes(buf[start - 4 : start]))
    return Frame(header.fin, header.opcode, payload, header.masked, header.rsv, end - pos)
