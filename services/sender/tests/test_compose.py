"""Tests for services.sender.domain.compose: every check parses the composed bytes back."""

from __future__ import annotations

import os
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from email import policy
from email.header import decode_header, make_header
from email.message import EmailMessage, MIMEPart
from email.parser import BytesParser
from email.utils import format_datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.sender.domain.compose import (
    Addr,
    Attachment,
    Draft,
    HeaderInjection,
    InvalidDraft,
    ThreadContext,
    build_references,
    compose,
    html_to_text,
    reply_subject,
    sanitize,
)

DATE = datetime(2024, 5, 17, 9, 30, 0, tzinfo=timezone(timedelta(hours=-3)))
HTML = (
    "<p>Olá <b>Zoë</b>, thanks for writing &amp; waiting.</p>"
    "<ul><li>first</li><li>second</li></ul>"
    '<p>See <a href="https://help.chatflow.test/a">the guide</a>.</p>'
)
BINARY = bytes(range(256)) * 8 + b"\r\n\r\x00\n\xff"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(200))


def make_draft(**kw: object) -> Draft:
    base = Draft(
        mailbox=Addr("ChatFLOW Suporte", "support@chatflow.test"),
        to=[Addr("Zoë Ñandú", "zoe@customer.test")],
        cc=[],
        html=HTML,
        attachments=[],
        message_id="<send-1.conv-9@chatflow.test>",
        reply_to=Addr("", "support+s1gn3d-t0k.en@chatflow.test"),
        date=DATE,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def make_thread(**kw: object) -> ThreadContext:
    base = ThreadContext(
        subject="Ação — 日本語",
        last_message_id="<parent@customer.test>",
        references=["<root@customer.test>", "<mid@chatflow.test>"],
        token="1042",
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def parse(raw: bytes) -> EmailMessage:
    msg = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(msg, EmailMessage)
    return msg


def subparts(part: MIMEPart) -> list[MIMEPart]:
    return list(part.iter_parts())


def body(part: MIMEPart) -> str:
    """Decoded text content, line endings normalized (the wire form is CRLF)."""
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n").rstrip("\n")


def header_block(raw: bytes) -> list[bytes]:
    return raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def raw_header(raw: bytes, name: str) -> str:
    """Unfolded value of header ``name`` exactly as on the wire (still RFC 2047 encoded)."""
    unfolded = re.sub(rb"\r\n(?=[ \t])", b"", raw.split(b"\r\n\r\n", 1)[0]).decode("ascii")
    values = [v for n, _, v in (h.partition(": ") for h in unfolded.split("\r\n")) if n == name]
    assert len(values) == 1, (name, values)
    return values[0]


def rfc2047_display_name(value: str, addr_spec: str) -> str:
    """Decode a single mailbox's display name with the legacy (RFC 2047 §6.2) decoder.

    The 3.11 modern parser keeps the folding space between adjacent encoded-words
    in phrases, so it is not a faithful oracle for long non-ASCII names.
    """
    if value == addr_spec:
        return ""
    phrase = value.removesuffix(f" <{addr_spec}>")
    assert phrase != value, value
    if phrase.startswith('"') and phrase.endswith('"'):
        return re.sub(r"\\(.)", r"\1", phrase[1:-1])
    return str(make_header(decode_header(phrase)))


def assert_wire_format(raw: bytes) -> None:
    assert raw.endswith(b"\r\n")
    assert raw.count(b"\n") == raw.count(b"\r\n"), "bare LF"
    assert raw.count(b"\r") == raw.count(b"\r\n"), "bare CR"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    assert raw.isascii()


# ------------------------------------------------------------------ structure


def test_alternative_only_roundtrip() -> None:
    draft = make_draft()
    msg = parse(compose(draft, make_thread()))
    assert msg.get_content_type() == "multipart/alternative"
    plain, html = subparts(msg)
    assert plain.get_content_type() == "text/plain"
    assert html.get_content_type() == "text/html"
    assert body(html) == sanitize(HTML)
    assert body(plain) == html_to_text(sanitize(HTML))
    assert "Olá Zoë, thanks for writing & waiting." in body(plain)
    assert "See the guide <https://help.chatflow.test/a>." in body(plain)


def test_html_is_sanitized_again() -> None:
    draft = make_draft(html='<p onclick="x()">hi<script>alert(1)</script></p>')
    msg = parse(compose(draft, make_thread()))
    html = body(subparts(msg)[1])
    assert html == "<p>hi</p>"
    assert "alert" not in body(subparts(msg)[0])


def test_attachments_byte_for_byte_with_rfc2231_filename() -> None:
    name = "Relatório — 日本語 ação.pdf"
    draft = make_draft(
        attachments=[
            Attachment(name, "application/pdf", BINARY),
            Attachment("notes.txt", "text/plain", "línea\r\nzwei\n".encode()),
        ]
    )
    raw = compose(draft, make_thread())
    assert_wire_format(raw)
    # RFC 2231 (possibly with continuations), not an RFC 2047 encoded-word
    assert re.search(rb"filename\*(0\*)?=utf-8''Relat%C3%B3rio", raw)
    assert b'filename="=?' not in raw
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/mixed"
    alt, pdf, txt = subparts(msg)
    assert alt.get_content_type() == "multipart/alternative"
    assert pdf.get_filename() == name
    assert pdf.get_content_type() == "application/pdf"
    assert pdf.get_content_disposition() == "attachment"
    assert pdf.get_content() == BINARY
    assert txt.get_payload(decode=True) == "línea\r\nzwei\n".encode()


def test_inline_image_is_related_by_cid() -> None:
    draft = make_draft(
        html='<p>Logo: <img src="cid:logo@chatflow.test" alt="logo"></p>',
        attachments=[Attachment("logo.png", "image/png", PNG, content_id="logo@chatflow.test")],
    )
    msg = parse(compose(draft, make_thread()))
    assert msg.get_content_type() == "multipart/alternative"
    plain, related = subparts(msg)
    assert related.get_content_type() == "multipart/related"
    html, image = subparts(related)
    assert html.get_content_type() == "text/html"
    assert 'src="cid:logo@chatflow.test"' in body(html)
    assert image["Content-ID"] == "<logo@chatflow.test>"
    assert image.get_content_disposition() == "inline"
    assert image.get_content() == PNG
    assert "Logo: [logo]" in body(plain)


def test_inline_and_files_together() -> None:
    draft = make_draft(
        attachments=[
            Attachment("logo.png", "image/png", PNG, content_id="<logo@chatflow.test>"),
            Attachment("a.bin", "application/octet-stream", BINARY),
        ]
    )
    msg = parse(compose(draft, make_thread()))
    assert msg.get_content_type() == "multipart/mixed"
    alt, file_part = subparts(msg)
    assert [p.get_content_type() for p in subparts(alt)] == [
        "text/plain",
        "multipart/related",
    ]
    assert subparts(subparts(alt)[1])[1]["Content-ID"] == "<logo@chatflow.test>"
    assert file_part.get_content() == BINARY


# -------------------------------------------------------------------- headers


def test_non_ascii_names_and_subject_survive() -> None:
    draft = make_draft(cc=[Addr("Ação — 日本語", "cc@customer.test")])
    raw = compose(draft, make_thread(last_message_id=None, references=[]))
    assert all(line.isascii() for line in header_block(raw))
    assert b"=?utf-8?" in raw  # RFC 2047 encoded-words on the wire
    msg = parse(raw)
    (to,) = msg["To"].addresses
    assert (to.display_name, to.addr_spec) == ("Zoë Ñandú", "zoe@customer.test")
    assert msg["Cc"].addresses[0].display_name == "Ação — 日本語"
    assert msg["From"].addresses[0].display_name == "ChatFLOW Suporte"
    assert str(msg["Subject"]) == "Ação — 日本語 [#1042]"


def test_idn_domain_is_punycoded() -> None:
    draft = make_draft(to=[Addr("Jörg", "jorg@bücher.example")])
    msg = parse(compose(draft, make_thread()))
    assert msg["To"].addresses[0].addr_spec == "jorg@xn--bcher-kva.example"


def test_long_non_ascii_subject_keeps_every_space() -> None:
    # The stdlib folder turns this into "...Ação?=\r\n  =?utf-8?b?..." and the space is lost.
    subject = "Ação " * 20 + "x" * 200 + " fim — 日本語" * 10
    raw = compose(make_draft(), make_thread(subject=subject, last_message_id=None))
    assert_wire_format(raw)
    expected = " ".join(f"{subject} [#1042]".split())
    assert str(parse(raw)["Subject"]) == expected
    assert str(make_header(decode_header(raw_header(raw, "Subject")))) == expected
    assert all(len(line) <= 76 for line in header_block(raw) if b"=?" in line)


def test_long_non_ascii_display_names() -> None:
    names = [
        "Ação " * 12 + "fim",
        "山田太郎株式会社チャットフロー" * 3,
        "Zoë, Ñandú (Ação)",
        # the stdlib folder writes "...T=C3=A9cnico?=\r\n =?utf-8?q?=3A?=": the space is lost
        "Central Brasil São Paulo Atendimento Suporte Técnico :",
        'Plain "quoted", ASCII \\ name that is long enough to need folding somewhere',
    ]
    for name in names:
        raw = compose(make_draft(to=[Addr(name, "zoe@customer.test")]), make_thread())
        assert_wire_format(raw)
        assert rfc2047_display_name(raw_header(raw, "To"), "zoe@customer.test") == name
        parsed = parse(raw)["To"].addresses[0].display_name
        assert parsed.replace(" ", "") == name.replace(" ", "")  # see rfc2047_display_name


def test_reply_headers() -> None:
    msg = parse(compose(make_draft(), make_thread()))
    assert str(msg["Subject"]) == "Re: Ação — 日本語 [#1042]"
    assert str(msg["In-Reply-To"]) == "<parent@customer.test>"
    assert str(msg["References"]).split() == [
        "<root@customer.test>",
        "<mid@chatflow.test>",
        "<parent@customer.test>",
    ]
    assert str(msg["Message-ID"]) == "<send-1.conv-9@chatflow.test>"
    assert str(msg["Date"]) == format_datetime(DATE)
    assert msg["Reply-To"].addresses[0].addr_spec == "support+s1gn3d-t0k.en@chatflow.test"
    assert msg["MIME-Version"] == "1.0"
    assert "Cc" not in msg
    assert "Auto-Submitted" not in msg


@pytest.mark.parametrize("with_file", [False, True])
def test_long_ids_are_never_encoded_words(with_file: bool) -> None:
    """An Outlook-length parent id (over a line) stays an id on the wire, with files or not."""
    long_parent = (
        "<"
        + "98e8c54485dc1fa063cb1b61c39aa43c2aa51f5ceea6ddfa0b5ab0471c61b4e3"
        + "@chatflow.generated>"
    )
    outlook = (
        "<AM6PR04MB5671C0FFEE1234567890ABCDEF12345678@AM6PR04MB5671.eurprd04.prod.outlook.com>"
    )
    files = [Attachment("a.pdf", "application/pdf", BINARY)] if with_file else []
    raw = compose(
        make_draft(attachments=files),
        make_thread(last_message_id=long_parent, references=[outlook]),
    )
    head = raw.split(b"\r\n\r\n", 1)[0]
    for name in (b"In-Reply-To", b"References", b"Message-ID"):
        line = re.search(rb"\r\n" + name + rb":((?:[^\r]|\r\n[ \t])*)", b"\r\n" + head)
        assert line is not None, name
        assert b"=?" not in line.group(1), line.group(0)
    assert long_parent.encode() in head and outlook.encode() in head
    msg = parse(raw)
    assert str(msg["In-Reply-To"]) == long_parent
    assert str(msg["References"]).split() == [outlook, long_parent]


def test_new_conversation_headers() -> None:
    draft = make_draft(reply_to=None, auto_generated=True)
    msg = parse(compose(draft, make_thread(subject="Hi", last_message_id=None, references=[])))
    assert str(msg["Subject"]) == "Hi [#1042]"
    assert "In-Reply-To" not in msg
    assert "References" not in msg
    assert "Reply-To" not in msg
    assert msg["Auto-Submitted"] == "auto-generated"


def test_header_order_and_no_extras() -> None:
    raw = compose(make_draft(cc=[Addr("", "cc@customer.test")], auto_generated=True), make_thread())
    names = [line.split(b":", 1)[0] for line in header_block(raw) if not line[:1].isspace()]
    assert names == [
        b"From",
        b"To",
        b"Cc",
        b"Subject",
        b"Date",
        b"Message-ID",
        b"In-Reply-To",
        b"References",
        b"Reply-To",
        b"MIME-Version",
        b"Auto-Submitted",
        b"Content-Type",
    ]


def test_wire_format_crlf_and_line_length() -> None:
    long_word = "x" * 5000
    draft = make_draft(
        html=f"<p>{long_word}</p><p>{'日本語' * 800}</p>",
        to=[Addr(f"Customer {i} Ñandú", f"c{i}@customer.test") for i in range(40)],
        attachments=[Attachment("é" * 300 + ".bin", "application/octet-stream", BINARY * 20)],
    )
    thread = make_thread(
        subject="Ação " * 200 + long_word,
        references=[f"<{'r' * 200}{i}@customer.test>" for i in range(30)],
    )
    raw = compose(draft, thread)
    assert_wire_format(raw)
    msg = parse(raw)
    assert long_word in body(subparts(subparts(msg)[0])[0])
    assert len(msg["To"].addresses) == 40


# ---------------------------------------------------------------- references


def test_references_trimmed_with_30_ancestors() -> None:
    chain = [f"<m{i}@customer.test>" for i in range(30)]
    parent, ancestors = chain[-1], chain[:-1]
    in_reply_to, refs = build_references(parent, ancestors)
    assert in_reply_to == [parent]
    assert len(refs) == 20
    assert refs[0] == chain[0]
    assert refs[1:] == chain[-19:]
    assert refs[-1] == parent

    thread = make_thread(last_message_id=parent, references=ancestors)
    msg = parse(compose(make_draft(), thread))
    assert str(msg["References"]).split() == refs
    assert str(msg["In-Reply-To"]) == parent


def test_references_dedup_parent_last_and_small_limits() -> None:
    chain = ["<a@x.test>", "<p@x.test>", "<a@x.test>", "<b@x.test>"]
    _, refs = build_references("<p@x.test>", chain)
    assert refs == ["<a@x.test>", "<b@x.test>", "<p@x.test>"]
    assert build_references("<p@x.test>", ["<a@x.test>", "<b@x.test>"], limit=2)[1] == [
        "<a@x.test>",
        "<p@x.test>",
    ]
    assert build_references("<p@x.test>", ["<a@x.test>"], limit=1)[1] == ["<p@x.test>"]
    assert build_references(None, ["<a@x.test>"]) == ([], [])
    with pytest.raises(ValueError):
        build_references("<p@x.test>", [], limit=0)


def test_references_drop_malformed_ancestors() -> None:
    odd = ["no-brackets@x.test", "<a b@x.test>", "<=?utf-8?q?x?=@x.test>", "<ok@x.test>"]
    _, refs = build_references("<p@x.test>", odd)
    assert refs == ["<ok@x.test>", "<p@x.test>"]


@pytest.mark.parametrize("bad", ["<a@x.test>\r\nBcc: v@evil.test", "<a@x.test>\n", "<a\x00@x>"])
def test_references_refuse_line_breaks(bad: str) -> None:
    with pytest.raises(HeaderInjection):
        build_references("<p@x.test>", [bad])
    with pytest.raises(HeaderInjection):
        build_references(bad, [])


# ------------------------------------------------------------------- subjects


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("Re: Re: Hi", "Re: Hi [#12]"),
        ("RE: [#12] Hi", "Re: [#12] Hi"),
        ("AW: Hi", "Re: Hi [#12]"),
        ("Hi [#12]", "Re: Hi [#12]"),
        ("Hi", "Re: Hi [#12]"),
        ("Sv: Fwd: Hi", "Re: Hi [#12]"),
        ("Re[2]: re:Hi", "Re: Hi [#12]"),
        ("[#12] Re: Hi [#12]", "Re: [#12] Hi"),
        ("Re:   Hi   [#12]  [#12]", "Re: Hi [#12]"),
        # Another conversation's tag of ours (a customer answered the wrong mail) is dropped:
        # one number per subject, this one's (found by a trial).
        ("Hi [#123]", "Re: Hi [#12]"),
        ("Re: Re: Earlier [#1]", "Re: Earlier [#12]"),
        # A gateway's marker first keeps its place; the prefix behind it goes (found by a trial).
        ("[EXT] Re: tagged", "Re: [EXT] tagged [#12]"),
        ("Re: [External] RE: AW: Offer [#12]", "Re: [External] Offer [#12]"),
        ("[acme] Weekly news", "Re: [acme] Weekly news [#12]"),
        ("Rebate: 10%", "Re: Rebate: 10% [#12]"),
        ("", "Re: [#12]"),
    ],
)
def test_reply_subject(subject: str, expected: str) -> None:
    result = reply_subject(subject, "12")
    assert result == expected
    assert result.count("[#12]") == 1
    assert re.match(r"(?i)^re:", result[4:]) is None
    assert reply_subject(result, "12") == result  # idempotent


