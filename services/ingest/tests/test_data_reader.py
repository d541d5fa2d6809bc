"""``data_reader.read_data`` against aiosmtpd 1.4.6's own DATA loop, on generated streams.

``aiosmtpd_loop`` below is that loop as aiosmtpd has it (``SMTP.smtp_DATA``), cut out of the
method: both read the same bytes from a real ``asyncio.StreamReader`` with a small buffer limit,
and must agree on the outcome, the content and what is left unread (pipelined commands).
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.ingest.data_reader import DataState, read_data

LIMIT = 64  # the StreamReader's buffer limit, and so the line limit (aiosmtpd uses the same)


async def aiosmtpd_loop(
    reader: asyncio.StreamReader, size_limit: int | None, line_limit: int
) -> tuple[DataState, bytes]:
    data: list[bytearray] = []
    num_bytes = 0
    line_fragments: list[bytes] = []
    state = DataState.NOMINAL
    while True:
        try:
            line: bytes = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as e:
            if state == DataState.NOMINAL:
                state = DataState.TOO_LONG
            data *= 0
            line = await reader.read(e.consumed)
        if not line_fragments and line == b".\r\n":
            break
        num_bytes += len(line)
        if state == DataState.NOMINAL and size_limit and num_bytes > size_limit:
            state = DataState.TOO_MUCH
            data *= 0
        line_fragments.append(line)
        if line.endswith(b"\r\n"):
            if state == DataState.NOMINAL:
                joined = bytearray().join(line_fragments)
                if len(joined) > line_limit:
                    state = DataState.TOO_LONG
                    data *= 0
                else:
                    data.append(bytearray().join(line_fragments))
            line_fragments *= 0
    if state != DataState.NOMINAL:
        return state, b""
    for text in data:
        if text.startswith(b"."):
            del text[0]
    return state, b"".join(data)


async def run(fn: object, stream: bytes, size_limit: int | None) -> tuple[DataState, bytes, bytes]:
    reader = asyncio.StreamReader(limit=LIMIT)
    reader.feed_data(stream)
    reader.feed_eof()
    state, content = await fn(reader, size_limit, LIMIT)  # type: ignore[operator]
    return state, content, await reader.read()


PIECES = [
    b"a",
    b"hello world",
    b".",
    b"..",
    b"\r\n",
    b"\n",
    b"\r",
    b"\r\n.",
    b".\r\n",
    b"\x00",
    b" ",
]


@st.composite
def data_stream(draw: st.DrawFn) -> bytes:
    body = b"".join(draw(st.lists(st.sampled_from(PIECES), max_size=40)))
    if draw(st.booleans()):
        body += b"x" * draw(st.integers(LIMIT - 4, LIMIT + 40))  # around the line limit
        body += b"".join(draw(st.lists(st.sampled_from(PIECES), max_size=10)))
    # Always an end; then what a pipelining client sends next.
    return body + b"\r\n.\r\nMAIL FROM:<x@y.test>\r\n"


@settings(max_examples=1500, deadline=None)
@given(data_stream(), st.sampled_from([None, 0, 20, 60, 200]))
def test_read_data_agrees_with_aiosmtpds_loop(stream: bytes, size_limit: int | None) -> None:
    async def both() -> None:
        ours = await run(read_data, stream, size_limit)
        theirs = await run(aiosmtpd_loop, stream, size_limit)
        if theirs[0] is DataState.NOMINAL or ours[0] is DataState.NOMINAL:
            assert ours == theirs
        else:  # both refuse; which reply may differ only where both limits are passed at once
            assert ours[1:] == theirs[1:]

    asyncio.run(both())


@pytest.mark.parametrize(
    ("stream", "content", "rest"),
    [
        (b".\r\nQUIT\r\n", b"", b"QUIT\r\n"),  # an empty message
        (b"a\r\n.\r\n", b"a\r\n", b""),
        (b"..\r\n.\r\n", b".\r\n", b""),  # dot-stuffed line
        (b"a\n.\nb\r\n.\r\n", b"a\n.\nb\r\n", b""),  # smuggling: bare LF dot LF is content
        (b"a\n.\r\nb\r\n.\r\n", b"a\n.\r\nb\r\n", b""),
        (b"a\r.\rb\r\n.\r\n", b"a\r.\rb\r\n", b""),
        (b"end.\r\nmore\r\n.\r\nNOOP\r\n", b"end.\r\nmore\r\n", b"NOOP\r\n"),
    ],
)
def test_ends_only_at_crlf_dot_crlf(stream: bytes, content: bytes, rest: bytes) -> None:
    state, got, left = asyncio.run(run(read_data, stream, None))
    assert (state, got, left) == (DataState.NOMINAL, content, rest)


async def run_trickled(stream: bytes, cuts: list[int], size_limit: int | None) -> tuple:
    """The same stream arriving in pieces, as from a socket (boundaries anywhere)."""
    reader = asyncio.StreamReader(limit=LIMIT)

    async def feed() -> None:
        at = 0
        for cut in sorted(c % (len(stream) + 1) for c in cuts):
            reader.feed_data(stream[at:cut])
            at = max(at, cut)
            await asyncio.sleep(0)
        reader.feed_data(stream[at:])
        reader.feed_eof()

    feeder = asyncio.create_task(feed())
    state, content = await read_data(reader, size_limit, LIMIT)
    await feeder
    return state, content, await reader.read()


@settings(max_examples=800, deadline=None)
@given(data_stream(), st.lists(st.integers(0, 10_000), max_size=30), st.sampled_from([None, 60]))
def test_piece_boundaries_do_not_matter(stream: bytes, cuts: list[int], limit: int | None) -> None:
    async def both() -> None:
        whole = await run(read_data, stream, limit)
        trickled = await run_trickled(stream, cuts, limit)
        assert (trickled[0] is DataState.NOMINAL) == (whole[0] is DataState.NOMINAL)
        assert trickled[1:] == whole[1:]

    asyncio.run(both())
