"""What the SPA does to log in: authorization code + PKCE (S256) through the gateway."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import ssl
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx

_HIDDEN = re.compile(r"<input[^>]*type=[\"']hidden[\"'][^>]*>", re.I)
_ATTR = re.compile(r"(name|value)=[\"']([^\"']*)[\"']", re.I)


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = (
        base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    )
    return verifier, challenge


def hidden_fields(html: str) -> dict[str, str]:
    import html as html_lib

    out: dict[str, str] = {}
    for tag in _HIDDEN.findall(html):
        attrs = {k.lower(): html_lib.unescape(v) for k, v in _ATTR.findall(tag)}
        if "name" in attrs:
            out[attrs["name"]] = attrs.get("value", "")
    return out


async def login(
    base_url: str,
    email: str,
    password: str,
    ca: ssl.SSLContext | str,
    client_id: str = "chatflow-web",
) -> dict[str, object]:
    """Runs the whole flow and returns the token response."""
    redirect_uri = f"{base_url}/callback"
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(16)
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": "chatflow",
        "state": state,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    async with httpx.AsyncClient(base_url=base_url, verify=ca, follow_redirects=False) as http:
        page = await http.get(f"/oauth/authorize?{urlencode(params)}")
        page.raise_for_status()
        form = hidden_fields(page.text)
        form.update(email=email, password=password)
        resp = await http.post("/oauth/authorize", data=form)
        assert resp.status_code in (302, 303), f"login failed: {resp.status_code} {resp.text[:300]}"
        location = resp.headers["location"]
        assert location.startswith(redirect_uri)
        query = parse_qs(urlsplit(location).query)
        assert query["state"] == [state]
        token = await http.post(
            "/oauth/token",
            data={
                "grant_type": "authorization_code",
                "code": query["code"][0],
                "redirect_uri": redirect_uri,
                "client_id": client_id,
                "code_verifier": verifier,
            },
        )
        token.raise_for_status()
        return dict(token.json())
