"""Tests for services.ingest.domain.mime_reader.

Three layers: small inline messages pinning each rule, the public corpora in shared/corpora
(every message must read; stated expectations are checked where Python and the corpus agree),
and a hypothesis fuzz run on mutated seed messages. The corpora are located relative to the
repository so the tests run wherever the checkout lives.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections import Counter
from datetime import datetime
from email import utils as email_utils
from functools import lru_cache
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libs.common import testing
from services.ingest.domain import mime_reader as mr
from services.ingest.domain.mime_reader import (
    MAX_DEPTH,
    Addr,
    ReadMessage,
    Unreadable,
    decode_bytes,
    decode_header_text,
    html_to_text,
    normalize_msgid_list,
    parse_address_list,
    read_message,
    sanitize_html,
    unflow,
)

CORPORA = testing.CORPORA
needs_corpora = pytest.mark.skipif(not CORPORA.is_dir(), reason=f"corpora not found at {CORPORA}")


def msg(*lines: str, body: str = "body\r\n") -> bytes:
    """Build a small CRLF message from header lines and a body."""
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode("utf-8", "surrogateescape")


BASIC = msg(
    "From: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <Joerg@Example.COM>",
    "To: Support <support@example.org>, other@example.org",
    'Cc: "Doe, Jane" <jane@example.net>',
    "Reply-To: replies@example.com",
    "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= from =?iso-8859-1?q?K=F6ln?=",
    "Date: Tue, 7 Apr 2026 10:00:00 +0200",
    "Message-ID: <abc@x.example>",
    "Thread-Index: AdQ1234==",
    "Thread-Topic: =?utf-8?q?Gr=C3=BC=C3=9Fe?=",
    "List-Id: Support <support.example.org>",
    "X-Mailer: Mailer 1.0",
)


# ---------------------------------------------------------------------------------------------
# Headers, ids, addresses, dates
# ---------------------------------------------------------------------------------------------


def test_basic_headers() -> None:
    m = read_message(BASIC)
    assert m.message_id == "<abc@x.example>"
    assert m.from_ == Addr(name="Jörg Müller", address="Joerg@example.com")
    assert m.to == [Addr("Support", "support@example.org"), Addr("", "other@example.org")]
    assert m.cc == [Addr("Doe, Jane", "jane@example.net")]
    assert m.reply_to == [Addr("", "replies@example.com")]
    assert m.subject == "Grüße from Köln"
    assert m.date is not None and m.date.utcoffset() is not None
    assert m.date.isoformat() == "2026-04-07T10:00:00+02:00"
    assert m.text == "body\n"
    assert m.html == "" and m.parts == []
    assert m.headers == {
        "Thread-Index": "AdQ1234==",
        "Thread-Topic": "Grüße",
        "List-Id": "Support <support.example.org>",
        "X-Mailer": "Mailer 1.0",
    }
    assert not m.flags.generated_message_id and not m.auto_submitted and not m.bounce


def test_missing_message_id_is_generated_deterministically() -> None:
    raw = msg("From: a@example.com", "Subject: no id")
    first, second = read_message(raw), read_message(raw)
    expected = f"<{hashlib.sha256(raw).hexdigest()}@chatflow.generated>"
    assert first.message_id == second.message_id == expected
    assert first.flags.generated_message_id
    other = read_message(msg("From: a@example.com", "Subject: no id 2"))
    assert other.message_id != first.message_id


def test_message_id_without_angle_brackets_is_accepted() -> None:
    m = read_message(msg("From: a@example.com", "Message-Id: 2018.58E7@mail.example.cz"))
    assert m.message_id == "<2018.58E7@mail.example.cz>"
    assert not m.flags.generated_message_id


def test_garbage_message_id_is_replaced() -> None:
    m = read_message(msg("From: a@example.com", "Message-ID: (just a comment) mumble"))
    assert m.flags.generated_message_id and m.message_id.endswith("@chatflow.generated>")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<a@x>", ["<a@x>"]),
        ("<a@x> <b@y>\r\n <c@z>", ["<a@x>", "<b@y>", "<c@z>"]),
        ("<a@x> <b@y> <a@x>", ["<a@x>", "<b@y>"]),  # duplicates removed, order kept
        ("<a@x>,<b@y>", ["<a@x>", "<b@y>"]),
        ("a@x b@y", ["<a@x>", "<b@y>"]),  # missing angle brackets
        ("<foo@five.com> (garbage)", ["<foo@five.com>"]),
        ("<baz@four.com> (RFC822 4lyfe)", ["<baz@four.com>"]),
        ("Your message of December 31 1999 <bar@baz.com>", ["<bar@baz.com>"]),
        ('"Quoted <not@id>" <real@id>', ["<real@id>"]),
        ("mumble", []),
        ("", []),
        ("<>", []),
        ("<unterminated@x", []),
        ("<1234>", ["<1234>"]),  # ids without @ exist (some list software)
        ("<a b@x>", []),  # whitespace inside brackets: prose, not an id
    ],
)
def test_normalize_msgid_list(value: str, expected: list[str]) -> None:
    assert normalize_msgid_list(value) == expected


def test_normalize_msgid_list_caps_long_lists_keeping_root_and_recent() -> None:
    ids = [f"<m{i}@x>" for i in range(1000)]
    out = normalize_msgid_list(" ".join(ids))
    assert out[0] == "<m0@x>" and out[-1] == "<m999@x>" and len(out) <= 256


def test_in_reply_to_junk_dropped_and_flagged() -> None:
    m = read_message(
        msg(
            "From: a@example.com",
            "Message-ID: <r@x>",
            'In-Reply-To: Your message of "Mon, 1 Jan 2001" <parent@x> (comment <c@d>)',
            "References: <root@x> <parent@x>\r\n <parent@x> trailing garbage",
        )
    )
    assert m.in_reply_to == ["<parent@x>"]
    assert m.flags.in_reply_to_junk
    assert m.references == ["<root@x>", "<parent@x>"]
    clean = read_message(msg("From: a@example.com", "In-Reply-To: <p@x>"))
    assert clean.in_reply_to == ["<p@x>"] and not clean.flags.in_reply_to_junk


def test_subject_never_contains_line_breaks() -> None:
    # CVE-2024-6923: an encoded word can smuggle CR LF (and other line breaks) into a header.
    m = read_message(
        msg(
            "From: a@example.com",
            "Subject: =?utf-8?q?Hi=0D=0ABcc:_victim@example.com?= =?utf-8?b?"
            + base64.b64encode("x\u2028y\x85z\x0bw".encode()).decode()
            + "?=",
        )
    )
    assert not any(ch in m.subject for ch in "\r\n\x0b\x0c\x85\u2028\u2029")
    assert "Bcc: victim@example.com" in m.subject
    assert len(m.subject.splitlines()) == 1


def test_names_and_header_dict_are_single_line() -> None:
    m = read_message(
        msg(
            "From: =?utf-8?q?Evil=0D=0AName?= <e@example.com>",
            "X-Mailer: =?utf-8?q?a=0Ab?=",
        )
    )
    assert m.from_ is not None and "\n" not in m.from_.name and "\r" not in m.from_.name
    assert "\n" not in m.headers["X-Mailer"]


def test_encoded_words_split_across_folded_lines() -> None:
    # cpython #128110: adjacent encoded-words must join without a stray space, even when the
    # split falls inside a multi-byte character.
    data = "Grüße aus Köln – 東京".encode()
    parts = [data[:3], data[3:11], data[11:]]  # splits "ü" and "ö"
    words = "\r\n ".join(f"=?utf-8?b?{base64.b64encode(p).decode()}?=" for p in parts)
    m = read_message(msg("From: a@example.com", f"Subject: {words}"))
    assert m.subject == "Grüße aus Köln – 東京"
    assert decode_header_text("=?utf-8?q?Hello?=\r\n =?utf-8?q?_World?=") == "Hello World"
    # Whitespace between an encoded word and plain text is kept.
    assert decode_header_text("=?utf-8?q?Hello?= World") == "Hello World"


def test_malformed_encoded_words_do_not_crash() -> None:
    assert decode_header_text("=?us-ascii?Q?ABC / 123 / West ?=") == "ABC / 123 / West "
    assert decode_header_text("=?utf-8?b?!!!?=") in ("", "=?utf-8?b?!!!?=")
    assert decode_header_text("=?utf-8?x?abc?=") == "=?utf-8?x?abc?="
    assert decode_header_text("=?unknown-cs?q?caf=E9?=") == "café"


def test_address_domain_lowercased_and_idn_decoded() -> None:
    m = read_message(msg("From: Bob <Bob.Smith@XN--BCHER-KVA.Example>"))
    assert m.from_ == Addr("Bob", "Bob.Smith@bücher.example")


def test_address_comment_form_gives_name() -> None:
    m = read_message(msg("From: MAILER-DAEMON@mx.example.com (Mail Delivery System)"))
    assert m.from_ == Addr("Mail Delivery System", "MAILER-DAEMON@mx.example.com")


def test_encoded_word_in_local_part_is_not_decoded() -> None:
    # "Splitting the email atom": decoding would turn this into admin@good.example>.
    m = read_message(msg("From: =?utf-8?q?admin=40good.example=3E?=@evil.example"))
    assert m.from_ is not None
    assert m.from_.address == "=?utf-8?q?admin=40good.example=3E?=@evil.example"
    assert m.from_.address.endswith("@evil.example")
    assert "encoded-word-in-local-part" in m.defects


def test_comma_inside_encoded_display_name() -> None:
    m = read_message(msg("From: =?iso-8859-1?Q?B=FCrling,=20Andreas?= <smith@example.com>"))
    assert m.from_ == Addr("Bürling, Andreas", "smith@example.com")


def test_address_header_bombs_do_not_crash() -> None:
    # mimekit stack-overflow.txt style: thousands of ':' send the legacy parser into recursion.
    bomb = "To: " + ",\r\n\t".join(["=?utf-8?Q?date=3E10:08:28=3C/pr?="] * 3000)
    m = read_message(msg("From: a@example.com", bomb, "Cc: " + "a:" * 5000))
    assert isinstance(m, ReadMessage)
    trailing_dot = read_message(msg('From: "Clement.Si" <Claudia.Shu@yahoo.com.>'))
    assert trailing_dot.from_ == Addr("Clement.Si", "Claudia.Shu@yahoo.com.")


def test_first_usable_from_header_wins() -> None:
    m = read_message(msg("From: [??????]", 'From: "Real" <real@example.com>'))
    assert m.from_ == Addr("Real", "real@example.com")
    assert "multiple-from-headers" in m.defects
    assert read_message(msg("Subject: no from")).from_ is None


def test_recipients_without_domain_are_dropped() -> None:
    m = read_message(msg("From: a@example.com", "To: xxx", "Cc: undisclosed-recipients:;"))
    assert m.to == [] and m.cc == []


@pytest.mark.parametrize(
    ("value", "iso"),
    [
        ("Tue, 7 Apr 2026 10:00:00 +0200", "2026-04-07T10:00:00+02:00"),
        ("7 Apr 2026 10:00:00 GMT", "2026-04-07T10:00:00+00:00"),
        ("Thu, 2 Aug 2018 16:58:28 +0200 (CEST)", "2018-08-02T16:58:28+02:00"),
        ("Tue, 7 Apr 2026 10:00:00 -0000", "2026-04-07T10:00:00+00:00"),
        ("Tue, 7 Apr 2026 10:00:00", "2026-04-07T10:00:00+00:00"),  # no zone: assume UTC
    ],
)
def test_dates_are_aware(value: str, iso: str) -> None:
    m = read_message(msg("From: a@example.com", f"Date: {value}"))
    assert m.date is not None and m.date.tzinfo is not None
    assert m.date.isoformat() == iso


@pytest.mark.parametrize("value", ["garbage", "Tue, 99 Foo 2026 99:99:99 +9999", "", "0"])
def test_bad_dates_are_none(value: str) -> None:
    assert read_message(msg("From: a@example.com", f"Date: {value}")).date is None
    assert read_message(msg("From: a@example.com")).date is None


# ---------------------------------------------------------------------------------------------
# Charsets
# ---------------------------------------------------------------------------------------------


def text_msg(
    body: bytes, ctype: str = "text/plain", cte: str = "8bit", extra: tuple[str, ...] = ()
) -> bytes:
    head = [
        "From: a@example.com",
        "Subject: t",
        "MIME-Version: 1.0",
        f"Content-Type: {ctype}",
        f"Content-Transfer-Encoding: {cte}",
        *extra,
    ]
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


def test_undeclared_iso_2022_jp_is_detected() -> None:
    body = "お問い合わせありがとうございます。".encode("iso2022_jp")
    assert b"\x1b$B" in body
    m = read_message(text_msg(body, "text/plain;", "7bit"))
    assert m.text == "お問い合わせありがとうございます。"


def test_iso_2022_jp_under_a_wrong_label_is_detected() -> None:
    body = "日本語のメール".encode("iso2022_jp")
    m = read_message(text_msg(body, "text/plain; charset=iso-8859-1", "7bit"))
    assert m.text == "日本語のメール"


def test_declared_charset_is_used() -> None:
    m = read_message(
        text_msg("Příliš žluťoučký kůň".encode("cp1250"), "text/plain; charset=windows-1250")
    )
    assert m.text == "Příliš žluťoučký kůň"


def test_wrong_charset_utf8_bytes_labelled_latin1() -> None:
    m = read_message(text_msg("Grüße – “quoted”".encode(), "text/plain; charset=iso-8859-1"))
    assert m.text == "Grüße – “quoted”"
    assert any(d.startswith("charset-mismatch") for d in m.defects)


def test_wrong_charset_cp1252_bytes_labelled_utf8() -> None:
    m = read_message(text_msg("Grüße “quoted” €5".encode("cp1252"), 'text/plain; charset="utf-8"'))
    assert m.text == "Grüße “quoted” €5"


@pytest.mark.parametrize(
    ("label", "text", "codec"),
    [
        ("iso-8859-8-i", "שלום עולם", "iso-8859-8"),
        ("ks_c_5601-1987", "안녕하세요 Запрос", "cp949"),
        ("gb2312", "內應力產生", "gbk"),  # GBK-only characters under a gb2312 label
        ("big5", "繁體中文", "big5"),
        ("shift_jis", "日本語", "shift_jis"),
        ("x-mac-cyrillic", "Привет", "mac_cyrillic"),
    ],
)
def test_charset_aliases(label: str, text: str, codec: str) -> None:
    m = read_message(text_msg(text.encode(codec), f"text/plain; charset={label}"))
    assert m.text == text
    assert (
        decode_header_text(f"=?{label}?b?{base64.b64encode(text.encode(codec)).decode()}?=") == text
    )


@pytest.mark.parametrize(
    "label", ["x-no-such-charset", "base64", "unicode_escape", "rot13", "7bit", "idna"]
)
def test_unknown_or_unsafe_charset_falls_back(label: str) -> None:
    m = read_message(text_msg("café \\u0041".encode("latin-1"), f"text/plain; charset={label}"))
    assert m.text == "café \\u0041"


def test_decode_bytes_never_fails() -> None:
    assert decode_bytes(b"\x81\x8d\x8f\x90\x9d\xff", "utf-8") == "\x81\x8d\x8f\x90\x9dÿ"
    assert decode_bytes(b"", "nonsense") == ""
    assert decode_bytes("ok".encode("utf-16"), "utf-16") == "ok"


def test_raw_8bit_headers_are_decoded() -> None:
    raw = b"From: =?utf-8?q?x?= <a@example.com>\r\nSubject: Gr\xc3\xbc\xc3\x9fe\r\n\r\nx"
    assert read_message(raw).subject == "Grüße"
    gbk = "转发：整体提升".encode("gbk")
    raw = (
        b"From: a@example.com\r\nSubject: " + gbk + b"\r\n"
        b"Content-Type: text/plain; charset=gb2312\r\n\r\nx"
    )
    assert read_message(raw).subject == "转发：整体提升"


def test_raw_utf8_header_with_a_stray_byte_stays_utf8() -> None:
    """One broken byte in a raw UTF-8 subject costs that byte, not the whole line (it was read
    as Latin-1: 日本 became mojibake; found by a trial). Latin-1 text stays Latin-1."""
    raw = b"From: a@example.com\r\nSubject: raw \xe6\x97\xa5\xe6\x9c\xac \xff\xfe broken\r\n\r\nx"
    m = read_message(raw)
    assert m.subject == "raw 日本 \ufffd\ufffd broken"
    assert "raw-8bit-header-invalid-utf8" in m.defects
    latin = b"From: a@example.com\r\nSubject: M\xfcller caf\xe9 \xe0 la carte\r\n\r\nx"
    assert read_message(latin).subject == "Müller café à la carte"


def test_a_huge_text_is_cut_for_display_and_kept_whole_as_an_attachment() -> None:
    """A 25 MB log pasted into a mail made every opening of its conversation a 25 MB answer
    (found by a trial): the text is cut at MAX_TEXT_CHARS, the whole text is message.txt."""
    body = ("line of a very long log " * 4 + "\n") * 20_000  # about 2 MB
    raw = b"From: a@example.com\r\nSubject: log\r\n\r\n" + body.replace("\n", "\r\n").encode()
    m = read_message(raw)
    assert m.flags.text_truncated and "text-truncated" in m.defects
    assert len(m.text) < mr.MAX_TEXT_CHARS + 200
    assert m.text.endswith("attached whole as message.txt.]")
    (part,) = [p for p in m.parts if p.filename == "message.txt"]
    assert part.data.decode().strip() == body.strip()
    small = read_message(b"From: a@example.com\r\nSubject: s\r\n\r\nshort\r\n")
    assert not small.flags.text_truncated and small.parts == []


def test_html_meta_charset_used_when_part_has_none() -> None:
    html = '<html><head><meta charset="windows-1251"></head><body>Привет</body></html>'
    m = read_message(text_msg(html.encode("cp1251"), "text/html"))
    assert m.text == "Привет"


# ---------------------------------------------------------------------------------------------
# Bodies
# ---------------------------------------------------------------------------------------------


def test_format_flowed_is_joined() -> None:
    body = b"This is a long \r\nparagraph.\r\n> quoted \r\n> text\r\n\r\n-- \r\nsig\r\n"
    m = read_message(text_msg(body, "text/plain; charset=utf-8; format=flowed"))
    assert m.text == "This is a long paragraph.\n> quoted text\n\n-- \nsig\n"
    assert unflow("a \nb", delsp=True) == "ab"
    assert unflow(" >not quote") == ">not quote"  # space-stuffed line


def test_single_part_html_gives_text_and_sanitized_html() -> None:
    html = (
        b"<html><head><title>T</title><style>p{color:red}</style></head><body>"
        b"<p>Hello <b>there</b></p><div>line 1<br>line 2</div>"
        b"<script>alert(1)</script><img src='http://track.example/p.gif'>"
        b"<img src='cid:logo@x'></body></html>"
    )
    m = read_message(text_msg(html, "text/html; charset=utf-8"))
    assert m.text == "Hello there\n\nline 1\nline 2"
    assert "<script" not in m.html and "alert" not in m.html
    assert "<b>there</b>" in m.html
    assert 'data-remote-src="http://track.example/p.gif"' in m.html
    assert re.search(r"<img[^>]*\ssrc=\"http", m.html) is None
    assert 'src="cid:logo@x"' in m.html


@pytest.mark.parametrize(
    "pattern", ["<div>", "<div/>", '<div "<">', "<ul><li>", "<b>x</p>", "<b></div>", "<!--", "<a"]
)
def test_hostile_html_is_linear(pattern: str) -> None:
    # html5ever is quadratic in nesting depth and html.parser on unclosed "<!--"/"<a" runs;
    # 50,000 repetitions used to take 10-25 s each.
    html = pattern * 50_000 + "<p>end</p>"
    started = time.perf_counter()
    out = sanitize_html(html)
    text = html_to_text(html)
    assert time.perf_counter() - started < 3.0
    assert "<script" not in out
    assert text.endswith("end") or pattern in ("<!--", "<a")


def test_deeply_nested_html_keeps_its_text() -> None:
    html = "<div>" * 1000 + "deep text" + "</div>" * 1000
    assert html_to_text(html) == "deep text"
    assert "deep text" in sanitize_html(html)


def test_html_to_text_keeps_structure() -> None:
    text = html_to_text(
        "<ul><li>a</li><li>b</li></ul><table><tr><td>c</td><td>d</td></tr>"
        "</table><pre>  x\n   y</pre>&amp;&nbsp;z"
    )
    assert text == "a\nb\n\nc d\n\n  x\n   y\n\n& z"


def test_subject_only_mail() -> None:
    m = read_message(b"Subject: only a subject\r\n")
    assert m.subject == "only a subject" and m.text == "" and m.parts == []


def test_alternative_prefers_plain_and_keeps_html() -> None:
    raw = msg(
        "From: a@example.com",
        "Content-Type: multipart/alternative; boundary=b",
        body=(
            "--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nplain text\r\n"
            "--b\r\nContent-Type: text/watch-html\r\n\r\n<b>watch</b>\r\n"
            "--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>rich <i>text</i></p>\r\n"
            "--b--\r\n"
        ),
    )
    m = read_message(raw)
    assert m.text == "plain text"
    assert "<i>text</i>" in m.html
    assert m.parts == []  # the watch-html alternative duplicates the body


def test_empty_plain_alternative_falls_back_to_html() -> None:
    raw = msg(
        "From: a@example.com",
        "Content-Type: multipart/alternative; boundary=b",
        body=(
            "--b\r\nContent-Type: text/plain\r\n\r\n\r\n"
            "--b\r\nContent-Type: text/html\r\n\r\n<div>from html</div>\r\n--b--\r\n"
        ),
    )
    assert read_message(raw).text == "from html"


def test_mixed_text_parts_are_concatenated() -> None:
    raw = msg(
        "From: a@example.com",
        "Content-Type: multipart/mixed; boundary=b",
        body=(
            "--b\r\nContent-Type: text/plain\r\n\r\nfirst\r\n"
            "--b\r\nContent-Type: application/pdf; name=x.pdf\r\n\r\n%PDF\r\n"
            "--b\r\nContent-Type: text/html\r\n\r\n<p>second</p>\r\n--b--\r\n"
        ),
    )
    m = read_message(raw)
    assert m.text == "first\nsecond"
    assert "first" in m.html and "<p>second</p>" in m.html
    assert [p.filename for p in m.parts] == ["x.pdf"]


# ---------------------------------------------------------------------------------------------
# Attachments
# ---------------------------------------------------------------------------------------------


def multipart(*parts: str, boundary: str = "XYZ", ctype: str = "multipart/mixed") -> bytes:
    body = "".join(f"--{boundary}\r\n{p}\r\n" for p in parts) + f"--{boundary}--\r\n"
    return msg(
        "From: a@example.com",
        "Subject: Parts",
        "MIME-Version: 1.0",
        f'Content-Type: {ctype}; boundary="{boundary}"',
        body=body,
    )


TEXT_PART = "Content-Type: text/plain; charset=utf-8\r\n\r\nsee attachments"


def test_rfc2231_filename() -> None:
    raw = multipart(
        TEXT_PART,
        (
            'Content-Type: text/plain; name="=?utf-8?Q?Erkl=C3=A4rung=2Etxt?="\r\n'
            "Content-Disposition: attachment; filename*=utf-8''Erkl%C3%A4rung.txt\r\n"
            "\r\nHello World"
        ),
    )
    m = read_message(raw)
    assert [(p.filename, p.data, p.inline) for p in m.parts] == [
        ("Erklärung.txt", b"Hello World", False)
    ]
    assert m.text == "see attachments"


def test_rfc2231_continuations_and_charset() -> None:
    raw = multipart(
        TEXT_PART,
        (
            "Content-Type: application/octet-stream\r\n"
            "Content-Disposition: attachment;\r\n"
            " filename*0*=iso-8859-1''R%E9sum%E9%20de;\r\n"
            " filename*1*=%20l%27ann%E9e.pdf\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(b"%PDF-1.4").decode()
        ),
    )
    part = read_message(raw).parts[0]
    assert part.filename == "Résumé de l'année.pdf" and part.data == b"%PDF-1.4"


def test_encoded_word_filename_in_unknown_to_python_charset() -> None:
    name = base64.b64encode("사진.JPG".encode("cp949")).decode()
    raw = multipart(
        TEXT_PART,
        (
            f'Content-Type: image/jpeg; name="=?ks_c_5601-1987?B?{name}?="\r\n'
            f'Content-Disposition: attachment; filename="=?ks_c_5601-1987?B?{name}?="\r\n'
            "Content-Transfer-Encoding: base64\r\n\r\n/9j/4A=="
        ),
    )
    part = read_message(raw).parts[0]
    assert part.filename == "사진.JPG" and part.data == b"\xff\xd8\xff\xe0"


def test_filename_path_and_control_chars_are_removed() -> None:
    raw = multipart(
        TEXT_PART,
        (
            "Content-Type: application/octet-stream\r\n"
            'Content-Disposition: attachment; filename="..\\\\..\\\\evil\r\n .exe"\r\n\r\nMZ'
        ),
    )
    part = read_message(raw).parts[0]
    assert "\\" not in part.filename and "/" not in part.filename
    assert "\n" not in part.filename and part.filename.endswith(".exe")


def test_nested_message_is_one_part() -> None:
    inner = (
        "From: inner@example.com\r\nSubject: =?utf-8?q?Original_=C3=A4?=\r\n"
        "Content-Type: multipart/mixed; boundary=IN\r\n\r\n"
        "--IN\r\nContent-Type: text/plain\r\n\r\ninner body\r\n"
        "--IN\r\nContent-Type: application/pdf; name=inner.pdf\r\n\r\n%PDF\r\n--IN--\r\n"
    )
    raw = multipart(TEXT_PART, "Content-Type: message/rfc822\r\n\r\n" + inner)
    m = read_message(raw)
    assert len(m.parts) == 1
    part = m.parts[0]
    assert part.content_type == "message/rfc822"
    assert part.filename == "Original ä.eml"
    assert b"inner body" in part.data and b"From: inner@example.com" in part.data
    assert m.text == "see attachments"  # the nested message's body is not ours
    again = read_message(part.data)  # and it can be read on its own
    assert again.subject == "Original ä" and [p.filename for p in again.parts] == ["inner.pdf"]


def test_nested_message_name_from_subject_is_path_safe() -> None:
    raw = multipart(
        TEXT_PART,
        "Content-Type: message/rfc822\r\n\r\n"
        "From: x@example.com\r\nSubject: Re: invoice 2024/05\r\n\r\nhi",
    )
    assert read_message(raw).parts[0].filename == "Re_ invoice 2024_05.eml"
    nameless = multipart(TEXT_PART, "Content-Type: message/rfc822\r\n\r\nFrom: x@y\r\n\r\nhi")
    assert read_message(nameless).parts[0].filename == "message.eml"


def test_inline_image_with_content_id_and_no_disposition() -> None:
    raw = multipart(
        'Content-Type: text/html\r\n\r\n<p>logo: <img src="cid:logo123@example"></p>',
        "Content-Type: image/png\r\nContent-ID: <logo123@example>\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=",
        ctype="multipart/related",
    )
    m = read_message(raw)
    assert [(p.content_type, p.inline, p.content_id) for p in m.parts] == [
        ("image/png", True, "logo123@example")
    ]
    assert m.parts[0].data.startswith(b"\x89PNG")
    assert m.parts[0].filename == "part-1.png"
    assert 'src="cid:logo123@example"' in m.html


def test_disposition_decides_inline() -> None:
    raw = multipart(
        TEXT_PART,
        "Content-Type: image/png; name=a.png\r\nContent-Disposition: inline\r\n\r\nx",
        "Content-Type: image/png; name=b.png\r\nContent-ID: <b@x>\r\n"
        "Content-Disposition: attachment\r\n\r\nx",
        "Content-Type: application/pdf; name=c.pdf\r\n\r\nx",
    )
    parts = read_message(raw).parts
    assert [(p.filename, p.inline, p.content_id) for p in parts] == [
        ("a.png", True, None),
        ("b.png", False, "b@x"),
        ("c.pdf", False, None),
    ]


def test_base64_root_is_an_attachment() -> None:
    raw = msg(
        "From: a@example.com",
        "Content-Type: image/png; name=s.png",
        "Content-Transfer-Encoding: base64",
        body="iVBORw0KGgo=\r\n",
    )
    m = read_message(raw)
    assert m.text == "" and [p.filename for p in m.parts] == ["s.png"]


def test_deep_nesting_is_capped() -> None:
    depth = 400
    head = "".join(
        f"Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n" for i in range(depth)
    )
    tail = "".join(f"\r\n--b{i}--" for i in reversed(range(depth)))
    raw = (
        "From: a@example.com\r\nSubject: deep\r\n"
        + head
        + "Content-Type: text/plain\r\n\r\nbottom"
        + tail
        + "\r\n"
    ).encode()
    m = read_message(raw)
    assert m.subject == "deep"
    assert m.flags.depth_limited or m.flags.headers_only
    assert "bottom" not in m.text  # below MAX_DEPTH: not reached
    shallow = (
        "From: a@example.com\r\n"
        + head[: head.index(f"b{MAX_DEPTH - 2}\r\n\r\n")]
        + "b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nreachable\r\n--b--\r\n"
    )
    assert "reachable" in read_message(shallow.encode()).text


def test_defects_are_reported() -> None:
    raw = msg("From: a@example.com", "Content-Type: multipart/mixed", body="no boundary\r\n")
    m = read_message(raw)
    assert "NoBoundaryInMultipartDefect" in m.defects
    assert m.text.strip() == "no boundary"
    bad64 = read_message(text_msg(b"aGVsbG8gd29ybGQ", "text/plain", "base64"))
    assert bad64.text == "hello world" and "InvalidBase64PaddingDefect" in bad64.defects


def test_header_block_with_junk_first_line_is_repaired() -> None:
    raw = (
        b"---- Original email message ----\r\nReturn-Path: x@example.cz\r\n"
        b"X-Spam: a\r\ntests=FOO, BAR\r\nTo: help@example.cz\r\nSubject: Contact\r\n"
        b"From: x@example.cz\r\nMessage-Id: <1@x>\r\n\r\nbody"
    )
    m = read_message(raw)
    assert m.subject == "Contact" and m.from_ == Addr("", "x@example.cz")
    assert m.flags.header_block_repaired and m.text == "body"
    # A body that merely lacks the blank separator line is not swallowed into a header.
    m2 = read_message(b"Subject: test\nnot a header\nTo: abc\n\nb\n")
    assert m2.subject == "test" and "not a header" in m2.text


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (("Auto-Submitted: auto-replied",), True),
        (("Auto-Submitted: auto-generated; owner-email=x@y",), True),
        (("Auto-Submitted: no",), False),
        (("Precedence: bulk",), True),
        (("Precedence: junk",), True),
        (("Precedence: list",), True),
        (("Precedence: auto_reply",), True),
        (("Precedence: first-class",), False),
        (("X-Autoreply: yes",), True),
        (("X-Autorespond: Vacation",), True),
        (("X-Auto-Response-Suppress: All",), True),
        (("X-Auto-Response-Suppress: DR, OOF, AutoReply",), True),
        (("X-Auto-Response-Suppress: DR, RN, NRN",), False),
        ((), False),
    ],
)
def test_auto_submitted(headers: tuple[str, ...], expected: bool) -> None:
    assert read_message(msg("From: a@example.com", *headers)).auto_submitted is expected


def test_bounce_detection() -> None:
    report = multipart(
        "Content-Type: text/plain\r\n\r\nDelivery failed",
        "Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example\r\n\r\n"
        "Final-Recipient: rfc822; x@example.com\r\nAction: failed\r\nStatus: 5.1.1\r\n",
        ctype="multipart/report; report-type=delivery-status",
    )
    m = read_message(report)
    assert m.bounce and m.text == "Delivery failed"
    assert b"Status: 5.1.1" in m.parts[0].data
    assert read_message(msg("From: MAILER-DAEMON@mx.example.com")).bounce
    assert not read_message(msg("From: daemon@mx.example.com")).bounce


@pytest.mark.parametrize("raw", [b"", b"   \r\n\r\n", b"\xef\xbb\xbf\r\n", b"just a body line"])
def test_unreadable(raw: bytes) -> None:
    with pytest.raises(Unreadable) as exc:
        read_message(raw)
    assert str(exc.value)


def test_unreadable_for_non_bytes() -> None:
    with pytest.raises(Unreadable):
        read_message("From: a@b\r\n\r\nx")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Sanitizer
# ---------------------------------------------------------------------------------------------

_URL_ATTRS = {
    "href",
    "src",
    "action",
    "formaction",
    "xlink:href",
    "background",
    "poster",
    "data",
    "srcset",
    "data-remote-src",
    "style",
}


class _Audit(HTMLParser):
    """Structural view of sanitizer output (what a browser would actually see)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs.extend((tag, k, v or "") for k, v in attrs)

    handle_startendtag = handle_starttag


