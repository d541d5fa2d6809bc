"""Refresh tokens through the real gateway, as the SPA uses them."""

from __future__ import annotations

import ssl

import httpx
import pytest

from tests.conftest import DEMO_PASSWORD
from tests.oauth_client import login
from tools.devstack import Stack

pytestmark = pytest.mark.xdist_group("stack")


async def test_refresh_rotates_and_a_reused_refresh_token_revokes_the_family(
    stack: Stack, ca_context: ssl.SSLContext
) -> None:
    tokens = await login(stack.origin, "agent@chatflow.test", DEMO_PASSWORD, ca_context)
    first = str(tokens["refresh_token"])
    async with httpx.AsyncClient(base_url=stack.origin, verify=ca_context) as http:

        async def refresh(token: str) -> httpx.Response:
            return await http.post(
                "/oauth/token",
                data={
                    "grant_type": "refresh_token",
                    "refresh_token": token,
                    "client_id": "chatflow-web",
                },
            )

        r = await refresh(first)
        assert r.status_code == 200, r.text
        second = r.json()["refresh_token"]
        assert second != first
        me = await http.get(
            "/api/me", headers={"Authorization": f"Bearer {r.json()['access_token']}"}
        )
        assert me.status_code == 200 and me.json()["email"] == "agent@chatflow.test"

        reused = await refresh(first)  # a stolen, already spent token
        assert reused.status_code == 400 and reused.json()["error"] == "invalid_grant"
        # ... and the whole family is gone, the newest member included.
        after = await refresh(second)
        assert after.status_code == 400 and after.json()["error"] == "invalid_grant"
        assert after.headers["cache-control"] == "no-store"
