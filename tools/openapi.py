"""One OpenAPI document for the public API: what the gateway serves on 8443.

``python -m tools.openapi > docs/openapi.json`` writes it. The paths come from the FastAPI apps of
the services behind the gateway (built, never connected), kept only where the gateway's routing
table sends that path to that very service, so the document cannot promise a route the edge
refuses. Auth reads its OAuth forms by hand (RFC 6749 wants repeated parameters refused, which a
declared form model would hide), so their parameters are described here; everything else is the
services' own schema. A test compares the committed file with this output.
"""

from __future__ import annotations

import copy
import json
import sys
from typing import Any

from fastapi import FastAPI

from services.gateway.domain import routing

TITLE = "ChatFLOW public API"
VERSION = "1"
SERVER = "https://127.0.0.1:8443"
BEARER = "bearer"
FORM = "application/x-www-form-urlencoded"

DESCRIPTION = (
    "The API the agent app and other systems reach through the gateway (HTTPS, port 8443 in "
    "development). `/oauth/*` and `/.well-known/*` need no token; every `/api/*` route needs "
    "`Authorization: Bearer <access token>` (Ed25519-signed JWT from `/oauth/token`) and answers 401 "
    "without a valid one. Conversation and attachment routes are for agents: a machine token "
    "(client credentials, no roles) gets 403, and anything outside the agent's mailboxes is 404. "
    'Errors are JSON `{"error": {"code", "message"}}`, except the OAuth endpoints, which answer '
    'RFC 6749 `{"error", "error_description"}`.'
)

ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}
OAUTH_ERROR_SCHEMA: dict[str, Any] = {
    "title": "OAuthError",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string"},
        "error_description": {"type": "string"},
    },
}
TOKEN_SCHEMA: dict[str, Any] = {
    "title": "TokenResponse",
    "type": "object",
    "required": ["access_token", "token_type", "expires_in", "scope"],
    "properties": {
        "access_token": {"type": "string"},
        "token_type": {"type": "string", "enum": ["Bearer"]},
        "expires_in": {"type": "integer"},
        "scope": {"type": "string"},
        "refresh_token": {"type": "string"},
    },
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _html(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/html": {"schema": {"type": "string"}}}}


def _form(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return {"required": True, "content": {FORM: {"schema": schema}}}


_S = {"type": "string"}
_AUTHORIZE = {
    "response_type": {"type": "string", "enum": ["code"]},
    "client_id": _S,
    "redirect_uri": _S,
    "scope": _S,
    "state": _S,
    "code_challenge": _S,
    "code_challenge_method": {"type": "string", "enum": ["S256"]},
}
_CLIENT_AUTH = {"client_id": _S, "client_secret": _S}
_OAUTH_FAIL = _json(_ref("OAuthError"), "OAuth error (RFC 6749 §5.2)")
_REDIRECT = {
    "description": "Redirect to the client (code, or an error it may show)",
    "headers": {"Location": {"schema": {"type": "string"}}},
}

# What auth's hand-read OAuth endpoints take and answer, keyed by (path, method).
OAUTH: dict[tuple[str, str], dict[str, Any]] = {
    ("/oauth/authorize", "get"): {
        "summary": "Authorization request: the sign-in page",
        "parameters": [
            {"name": k, "in": "query", "required": k != "scope", "schema": v}
            for k, v in _AUTHORIZE.items()
        ],
        "responses": {
            "200": _html("Sign-in form (sets the CSRF cookie)"),
            "302": _REDIRECT,
            "400": {
                "description": "Unknown client or redirect URI: an error page, never a redirect",
                "content": {
                    "text/html": {"schema": {"type": "string"}},
                    "application/json": {"schema": _ref("Error")},
                },
            },
        },
    },
    ("/oauth/authorize", "post"): {
        "summary": "Sign-in form submission",
        "requestBody": _form(
            {
                **_AUTHORIZE,
                "email": _S,
                "password": {"type": "string", "format": "password"},
                "csrf": _S,
            },
            ["client_id", "redirect_uri", "email", "password", "csrf"],
        ),
        "responses": {
            "302": _REDIRECT,
            "400": _html("Invalid or expired form, or an invalid request"),
            "401": _html("Wrong email or password"),
            "415": _json(_ref("Error"), "Not form-encoded"),
            "429": _json(_ref("Error"), "Too many failed attempts"),
        },
    },
    ("/oauth/token", "post"): {
        "summary": "Token endpoint: authorization code, refresh token, client credentials",
        "description": (
            "Confidential clients authenticate with HTTP Basic or `client_secret` in the form; "
            "public clients send `client_id`. No parameter may appear twice."
        ),
        "requestBody": _form(
            {
                "grant_type": {
                    "type": "string",
                    "enum": ["authorization_code", "refresh_token", "client_credentials"],
                },
                "code": _S,
                "redirect_uri": _S,
                "code_verifier": _S,
                "refresh_token": _S,
                "scope": _S,
                **_CLIENT_AUTH,
            },
            ["grant_type"],
        ),
        "responses": {
            "200": _json(_ref("TokenResponse"), "Tokens"),
            "400": _OAUTH_FAIL,
            "401": _OAUTH_FAIL,
        },
    },
    ("/oauth/revoke", "post"): {
        "summary": "Revoke a refresh token and its whole family (RFC 7009)",
        "requestBody": _form(
            {"token": _S, "token_type_hint": _S, **_CLIENT_AUTH},
            ["token"],
        ),
        "responses": {
            "200": {"description": "Revoked, or nothing to revoke"},
            "400": _OAUTH_FAIL,
            "401": _OAUTH_FAIL,
        },
    },
}

# Answers auth's directory routes give besides 200 and 401.
_NOT_A_USER = {"description": "The token belongs to a client, not a user"}
_NOT_ADMIN = {"description": "Not an admin token"}
EXTRA_RESPONSES: dict[tuple[str, str], dict[str, Any]] = {
    ("/api/me", "get"): {"403": _NOT_A_USER},
    ("/api/mailboxes", "get"): {"403": _NOT_A_USER},
}


def service_apps() -> dict[str, FastAPI]:
    """The apps behind the gateway, by upstream name, built without connecting anything."""
    from services.auth.service import AuthService
    from services.auth.settings import AuthSettings
    from services.ingest.service import IngestService
    from services.ingest.settings import IngestSettings
    from services.notifier.service import NotifierService
    from services.notifier.settings import NotifierSettings
    from services.sender.service import SenderService
    from services.sender.settings import SenderSettings
    from services.threader.service import ThreaderService
    from services.threader.settings import ThreaderSettings

    return {
        routing.AUTH: AuthService(AuthSettings.load()).build_app(),
        routing.THREADER: ThreaderService(ThreaderSettings.load()).build_app(),
        routing.INGEST: IngestService(IngestSettings.load()).build_app(),
        routing.SENDER: SenderService(SenderSettings.load()).build_app(),
        routing.NOTIFIER: NotifierService(NotifierSettings.load()).build_app(),
    }


def _public(path: str, upstream: str, method: str = "get") -> bool:
    target = routing.resolve(path, method)
    return target is not None and target.upstream == upstream


def _errors_as_ours(operation: dict[str, Any]) -> None:
    """FastAPI documents 422 as its own shape; our handler answers with the common error."""
    for status, response in operation.get("responses", {}).items():
        if status[0] in "23":
            continue
        if "content" in response and "application/json" in response["content"]:
            response["content"]["application/json"]["schema"] = _ref("Error")
        elif "content" not in response:
            response["content"] = {"application/json": {"schema": _ref("Error")}}


def _operation(paths: dict[str, dict[str, Any]], path: str, method: str) -> dict[str, Any]:
    """An operation described here must exist: a renamed route must not keep a stale overlay."""
    try:
        op: dict[str, Any] = paths[path][method]
        return op
    except KeyError:
        raise SystemExit(
            f"tools/openapi.py describes {method.upper()} {path}, which is gone"
        ) from None


def build() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    schemas: dict[str, Any] = {}
    for upstream, app in service_apps().items():
        doc = app.openapi()
        for path, item in doc.get("paths", {}).items():
            for method, op in item.items():
                if not _public(path, upstream, method):
                    continue
                if method in paths.get(path, {}):
                    raise SystemExit(f"{method.upper()} {path} is defined by two services")
                paths.setdefault(path, {})[method] = copy.deepcopy(op)
        for name, schema in doc.get("components", {}).get("schemas", {}).items():
            if name in schemas and schemas[name] != schema:
                raise SystemExit(f"schema {name} differs between services")
            schemas[name] = schema
    for (path, method), extra in OAUTH.items():
        _operation(paths, path, method).update(copy.deepcopy(extra))
    for (path, method), responses in EXTRA_RESPONSES.items():
        _operation(paths, path, method)["responses"].update(copy.deepcopy(responses))
    for path, item in paths.items():
        target = routing.resolve(path)
        assert target is not None  # filtered by _public
        for op in item.values():
            if target.needs_token:
                op["security"] = [{BEARER: []}]
                op["responses"].setdefault(
                    "401", {"description": "Missing or invalid bearer token"}
                )
                if routing.under(path, "/api/admin"):
                    op["responses"].setdefault("403", dict(_NOT_ADMIN))
                _errors_as_ours(op)
                op["tags"] = [path.split("/")[2]]
            else:
                op["security"] = []
                op["tags"] = ["oauth"]
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas.setdefault("Error", ERROR_SCHEMA)
    schemas["OAuthError"] = OAUTH_ERROR_SCHEMA
    schemas["TokenResponse"] = TOKEN_SCHEMA
    return {
        "openapi": "3.1.0",
        "info": {"title": TITLE, "version": VERSION, "description": DESCRIPTION},
        "servers": [{"url": SERVER, "description": "development gateway"}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {
                BEARER: {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "Access token from /oauth/token (Ed25519-signed JWT)",
                }
            },
        },
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