def audit(out: str) -> list[str]:
    problems = []
    low = out.lower()
    if "<script" in low:
        problems.append("<script")
    if "javascript:" in low or "vbscript:" in low:
        problems.append("script url")
    for tag in re.findall(r"<[a-zA-Z][^>]*>", out):  # markup only: escaped text is inert
        if re.search(r"\son\w+\s*=", tag, re.IGNORECASE):
            problems.append(f"on* attribute in {tag[:60]}")
    parser = _Audit()
    parser.feed(out)
    parser.close()
    for tag in parser.tags:
        if tag in (
            "script",
            "iframe",
            "object",
            "embed",
            "form",
            "base",
            "meta",
            "link",
            "style",
            "svg",
            "math",
            "frame",
            "input",
            "button",
        ):
            problems.append(f"tag {tag}")
    for tag, name, value in parser.attrs:
        squashed = re.sub(r"[\s\x00-\x1f]", "", value).lower()
        if name.startswith("on"):
            problems.append(f"attr {name}")
        if name in _URL_ATTRS and re.search(r"(java|vb)script:|data:text", squashed):
            problems.append(f"url {name}={value[:40]}")
        if tag == "img" and name == "src" and squashed.startswith(("http:", "https:", "//")):
            problems.append("remote img")
        if name == "style" and re.search(r"url\(|expression\(", squashed):
            problems.append("css")
    return problems


