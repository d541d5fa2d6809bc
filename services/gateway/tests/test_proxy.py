"""The public HTTP side against real TLS upstreams, Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from joserfc.jwk import OKPKey

from libs.common import testing
from services.gateway.tests.conftest import (
    BODY_LIMIT,
    ENDLESS_CLOSED,
    KID,
    ORIGIN,
    Gateway,
    Rig,
    StartGateway,
    stop_gateway,
    token,
)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_of(tok: str) -> dict[str, Any]:
    part = tok.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    h = b64(json.dumps(header).encode())
    c = b64(json.dumps(claims).encode())
    return f"{h}.{c}.{b64(signature)}"


def hs256_with_public_key(rig: Rig) -> str:
    """The classic key-confusion attack: HMAC keyed with the (public) verification key."""
    public = json.dumps(rig.key.as_dict(private=False)).encode()
    claims = claims_of(token(rig.key))
    head = b64(json.dumps({"alg": "HS256", "kid": KID}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(public, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def tampered(rig: Rig) -> str:
    h, _, s = token(rig.key).split(".")
    claims = claims_of(token(rig.key)) | {"roles": ["admin"]}
    return f"{h}.{b64(json.dumps(claims).encode())}.{s}"


BAD_TOKENS: dict[str, Callable[[Rig], str | None]] = {
    "none": lambda rig: None,
    "garbage": lambda rig: "not-a-jwt",
    "expired": lambda rig: token(
        rig.key,
        exp=int(time.time()) - 3600,
        iat=int(time.time()) - 4000,
        nbf=int(time.time()) - 4000,
    ),
    "wrong_iss": lambda rig: token(rig.key, iss="https://evil.example"),
    "wrong_aud": lambda rig: token(rig.key, aud="someone-else"),
    "alg_none": lambda rig: unsigned({"alg": "none", "kid": KID}, claims_of(token(rig.key))),
    "hs256_public_key": hs256_with_public_key,
    "unknown_kid": lambda rig: token(OKPKey.generate_key("Ed25519"), kid="nobody-knows-me"),
    "known_kid_other_key": lambda rig: token(OKPKey.generate_key("Ed25519"), kid=KID),
    "tampered_payload": tampered,
    "not_yet_valid": lambda rig: token(rig.key, nbf=int(time.time()) + 3600),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
async def test_bad_tokens_get_401(client: httpx.AsyncClient, rig: Rig, case: str) -> None:
    tok = BAD_TOKENS[case](rig)
    headers = {"Authorization": f"Bearer {tok}"} if tok else {}
    r = await client.get("/api/conversations", headers=headers)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"]["code"] == "unauthorized"
    assert "x-upstream" not in r.headers  # never reached the upstream


async def test_valid_token_is_proxied(client: httpx.AsyncClient, good_token: str) -> None:
    r = await client.get(
        "/api/conversations/c1/messages?limit=5&q=a%20b",
        headers={
            "Authorization": f"Bearer {good_token}",
            "X-Request-Id": "client-req-0001",
            "X-Forwarded-For": "6.6.6.6",
            "Connection": "keep-alive, x-hop-secret",
            "X-Hop-Secret": "drop me",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        },
    )
    assert r.status_code == 200, r.text
    echo = r.json()
    headers = dict(echo["headers"])
    assert echo["upstream"] == "threader"
    assert echo["method"] == "GET"
    assert echo["path"] == "/api/conversations/c1/messages"
    assert echo["query"] == "limit=5&q=a%20b"
    assert headers["authorization"] == f"Bearer {good_token}"
    assert headers["x-request-id"] == "client-req-0001"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "https"
    assert "x-hop-secret" not in headers and "proxy-authorization" not in headers
    assert [k for k, _ in echo["headers"]].count("x-forwarded-for") == 1
    assert r.headers["x-request-id"] == "client-req-0001"  # the gateway's id, not the upstream's


async def test_insane_request_id_is_replaced(client: httpx.AsyncClient, good_token: str) -> None:
    r = await client.get(
        "/api/me", headers={"Authorization": f"Bearer {good_token}", "X-Request-Id": 'a b"<x>' * 3}
    )
    rid = r.headers["x-request-id"]
    assert len(rid) == 32 and rid.isalnum()
    assert dict(r.json()["headers"])["x-request-id"] == rid


@pytest.mark.parametrize(
    ("method", "path", "upstream", "auth"),
    [
        ("GET", "/api/me", "auth", True),
        ("GET", "/api/mailboxes", "auth", True),
        ("PATCH", "/api/admin/users/u1", "auth", True),
        ("GET", "/api/conversations", "threader", True),
        ("GET", "/api/attachments/a1", "ingest", True),
        ("POST", "/api/attachments", "sender", True),
        ("GET", "/api/attachments/up_0123456789abcdef0123456789abcdef", "sender", True),
        ("GET", "/.well-known/jwks.json", "auth", False),
        ("POST", "/oauth/token", "auth", False),
        ("GET", "/oauth/authorize?client_id=spa", "auth", False),
    ],
)
async def test_routes(
    client: httpx.AsyncClient, good_token: str, method: str, path: str, upstream: str, auth: bool
) -> None:
    headers = {"Authorization": f"Bearer {good_token}"} if auth else {}
    r = await client.request(
        method, path, headers=headers, content=b"x=1" if method != "GET" else None
    )
    assert r.status_code == 200, r.text
    assert r.json()["upstream"] == upstream
    assert r.headers["x-upstream"] == upstream


async def test_unknown_routes_are_404_json(client: httpx.AsyncClient, good_token: str) -> None:
    auth = {"Authorization": f"Bearer {good_token}"}
    for path in ("/api/nope", "/api/meta", "/api", "/nope", "/oauthx"):
        r = await client.get(path, headers=auth)
        assert r.status_code == 404, path
        assert r.json()["error"]["code"] == "not_found"
        assert r.headers["content-type"] == "application/json"
    # No token: /api/* is checked first, so unknown routes don't reveal themselves.
    assert (await client.get("/api/nope")).status_code == 401


async def test_dot_segments_refused(client: httpx.AsyncClient, good_token: str) -> None:
    auth = {"Authorization": f"Bearer {good_token}"}
    for raw in ("/api/conversations/%2e%2e/admin/users", "/api/conversations/%2E/x"):
        r = await client.send(
            client.build_request(
                "GET", httpx.URL(client.base_url, raw_path=raw.encode()), headers=auth
            )
        )
        assert r.status_code == 400, raw


async def test_body_streamed_through(client: httpx.AsyncClient, good_token: str) -> None:
    auth = {"Authorization": f"Bearer {good_token}"}
    body = bytes(range(256)) * (BODY_LIMIT // 256)  # exactly the limit
    r = await client.post("/api/attachments", headers=auth, content=body)
    assert r.status_code == 200
    assert r.json()["body_len"] == len(body)
    assert r.json()["body_sha256"] == hashlib.sha256(body).hexdigest()

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"a" * 1000

    r = await client.post("/api/attachments", headers=auth, content=chunked())
    assert r.status_code == 200 and r.json()["body_len"] == 4000


async def test_oversized_body_413(client: httpx.AsyncClient, good_token: str) -> None:
    auth = {"Authorization": f"Bearer {good_token}"}
    r = await client.post("/api/attachments", headers=auth, content=b"x" * (BODY_LIMIT + 1))
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "too_large"

    async def endless() -> AsyncIterator[bytes]:
        for _ in range(100):  # no Content-Length: caught while streaming
            yield b"y" * 16384

    r = await client.post("/api/attachments", headers=auth, content=endless())
    assert r.status_code == 413
    # The connection pool still works afterwards.
    assert (await client.get("/api/me", headers=auth)).status_code == 200


async def test_streaming_response(client: httpx.AsyncClient, good_token: str) -> None:
    auth = {"Authorization": f"Bearer {good_token}"}
    async with client.stream("GET", "/api/conversations/stream", headers=auth) as r:
        assert r.status_code == 200
        chunks = [c async for c in r.aiter_text()]
    assert "".join(chunks) == "".join(f"chunk-{i}\n" for i in range(5))


async def test_client_disconnect_stops_the_download(
    gateway: Gateway, rig: Rig, good_token: str
) -> None:
    before = len(ENDLESS_CLOSED)
    async with httpx.AsyncClient(base_url=gateway.base, verify=rig.ctx, trust_env=False) as c:
        auth = {"Authorization": f"Bearer {good_token}"}
        async with c.stream("GET", "/api/attachments/endless", headers=auth) as r:
            assert r.status_code == 200
            async for _ in r.aiter_raw():
                break
    # The gateway notices, drops its upstream connection, and the upstream stops producing.
    await testing.eventually(lambda: len(ENDLESS_CLOSED) > before, timeout=10)


async def test_redirect_and_cookies_pass_through(client: httpx.AsyncClient) -> None:
    r = await client.post("/oauth/authorize", data={"username": "a", "password": "b"})
    assert r.status_code == 302
    assert r.headers["location"] == "https://127.0.0.1:8443/callback?code=abc&state=xyz"
    cookies = r.headers.get_list("set-cookie")
    assert len(cookies) == 2
    assert any(c.startswith("sid=s1") and "HttpOnly" in c for c in cookies)


async def test_a_location_on_an_upstream_origin_never_reaches_the_client(
    client: httpx.AsyncClient, good_token: str, rig: Rig
) -> None:
    """An upstream's redirect to its own internal URL is made relative (it resolves against the
    public origin the client used); a Location elsewhere is left alone."""
    auth = {"Authorization": f"Bearer {good_token}"}
    r = await client.get("/api/conversations/moved", params={"to": "/api/me?x=1"}, headers=auth)
    assert r.status_code == 307
    assert r.headers["location"] == "/api/me?x=1"
    assert str(rig.ports["threader"]) not in r.text + str(r.headers)
    r = await client.get("/api/conversations/moved", params={"to": ""}, headers=auth)
    assert r.headers["location"] == "/"


SECURITY = {
    "strict-transport-security": "max-age=63072000; includeSubDomains",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "content-security-policy": (
        "default-src 'self'; frame-ancestors 'none'; connect-src 'self' wss:"
    ),
}


async def test_security_headers_everywhere(client: httpx.AsyncClient, good_token: str) -> None:
    auth = {"Authorization": f"Bearer {good_token}"}
    responses = [
        await client.get("/api/me", headers=auth),  # proxied
        await client.get("/api/me"),  # 401
        await client.get("/nope"),  # 404
        await client.get("/"),  # placeholder
        await client.options(  # CORS preflight
            "/api/me",
            headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"},
        ),
    ]
    for r in responses:
        for name, value in SECURITY.items():
            assert r.headers.get(name) == value, (r.request.url, name)
        assert r.headers.get_list("x-request-id") == [r.headers["x-request-id"]]


async def test_spa_placeholder(client: httpx.AsyncClient) -> None:
    for path in ("/", "/callback?code=x&state=y"):
        r = await client.get(path)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/html")
        assert "ChatFLOW" in r.text
    assert (await client.post("/")).status_code == 405


async def test_cors(client: httpx.AsyncClient, good_token: str) -> None:
    pre = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    ok = await client.options("/api/conversations", headers={"Origin": ORIGIN, **pre})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == ORIGIN
    bad = await client.options(
        "/api/conversations", headers={"Origin": "https://evil.example", **pre}
    )
    assert bad.status_code == 400
    assert "access-control-allow-origin" not in bad.headers
    auth = {"Authorization": f"Bearer {good_token}"}
    simple = await client.get("/api/me", headers={"Origin": "https://localhost:8443", **auth})
    assert simple.headers["access-control-allow-origin"] == "https://localhost:8443"
    other = await client.get("/api/me", headers={"Origin": "https://evil.example", **auth})
    assert "access-control-allow-origin" not in other.headers


async def test_ops_port(gateway: Gateway, rig: Rig) -> None:
    async with httpx.AsyncClient(verify=rig.ctx, trust_env=False) as c:
        base = f"https://127.0.0.1:{gateway.settings.http_port}"
        assert (await c.get(f"{base}/healthz")).json() == {"status": "ok"}
        ready = (await c.get(f"{base}/readyz")).json()
        assert ready["ready"] is True and ready["checks"]["public"] is True
        metrics = (await c.get(f"{base}/metrics")).text
        assert "chatflow_gateway_requests_total" in metrics


async def test_upstream_down_is_502(start_gateway: StartGateway, rig: Rig, good_token: str) -> None:
    dead = f"https://127.0.0.1:{testing.free_port()}"
    gw = await start_gateway(threader_url=dead, auth_url=dead)
    try:
        async with httpx.AsyncClient(base_url=gw.base, verify=rig.ctx, trust_env=False) as c:
            r = await c.get("/api/conversations", headers={"Authorization": f"Bearer {good_token}"})
            assert r.status_code == 502
            assert r.json()["error"]["code"] == "bad_gateway"
            assert r.headers["strict-transport-security"]
            r = await c.get("/.well-known/jwks.json")
            assert r.status_code == 502
            # Another upstream is unaffected.
            r = await c.get("/api/attachments", headers={"Authorization": f"Bearer {good_token}"})
            assert r.status_code == 200
    finally:
        await stop_gateway(gw)


async def test_rate_limit(start_gateway: StartGateway, rig: Rig) -> None:
    if time.time() % 60 > 57:  # keep the whole test inside one fixed window
        await asyncio.sleep(60 - time.time() % 60 + 0.1)
    gw = await start_gateway(rate_limit_per_user=3, rate_limit_per_ip=5)
    try:
        async with httpx.AsyncClient(base_url=gw.base, verify=rig.ctx, trust_env=False) as c:
            auth = {"Authorization": f"Bearer {token(rig.key, sub='limited-user')}"}
            codes = [(await c.get("/api/me", headers=auth)).status_code for _ in range(4)]
            assert codes == [200, 200, 200, 429]
            r = await c.get("/api/me", headers=auth)
            assert r.json()["error"]["code"] == "throttled"
            assert 1 <= int(r.headers["retry-after"]) <= 61
            # Per IP as well: the sixth request from this address is refused whoever sends it.
            other = {"Authorization": f"Bearer {token(rig.key, sub='another-user')}"}
            assert (await c.get("/api/me", headers=other)).status_code == 429
    finally:
        await stop_gateway(gw)


async def test_literal_dot_segments_refused(gateway: Gateway, rig: Rig, good_token: str) -> None:
    """httpx normalises ``..`` away; a raw client does not, so send the bytes ourselves."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gateway.settings.public_port, ssl=rig.ctx, server_hostname="127.0.0.1"
    )
    writer.write(
        b"GET /api/conversations/../admin/users HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + f"Authorization: Bearer {good_token}\r\nConnection: close\r\n\r\n".encode()
    )
    await writer.drain()
    status = await reader.readline()
    writer.close()
    assert status.startswith(b"HTTP/1.1 400"), status


