"""Schemathesis over docs/openapi.json against the running gateway: no input may cause a 5xx.

Authenticated as the demo agent, so the agent routes get past the token check and their
parameters and bodies reach the services; ``/oauth/*`` is fuzzed without a token. Bounded (a few
dozen cases per operation, no shrinking, an in-memory example database) to stay well under 90 s.
"""

from __future__ import annotations

import ssl

import httpx
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from libs.common.settings import ROOT
from tools.devstack import Stack

pytestmark = pytest.mark.xdist_group("stack")

OPENAPI = ROOT / "docs/openapi.json"
CA = str(ROOT / "var/certs/ca.pem")
MAX_EXAMPLES = 25

CONFIG = schemathesis.Config.from_dict(
    {
        "request-timeout": 20,
        "generation": {
            "max-examples": MAX_EXAMPLES,
            "no-shrink": True,
            "database": ":memory:",
            "allow-x00": True,
        },
        "phases": {"stateful": {"enabled": False}},
    }
)
# POST /api/messages/raw takes a raw RFC 5322 message: schemathesis has no generator for
# message/rfc822, so it gets well-formed mail with fuzzed fields and plain garbage bytes.
_RAW_MAIL = st.one_of(
    st.builds(
        lambda subject, body: (
            f"From: a@customer.test\r\nTo: support@chatflow.test\r\nSubject: {subject}\r\n"
            f"\r\n{body}\r\n"
        ).encode("utf-8", "surrogatepass"),
        st.text(max_size=60).map(lambda t: t.replace("\r", " ").replace("\n", " ")),
        st.text(max_size=500),
    ),
    st.binary(max_size=2000),
)
schemathesis.openapi.media_type("message/rfc822", _RAW_MAIL)
# Loaded at import so pytest sees one test per operation; the stack's URL comes at call time.
schema = schemathesis.openapi.from_path(OPENAPI, config=CONFIG)


@schema.parametrize()
def test_no_server_errors(case: schemathesis.Case, stack: Stack, agent_token: str) -> None:
    headers = {"Authorization": f"Bearer {agent_token}"} if case.path.startswith("/api/") else {}
    case.call_and_validate(
        base_url=stack.origin, headers=headers, verify=CA, checks=[not_a_server_error]
    )


FORM = {"content-type": "application/x-www-form-urlencoded"}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        # A NUL in client_id reached PostgreSQL, which refuses it (asyncpg raised).
        ("GET", "/oauth/authorize?response_type=code&client_id=a%00b", None),
        ("POST", "/oauth/authorize", "response_type=code&client_id=a%00b"),
        ("POST", "/oauth/token", "grant_type=client_credentials&client_id=a%00b"),
        ("POST", "/oauth/revoke", "token=x&client_id=a%00b"),
        # Names of repeated parameters were echoed into error_description, where authlib
        # raises on characters RFC 6749 §5.2 does not allow.
        ("POST", "/oauth/token", "%C3%A9=1&%C3%A9=2"),
        ("POST", "/oauth/revoke", "token=x&%00=1&%00=2"),
    ],
)
async def test_auth_inputs_schemathesis_found(
    stack: Stack, ca_context: ssl.SSLContext, method: str, path: str, body: str | None
) -> None:
    """The 500s the first fuzz runs found in auth, pinned as plain requests."""
    async with httpx.AsyncClient(base_url=stack.origin, verify=ca_context) as http:
        r = await http.request(method, path, content=body, headers=FORM if body else {})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