@lru_cache(maxsize=1)
def dompurify_cases() -> list[dict[str, Any]]:
    return json.loads((CORPORA / "dompurify" / "expect.json").read_text(encoding="utf-8"))


@needs_corpora
def test_sanitizer_on_dompurify_payloads() -> None:
    cases = dompurify_cases()
    assert len(cases) > 200
    failures = {
        f"{i}:{c.get('title', '')}": audit(sanitize_html(c["payload"])) for i, c in enumerate(cases)
    }
    failures = {k: v for k, v in failures.items() if v}
    assert failures == {}


@needs_corpora
def test_sanitizer_keeps_benign_markup() -> None:
    out = sanitize_html(
        "<table><tr><td>cell</td></tr></table><p><b>bold</b> <a "
        "href='https://example.com/x'>link</a></p>"
    )
    assert "<td>cell</td>" in out and "<b>bold</b>" in out
    assert 'href="https://example.com/x"' in out and "nofollow" in out
    # DOMPurify's benign cases keep their visible text.
    for case in dompurify_cases():
        expected = case["expected"]
        if isinstance(expected, str) and "<" not in expected and expected.strip():
            assert expected.strip() in html_to_text(
                sanitize_html(case["payload"])
            ) or expected.strip() in sanitize_html(case["payload"]), case.get("title")


