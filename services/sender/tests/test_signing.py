"""DKIM keys and signatures: both RSA backends give the same bytes, and dkimpy verifies them."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from unittest import mock

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.sender import signing
from services.sender.settings import DkimKeySetting
from services.sender.signing import DkimKeyError, Signer, load_keys
from services.sender.tests.conftest import DkimKey

MESSAGE = (
    b"From: Support <support@chatflow.test>\r\nTo: zoe@customer.test\r\n"
    b"Subject: Re: Where is my order? [#1042]\r\nDate: Fri, 17 May 2024 09:30:00 -0300\r\n"
    b"Message-ID: <a1.1042@chatflow.test>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\nIt ships today.  \r\n\r\n\r\n"
)


def test_openssl_and_dkimpy_rsa_give_the_same_signature(dkim_key: DkimKey) -> None:
    keys = load_keys(dkim_key.folder, {})
    with mock.patch("time.time", return_value=1_715_949_000):
        fast, d1 = Signer(keys, "openssl").sign(MESSAGE, "chatflow.test")
        slow, d2 = Signer(keys, "dkimpy").sign(MESSAGE, "chatflow.test")
    assert fast == slow and d1 == d2 == "chatflow.test"
    assert dkim.verify(fast, dnsfunc=dkim_key.dns)
    # relaxed/relaxed: a relay refolding a header or trimming trailing blanks keeps it valid
    refolded = fast.replace(b"Subject: Re: Where", b"Subject:  Re:\r\n Where")
    assert dkim.verify(refolded, dnsfunc=dkim_key.dns)


def test_subdomains_use_the_nearest_parent_key_and_others_pass_unsigned(dkim_key: DkimKey) -> None:
    signer = Signer(load_keys(dkim_key.folder, {}))
    assert signer.key_for("eu.chatflow.test") is not None
    assert signer.key_for("chatflow.test.evil.test") is None
    assert signer.key_for("test") is None
    assert signer.sign(MESSAGE, "other.test") == (MESSAGE, None)


def test_keys_from_the_setting_win_and_pkcs8_is_accepted(tmp_path: Path, dkim_key: DkimKey) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "k.pem").write_bytes(pkcs8)
    keys = load_keys(
        dkim_key.folder,
        {
            "chatflow.test": DkimKeySetting(selector="env1", key_file=tmp_path / "k.pem"),
            "other.test": DkimKeySetting(selector="s1", key=dkim_key.pem.decode()),
        },
    )
    assert keys["chatflow.test"].selector == "env1"
    assert keys["chatflow.test"].pem.startswith(b"-----BEGIN RSA " + b"PRIVATE KEY-----")  # PKCS#1
    assert keys["other.test"].selector == "s1"


@pytest.mark.parametrize(
    ("name", "content", "error"),
    [
        ("chatflow.test.s1.key", b"not a key", "not a PEM private key"),
        ("nodots.key", None, "name must be <domain>.<selector>.key"),
        ("chatflow.test.s1.key", "ec", "only RSA keys"),
    ],
)
def test_unusable_keys_stop_the_service(
    tmp_path: Path, name: str, content: object, error: str
) -> None:
    if content == "ec":
        data = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    else:
        data = content if isinstance(content, bytes) else b"x"
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DkimKeyError, match=error):
        load_keys(tmp_path, {})


_PIECES = [b"a", b"Subject", b":", b" ", b"  ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n ", b"From x"]


def _random_inputs(n: int) -> list[bytes]:
    rng = random.Random(6)
    out = [b"", b"\r\n", b"\r\n\r\n", b"A: b\r\n\r\n", b"\r\nA: b\r\n\r\nbody", MESSAGE]
    out += [b"".join(rng.choices(_PIECES, k=rng.randint(1, 40))) for _ in range(n)]
    # well-formed messages, the fast path's usual case
    out += [b"A: b\r\n c\r\nB:\td \r\n\r\n" + x for x in out[6:]]
    return out


@pytest.mark.parametrize(
    "name",
    ["strip_trailing_whitespace", "compress_whitespace", "unfold_header_value", "rfc822_parse"],
)
def test_the_fast_canonicalization_gives_what_dkimpy_gives_for_any_input(name: str) -> None:
    fast, original = getattr(signing, name), signing.ORIGINALS[name]
    assert fast is not original
    for data in _random_inputs(3000):
        try:
            expected: object = original(data)
        except Exception as exc:  # a malformed input must fail the same way
            expected = (type(exc), exc.args)
        try:
            got: object = fast(data)
        except Exception as exc:
            got = (type(exc), exc.args)
        assert got == expected, data


def test_signatures_are_the_same_as_with_dkimpy_s_own_canonicalization(dkim_key: DkimKey) -> None:
    keys = load_keys(dkim_key.folder, {})
    message = MESSAGE.replace(b"It ships", b"It\tships  today\r\n\r\nand  more \t\r\n")
    with mock.patch("time.time", return_value=1_715_949_000):
        fast = [Signer(keys).sign(m, "chatflow.test")[0] for m in (MESSAGE, message)]
        with contextlib.ExitStack() as stack:
            for name, original in signing.ORIGINALS.items():
                where = dkim if name == "rfc822_parse" else dkim.canonicalization
                stack.enter_context(mock.patch.object(where, name, original))
            slow = [Signer(keys).sign(m, "chatflow.test")[0] for m in (MESSAGE, message)]
    assert fast == slow
    assert all(dkim.verify(m, dnsfunc=dkim_key.dns) for m in fast)


def test_the_header_parse_of_the_fast_signature_is_dkimpy_s_where_it_applies() -> None:
    original = signing.ORIGINALS["rfc822_parse"]
    taken = 0
    for data in [*_random_inputs(3000), b"A: b\r\n\tc\r\nFrom x: y\r\n\r\nbody", b"::x\r\n\r\n"]:
        got = signing._header_fields(data)
        if got is not None:
            taken += 1
            assert list(got) == list(original(data)), data
    assert taken > 500  # most of the well-formed half


def test_the_fast_signature_is_dkimpy_s_byte_for_byte(dkim_key: DkimKey) -> None:
    """``Signer.sign``'s own signing (OpenSSL, no dkimpy object) and dkimpy's, for messages
    as we compose them and for the awkward ones; the rest fall back to dkimpy."""
    keys = load_keys(dkim_key.folder, {})
    signer = Signer(keys)
    k = keys["chatflow.test"]
    rng = random.Random(7)
    words = [b"a", b"Re:", b" ", b"  ", b"\t", b"\xc3\xa9", b"x" * 80, b";", b"=?UTF-8?Q?a?="]
    messages = [MESSAGE, MESSAGE.replace(b"It ships", b"It\tships  today\r\n\r\nand  more \t\r\n")]
    for _ in range(200):
        extra = b"".join(rng.choices(words, k=rng.randint(1, 30)))
        fold = b"\r\n " if rng.random() < 0.5 else b" "
        messages.append(
            MESSAGE.replace(b"Subject: Re:", b"Subject: Re:" + extra + fold + b"x")
            .replace(b"To: zoe", b"X-Other: 1\r\nTo: zoe" if rng.random() < 0.3 else b"To: zoe")
            .replace(b"It ships", extra + b"\r\n\r\n" + extra)
        )
    with mock.patch("time.time", return_value=1_715_949_000):
        for m in messages:
            fast = signing._sign_openssl(m, k, signer._openssl["chatflow.test"])
            d = signing._OpenSSLDKIM(m, linesep=b"\r\n")
            d.openssl_key = signer._openssl["chatflow.test"]
            d.add_frozen(signing._OVERSIGN)
            slow = d.sign(
                k.selector.encode(), k.domain.encode(), k.pem, canonicalize=(b"relaxed", b"relaxed")
            )
            assert fast == bytes(slow), m
        assert signing._sign_openssl(b"A: b\nbare LF\r\n\r\n", k, signer._openssl[k.domain]) is None
        assert signing._sign_openssl(b"To: x\r\n\r\nno From", k, signer._openssl[k.domain]) is None
        bare = b"From: a@chatflow.test\nTo: b@x.test\n\nbody\n"
        signed, domain = signer.sign(bare, "chatflow.test")  # dkimpy's path, still signed
    assert domain == "chatflow.test" and dkim.verify(signed, dnsfunc=dkim_key.dns)
    assert all(
        dkim.verify(signer.sign(m, "chatflow.test")[0], dnsfunc=dkim_key.dns) for m in messages
    )
