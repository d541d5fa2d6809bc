"""OAuth2 request rules (RFC 6749, RFC 7636, RFC 9700): parameters, scopes, PKCE, redirects.

Errors are authlib's ``OAuth2Error`` subclasses so the flows can later move onto authlib's
grant classes without changing what clients see.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit, urlunsplit

from authlib.oauth2.rfc6749.errors import (
    InvalidRequestError,
    InvalidScopeError,
    OAuth2Error,
    UnsupportedResponseTypeError,
)
from authlib.oauth2.rfc7636 import create_s256_code_challenge

GRANT_TYPES = ("authorization_code", "refresh_token", "client_credentials")
_PKCE = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")  # RFC 7636 §4.1 unreserved characters
_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")  # RFC 6749 §3.3 scope-token
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}
MAX_STATE = 1024


class Unredirectable(Exception):
    """The client or redirect URI is not trusted: tell the user, never send them anywhere."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Client:
    client_id: str
    public: bool
    secret_hash: str | None
    redirect_uris: tuple[str, ...]
    grant_types: tuple[str, ...]
    scopes: str


@dataclass(frozen=True)
class AuthorizeParams:
    """A validated authorization request; it travels as hidden fields of the login form."""

    client_id: str
    redirect_uri: str
    scope: str
    state: str
    code_challenge: str

    def fields(self) -> dict[str, str]:
        return {
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "response_type": "code",
            "scope": self.scope,
            "state": self.state,
            "code_challenge": self.code_challenge,
            "code_challenge_method": "S256",
        }


class RedirectableError(Exception):
    """An error to report to the client at its (already verified) redirect URI."""

    def __init__(self, redirect_uri: str, state: str, error: OAuth2Error) -> None:
        super().__init__(error.error)
        self.redirect_uri = redirect_uri
        self.state = state
        self.error = error


# ---- scopes --------------------------------------------------------------------------------


def parse_scope(value: str | None) -> list[str]:
    """Space-separated scope tokens, de-duplicated in order; rejects malformed tokens."""
    out: list[str] = []
    for tok in (value or "").split(" "):
        if not tok:
            continue
        if not _SCOPE_TOKEN.match(tok):
            raise InvalidScopeError(description="malformed scope")
        if tok not in out:
            out.append(tok)
    return out


def granted_scope(requested: str | None, allowed: str) -> str:
    """The scope to grant: the request if it is a subset of ``allowed``, all of it if absent."""
    allowed_list = parse_scope(allowed)
    wanted = parse_scope(requested)
    if not wanted:
        return " ".join(allowed_list)
    extra = [s for s in wanted if s not in allowed_list]
    if extra:
        raise InvalidScopeError(description="requested scope exceeds what the client may have")
    return " ".join(wanted)


# ---- PKCE ----------------------------------------------------------------------------------


def valid_pkce_value(value: str | None) -> bool:
    return bool(value) and bool(_PKCE.match(value or ""))


def pkce_matches(verifier: str, challenge: str) -> bool:
    if not valid_pkce_value(verifier):
        return False
    return hmac.compare_digest(create_s256_code_challenge(verifier), challenge)


# ---- authorization requests ----------------------------------------------------------------


def check_authorize(
    params: Mapping[str, str], client: Client | None, repeated: Iterable[str] = ()
) -> AuthorizeParams:
    """Validate an authorization request against its client (RFC 6749 §4.1.1, RFC 7636 §4.3).

    Client and redirect URI problems raise ``Unredirectable``; everything found after the
    redirect URI is known good raises ``RedirectableError``.
    """
    repeated = set(repeated)
    if "client_id" in repeated or "redirect_uri" in repeated:
        raise Unredirectable("The request repeats client_id or redirect_uri.")
    if client is None:
        raise Unredirectable("Unknown client.")
    redirect_uri = params.get("redirect_uri", "")
    if not redirect_uri or redirect_uri not in client.redirect_uris:
        raise Unredirectable("The redirect URI is not registered for this client.")
    state = params.get("state", "")

    def fail(error: OAuth2Error) -> RedirectableError:
        return RedirectableError(redirect_uri, state if len(state) <= MAX_STATE else "", error)

    if repeated:
        raise fail(InvalidRequestError(description="repeated parameters"))
    if params.get("response_type") != "code":
        raise fail(UnsupportedResponseTypeError(response_type=shown(params.get("response_type"))))
    if "authorization_code" not in client.grant_types:
        raise fail(UnsupportedResponseTypeError(response_type="code"))
    if not state or len(state) > MAX_STATE:
        raise fail(InvalidRequestError(description="state is required"))
    if params.get("code_challenge_method") != "S256":
        raise fail(InvalidRequestError(description="code_challenge_method must be S256"))
    challenge = params.get("code_challenge", "")
    if not valid_pkce_value(challenge):
        raise fail(InvalidRequestError(description="code_challenge is missing or malformed"))
    try:
        scope = granted_scope(params.get("scope"), client.scopes)
    except OAuth2Error as exc:
        raise fail(exc) from exc
    return AuthorizeParams(client.client_id, redirect_uri, scope, state, challenge)


def shown(value: str | None) -> str:
    """A client-supplied value made safe to echo in an error description."""
    return re.sub(r"[^A-Za-z0-9_.:-]", "", value or "")[:40]


def with_query(uri: str, params: Mapping[str, str]) -> str:
    """``uri`` with ``params`` added to its query, keeping what the client registered there."""
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True) + [
        (k, v) for k, v in params.items() if v
    ]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))


def error_redirect(err: RedirectableError, issuer: str) -> str:
    params = {"error": err.error.error, "error_description": err.error.get_error_description()}
    return with_query(err.redirect_uri, {**params, "state": err.state, "iss": issuer})


def check_redirect_uri(uri: str) -> str:
    """A redirect URI fit for registration: absolute, no fragment, HTTPS unless loopback."""
    parts = urlsplit(uri)
    if parts.fragment or not parts.netloc or not parts.hostname:
        raise ValueError(f"redirect URI must be absolute and without a fragment: {uri!r}")
    if parts.scheme != "https" and not (parts.scheme == "http" and parts.hostname in _LOOPBACK):
        raise ValueError(f"redirect URI must use https (http only for loopback): {uri!r}")
    return uri


def origin(uri: str) -> str:
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.netloc}"


# ---- client authentication -----------------------------------------------------------------


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """``(client_id, secret)`` from HTTP Basic, form-decoded as RFC 6749 §2.3.1 says."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidRequestError(description="malformed Basic credentials") from exc
    cid, sep, secret = raw.partition(":")
    if not sep:
        raise InvalidRequestError(description="malformed Basic credentials")
    return unquote_plus(cid), unquote_plus(secret)


# ---- opaque credentials --------------------------------------------------------------------


def new_secret() -> str:
    """An opaque 256-bit credential (codes, refresh tokens)."""
    return secrets.token_urlsafe(32)


def digest(value: str) -> str:
    """What we store for a high-entropy credential: its SHA-256, never the value."""
    return hashlib.sha256(value.encode()).hexdigest()