@pytest.mark.parametrize(
    ("html", "absent", "present"),
    [
        (
            '<img src="http://t.example/p.gif" width="1" height="1">',
            [' src="http'],
            ['data-remote-src="http://t.example/p.gif"'],
        ),
        (
            '<img src="https://cdn.example/a.png" srcset="https://cdn.example/b.png 2x">',
            ["srcset", ' src="https'],
            ["data-remote-src"],
        ),
        ('<img src="//t.example/p.gif">', [' src="//'], []),
        ('<img src="cid:part1.abc@example">', [], ['src="cid:part1.abc@example"']),
        ('<img src="data:image/png;base64,iVBORw0KGgo=">', [], ['src="data:image/png']),
        ('<img src="data:image/svg+xml;base64,PHN2Zz48L3N2Zz4=">', ["svg"], []),
        (
            '<base href="http://evil.example/"><a href="/relative">r</a>',
            ["<base", "evil", "/relative"],
            [],
        ),
        (
            '<meta http-equiv="refresh" content="0;url=http://evil.example">x',
            ["<meta", "refresh"],
            [],
        ),
        (
            '<div style="background:url(http://t.example/x.gif);color:red">x</div>',
            ["url("],
            ["color:red"],
        ),
        ('<div style="width:expression(alert(1))">x</div>', ["expression"], []),
        (
            '<div style="color:red;background-image:u\\72l(http://t)">x</div>',
            ["u\\72l", "http"],
            [],
        ),
        (
            "<style>@import url(http://t.example/x.css);</style><p>y</p>",
            ["@import", "<style"],
            ["<p>y</p>"],
        ),
        ('<link rel="stylesheet" href="http://t.example/x.css"><p>y</p>', ["<link"], []),
        (
            '<table background="http://t.example/bg.gif"><tr><td>x</td></tr></table>',
            ["background"],
            [],
        ),
        (
            '<a href="javascript:alert(1)">x</a><a href="data:text/html,x">y</a>',
            ["javascript", "data:"],
            [],
        ),
        ('<form action="http://phish.example"><input name="pw"></form>', ["<form", "<input"], []),
        (
            '<iframe src="http://x.example"></iframe><object data="x"></object>',
            ["<iframe", "<object"],
            [],
        ),
        ('<p onclick="x()" id="clobber" name="clobber">t</p>', ["onclick", "clobber"], ["t"]),
    ],
)
def test_sanitizer_email_specific(html: str, absent: list[str], present: list[str]) -> None:
    out = sanitize_html(html)
    for needle in absent:
        assert needle not in out, (needle, out)
    for needle in present:
        assert needle in out, (needle, out)
    assert audit(out) == []