@pytest.mark.parametrize("token", ["", "12 ]", "[#1]", "a\r\nb"])
def test_reply_subject_rejects_bad_token(token: str) -> None:
    with pytest.raises(ValueError):
        reply_subject("Hi", token)


# ---------------------------------------------------------- header injection

INJECTIONS = ["x\r\nBcc: victim@evil.test", "x\nBcc: victim@evil.test", "x\rBcc: a@b.test", "x\x00"]


@pytest.mark.parametrize("evil", INJECTIONS)
@pytest.mark.parametrize(
    "where",
    ["to_name", "from_name", "cc_address", "to_address", "reply_to_name", "subject", "message_id",
     "parent_id", "reference", "filename", "content_id", "token"],
)  # fmt: skip
def test_header_injection_refused(where: str, evil: str) -> None:
    draft, thread = make_draft(), make_thread()
    if where == "to_name":
        draft.to = [Addr(evil, "zoe@customer.test")]
    elif where == "from_name":
        draft.mailbox = Addr(evil, "support@chatflow.test")
    elif where == "cc_address":
        draft.cc = [Addr("", f"cc@customer.test{evil}")]
    elif where == "to_address":
        draft.to = [Addr("Zoë", f"{evil}@customer.test")]
    elif where == "reply_to_name":
        draft.reply_to = Addr(evil, "support@chatflow.test")
    elif where == "subject":
        thread.subject = evil
    elif where == "message_id":
        draft.message_id = f"<a{evil}@chatflow.test>"
    elif where == "parent_id":
        thread.last_message_id = f"<p{evil}@customer.test>"
    elif where == "reference":
        thread.references = [f"<r{evil}@customer.test>"]
    elif where == "filename":
        draft.attachments = [Attachment(f"a{evil}.pdf", "application/pdf", b"%PDF")]
    elif where == "content_id":
        draft.attachments = [Attachment("a.png", "image/png", PNG, content_id=f"c{evil}@x")]
    elif where == "token":
        thread.token = f"12{evil}"
    with pytest.raises(HeaderInjection):
        compose(draft, thread)


