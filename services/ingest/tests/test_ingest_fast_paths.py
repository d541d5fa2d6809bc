"""The reader's fast paths (measured hot spots of ingest) must read exactly what the slow ones do.

``_simple_addresses`` skips headerregistry for plain addresses; ``_MemoHeaders`` shares parsed
MIME fields. Both are held here to the stock behaviour on generated inputs, near misses included.
"""

from __future__ import annotations

from email import policy
from email.headerregistry import HeaderRegistry
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.ingest.domain import mime_reader
from services.ingest.domain.mime_reader import _MemoHeaders, _simple_addresses, parse_address_list

ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
# Characters that must send a value to the full parser somewhere: quotes, comments, dots in a
# name, whitespace runs, tabs, brackets, colons (groups), non-ASCII, encoded-word starts.
NEAR_MISS = ' \t."()[]:;<>@,\\=?é'

atom = st.text(ATEXT, min_size=1, max_size=6)
label = st.text("abcXYZ019-", min_size=1, max_size=6)
local = st.lists(atom, min_size=1, max_size=3).map(".".join)
domain = st.lists(label, min_size=1, max_size=3).map(".".join)
name = st.lists(atom, min_size=1, max_size=3).map(" ".join)


@st.composite
def address(draw: st.DrawFn) -> str:
    spec = f"{draw(local)}@{draw(domain)}"
    form = draw(st.sampled_from(["bare", "angle", "named"]))
    if form == "bare":
        return spec
    if form == "angle":
        return f"<{spec}>"
    return f"{draw(name)} <{spec}>"


@st.composite
def address_list(draw: st.DrawFn) -> str:
    value = ", ".join(draw(st.lists(address(), min_size=1, max_size=3)))
    for _ in range(draw(st.integers(0, 2))):  # mutate: the fast path must refuse or agree
        at = draw(st.integers(0, len(value)))
        value = value[:at] + draw(st.sampled_from(NEAR_MISS)) + value[at:]
    return value


def stock(value: str) -> list[tuple[str, str, str]] | None:
    try:
        header = policy.default.header_factory("to", value)
        return [(a.display_name, a.username, a.domain) for a in header.addresses]
    except Exception:
        return None


@settings(max_examples=600, deadline=None)
@given(address_list())
def test_simple_address_fast_path_agrees_with_headerregistry(value: str) -> None:
    fast = _simple_addresses(value)
    if fast is not None:
        assert fast == stock(value)


@settings(max_examples=300, deadline=None)
@given(address_list())
def test_parse_address_list_is_the_same_with_and_without_the_fast_path(value: str) -> None:
    notes_fast: list[str] = []
    fast = parse_address_list(value, (), notes_fast)
    original = mime_reader._simple_addresses
    mime_reader._simple_addresses = lambda v: None
    try:
        notes_slow: list[str] = []
        slow = parse_address_list(value, (), notes_slow)
    finally:
        mime_reader._simple_addresses = original
    assert fast == slow
    assert notes_fast == notes_slow


@pytest.mark.parametrize(
    "value",
    [
        "Customer 12 <customer12@load.test>",
        "zoe@customer.test",
        "<zoe@customer.test>",
        "a@b.test, Zoe Q <z@c.test>",
        "O'Brien <ob@x.test>",
    ],
)
def test_plain_addresses_take_the_fast_path(value: str) -> None:
    assert _simple_addresses(value) == stock(value)


@pytest.mark.parametrize(
    "value",
    [
        '"Customer, Zoe" <z@c.test>',
        "=?utf-8?q?Zo=C3=AB?= <z@c.test>",
        "John Q. Public <jqp@x.test>",
        "a@b.test.",
        "z@[127.0.0.1]",
        "Team: a@b.test, c@d.test;",
        "zoé@c.test",
        "a@b.test,",
        "Zoe  Two  Spaces <z@c.test>",
    ],
)
def test_anything_else_takes_the_full_parser(value: str) -> None:
    assert _simple_addresses(value) is None


MIME_VALUES = [
    'text/plain; charset="utf-8"',
    "multipart/mixed; boundary=abc",
    "text/html; charset=iso-8859-1; format=flowed",
    "garbage",
    "",
    "attachment; filename*=UTF-8''%E2%82%AC.txt",
    "text/plain; charset=" + "x" * 300,
]


@pytest.mark.parametrize("value", MIME_VALUES)
@pytest.mark.parametrize("field", ["Content-Type", "Content-Disposition", "Subject", "To"])
def test_memo_headers_parse_like_the_stock_registry(field: str, value: str) -> None:
    memo, plain = _MemoHeaders(), HeaderRegistry()
    for _ in range(2):  # the second call is served from the memo where it applies
        got, want = memo(field, value), plain(field, value)
        assert type(got).__mro__[1:] == type(want).__mro__[1:]
        assert (str(got), got.name) == (str(want), want.name)
        assert [repr(d) for d in got.defects] == [repr(d) for d in want.defects]
        if hasattr(want, "content_type"):
            assert (got.content_type, dict(got.params)) == (want.content_type, dict(want.params))


def test_memo_headers_stay_bounded() -> None:
    memo = _MemoHeaders()
    for i in range(10 * memo.MAX_ENTRIES):
        memo("Content-Type", f"multipart/mixed; boundary=b{i}")
        memo("To", f"u{i}@x.test")  # never kept: address fields are not memoized
    assert len(memo._parsed) <= memo.MAX_ENTRIES
    memo("Content-Type", "text/plain; charset=" + "x" * (memo.MAX_VALUE + 1))
    assert all(len(v) <= memo.MAX_VALUE for _, v in memo._parsed)


@st.composite
def smtp_path_arg(draw: st.DrawFn) -> str:
    value = f"<{draw(local)}@{draw(domain)}>"
    value += draw(st.sampled_from(["", " SIZE=1000", "  BODY=8BITMIME SMTPUTF8", "\tSIZE=5", "x"]))
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(value)))
        value = value[:at] + draw(st.sampled_from(NEAR_MISS)) + value[at:]
    return value


def _smtp_pair() -> tuple[Any, Any]:
    from aiosmtpd.smtp import SMTP

    from services.ingest.smtp import IngestSMTP

    ours = object.__new__(IngestSMTP)  # _getaddr reads only the class's local_part_limit
    return ours, SMTP._getaddr


@settings(max_examples=600, deadline=None)
@given(smtp_path_arg())
def test_smtp_path_fast_path_agrees_with_aiosmtpd(arg: str) -> None:
    ours, theirs = _smtp_pair()

    def outcome(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:  # aiosmtpd's parser itself raises on some garbage
            return type(exc)

    assert outcome(ours._getaddr, arg) == outcome(theirs, ours, arg)


@pytest.mark.parametrize(
    "arg",
    ["<zoe@customer.test>", "<zoe@customer.test> SIZE=5000", "<a.b@c.test>\tBODY=8BITMIME"],
)
def test_plain_smtp_paths_take_the_fast_path(arg: str) -> None:
    from services.ingest.smtp import _PLAIN_PATH

    ours, theirs = _smtp_pair()
    assert _PLAIN_PATH.fullmatch(arg) is not None
    assert ours._getaddr(arg) == theirs(ours, arg)