# ---------------------------------------------------------------------------------------------
# Corpus: every message must read
# ---------------------------------------------------------------------------------------------

_SKIP_SUFFIXES = {
    ".json",
    ".yml",
    ".md",
    ".png",
    ".jpg",
    ".gif",
    ".wav",
    ".rtf",
    ".html",
    ".htm",
    ".golden",
    ".list",
    ".tnef",
    ".dat",
    ".doc",
    ".mp3",
    ".pdf",
}
_MESSAGE_SUFFIXES = {".eml", ".txt", ".msg", ".box", ".raw", ""}
_HEADER_START = re.compile(rb"(?:From |[!-9;-~]+[ \t]*:)")
_MBOX_SEP = re.compile(rb"From (?:\S+\s+(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)\b.*|\S*\s*)$")


def split_mbox(data: bytes) -> list[bytes]:
    """Split an mbox on 'From ' separator lines (after a blank line, looking like a separator)."""
    out: list[bytes] = []
    cur: list[bytes] = []
    prev_blank = True
    for line in data.splitlines(keepends=True):
        if prev_blank and _MBOX_SEP.match(line):
            if b"".join(cur).strip():
                out.append(b"".join(cur))
            cur = []
            prev_blank = False
            continue
        cur.append(line)
        prev_blank = line.strip() == b""
    if b"".join(cur).strip():
        out.append(b"".join(cur))
    return out


