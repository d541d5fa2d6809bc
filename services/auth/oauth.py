"""The OAuth2 authorization server: authorization code + PKCE, refresh rotation, client
credentials and revocation (RFC 6749, RFC 7636, RFC 7009, RFC 9700).

HTTP-free on purpose: ``http.py`` turns requests into calls here and errors into responses.
Errors are authlib ``OAuth2Error``s, the shape authlib's own grants raise.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from authlib.oauth2.rfc6749.errors import (
    InvalidClientError,
    InvalidGrantError,
    InvalidRequestError,
    InvalidScopeError,
    OAuth2Error,
    UnauthorizedClientError,
    UnsupportedGrantTypeError,
)

from services.auth import storage
from services.auth.domain import oauth
from services.auth.domain.claims import access_claims
from services.auth.domain.directory import normalize_email
from services.auth.domain.oauth import AuthorizeParams, Client
from services.auth.keys import KeyRing
from services.auth.passwords import Passwords
from services.auth.settings import AuthSettings
from services.auth.throttle import LoginThrottle

MAX_PASSWORD = 1024


class LoginFailed(Exception):
    """Wrong email or password (deliberately not saying which)."""


class Throttled(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"retry after {retry_after}s")
        self.retry_after = retry_after


class AuthorizationServer:
    def __init__(
        self,
        pool: Any,
        settings: AuthSettings,
        keys: KeyRing,
        passwords: Passwords,
        throttle: LoginThrottle,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.keys = keys
        self.passwords = passwords
        self.throttle = throttle

    @property
    def issuer(self) -> str:
        return self.settings.jwt_issuer

    # ---- authorization endpoint --------------------------------------------------------------

    async def authorize_request(
        self, params: Mapping[str, str], repeated: list[str]
    ) -> AuthorizeParams:
        client = await storage.client(self.pool, params.get("client_id", ""))
        return oauth.check_authorize(params, client, repeated)

    async def login(self, req: AuthorizeParams, email_in: str, password: str, ip: str) -> str:
        """Check the credentials and issue a code; returns where to send the browser."""
        try:
            email, valid = normalize_email(email_in), True
        except ValueError:
            email, valid = email_in.strip().lower()[:254], False
        wait = await self.throttle.blocked_for(email, ip)
        if wait:
            raise Throttled(wait)
        # Not an address: no such user (and nothing unstorable, like NUL, reaches the database).
        user = await storage.user_by_email(self.pool, email) if valid else None
        stored = user["password_hash"] if user is not None and user["active"] else None
        if len(password) > MAX_PASSWORD or not password:
            stored = None
        if not await self.passwords.verify(stored, password):
            await self.throttle.failed(email, ip)
            raise LoginFailed
        assert user is not None and stored is not None
        await self.throttle.succeeded(email, ip)
        if self.passwords.needs_rehash(stored):
            await storage.set_password(self.pool, user["id"], await self.passwords.hash(password))
        code = oauth.new_secret()
        await storage.insert_code(
            self.pool,
            oauth.digest(code),
            req.client_id,
            user["id"],
            req.redirect_uri,
            req.code_challenge,
            req.scope,
            self.settings.auth_code_ttl_s,
        )
        return oauth.with_query(
            req.redirect_uri, {"code": code, "state": req.state, "iss": self.issuer}
        )

    # ---- token endpoint ----------------------------------------------------------------------

    async def token(self, form: Mapping[str, str], authorization: str | None) -> dict[str, Any]:
        grant = form.get("grant_type", "")
        if not grant:
            raise InvalidRequestError(description="grant_type is required")
        if grant not in oauth.GRANT_TYPES:
            raise UnsupportedGrantTypeError(grant_type=oauth.shown(grant))
        client = await self.authenticate_client(form, authorization)
        if grant not in client.grant_types:
            raise UnauthorizedClientError(description=f"client may not use {grant}")
        if grant == "authorization_code":
            return await self._authorization_code(client, form)
        if grant == "refresh_token":
            return await self._refresh(client, form)
        return await self._client_credentials(client, form)

    async def authenticate_client(
        self, form: Mapping[str, str], authorization: str | None
    ) -> Client:
        """RFC 6749 §2.3: Basic or form secret for confidential clients, client_id for public."""
        basic = oauth.basic_credentials(authorization)
        form_id, form_secret = form.get("client_id"), form.get("client_secret")
        secret: str | None
        if basic is not None:
            if form_secret is not None:
                raise InvalidRequestError(description="use one client authentication method")
            client_id, secret = basic
            if form_id and form_id != client_id:
                raise InvalidRequestError(description="client_id does not match the credentials")
        else:
            client_id, secret = form_id or "", form_secret
        found = await storage.client(self.pool, client_id)
        if found is None:
            if secret is not None:
                await self.passwords.verify(None, secret)  # same time as a wrong secret
            raise _invalid_client()
        if found.public:
            if secret is not None:
                raise _invalid_client()
            return found
        if secret is None or not await self.passwords.verify(found.secret_hash, secret):
            raise _invalid_client()
        return found

    async def _authorization_code(self, client: Client, form: Mapping[str, str]) -> dict[str, Any]:
        code, verifier = form.get("code", ""), form.get("code_verifier", "")
        if not code or not verifier:
            raise InvalidRequestError(description="code and code_verifier are required")
        error: OAuth2Error | None = None
        result: dict[str, Any] = {}
        # The code is spent first, atomically; any failure after that still burns it, and the
        # transaction commits so a replay's revocation sticks.
        async with self.pool.acquire() as conn, conn.transaction():
            row, first = await storage.spend_code(conn, oauth.digest(code))
            user = await storage.user_by_id(conn, row["user_id"]) if row is not None else None
            if row is None or row["client_id"] != client.client_id:
                error = InvalidGrantError(description="invalid authorization code")
            elif not first:
                if row["family_id"] is not None:
                    await storage.revoke_family(conn, row["family_id"])  # RFC 6749 §4.1.2
                error = InvalidGrantError(description="authorization code already used")
            elif not row["fresh"]:
                error = InvalidGrantError(description="authorization code expired")
            elif form.get("redirect_uri", "") != row["redirect_uri"]:
                error = InvalidGrantError(description="redirect_uri does not match")
            elif not oauth.pkce_matches(verifier, row["code_challenge"]):
                error = InvalidGrantError(description="code_verifier does not match")
            elif user is None or not user["active"]:
                error = InvalidGrantError(description="user is not active")
            else:
                family = uuid.uuid4() if "refresh_token" in client.grant_types else None
                result = await self._user_tokens(conn, client, user, row["scope"], family, None)
                if family is not None:
                    await storage.set_code_family(conn, row["code"], family)
        if error is not None:
            raise error
        return result

    async def _refresh(self, client: Client, form: Mapping[str, str]) -> dict[str, Any]:
        presented = form.get("refresh_token", "")
        if not presented:
            raise InvalidRequestError(description="refresh_token is required")
        error: OAuth2Error | None = None
        result: dict[str, Any] = {}
        async with self.pool.acquire() as conn, conn.transaction():
            row, first = await storage.spend_refresh(conn, oauth.digest(presented))
            if row is None or row["client_id"] != client.client_id:
                error = InvalidGrantError(description="invalid refresh token")
            elif not first:
                if row["revoked_at"] is None:
                    # A spent token came back: someone holds a copy. End the whole login.
                    await storage.revoke_family(conn, row["family_id"])
                error = InvalidGrantError(description="refresh token is no longer valid")
            elif not row["fresh"]:
                error = InvalidGrantError(description="refresh token expired")
            else:
                user = await storage.user_by_id(conn, row["user_id"])
                try:
                    scope = _narrowed(form.get("scope"), row["scope"])
                except OAuth2Error as exc:
                    error = exc
                else:
                    if user is None or not user["active"]:
                        await storage.revoke_family(conn, row["family_id"])
                        error = InvalidGrantError(description="user is not active")
                    else:
                        result = await self._user_tokens(
                            conn,
                            client,
                            user,
                            row["scope"],
                            row["family_id"],
                            row["family_expires_at"],
                            access_scope=scope,
                        )
        if error is not None:
            raise error
        return result

    async def _client_credentials(self, client: Client, form: Mapping[str, str]) -> dict[str, Any]:
        if client.public:
            raise UnauthorizedClientError(
                description="public clients cannot use client_credentials"
            )
        scope = oauth.granted_scope(form.get("scope"), client.scopes)
        claims = self._claims(client.client_id, client.client_id, scope, [], [])
        return self._response(await self.keys.mint(claims), scope)

    async def _user_tokens(
        self,
        conn: Any,
        client: Client,
        user: Any,
        scope: str,
        family: uuid.UUID | None,
        family_expires_at: datetime | None,
        access_scope: str | None = None,
    ) -> dict[str, Any]:
        """An access token with the user's current roles and mailboxes, and the next refresh
        token of ``family`` (kept to the scope the user granted, RFC 6749 §6)."""
        s = self.settings
        mailboxes = [str(m["id"]) for m in await storage.user_mailboxes(conn, user["id"])]
        granted = scope if access_scope is None else access_scope
        claims = self._claims(str(user["id"]), client.client_id, granted, user["roles"], mailboxes)
        out = self._response(await self.keys.mint(claims), granted)
        if family is not None:
            refresh = oauth.new_secret()
            if family_expires_at is None:
                family_expires_at = datetime.now(UTC) + timedelta(seconds=s.refresh_family_ttl_s)
            await storage.insert_refresh(
                conn,
                oauth.digest(refresh),
                family,
                user["id"],
                client.client_id,
                scope,
                s.refresh_token_ttl_s,
                family_expires_at,
            )
            out["refresh_token"] = refresh
        return out

    def _claims(
        self, sub: str, client_id: str, scope: str, roles: list[str], mailboxes: list[str]
    ) -> dict[str, Any]:
        s = self.settings
        return access_claims(
            issuer=s.jwt_issuer,
            audience=s.jwt_audience,
            sub=sub,
            client_id=client_id,
            scope=scope,
            roles=roles,
            mailboxes=mailboxes,
            ttl_s=s.access_token_ttl_s,
            now=int(time.time()),
        )

    def _response(self, access_token: str, scope: str) -> dict[str, Any]:
        return {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": self.settings.access_token_ttl_s,
            "scope": scope,
        }

    # ---- revocation endpoint (RFC 7009) ------------------------------------------------------

    async def revoke(self, form: Mapping[str, str], authorization: str | None) -> None:
        """Revoke a refresh token's whole family; unknown or foreign tokens are a no-op."""
        client = await self.authenticate_client(form, authorization)
        token = form.get("token", "")
        if not token:
            raise InvalidRequestError(description="token is required")
        async with self.pool.acquire() as conn, conn.transaction():
            row = await storage.refresh_by_hash(conn, oauth.digest(token))
            if row is not None and row["client_id"] == client.client_id:
                await storage.revoke_family(conn, row["family_id"])


def _invalid_client() -> InvalidClientError:
    return InvalidClientError(description="client authentication failed", status_code=401)


def _narrowed(requested: str | None, original: str) -> str:
    """A refresh may ask for less than was granted, never more (RFC 6749 §6)."""
    if not oauth.parse_scope(requested):
        return original
    try:
        return oauth.granted_scope(requested, original)
    except InvalidScopeError as exc:
        raise InvalidScopeError(description="scope exceeds the original grant") from exc