ENCODED_NEWLINE = "=?UTF-8?Q?hi=0ABcc:_x@y.test?="


def _assert_no_smuggled_headers(raw: bytes) -> EmailMessage:
    assert_wire_format(raw)
    msg = parse(raw)
    assert "Bcc" not in msg
    assert "Cc" not in msg
    for line in header_block(raw):
        assert not line.lower().startswith((b"bcc:", b"cc:"))
    for name, value in msg.items():
        assert "\n" not in str(value) and "\r" not in str(value), name
    return msg


def test_encoded_word_newline_in_subject_is_neutralized() -> None:
    raw = compose(make_draft(), make_thread(subject=ENCODED_NEWLINE))
    msg = _assert_no_smuggled_headers(raw)
    assert str(msg["Subject"]) == "Re: hi Bcc: x@y.test [#1042]"
    assert reply_subject(ENCODED_NEWLINE, "1042") == str(msg["Subject"])


def test_double_encoded_newline_in_subject_is_neutralized() -> None:
    # decodes to ENCODED_NEWLINE, which decodes to a newline
    double = "=?utf-8?q?=3D=3FUTF-8=3FQ=3Fhi=3D0ABcc=3A=5Fx=40y=2Etest=3F=3D?="
    raw = compose(make_draft(), make_thread(subject=double, last_message_id=None))
    msg = _assert_no_smuggled_headers(raw)
    assert str(msg["Subject"]) == "hi Bcc: x@y.test [#1042]"