def _classify(path: Path) -> str:
    """'mbox', 'message' or 'skip' for one corpus file (cheap name and first-line checks)."""
    rel = path.relative_to(CORPORA).as_posix()
    name = path.name
    if rel.startswith("dompurify/") or name in ("SOURCE.md", "README", "COPYING"):
        return "skip"
    if "/tnef/" in rel and not name.endswith(".eml"):
        return "skip"  # TNEF payloads and the files extracted from them
    if name.endswith("-summary.txt"):
        return "skip"  # MimeKit's expected output, not a message
    if name.endswith((".mbox", ".mbox.txt")):
        return "mbox"
    suffix = "" if ":2," in name else path.suffix.lower()
    if suffix in _SKIP_SUFFIXES or suffix not in _MESSAGE_SUFFIXES:
        return "skip"
    if suffix in (".eml", ".box", ".msg", ".raw"):
        return "message"  # named as a message: read it even if its first line is junk
    head = path.read_bytes()[:300].removeprefix(b"\xef\xbb\xbf").lstrip()
    return "message" if _HEADER_START.match(head) else "skip"  # scripts, address lists


@lru_cache(maxsize=1)
def corpus_messages() -> tuple[tuple[str, bytes], ...]:
    found: list[tuple[str, bytes]] = []
    for path in sorted(CORPORA.rglob("*")):
        if not path.is_file():
            continue
        kind = _classify(path)
        if kind == "skip":
            continue
        rel = path.relative_to(CORPORA).as_posix()
        data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
        if kind == "mbox":
            found.extend((f"{rel}#{i}", m) for i, m in enumerate(split_mbox(data)))
        else:
            found.append((rel, data))
    return tuple(found)


@needs_corpora
def test_corpus_every_message_reads() -> None:
    counts: Counter[str] = Counter()
    per_source: Counter[str] = Counter()
    failures: list[str] = []
    unreadable: list[str] = []
    files = {label.split("#", 1)[0] for label, _ in corpus_messages()}
    for label, raw in corpus_messages():
        counts["messages"] += 1
        per_source[label.split("/", 1)[0]] += 1
        try:
            result = read_message(raw)
        except Unreadable as exc:
            counts["unreadable"] += 1
            unreadable.append(f"{label}: {exc}")
            continue
        except Exception as exc:  # the property under test: nothing else escapes
            failures.append(f"{label}: {type(exc).__name__}: {exc}")
            continue
        counts["read"] += 1
        counts["with_defects"] += bool(result.defects)
        internal = [d for d in result.defects if d.startswith("internal-error")]
        if internal:
            failures.append(f"{label}: {internal}")
        counts["parts"] += len(result.parts)
        assert "\n" not in result.subject and "\r" not in result.subject, label
        assert result.message_id.startswith("<") and result.message_id.endswith(">"), label
    print(f"\ncorpus: {len(files)} files, {dict(counts)}")
    print(f"per source: {dict(sorted(per_source.items()))}")
    print("unreadable:", *unreadable, sep="\n  ")
    assert failures == []
    assert len(files) >= 800 and counts["messages"] >= 1000  # we really walked the corpora
    # Only messages without a single header field (imaptest's bare "1"/"2" bodies) may be
    # refused; anything else being Unreadable is a regression.
    assert all(u.endswith("no header fields found") for u in unreadable)
    assert counts["unreadable"] <= 20


def corpus_file(rel: str) -> bytes:
    return (CORPORA / rel).read_bytes()


# ---------------------------------------------------------------------------------------------
# Corpus: stated expectations
# ---------------------------------------------------------------------------------------------


def _php_cases() -> list[Any]:
    if not CORPORA.is_dir():
        return []
    root = CORPORA / "php-mime-mail-parser"
    cases = json.loads((root / "expected-provideData.json").read_text(encoding="utf-8"))
    out = []
    hard = {
        "m0018": "base64 body cut short and case-mangled: decoders disagree on its length "
        "(Python 233 bytes, PHP 174)",
        "m0020": "nameless base64 text/calendar part: PHP names it 'noname1', we generate "
        "'part-1.ics'",
    }
    for case in cases:
        path = root / "tests" / "mails" / case["mail_id"]
        path = path if path.exists() else path.with_suffix(".eml")
        if not path.exists():
            continue  # m0004/5/6/10: left out of the corpus for size
        marks = (
            [pytest.mark.xfail(reason=hard[case["mail_id"]], strict=True)]
            if case["mail_id"] in hard
            else []
        )
        out.append(pytest.param(case, path, id=case["mail_id"], marks=marks))
    return out


@needs_corpora
@pytest.mark.parametrize(("case", "path"), _php_cases())
def test_php_mime_mail_parser_expectations(case: dict[str, Any], path: Path) -> None:
    m = read_message(path.read_bytes())
    assert m.subject == case["subject"]
    assert m.from_ is not None
    assert [a["address"] for a in case["from_addresses"]] == [m.from_.address]
    got = [
        (p.filename, len(p.data), p.content_type, "inline" if p.inline else "attachment")
        for p in m.parts
    ]
    want = [
        (a["filename"], a["size"], a["content_type"], a["disposition"]) for a in case["attachments"]
    ]
    assert got == want
    for part, att in zip(m.parts, case["attachments"], strict=True):
        if att["substring"]:
            assert (
                part.data.decode("utf-8", "replace").count(att["substring"])
                == att["substring_count"]
            )
    kind, *rest = case["text_expected"]
    if kind == "MATCH":
        assert m.text.strip() == rest[0].replace("\r\n", "\n").strip()
    else:
        count, needle = rest
        assert m.text.count(needle) == count


@needs_corpora
def test_php_issue149_hebrew_iso_8859_8_i_subject() -> None:
    # One of the corpus README's three "Python disagrees" cases; our alias table fixes it.
    m = read_message(corpus_file("php-mime-mail-parser/tests/mails/issue149"))
    assert m.subject == "מענה 'אני לא נמצא': Invoice 02722027"


def _zammad_yml(path: Path) -> dict[str, Any]:
    import yaml  # only the tests need YAML

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor(
        "!ruby/hash:", lambda loader, _suffix, node: loader.construct_mapping(node, deep=True)
    )
    Loader.add_constructor(
        "!binary", lambda loader, node: base64.b64decode(loader.construct_scalar(node))
    )
    data: dict[str, Any] = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506
    return data


# Where our result knowingly differs from Zammad's, this is what we produce instead, and why.
ZAMMAD_OURS = {
    ("mail065", "from_display_name"): (
        "Bürling, Andreas",
        "Zammad splits the encoded name at its comma",
    ),
    ("mail046", "from_display_name"): ("武兰成", "Zammad shows GBK bytes as mojibake"),
}
ZAMMAD_XFAIL = {
    ("mail117", "from_email"): "encoded-word local part kept literally (RFC 2047 section 5); "
    "Zammad strips the =?..?= wrapper",
    ("mail071", "attachments"): "multipart/mixed without boundary or body: we give an empty "
    "text body, Zammad an empty attachment named 'file'",
}


def _lf(text: str) -> str:
    """LF line ends, no trailing blanks: Zammad stores text that way, and re-serialising an
    attached message writes ``Name: `` for an empty header (semantically the same bytes)."""
    return "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n"))


ZAMMAD_GENERATED_NAMES = {"file", "Delivery report.txt", "Undelivered Message.eml"}


def _zammad_cases() -> list[Any]:
    if not CORPORA.is_dir():
        return []
    return [
        pytest.param(p, id=p.stem.split("-")[0]) for p in sorted((CORPORA / "zammad").glob("*.yml"))
    ]


