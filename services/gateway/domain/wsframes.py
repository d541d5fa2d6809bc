"""RFC 6455 framing, only as much as the ``/ws`` splice needs (pure: no I/O).

After the upgrade the gateway copies bytes between the client and the notifier without decoding
frames. It still has to know where frames begin and end: a close frame of its own (account
disabled, restart, frame too big) may only go between two frames, and the client's frames are
held to the size cap. ``FrameCursor`` follows the boundaries of a byte stream chunk by chunk
from the headers alone; ``parse_frame`` reads one whole frame (the first-frame ``auth``, the
client's answer to a close) when the payload itself matters.
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
    """One frame's header; ``start`` is where the frame began in the chunk fed (negative when
    its header began in an earlier chunk)."""

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


class FrameCursor:
    """Follows frame boundaries of one direction of a connection across chunks.

    ``feed`` returns the header of every frame that starts (completes its header) in the chunk;
    ``at_boundary`` says whether the bytes fed so far end exactly between two frames.
    """

    __slots__ = ("_left", "_partial")

    def __init__(self) -> None:
        self._left = 0  # payload bytes of the current frame not seen yet
        self._partial = b""  # an incomplete header carried over from the previous chunk

    @property
    def at_boundary(self) -> bool:
        return self._left == 0 and not self._partial

    def feed(self, data: bytes) -> list[Header]:
        out: list[Header] = []
        n = len(data)
        pos = 0
        if self._left:
            if self._left >= n:
                self._left -= n
                return out
            pos = self._left
            self._left = 0
        if self._partial:
            carried = len(self._partial)
            buf = self._partial + data[pos : pos + 14]
            found = _parse_header(buf, 0)
            if found is None:
                self._partial = buf  # still short, so all of ``data`` is in it
                return out
            header, size = found
            self._partial = b""
            out.append(
                Header(
                    pos - carried,
                    header.fin,
                    header.rsv,
                    header.opcode,
                    header.masked,
                    header.length,
                )
            )
            pos += size - carried
            end = pos + header.length
            if end > n:
                self._left = end - n
                return out
            pos = end
        while pos < n:
            found = _parse_header(data, pos)
            if found is None:
                self._partial = bytes(data[pos:])
                return out
            header, size = found
            out.append(header)
            end = pos + size + header.length
            if end > n:
                self._left = end - n
                return out
            pos = end
        return out


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