def test_encoded_word_newline_in_display_name_and_filename() -> None:
    draft = make_draft(
        to=[Addr(ENCODED_NEWLINE, "zoe@customer.test")],
        mailbox=Addr(f"Support {ENCODED_NEWLINE}", "support@chatflow.test"),
        attachments=[Attachment(ENCODED_NEWLINE, "application/pdf", b"%PDF")],
    )
    msg = _assert_no_smuggled_headers(compose(draft, make_thread()))
    assert msg["To"].addresses[0].display_name == "hi Bcc: x@y.test"
    assert msg["To"].addresses[0].addr_spec == "zoe@customer.test"
    assert subparts(msg)[1].get_filename() == "hi Bcc: x@y.test"


def test_encoded_word_in_address_or_id_refused() -> None:
    with pytest.raises(InvalidDraft):
        compose(make_draft(to=[Addr("", "=?utf-8?q?a=0A?=@customer.test")]), make_thread())
    with pytest.raises(InvalidDraft):
        compose(make_draft(message_id="<=?utf-8?q?a=0Ab?=@chatflow.test>"), make_thread())


# ------------------------------------------------------------ invalid drafts


def test_no_recipients() -> None:
    with pytest.raises(InvalidDraft, match="recipient"):
        compose(make_draft(to=[]), make_thread())
    with pytest.raises(InvalidDraft):
        compose(make_draft(to=[], cc=[Addr("", "cc@customer.test")]), make_thread())


