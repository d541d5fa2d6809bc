"""The one rule for addresses we send to, shared by the REST API and the sender's composer."""

from __future__ import annotations

import pytest

from libs.common.addresses import AddressError, check_address


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("ana@acme.test", ("ana", "acme.test")),
        (" ana@acme.test ", ("ana", "acme.test")),
        ("o'brien+tag@acme.test", ("o'brien+tag", "acme.test")),
        ("zoe@exämple.test", ("zoe", "xn--exmple-cua.test")),
    ],
)
def test_sendable_addresses(spec: str, expected: tuple[str, str]) -> None:
    assert check_address(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "nobody",
        "@acme.test",
        "ana@",
        "a,victim@evil.test",
        "(c)x@example.com",
        '"q"@example.com',
        "x@[127.0.0.1]",
        "x@-evil.test",
        "x@localhost",
        "x@example.123",
        "jösé@exämple.test",
        "=?utf-8?q?x?=@acme.test",
        f"{'a' * 65}@acme.test",
        "a..b@acme.test",
    ],
)
def test_addresses_we_cannot_send_to(spec: str) -> None:
    with pytest.raises(AddressError):
        check_address(spec)
