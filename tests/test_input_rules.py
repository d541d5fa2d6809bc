"""The input rules of the threader and ingest routes, without a stack."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from pydantic import ValidationError

from libs.common import web
from services.ingest.service import content_disposition, header_token
from services.threader.http import ReplyIn, _cursor_decode, _like_literal


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("invoice.pdf", 'attachment; filename="invoice.pdf"'),
        ("", 'attachment; filename="attachment"'),
        (
            "отчёт.pdf",
            f"attachment; filename=\"attachment.pdf\"; filename*=UTF-8''{quote('отчёт.pdf', safe='')}",
        ),
        ('a"b\\c/d.txt', 'attachment; filename="abcd.txt"'),
        (
            "evil\r\nSet-Cookie: x=1",
            'attachment; filename="evilSet-Cookie x1"',
        ),
        ("\udcff.bin", 'attachment; filename="attachment.bin"'),
        ("...", 'attachment; filename="attachment"'),
        (".htaccess", 'attachment; filename="attachment.htaccess"'),
        ("README", 'attachment; filename="README"'),
    ],
)
def test_content_disposition_is_latin1_safe(filename: str, expected: str) -> None:
    value = content_disposition(filename)
    assert value == expected
    value.encode("latin-1")  # what Starlette does with it
    assert "\r" not in value and "\n" not in value


@pytest.mark.parametrize(
    ("stored", "sent"),
    [
        ("application/pdf", "application/pdf"),
        ("Text/CSV; charset=utf-8", "text/csv"),
        ("тип/подтип", "application/octet-stream"),
        ("text/html\r\nx: y", "application/octet-stream"),
        ("", "application/octet-stream"),
    ],
)
def test_original_content_type_header(stored: str, sent: str) -> None:
    assert header_token(stored) == sent


@pytest.mark.parametrize(
    "body",
    [
        {"html": "a\x00b"},
        {"html": "a\ud800b"},
        {"html": ""},
        {"html": "x", "client_id": "a\nb"},
        {"html": "x", "to": [{"address": "a@b.test\r\nBcc: c@d.test"}]},
        {"html": "x", "to": [{"name": "x\ny", "address": "a@b.test"}]},
        {"html": "x", "cc": [{"address": "a b@c.test"}]},
        {"html": "x", "attachments": ["../x"]},
        {"html": "x", "to": [{"address": "a@b.test"}] * 51},
    ],
)
def test_reply_refuses_unstorable_or_header_breaking_input(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ReplyIn.model_validate(body)


def test_reply_accepts_ordinary_input() -> None:
    r = ReplyIn.model_validate(
        {
            "html": "<p>Grüße 👋</p>",
            "to": [{"name": "Zoë Customer", "address": "zoe@customer.test"}],
            "attachments": ["6f1c2c1e-8a51-4b9e-9d4e-0c8a1a9c9b10"],
            "client_id": "c-1",
        }
    )
    assert r.to is not None and r.to[0].address == "zoe@customer.test"


def test_backslashes_are_doubled_for_ilike() -> None:
    assert _like_literal("a\\b") == "a\\\\b"
    assert _like_literal("plain") == "plain"


@pytest.mark.parametrize(
    "cursor", ["", "e30=", "WzEsMl0=", "WyIyMDI0LTAxLTAxVDAwOjAwOjAwIiwgIngiXQ=="]
)
def test_bad_cursors_are_400(cursor: str) -> None:
    with pytest.raises(web.ApiError) as exc:
        _cursor_decode(cursor)
    assert exc.value.status_code == 400