@pytest.mark.parametrize(
    "address",
    ["", "plainaddress", "a@", "@customer.test", "a b@customer.test", "a@localhost",
     "a@-bad.test", "a@bad_.test", "a..b@customer.test", ".a@customer.test",
     "Zoë <zoe@customer.test>", "jösé@customer.test", "a@b@customer.test", "a@[127.0.0.1]",
     "a@customer.123", "x" * 65 + "@customer.test"],
)  # fmt: skip
def test_bad_address_syntax(address: str) -> None:
    with pytest.raises(InvalidDraft):
        compose(make_draft(to=[Addr("Zoë", address)]), make_thread())


@pytest.mark.parametrize(
    "changes",
    [
        {"message_id": "no-brackets@chatflow.test"},
        {"message_id": "<no-at-sign>"},
        {"message_id": "<a b@chatflow.test>"},
        {"message_id": "<" + "a" * 300 + "@chatflow.test>"},
        {"date": datetime(2024, 5, 17, 9, 30)},  # naive
        {"attachments": [Attachment("a", "application", b"")]},
        {"attachments": [Attachment("a", "text/plain; charset=utf-8", b"")]},
        {"attachments": [Attachment("a", "multipart/mixed", b"")]},
        {"attachments": [Attachment("", "application/pdf", b"")]},
        {"attachments": [Attachment("a.png", "image/png", b"", "x@y"),
                         Attachment("b.png", "image/png", b"", "<x@y>")]},
        {"to": [Addr("Zoë", "zoe\x07@customer.test")]},
        {"to": [Addr("Zoë", "zoe@customer.test\x7f")]},
    ],
)  # fmt: skip
def test_invalid_drafts(changes: dict[str, object]) -> None:
    with pytest.raises(InvalidDraft):
        compose(make_draft(**changes), make_thread())