def _emails(value: str) -> list[str]:
    """Addresses in one of Zammad's expected address strings (stdlib legacy parser)."""
    return [a.lower() for _n, a in email_utils.getaddresses([value]) if "@" in a]


@needs_corpora
@pytest.mark.parametrize("yml", _zammad_cases())
def test_zammad_expectations(yml: Path) -> None:
    stem = yml.stem.split("-")[0]
    expected = _zammad_yml(yml)
    m = read_message(yml.with_suffix(".box").read_bytes())
    sender = m.from_ or (m.reply_to[0] if m.reply_to else None)  # Zammad falls back to Reply-To
    checks: dict[str, tuple[Any, Any]] = {}
    if "subject" in expected:
        checks["subject"] = (m.subject, expected["subject"].strip(" \t"))
    if "from_email" in expected:
        checks["from_email"] = (
            sender.address.lower() if sender else None,
            expected["from_email"].lower(),
        )
    if "from_display_name" in expected:
        checks["from_display_name"] = (
            sender.name if sender else None,
            expected["from_display_name"],
        )
    for key, ours in (("to", m.to), ("cc", m.cc)):
        if key in expected:
            checks[key] = ([a.address.lower() for a in ours], _emails(expected[key]))
    if "attachments" in expected:
        want = [a for a in expected["attachments"] if a["filename"] != "message.html"]
        names = [
            p.filename if a["filename"] not in ZAMMAD_GENERATED_NAMES else "<generated>"
            for p, a in zip(m.parts, want, strict=False)
        ]
        checks["attachments"] = (
            (names, len(m.parts)),
            (
                [
                    a["filename"] if a["filename"] not in ZAMMAD_GENERATED_NAMES else "<generated>"
                    for a in want
                ],
                len(want),
            ),
        )
        for part, att in zip(m.parts, want, strict=False):
            data = att.get("data")
            if isinstance(data, bytes) and att["filename"] not in ZAMMAD_GENERATED_NAMES:
                checks[f"data:{att['filename']}"] = (part.data, data)
            elif isinstance(data, str) and att["filename"] not in ZAMMAD_GENERATED_NAMES:
                # Zammad stores text attachments as strings with LF line ends.
                checks[f"data:{att['filename']}"] = (
                    _lf(part.data.decode("utf-8", "replace")).strip(),
                    _lf(data).strip(),
                )
    if expected.get("content_type") == "text/plain" and isinstance(expected.get("body"), str):
        body = expected["body"]
        want_text = "" if body.strip() == "no visible content" else body
        checks["body"] = (" ".join(m.text.split()), " ".join(want_text.split()))
    assert checks, "nothing to check"
    failures = []
    for key, (ours, theirs) in checks.items():
        if (stem, key) in ZAMMAD_OURS:
            theirs = ZAMMAD_OURS[(stem, key)][0]
        if ours != theirs:
            failures.append((key, ours, theirs))
    xfails = [ZAMMAD_XFAIL[(stem, k)] for k, _o, _t in failures if (stem, k) in ZAMMAD_XFAIL]
    if failures and len(xfails) == len(failures):
        pytest.xfail("; ".join(xfails))
    assert failures == []


@needs_corpora
def test_nodemailer_expectations() -> None:
    root = CORPORA / "nodemailer-mailparser" / "test" / "fixtures"
    m = read_message((root / "nodemailer.eml").read_bytes())
    assert m.subject == "Nodemailer is unicode friendly ✔ (1476358788189)"
    assert m.to == [
        Addr("Andris Reinman", "andris+123@kreata.ee"),
        Addr("", "andris.reinman@gmail.com"),
    ]
    # mailparser counts 4 attachments including the text/watch-html alternative; we treat that
    # alternative as a duplicate body (as the corpus notes), leaving the 3 real attachments.
    assert [p.filename for p in m.parts] == ["image.png", "nyan cat ✔.gif", "notes.txt"]
    assert hashlib.md5(m.parts[1].data).hexdigest() == "2822cbcf68de083b96ac3921d0e308a2"  # noqa: S324
    assert m.parts[0].inline is False and m.parts[0].content_id == "note@example.com"

    root_b64 = read_message((root / "base64encodedroot.eml").read_bytes())
    assert len(root_b64.parts) == 1
    assert (
        hashlib.sha256(root_b64.parts[0].data).hexdigest()
        == "3d0c2d17edd1fed968f66ca200e7c165efd63834b488eec53deb24cca49c3d7b"
    )

    large = read_message((root / "large_text.eml").read_bytes())
    assert large.text.splitlines()[0] == "Exception during installation:" and large.html == ""
    assert read_message((root / "spam.eml").read_bytes()).html.strip()

    # mailparser's text strings are its own concatenation; compare ignoring whitespace runs.
    for name, text in (
        ("nested.eml", "\nDear Sir,\n\nGood evening.\n\n\n\n\n\n\n\nThe footer\n"),
        (
            "mixed.eml",
            "\nThis e-mail message has been scanned for Viruses and Content and "
            "cleared\n\nGood Morning;\n\n",
        ),
        (
            "decoderended.eml",
            "\n\nNote: forwarded message attached.\n       \n"
            "---------------------------------\nBe a better something.\n"
            "Check it out.",
        ),
    ):
        got = read_message((root / name).read_bytes()).text
        assert got.split() == text.split(), name

    dsn = read_message((root / "delivery-status.eml").read_bytes())
    assert dsn.bounce
    assert any(b"Status: 5.1.1" in p.data for p in dsn.parts)  # the delivery-status part

    for stress in ("outofmemory.eml", "htmllargecallstack.eml"):
        assert isinstance(read_message((root / stress).read_bytes()), ReadMessage)


@needs_corpora
def test_mailpit_inline_vs_attachment() -> None:
    root = CORPORA / "mailpit" / "internal" / "storage" / "testdata"

    def split(name: str) -> tuple[list[Any], list[Any], ReadMessage]:
        m = read_message((root / name).read_bytes())
        return [p for p in m.parts if p.inline], [p for p in m.parts if not p.inline], m

    inline, attached, m = split("mime-attachment.eml")
    assert m.subject == "inline + attachment"
    assert m.from_ == Addr("Sender Smith", "sender2@example.com")
    assert m.to == [Addr("Recipient Ross", "recipient2@example.com")]
    assert [p.filename for p in inline] == ["inline-image.jpg"]
    assert [p.filename for p in attached] == ["Sample PDF.pdf"]

    inline, attached, _ = split("inline-attachment.eml")
    assert len(inline) == 1 and attached == [] and inline[0].content_id == "test1@example.com"

    inline, attached, _ = split("regular-attachment.eml")
    assert inline == [] and len(attached) == 1 and attached[0].content_id is None
    data = attached[0].data
    assert hashlib.md5(data).hexdigest() == "b04930eb1ba0c62066adfa87e5d262c4"  # noqa: S324
    assert hashlib.sha1(data).hexdigest() == "15605d6a2fca44e966209d1701f16ecf816df880"  # noqa: S324
    assert (
        hashlib.sha256(data).hexdigest()
        == "92c4ccff376003381bd9054d3da7b32a3c5661905b55e3b0728c17aba6d223ec"
    )

    inline, attached, _ = split("mixed-attachment.eml")
    assert [p.content_id for p in inline] == ["inline@example.com"]
    assert [p.content_id for p in attached] == [None]


@needs_corpora
def test_notmuch_header_cases() -> None:
    cases = json.loads((CORPORA / "notmuch" / "expected-threads.json").read_text())
    checked = 0
    for case in cases["header_cases_from_T510"]["cases"]:
        for header in case["messages"]:
            raw = msg(*(f"{k}: {v}" for k, v in header.items()), "From: t@example.com")
            m = read_message(raw)
            assert m.message_id == header["Message-ID"]
            for ident in m.in_reply_to + m.references:
                assert re.fullmatch(r"<[^<>\s]+>", ident)
            if "References" in header:
                assert m.references == normalize_msgid_list(header["References"])
                assert all(" " not in r for r in m.references)
            checked += 1
    assert checked == 11
    junk = read_message(msg("From: t@x", "In-Reply-To: mumble", "References: <foo@one.com>"))
    assert junk.in_reply_to == [] and junk.references == ["<foo@one.com>"]
    assert junk.flags.in_reply_to_junk


