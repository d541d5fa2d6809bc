"""Auth's HTTP surface: discovery, JWKS, the authorization/token/revocation endpoints, /api.

The login form is server-rendered: no script, a strict CSP, a double-submit CSRF cookie
(``__Host-``, Secure, SameSite=Strict), and every hidden parameter validated again on POST.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import secrets
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any

from authlib.oauth2.rfc6749.errors import InvalidRequestError, OAuth2Error
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.datastructures import FormData

from libs.common.tokens import ALGORITHM, Identity
from libs.common.web import ApiError, error_body, identity_dependency
from services.auth import storage
from services.auth.domain import oauth
from services.auth.domain.oauth import AuthorizeParams, RedirectableError, Unredirectable
from services.auth.oauth import LoginFailed, Throttled

if TYPE_CHECKING:
    from services.auth.service import AuthService

TEMPLATES = Path(__file__).parent / "templates"
LOGIN = Template((TEMPLATES / "login.html").read_text())
ERROR = Template((TEMPLATES / "error.html").read_text())
GENERIC_LOGIN_ERROR = "Incorrect email or password."
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
FORM_TYPE = "application/x-www-form-urlencoded"

identity = identity_dependency(lambda request: request.app.state.service.verifier)


def router(svc: AuthService) -> APIRouter:
    r = APIRouter()
    s = svc.settings

    # ---- discovery -----------------------------------------------------------------------

    @r.get("/.well-known/openid-configuration")
    @r.get("/.well-known/oauth-authorization-server")
    async def metadata() -> JSONResponse:
        """RFC 8414 metadata; endpoints are under the issuer, i.e. behind the gateway."""
        base = s.jwt_issuer.rstrip("/")
        doc = {
            "issuer": s.jwt_issuer,
            "authorization_endpoint": f"{base}/oauth/authorize",
            "token_endpoint": f"{base}/oauth/token",
            "revocation_endpoint": f"{base}/oauth/revoke",
            "jwks_uri": f"{base}/.well-known/jwks.json",
            "userinfo_endpoint": f"{base}/api/me",
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": list(oauth.GRANT_TYPES),
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": [
                "none",
                "client_secret_basic",
                "client_secret_post",
            ],
            "revocation_endpoint_auth_methods_supported": [
                "none",
                "client_secret_basic",
                "client_secret_post",
            ],
            "authorization_response_iss_parameter_supported": True,
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [ALGORITHM],
            "token_endpoint_auth_signing_alg_values_supported": [ALGORITHM],
        }
        return JSONResponse(doc, headers={"Cache-Control": "public, max-age=300"})

    @r.get("/.well-known/jwks.json")
    async def jwks() -> JSONResponse:
        keys = await storage.published_keys(svc.pool, s.retired_key_grace_s)
        return JSONResponse({"keys": keys}, headers={"Cache-Control": "public, max-age=300"})

    # ---- authorization endpoint ----------------------------------------------------------

    @r.get("/oauth/authorize")
    async def authorize_form(request: Request) -> Response:
        q = request.query_params
        params = {k: q[k] for k in q}
        repeated = [k for k in q if len(q.getlist(k)) > 1]
        try:
            req = await svc.oauth.authorize_request(params, repeated)
        except Unredirectable as exc:
            return _unredirectable(request, exc.message)
        except RedirectableError as exc:
            return _redirect(oauth.error_redirect(exc, s.jwt_issuer))
        return _login_page(svc, req, "", None, 200)

    @r.post("/oauth/authorize")
    async def authorize_submit(request: Request) -> Response:
        form = await _form(request)
        params, repeated = _fields(form)
        try:
            req = await svc.oauth.authorize_request(params, repeated)
        except Unredirectable as exc:
            return _unredirectable(request, exc.message)
        except RedirectableError as exc:
            return _redirect(oauth.error_redirect(exc, s.jwt_issuer))
        email = params.get("email", "")
        cookie = request.cookies.get(s.csrf_cookie, "")
        sent = params.get("csrf", "")
        if not cookie or not sent or not hmac.compare_digest(cookie.encode(), sent.encode()):
            return _login_page(svc, req, email, "Your sign-in form expired. Please try again.", 400)
        try:
            location = await svc.oauth.login(
                req, email, params.get("password", ""), client_ip(request, s.trusted_proxies)
            )
        except Throttled as exc:
            body = error_body(429, "Too many failed sign-in attempts. Try again later.")
            headers = {"Retry-After": str(exc.retry_after), **NO_STORE}
            return JSONResponse(body, 429, headers=headers)
        except LoginFailed:
            return _login_page(svc, req, email, GENERIC_LOGIN_ERROR, 401)
        response = _redirect(location)
        response.delete_cookie(
            s.csrf_cookie, path="/", secure=True, httponly=True, samesite="strict"
        )
        return response

    # ---- token and revocation endpoints --------------------------------------------------

    @r.post("/oauth/token")
    async def token(request: Request) -> JSONResponse:
        try:
            params = await _oauth_form(request)
            body = await svc.oauth.token(params, request.headers.get("authorization"))
        except OAuth2Error as exc:
            return _oauth_error(exc)
        return JSONResponse(body, headers=NO_STORE)

    @r.post("/oauth/revoke")
    async def revoke(request: Request) -> Response:
        try:
            params = await _oauth_form(request)
            await svc.oauth.revoke(params, request.headers.get("authorization"))
        except OAuth2Error as exc:
            return _oauth_error(exc)
        return Response(status_code=200, headers=NO_STORE)

    # ---- the directory, for the signed-in user -------------------------------------------

    @r.get("/api/me")
    async def me(who: Identity = Depends(identity)) -> dict[str, Any]:
        user = await current_user(svc, who)
        boxes = await storage.user_mailboxes(svc.pool, user["id"])
        return {
            "id": str(user["id"]),
            "email": user["email"],
            "name": user["name"],
            "roles": list(user["roles"]),
            "mailboxes": [_mailbox(m) for m in boxes],
        }

    @r.get("/api/mailboxes")
    async def mailboxes(who: Identity = Depends(identity)) -> dict[str, Any]:
        user = await current_user(svc, who)
        boxes = await storage.user_mailboxes(svc.pool, user["id"])
        return {"mailboxes": [_mailbox(m) for m in boxes]}

    return r


# ---- helpers ---------------------------------------------------------------------------------


async def current_user(svc: AuthService, who: Identity) -> Any:
    """The user a token belongs to, as the directory has it now (401 once disabled)."""
    try:
        user = await storage.user_by_id(svc.pool, who.sub)
    except ValueError:
        raise ApiError(403, "this token does not belong to a user") from None
    if user is None or not user["active"]:
        raise ApiError(401, "user is not active")
    return user


def _mailbox(row: Any) -> dict[str, str]:
    return {"id": str(row["id"]), "address": row["address"], "name": row["name"]}


async def _form(request: Request) -> FormData:
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != FORM_TYPE:
        raise ApiError(415, f"expected {FORM_TYPE}")
    return await request.form()


def _fields(form: FormData) -> tuple[dict[str, str], list[str]]:
    """String fields of a form and the names that appear more than once."""
    params = {k: v for k, v in form.items() if isinstance(v, str)}
    repeated = [k for k in params if len(form.getlist(k)) > 1]
    return params, repeated


async def _oauth_form(request: Request) -> dict[str, str]:
    """RFC 6749 §3.2: form-encoded, and no parameter more than once."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != FORM_TYPE:
        raise InvalidRequestError(description=f"expected {FORM_TYPE}")
    params, repeated = _fields(await request.form())
    if repeated:
        # Names are client input: only what RFC 6749 §5.2 allows in a description is echoed.
        shown = sorted({oauth.shown(name) or "?" for name in repeated})
        raise InvalidRequestError(description="repeated parameters: " + " ".join(shown))
    return params


