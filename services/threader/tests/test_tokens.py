from services.threader.domain import tokens

SECRET = b"s" * 32


def test_a_signed_token_verifies_and_a_forged_one_does_not() -> None:
    tok = tokens.sign(1042, SECRET)
    number, mac = tok.split("-")
    assert tokens.verify(number, mac, SECRET) == 1042
    assert tokens.verify("1043", mac, SECRET) is None
    assert tokens.verify(number, mac, b"other secret") is None


def test_tokens_are_found_in_reply_to_addresses_and_message_ids() -> None:
    t7, t9 = tokens.sign(7, SECRET), tokens.sign(9, SECRET)
    assert tokens.numbers_named([f"Support <support+{t7}@chatflow.test>"], [], SECRET) == [7]
    assert tokens.numbers_named([], [f"<abc123.{t9}@chatflow.test>"], SECRET) == [9]
    forged = "support+8-aaaaaaaaaa@chatflow.test"
    assert tokens.numbers_named([forged], ["<x.8-bbbbbbbbbb@chatflow.test>"], SECRET) == []


def test_subject_number() -> None:
    assert tokens.subject_number("Re: Order late [#1042]") == 1042
    assert tokens.subject_number("Order late") is None
    assert tokens.subject_number("[# 12]") is None


def test_tokens_already_in_mail_keep_verifying() -> None:
    """The mac is the first ten base32 characters of HMAC-SHA256 (values computed with
    base64.b32encode before it was read from the digest's bits directly)."""
    assert tokens.sign(1, b"secret") == "1-5a2jct5xom"
    assert tokens.sign(1042, b"secret") == "1042-2ghzed4pxy"
    assert tokens.sign(10**17 + 3, b"secret") == "100000000000000003-ylyzsuj4sz"
