"""The DATA body: the same bytes as aiosmtplib's own line-end normalization and dot-stuffing."""

from __future__ import annotations

import random

from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from services.sender.relay import wire_body


def _reference(message: bytes) -> bytes:
    body = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message))
    return body if body.endswith(b"\r\n") else body + b"\r\n"


def test_wire_body_is_aiosmtplibs_for_any_input() -> None:
    rng = random.Random(2920)
    pieces = [b"a", b" ", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b"\n.\r", b"From x"]
    cases = [b"", b".", b"\r\n", b"a\r\n.\r\n", b"x\r\n\r\n.hidden\r\n", b"a\r\r\nb", b"a\nb"]
    cases += [b"".join(rng.choices(pieces, k=rng.randint(1, 30))) for _ in range(5000)]
    for message in cases:
        assert wire_body(message) == _reference(message), message
    composed = b"From: a@b.test\r\nSubject: x\r\n\r\n" + b"line of text\r\n" * 50
    assert wire_body(composed) is composed  # nothing to change: not copied