@pytest.mark.parametrize("brk", ["\x85", "\u2028", "\u2029", "\x0b", "\x0c", "\x1e"])
def test_unicode_line_breaks_in_structural_values_refused(brk: str) -> None:
    with pytest.raises(HeaderInjection):
        compose(make_draft(to=[Addr("", f"zoe@customer.test{brk}")]), make_thread())
    with pytest.raises(HeaderInjection):
        compose(make_draft(message_id=f"<a{brk}@chatflow.test>"), make_thread())
    with pytest.raises(HeaderInjection):
        compose(make_draft(), make_thread(token=f"1{brk}"))


def test_other_controls_in_free_text_become_spaces() -> None:
    # e.g. cp1252 "…" mis-decoded as latin-1 U+0085: the thread must stay repliable
    draft = make_draft(to=[Addr("Zoë\x07\tÑandú\u2028x", "zoe@customer.test")])
    raw = compose(draft, make_thread(subject="Olá\x85 tudo\x1b bem\u2029?"))
    msg = _assert_no_smuggled_headers(raw)
    assert str(msg["Subject"]) == "Re: Olá tudo bem ? [#1042]"
    assert rfc2047_display_name(raw_header(raw, "To"), "zoe@customer.test") == "Zoë Ñandú x"


def test_invalid_parent_id() -> None:
    with pytest.raises(InvalidDraft):
        compose(make_draft(), make_thread(last_message_id="parent@customer.test"))


def test_date_in_other_timezone_is_kept() -> None:
    msg = parse(compose(make_draft(date=DATE.astimezone(UTC)), make_thread()))
    assert msg["Date"].datetime == DATE


# ------------------------------------------------------------------ sanitize


@pytest.mark.parametrize(
    "evil",
    [
        "<script>alert(1)</script>",
        '<img src="x" onerror="alert(1)">',
        '<a href="javascript:alert(1)">x</a>',
        '<a href="JaVaScRiPt:alert(1)">x</a>',
        '<a href=" jav&#x61;script:alert(1)">x</a>',
        '<a href="java\tscript:alert(1)">x</a>',
        '<a href="data:text/html,<script>alert(1)</script>">x</a>',
        '<p onclick="alert(1)" onmouseover="alert(1)">x</p>',
        '<iframe src="https://evil.test"></iframe>',
        "<style>p{background:url(javascript:alert(1))}</style>",
        "<svg><script>alert(1)</script></svg>",
        '<img src="data:image/svg+xml;base64,PHN2Zz48c2NyaXB0PmFsZXJ0KDEpPC9zY3JpcHQ+PC9zdmc+">',
        '<form action="https://evil.test"><input name="alert"></form>',
    ],
)
def test_sanitize_strips_active_content(evil: str) -> None:
    out = sanitize(f"<p>before</p>{evil}<p>after</p>").lower()
    assert "<p>before</p>" in out and "<p>after</p>" in out
    for needle in ("script", "alert", "javascript", " on", "iframe", "svg", "<form", "<input"):
        assert needle not in out


