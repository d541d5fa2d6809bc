"""The pure rules: scopes, PKCE, redirect URIs, client credentials, authorization requests."""

from __future__ import annotations

import base64

import pytest
from authlib.oauth2.rfc6749.errors import InvalidRequestError, InvalidScopeError
from hypothesis import given
from hypothesis import strategies as st

from services.auth.domain import oauth
from services.auth.domain.claims import access_claims
from services.auth.domain.directory import normalize_email, normalize_roles
from services.auth.domain.oauth import Client, RedirectableError, Unredirectable

CLIENT = Client("web", True, None, ("https://app.test/cb",), ("authorization_code",), "a b")


def test_rfc7636_appendix_b_example() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert oauth.pkce_matches(verifier, "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM")
    assert not oauth.pkce_matches(
        verifier[:-1] + "l", "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    )
    assert not oauth.pkce_matches("short", "short")


def test_scopes() -> None:
    assert oauth.granted_scope(None, "a b") == "a b"
    assert oauth.granted_scope("b  b", "a b") == "b"
    with pytest.raises(InvalidScopeError):
        oauth.granted_scope("a c", "a b")
    with pytest.raises(InvalidScopeError):
        oauth.parse_scope('a "b"')


@given(st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=6))
def test_granted_scope_is_a_subset(requested: list[str]) -> None:
    try:
        granted = oauth.granted_scope(" ".join(requested), "a b c")
    except InvalidScopeError:
        assert "d" in requested
    else:
        assert set(granted.split()) <= {"a", "b", "c"}


def test_basic_credentials_are_form_decoded() -> None:
    raw = base64.b64encode(b"my%3Aclient:s%2Bcret+x").decode()
    assert oauth.basic_credentials(f"Basic {raw}") == ("my:client", "s+cret x")
    assert oauth.basic_credentials("Bearer abc") is None
    with pytest.raises(InvalidRequestError):
        oauth.basic_credentials("Basic !!!")


def test_with_query_keeps_the_registered_query() -> None:
    assert (
        oauth.with_query("https://a.test/cb?x=1", {"code": "c d", "state": ""})
        == "https://a.test/cb?x=1&code=c+d"
    )


@pytest.mark.parametrize(
    "uri",
    ["https://a.test/cb#frag", "http://a.test/cb", "/relative", "javascript:alert(1)"],
)
def test_unfit_redirect_uris(uri: str) -> None:
    with pytest.raises(ValueError):
        oauth.check_redirect_uri(uri)


def test_check_authorize() -> None:
    good = {
        "client_id": "web",
        "redirect_uri": "https://app.test/cb",
        "response_type": "code",
        "state": "s",
        "code_challenge": "x" * 43,
        "code_challenge_method": "S256",
    }
    req = oauth.check_authorize(good, CLIENT)
    assert req.scope == "a b" and req.fields()["code_challenge_method"] == "S256"
    with pytest.raises(Unredirectable):
        oauth.check_authorize(good, None)
    with pytest.raises(Unredirectable):
        oauth.check_authorize({**good, "redirect_uri": "https://app.test/cb2"}, CLIENT)
    with pytest.raises(Unredirectable):
        oauth.check_authorize(good, CLIENT, repeated=["redirect_uri"])
    with pytest.raises(RedirectableError) as err:
        oauth.check_authorize({**good, "code_challenge_method": "plain"}, CLIENT)
    assert "error=invalid_request" in oauth.error_redirect(err.value, "https://iss")
    assert "iss=https%3A%2F%2Fiss" in oauth.error_redirect(err.value, "https://iss")


def test_claims_have_everything_verifiers_need() -> None:
    c = access_claims(
        issuer="i",
        audience="a",
        sub="s",
        client_id="c",
        scope="x",
        roles=["agent", "agent"],
        mailboxes=["m2", "m1"],
        ttl_s=900,
        now=1000,
    )
    assert c["exp"] == 1900 and c["nbf"] == c["iat"] == 1000
    assert c["roles"] == ["agent"] and c["mailboxes"] == ["m1", "m2"]
    assert set(c) == {
        "iss",
        "aud",
        "sub",
        "iat",
        "nbf",
        "exp",
        "jti",
        "client_id",
        "scope",
        "roles",
        "mailboxes",
    }


def test_directory_normalization() -> None:
    assert normalize_email("  Agent@ChatFLOW.Test ") == "agent@chatflow.test"
    with pytest.raises(ValueError):
        normalize_email("not-an-address")
    assert normalize_roles(["Admin", "agent", "admin"]) == ["admin", "agent"]
    with pytest.raises(ValueError):
        normalize_roles(["owner"])