def _oauth_error(exc: OAuth2Error) -> JSONResponse:
    body = {"error": exc.error}
    description = exc.get_error_description()
    if description:
        body["error_description"] = description
    headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
    return JSONResponse(body, exc.status_code, headers={**headers, **NO_STORE})


def _redirect(location: str) -> RedirectResponse:
    return RedirectResponse(location, 302, headers={**NO_STORE, "Referrer-Policy": "no-referrer"})


def _page_headers(nonce: str, form_target: str | None = None) -> dict[str, str]:
    # Chrome applies form-action to the redirect after the POST, so the client's origin is in it.
    form_action = "'self'" + (f" {form_target}" if form_target else "")
    csp = (
        f"default-src 'none'; style-src 'nonce-{nonce}'; form-action {form_action}; "
        "frame-ancestors 'none'; base-uri 'none'"
    )
    return {
        "Content-Security-Policy": csp,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        **NO_STORE,
    }


def _login_page(
    svc: AuthService, req: AuthorizeParams, email: str, message: str | None, status: int
) -> HTMLResponse:
    csrf, nonce = secrets.token_urlsafe(32), secrets.token_urlsafe(16)
    e = html.escape
    hidden = "\n    ".join(
        f'<input type="hidden" name="{e(k)}" value="{e(v)}">' for k, v in req.fields().items()
    )
    page = LOGIN.substitute(
        nonce=nonce,
        csrf=csrf,
        hidden=hidden,
        email=e(email),
        message=f'<p class="error" role="alert">{e(message)}</p>' if message else "",
    )
    headers = _page_headers(nonce, oauth.origin(req.redirect_uri))
    response = HTMLResponse(page, status, headers=headers)
    response.set_cookie(
        svc.settings.csrf_cookie,
        csrf,
        max_age=3600,
        path="/",
        secure=True,
        httponly=True,
        samesite="strict",
    )
    return response


def _unredirectable(request: Request, message: str) -> Response:
    """Bad client or redirect URI: an error page (or JSON for non-browsers), never a redirect."""
    if "text/html" in request.headers.get("accept", ""):
        nonce = secrets.token_urlsafe(16)
        page = ERROR.substitute(nonce=nonce, message=html.escape(message))
        return HTMLResponse(page, 400, headers=_page_headers(nonce))
    return JSONResponse(error_body(400, message, "invalid_request"), 400, headers=NO_STORE)


def client_ip(request: Request, trusted_proxies: str) -> str:
    """The peer, or the last X-Forwarded-For hop when the peer is a trusted proxy (gateway)."""
    peer = request.client.host if request.client else ""
    trusted = {p.strip() for p in trusted_proxies.split(",") if p.strip()}
    if peer in trusted:
        hops = [h.strip() for h in request.headers.get("x-forwarded-for", "").split(",")]
        hops = [h for h in hops if h]
        if hops:
            try:
                return str(ipaddress.ip_address(hops[-1]))
            except ValueError:
                pass
    return peer or "unknown"