def test_sanitize_keeps_email_formatting() -> None:
    html = (
        "<h2>T</h2><p><b>b</b><i>i</i><u>u</u><strong>s</strong><em>e</em><br>"
        "<span>s</span><code>c</code></p><div><pre>p</pre></div><blockquote>q</blockquote>"
        "<ol><li>1</li></ol><ul><li>2</li></ul>"
        '<table><tr><th colspan="2">h</th></tr><tr><td>a</td><td rowspan="1">b</td></tr></table>'
        '<a href="https://x.test/?a=1&amp;b=2">l</a><a href="mailto:a@x.test">m</a>'
        '<img src="cid:logo@x" alt="logo" width="10" height="20">'
        '<img src="data:image/png;base64,iVBORw0KGgo=" alt="d">'
    )
    out = sanitize(html)
    for kept in ("<h2>", "<b>", "<i>", "<u>", "<strong>", "<em>", "<br>", "<span>", "<code>",
                 "<div>", "<pre>", "<blockquote>", "<ol>", "<ul>", "<li>", "<table>", "<td>",
                 '<th colspan="2">', 'rowspan="1"', 'href="https://x.test/?a=1&amp;b=2"',
                 'href="mailto:a@x.test"', 'src="cid:logo@x"', 'width="10"',
                 'src="data:image/png;base64,iVBORw0KGgo="'):  # fmt: skip
        assert kept in out, kept


def test_sanitize_drops_remote_images_and_odd_sizes() -> None:
    out = sanitize('<img src="https://tracker.test/p.gif" width="1px" alt="t"><a href="/rel">r</a>')
    assert "tracker" not in out and "width" not in out and "/rel" not in out


# -------------------------------------------------------------- html_to_text


@pytest.mark.parametrize(
    ("html", "text"),
    [
        ("<p>one</p><p>two</p>", "one\n\ntwo"),
        ("a<br>b<br/><br>c", "a\nb\n\nc"),
        ("<div>a</div><div>b</div>", "a\nb"),
        ("<p>  lots   of\n  space </p>", "lots of space"),
        ("<ul><li>x</li><li>y</li></ul>", "- x\n- y"),
        ("<ol><li>x</li><li>y</li></ol>", "1. x\n2. y"),
        ("<ul><li>x<ul><li>x1</li></ul></li><li>y</li></ul>", "- x\n  - x1\n- y"),
        ('<a href="https://x.test/a">the docs</a>', "the docs <https://x.test/a>"),
        ('<a href="https://x.test/">https://x.test/</a>', "https://x.test/"),
        ('<a href="mailto:a@x.test">a@x.test</a>', "a@x.test"),
        ("<p>hi</p><blockquote><p>old</p><p>older</p></blockquote>", "hi\n\n> old\n>\n> older"),
        ("<blockquote>a<blockquote>b</blockquote></blockquote>", "> a\n>\n> > b"),
        ("<p>&amp; &lt;b&gt; &eacute; &#8212; &#x41;&nbsp;x</p>", "& <b> é — A x"),
        ("<p>a&nbsp;&nbsp;b</p>", "a  b"),  # nbsp does not collapse
        ("<pre>  code\n    indented</pre>", "  code\n    indented"),
        ("<p>a</p><script>var x = '<p>';</script><style>p{}</style><p>b</p>", "a\n\nb"),
        ("<h1>Title</h1>text", "Title\n\ntext"),
        ("<table><tr><td>a</td><td>b</td></tr><tr><td>c</td><td>d</td></tr></table>",
         "a | b\nc | d"),
        ('<p><img src="cid:x" alt="logo"> hi</p>', "[logo] hi"),
        ("", ""),
    ],
)  # fmt: skip
def test_html_to_text(html: str, text: str) -> None:
    assert html_to_text(html) == text


# ------------------------------------------------------------------ property