@needs_corpora
def test_cpython_defect_cases() -> None:
    root = CORPORA / "cpython-test-email"
    cases = json.loads((root / "expected-defects.json").read_text())["cases"]
    checked = 0
    for name, case in cases.items():
        for rel in case["files"]:
            defects = read_message((root / rel).read_bytes()).defects
            assert set(case["defects_referenced"]) <= set(defects), (name, defects)
            if not case["defects_referenced"]:
                assert not [d for d in defects if d.endswith("Defect")], (name, defects)
            checked += 1
    assert checked >= 15


@needs_corpora
def test_flanker_bounce_detection() -> None:
    root = CORPORA / "flanker"
    cases = json.loads((root / "expected-from-tests.json").read_text())["bounce_detect"]
    for case in cases:
        m = read_message((root / case["file"]).read_bytes())
        assert m.bounce is case["is_bounce"], case["file"]


ENMIME_WARNING = {
    "Missing Boundary": lambda d: "CloseBoundaryNotFoundDefect" in d,
    "Malformed Header": lambda d: "MissingHeaderBodySeparatorDefect" in d,
    "Missing Content-Type": lambda d: "missing-content-type" in d,
    "Content Encoding": lambda d: any(x.startswith("unknown-transfer-encoding") for x in d),
    "Character Set Conversion": lambda d: any(x.startswith("unknown-charset") for x in d),
    "Malformed Base64": lambda d: any(x.startswith("InvalidBase64") for x in d),
    "Character Set Declaration Mismatch": lambda d: any(
        x.startswith("charset-mismatch") for x in d
    ),
}


@needs_corpora
def test_enmime_low_quality_and_attachment_only() -> None:
    root = CORPORA / "enmime"
    expected = json.loads((root / "expected-from-tests.json").read_text())
    for case in expected["low_quality_warnings"]:
        m = read_message((root / case["file"]).read_bytes())
        kind = case["expected_warning"]
        if kind == "Plain Text from HTML":  # not a defect for us: the text is derived
            assert m.text and m.html
            continue
        assert ENMIME_WARNING[kind](m.defects), (case["file"], m.defects)
    for case in expected["attachment_only"]["cases"]:
        m = read_message((root / case["file"]).read_bytes())
        assert m.text == "" and len(m.parts) == 1, case["file"]
        if "inlines" in case:
            assert m.parts[0].inline is bool(case["inlines"])
            assert m.parts[0].data.startswith(b"\x89PNG")


@needs_corpora
def test_mimekit_stack_overflow_and_japanese() -> None:
    root = CORPORA / "mimekit" / "UnitTests" / "TestData" / "messages"
    m = read_message((root / "stack-overflow.txt").read_bytes())
    assert m.from_ == Addr("test", "test@test.com")
    japanese = read_message((root / "japanese.txt").read_bytes())
    assert re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", japanese.subject + japanese.text)


# ---------------------------------------------------------------------------------------------
# Fuzz
# ---------------------------------------------------------------------------------------------

SEEDS = [
    BASIC,
    multipart(
        TEXT_PART,
        "Content-Type: text/html; charset=iso-8859-1\r\nContent-Transfer-Encoding: "
        'quoted-printable\r\n\r\n<p>caf=E9 <img src=3D"http://t/x.gif"></p>',
        "Content-Type: application/octet-stream; name*=utf-8''na%C3%AFve.bin\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\nAAECAwQF",
        "Content-Type: message/rfc822\r\n\r\nFrom: x@y\r\nSubject: inner\r\n\r\nhi",
    ),
    multipart(
        "Content-Type: text/plain\r\n\r\nDelivery failed",
        "Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx\r\n\r\n"
        "Status: 5.1.1\r\n",
        ctype="multipart/report; report-type=delivery-status",
    ),
    text_msg(
        "日本語".encode("iso2022_jp"),
        "text/plain; format=flowed",
        "7bit",
        ("In-Reply-To: <a@b> (c)", "References: <a@b> x@y"),
    ),
]


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    ops = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["flip", "truncate", "duplicate-header", "insert", "delete"]),
                st.integers(min_value=0, max_value=10**6),
                st.binary(min_size=1, max_size=12),
            ),
            min_size=1,
            max_size=6,
        )
    )
    for op, pos, blob in ops:
        if not data:
            break
        i = pos % len(data)
        if op == "flip":
            data[i] ^= blob[0] or 0x80
        elif op == "truncate":
            del data[i:]
        elif op == "insert":
            data[i:i] = blob
        elif op == "delete":
            del data[i : i + len(blob)]
        else:
            head_end = data.find(b"\r\n\r\n")
            lines = bytes(data[: head_end if head_end > 0 else len(data)]).split(b"\r\n")
            line = lines[pos % len(lines)]
            copies = b"\r\n".join([line] * (1 + blob[0] % 40))
            data[0:0] = copies + b"\r\n"
    return bytes(data)


@settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(mutated_messages())
def test_fuzz_mutated_messages(raw: bytes) -> None:
    try:
        m = read_message(raw)
    except Unreadable as exc:
        assert str(exc)
        return
    assert isinstance(m, ReadMessage)
    assert m.message_id.startswith("<") and m.message_id.endswith(">")
    assert not any(ch in m.subject for ch in "\r\n")
    assert m.date is None or (isinstance(m.date, datetime) and m.date.tzinfo is not None)
    assert all(isinstance(p.data, bytes) and "\n" not in p.filename for p in m.parts)
    assert "<script" not in m.html.lower()
    assert not [d for d in m.defects if d.startswith("internal-error")], m.defects


def test_ids_that_pythons_folder_encoded_are_decoded() -> None:
    """A reply built with stdlib EmailMessage encodes an over-long id; threading must still work."""
    from email import policy as email_policy
    from email.message import EmailMessage

    long_id = (
        "<849b337d0f3e4a6b9c7d2e1f0a9b8c7d.8f1e2d3c-4b5a-6978-8091-a2b3c4d5e6f7@chatflow.test>"
    )
    m = EmailMessage()
    m["From"] = "a@b.test"
    m["To"] = "support@chatflow.test"
    m["Subject"] = "Re: x"
    m["Message-ID"] = "<r1@b.test>"
    m["In-Reply-To"] = long_id
    m["References"] = f"<root@x.test> {long_id}"
    m.set_content("hi")
    raw = m.as_bytes(policy=email_policy.SMTP)
    assert b"=?utf-8?q?=3C" in raw  # the stdlib really does this
    read = read_message(raw)
    assert read.in_reply_to == [long_id]
    assert read.references == ["<root@x.test>", long_id]


@pytest.mark.parametrize(
    ("raw", "address"),
    [
        ("=?UTF-8?Q?Evil=0D=0ABcc:_victim2@evil.test?= <inj2@example.com>", "inj2@example.com"),
        ("=?UTF-8?Q?Evil=0D=0A=3Cvictim@evil.test=3E?= <real@example.com>", "real@example.com"),
        ("=?UTF-8?B?RXZpbA0KQmNjOiB2QGV2aWwudGVzdA==?= <b64@example.com>", "b64@example.com"),
    ],
)
def test_a_name_that_decodes_to_a_line_break_keeps_the_real_address(raw: str, address: str) -> None:
    """Python refuses a decoded CR/LF in a header value (CVE-2024-6923's fix), and the lenient
    legacy parser then read the encoded word as text: the sender became an address inside the
    name (found by a trial). The name's encoded words are defanged and parsed again instead."""
    notes: list[str] = []
    [got] = parse_address_list(raw, (), notes)
    assert got.address == address
    assert "\n" not in got.name and "\r" not in got.name
    assert got.name.startswith("Evil")
