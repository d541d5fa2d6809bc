"""docs/openapi.json is what ``python -m tools.openapi`` produces now, and says what the edge does."""

from __future__ import annotations

import json

from libs.common.settings import ROOT
from services.gateway.domain import routing
from tools import openapi

COMMITTED = ROOT / "docs/openapi.json"


def test_committed_document_matches_the_code() -> None:
    assert COMMITTED.read_text(encoding="utf-8") == openapi.render(), (
        "docs/openapi.json is stale: run `python -m tools.openapi > docs/openapi.json`"
    )


def test_only_paths_the_gateway_routes() -> None:
    doc = openapi.build()
    assert doc["paths"]
    for path in doc["paths"]:
        target = routing.resolve(path)
        assert target is not None and target.upstream is not None, path
    assert {"/oauth/token", "/api/conversations", "/api/attachments/{att_id}"} <= set(doc["paths"])
    assert not {"/healthz", "/readyz", "/metrics"} & set(doc["paths"])


def test_api_needs_bearer_and_oauth_does_not() -> None:
    doc = openapi.build()
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "Access token from /oauth/token (Ed25519-signed JWT)",
    }
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if path.startswith("/api/"):
                assert op["security"] == [{"bearer": []}], (method, path)
                assert "401" in op["responses"], (method, path)
            else:
                assert op["security"] == [], (method, path)


def test_agent_routes_document_403_and_our_error_shape() -> None:
    doc = openapi.build()
    for path in ("/api/conversations", "/api/attachments/{att_id}"):
        assert "403" in doc["paths"][path]["get"]["responses"]
    text = json.dumps(doc)
    assert "HTTPValidationError" not in text
    reply = doc["paths"]["/api/conversations/{id_conversa}/replies"]["post"]
    assert reply["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"
    }


def test_token_endpoint_documents_its_form() -> None:
    op = openapi.build()["paths"]["/oauth/token"]["post"]
    form = op["requestBody"]["content"]["application/x-www-form-urlencoded"]["schema"]
    assert form["required"] == ["grant_type"]
    assert set(form["properties"]["grant_type"]["enum"]) == {
        "authorization_code",
        "refresh_token",
        "client_credentials",
    }