PRINTABLE = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=80
)
ANYTHING = st.text(max_size=60)
PROPERTY_SETTINGS = settings(
    max_examples=int(os.environ.get("COMPOSE_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _normalized(text: str) -> str:
    """The documented normalization of free header text: controls → space, runs collapsed."""
    return " ".join(re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", " ", text).split())


def _roundtrip(name: str, subject: str, replying: bool) -> None:
    draft = make_draft(to=[Addr(name, "zoe@customer.test")], mailbox=Addr(name, "s@chatflow.test"))
    thread = make_thread(subject=subject, last_message_id="<p@x.test>" if replying else None)
    raw = compose(draft, thread)
    assert_wire_format(raw)
    msg = parse(raw)
    want = _normalized(name)
    assert rfc2047_display_name(raw_header(raw, "To"), "zoe@customer.test") == want
    assert rfc2047_display_name(raw_header(raw, "From"), "s@chatflow.test") == want
    assert [a.addr_spec for a in msg["To"].addresses] == ["zoe@customer.test"]
    assert msg["To"].addresses[0].display_name.replace(" ", "") == want.replace(" ", "")
    got = str(msg["Subject"])
    assert got.count("[#1042]") == 1
    if replying:
        assert got == reply_subject(subject, "1042")
        assert got.startswith("Re: ") and not re.match(r"(?i)re:", got[4:])
    else:
        assert got == _normalized(f"{subject} [#1042]")
    assert {k.lower() for k in msg} <= {
        "from", "to", "subject", "date", "message-id", "in-reply-to", "references",
        "reply-to", "mime-version", "content-type",
    }  # fmt: skip


@PROPERTY_SETTINGS
@given(name=PRINTABLE, subject=PRINTABLE, replying=st.booleans())
def test_property_printable_unicode_round_trips(name: str, subject: str, replying: bool) -> None:
    _roundtrip(name, subject, replying)


@PROPERTY_SETTINGS
@given(name=ANYTHING, subject=ANYTHING, replying=st.booleans())
def test_property_anything_round_trips_or_is_refused(
    name: str, subject: str, replying: bool
) -> None:
    try:
        _roundtrip(name, subject, replying)
    except (HeaderInjection, InvalidDraft):
        pass


# ---- the hand-written alternative is the stdlib's, byte for byte ---------------------------

BOUNDARY_RE = re.compile(rb'boundary="(=+\d+==)"')


@pytest.mark.parametrize(
    "html",
    [
        HTML,
        "<p>plain ascii</p>",
        "<p>" + "long line " * 40 + "</p>",
        "<p>trailing space </p>\n<p>tab\t</p>",
        "<pre>From the start\n.dot line\n..two\n=equals= 3=D\n</pre>",
        "<p>Ação — 日本語 " + "ç" * 200 + "</p>",
        "<p>\r\nmixed\rline\nends\r\n</p>",
        "",
    ],
)
@pytest.mark.parametrize("auto", [False, True])
def test_alternative_written_by_hand_equals_the_stdlib(html: str, auto: bool) -> None:
    """Replies without files skip EmailMessage (compose.py, "the common case"): the bytes must
    be exactly what the stdlib path writes for the same values, boundary aside."""
    from services.sender.domain import compose as c

    draft = make_draft(html=html, auto_generated=auto, cc=[Addr("Ç", "cc@customer.test")])
    raw = compose(draft, make_thread())
    clean = sanitize(html)
    stdlib = c._build(_intended_headers(draft, make_thread()), clean, html_to_text(clean), [])
    ours, theirs = BOUNDARY_RE.search(raw), BOUNDARY_RE.search(stdlib)
    assert ours is not None and theirs is not None
    assert stdlib.replace(theirs.group(1), ours.group(1)) == raw


def _intended_headers(draft: Draft, thread: ThreadContext) -> list[tuple[str, object]]:
    from email.headerregistry import Address as StdAddress

    def addr(a: Addr) -> StdAddress:
        local, _, domain = a.address.rpartition("@")
        return StdAddress(display_name=a.name, username=local, domain=domain)

    irt, refs = build_references(thread.last_message_id, thread.references)
    headers: list[tuple[str, object]] = [
        ("From", [addr(draft.mailbox)]),
        ("To", [addr(a) for a in draft.to]),
    ]
    if draft.cc:
        headers.append(("Cc", [addr(a) for a in draft.cc]))
    headers += [
        ("Subject", reply_subject(thread.subject, thread.token)),
        ("Date", format_datetime(draft.date)),
        ("Message-ID", draft.message_id),
        ("In-Reply-To", " ".join(irt)),
        ("References", " ".join(refs)),
    ]
    if draft.reply_to is not None:
        headers.append(("Reply-To", [addr(draft.reply_to)]))
    headers.append(("MIME-Version", "1.0"))
    if draft.auto_generated:
        headers.append(("Auto-Submitted", "auto-generated"))
    return headers


def test_the_header_checks_refuse_exactly_the_characters_of_their_sets() -> None:
    """``_reject_raw`` searches with one regular expression per set, not a loop per character."""
    from services.sender.domain import compose as c

    for ch in map(chr, range(0x10000)):
        assert bool(c._INJECTION_RE.search(ch)) == (ch in c._INJECTION), repr(ch)
        assert bool(c._OTHER_BREAKS_RE.search(ch)) == (ch in c._OTHER_BREAKS), repr(ch)