async def test_token_never_logged(
    client: httpx.AsyncClient,
    gateway: Gateway,
    rig: Rig,
    good_token: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from services.gateway.tests.test_ws import dial

    bad = token(rig.key, aud="nope")
    with caplog.at_level("INFO"):
        await client.get("/api/me", headers={"Authorization": f"Bearer {bad}"})
        await client.get("/api/me", headers={"Authorization": f"Bearer {good_token}"})
        for tok in (bad, good_token):
            async with dial(gateway, rig, ["chatflow.v1", f"bearer.{tok}"]) as ws:
                with contextlib.suppress(Exception):
                    await ws.send("x")
                    await ws.recv()
    assert caplog.records  # the capture works (uvicorn logs each WebSocket handshake)
    text = caplog.text + " ".join(str(r.__dict__) for r in caplog.records)
    assert good_token not in text and bad not in text


async def test_head_and_upstream_errors_pass_through(
    client: httpx.AsyncClient, good_token: str
) -> None:
    auth = {"Authorization": f"Bearer {good_token}"}
    r = await client.head("/api/me", headers=auth)
    assert r.status_code == 200 and r.content == b""
    assert r.headers["x-upstream"] == "auth"
    # An upstream's own error statuses and bodies come through untouched.
    r = await client.get("/api/conversations/teapot", headers=auth)
    assert r.status_code == 418
    assert r.json() == {"error": {"code": "teapot", "message": "short and stout"}}


async def _trickle(gw: Gateway, rig: Rig, path: str, length: int, first: bytes = b"") -> bytes:
    """A client that announces ``length`` bytes of body, sends ``first``, then one byte every
    0.3 s; returns what the gateway answered (up to its close)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.settings.public_port, ssl=rig.ctx, server_hostname="127.0.0.1"
    )
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n\r\n".encode()
            + first
        )
        sent = len(first)

        async def drip() -> None:
            nonlocal sent
            while sent < length:
                await asyncio.sleep(0.3)
                writer.write(b"x")
                await writer.drain()
                sent += 1

        async def answer() -> bytes:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            return head + await reader.readexactly(int(length.group(1)) if length else 0)

        dripping = asyncio.create_task(drip())
        try:
            return await asyncio.wait_for(answer(), 30)
        finally:
            dripping.cancel()
            await asyncio.gather(dripping, return_exceptions=True)
    finally:
        writer.close()


async def test_slow_request_bodies_hold_no_upstream_connection(
    start_gateway: StartGateway, rig: Rig, good_token: str
) -> None:
    """Anonymous clients trickling bodies (a byte at a time) on more connections than the
    upstream pool holds: an agent's request still answers at once, and the trickles get 408
    once the body deadline passes (a trial's 300 such clients made every request 503)."""
    gw = await start_gateway(
        upstream_max_connections=4, upstream_pool_timeout_s=1.0, body_timeout_s=4.0
    )
    try:
        slow = [asyncio.create_task(_trickle(gw, rig, "/oauth/token", 1000)) for _ in range(30)]
        await asyncio.sleep(1.0)
        async with httpx.AsyncClient(base_url=gw.base, verify=rig.ctx, trust_env=False) as c:
            auth = {"Authorization": f"Bearer {good_token}"}
            for _ in range(3):
                r = await c.get("/api/me", headers=auth)
                assert r.status_code == 200, r.text
        answers = await asyncio.gather(*slow)
        assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), answers[:2]
        assert b'"code":"request_timeout"' in answers[0].replace(b" ", b"")
    finally:
        await stop_gateway(gw)


async def test_large_bodies_stream_and_count_against_the_per_ip_cap(
    start_gateway: StartGateway, rig: Rig, good_token: str
) -> None:
    """A body over the buffer goes through as it arrives (an upload may be large and slow),
    so it holds an upstream connection: those count against the in-flight cap per IP."""
    gw = await start_gateway(body_buffer_bytes=1024, max_in_flight_per_ip=2, body_timeout_s=2.0)
    try:
        auth = {"Authorization": f"Bearer {good_token}"}
        async with httpx.AsyncClient(base_url=gw.base, verify=rig.ctx, trust_env=False) as c:
            body = bytes(range(256)) * 400  # 100 KiB: streamed
            r = await c.post("/api/attachments", headers=auth, content=body)
            assert r.status_code == 200
            assert r.json()["body_sha256"] == hashlib.sha256(body).hexdigest()

            # Two slow large uploads take this IP's two slots, well past the body deadline
            # (which is for the buffered kind only)...
            first = b"y" * 2000
            held = [
                asyncio.create_task(_trickle(gw, rig, "/oauth/token", 2000 + 20, first))
                for _ in range(2)
            ]
            await asyncio.sleep(2.5)
            r = await c.get("/api/me", headers=auth)
            assert r.status_code == 429
            assert r.json()["error"]["code"] == "throttled"
            # ... and give them back when they end.
            answers = await asyncio.gather(*held)
            assert all(a.startswith(b"HTTP/1.1 200 ") for a in answers), answers[:1]
            r = await c.get("/api/me", headers=auth)
            assert r.status_code == 200
    finally:
        await stop_gateway(gw)
