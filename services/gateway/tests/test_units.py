"""Pure pieces: the route table, header rules, settings parsing, the limiter failing open."""

from __future__ import annotations

import time

import pytest

from libs.common import testing
from libs.common.bus import connect
from libs.common.tokens import Identity, InvalidToken
from services.gateway.domain.headers import (
    downstream_response_headers,
    sane_request_id,
    upstream_request_headers,
    with_security,
)
from services.gateway.domain.routing import Target, has_dot_segments, resolve
from services.gateway.ratelimit import RateLimiter
from services.gateway.settings import GatewaySettings
from services.gateway.tokencache import CachingVerifier
from services.gateway.ws import sendable


def test_route_table() -> None:
    assert resolve("/api/me") == Target("auth", True)
    assert resolve("/api/mailboxes/m1") == Target("auth", True)
    assert resolve("/api/admin/users") == Target("auth", True)
    assert resolve("/api/conversations") == Target("threader", True)
    assert resolve("/api/conversations/c1/reply") == Target("threader", True)
    assert resolve("/api/attachments/a1") == Target("ingest", True)
    assert resolve("/api/meta") == Target(None, True)
    assert resolve("/api") == Target(None, True)
    assert resolve("/oauth/token") == Target("auth", False)
    assert resolve("/.well-known/openid-configuration") == Target("auth", False)
    assert resolve("/oauthx") is None
    assert resolve("/apix") is None
    assert has_dot_segments("/api/conversations/../admin")
    assert has_dot_segments("/api/./me")
    assert not has_dot_segments("/.well-known/jwks.json")
    assert not has_dot_segments("/api/attachments/a..b")


@pytest.mark.parametrize(
    ("method", "path", "upstream"),
    [
        ("POST", "/api/attachments", "sender"),  # an agent's upload
        ("post", "/api/attachments", "sender"),
        ("GET", "/api/attachments/up_0123456789abcdef0123456789abcdef", "sender"),
        ("HEAD", "/api/attachments/up_x", "sender"),
        ("GET", "/api/attachments/6f1c2b9e-1d0a-4c3e-9a7b-2f4d5e6a7b8c", "ingest"),  # inbound
        ("GET", "/api/attachments/upx", "ingest"),
        ("GET", "/api/attachments/xup_1", "ingest"),
        ("GET", "/api/attachments", "ingest"),
        ("PUT", "/api/attachments", "ingest"),
        ("POST", "/api/attachments/a1", "ingest"),
        ("POST", "/api/attachmentsx", None),
        ("POST", "/api/conversations", "threader"),
    ],
)
def test_attachment_routes_by_method_and_id(method: str, path: str, upstream: str | None) -> None:
    assert resolve(path, method) == Target(upstream, True)


def test_request_ids() -> None:
    assert sane_request_id("abc-123_x.y:z") == "abc-123_x.y:z"
    for bad in (None, "", "a b", "x" * 200, "-leading", "ünïcode", "a\r\nb"):
        rid = sane_request_id(bad)
        assert len(rid) == 32 and rid != bad


def test_upstream_request_headers() -> None:
    raw = [
        (b"host", b"127.0.0.1:8443"),
        (b"connection", b"keep-alive, X-Custom-Hop"),
        (b"x-custom-hop", b"1"),
        (b"te", b"trailers"),
        (b"x-forwarded-for", b"1.2.3.4"),
        (b"x-request-id", b"spoof"),
        (b"authorization", b"Bearer t"),
        (b"cookie", b"a=1"),
        (b"cookie", b"b=2"),
    ]
    out = upstream_request_headers(raw, client_ip="10.0.0.1", request_id="rid1", host=b"h:1")
    assert out == [
        (b"authorization", b"Bearer t"),
        (b"cookie", b"a=1"),
        (b"cookie", b"b=2"),
        (b"x-forwarded-for", b"10.0.0.1"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"h:1"),
        (b"x-request-id", b"rid1"),
    ]


def test_downstream_response_headers() -> None:
    raw = [
        (b"Content-Type", b"text/plain"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Date", b"x"),
        (b"Access-Control-Allow-Origin", b"*"),
        (b"X-Request-Id", b"up"),
        (b"Location", b"/x"),
    ]
    assert downstream_response_headers(raw) == [
        (b"content-type", b"text/plain"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"location", b"/x"),
    ]


def test_upstream_csp_wins_but_fixed_headers_do_not() -> None:
    fixed = [(b"x-frame-options", b"DENY")]
    out = with_security(
        [(b"content-security-policy", b"default-src 'none'"), (b"x-frame-options", b"ALLOW")],
        fixed,
        "r1",
    )
    assert out == [
        (b"content-security-policy", b"default-src 'none'"),
        (b"x-frame-options", b"DENY"),
        (b"x-request-id", b"r1"),
    ]


def test_close_codes() -> None:
    assert sendable(4123, 1011) == 4123
    assert sendable(1005, 1011) == 1000
    assert sendable(1006, 1011) == 1011
    assert sendable(1006, 1001) == 1001
    assert sendable(None, 1011) == 1011
    assert sendable(999, 1011) == 1011


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATFLOW_GATEWAY_ALLOWED_ORIGINS", '["https://a.test", "https://b.test/"]')
    monkeypatch.setenv("CHATFLOW_GATEWAY_PUBLIC_PORT", "9443")
    s = GatewaySettings.load()
    assert isinstance(s, GatewaySettings)
    assert s.allowed_origins == ["https://a.test", "https://b.test"]
    assert s.public_port == 9443 and s.http_port == 8101
    s = GatewaySettings.load(allowed_origins="https://c.test, https://d.test")
    assert isinstance(s, GatewaySettings)
    assert s.allowed_origins == ["https://c.test", "https://d.test"]


async def test_rate_limiter_fails_open() -> None:
    redis = connect(f"redis://127.0.0.1:{testing.free_port()}/0")
    limiter = RateLimiter(redis, "x:", 60, 1, 1, 0.25)
    started = time.monotonic()
    assert await limiter.check("1.2.3.4", "u") is None
    assert time.monotonic() - started < 1.0
    await redis.aclose()


class CountingVerifier:
    def __init__(self, exp: int) -> None:
        self.calls = 0
        self.exp = exp

    async def verify(self, token: str) -> Identity:
        self.calls += 1
        if token == "bad":
            raise InvalidToken("bad")
        return Identity("u", (), frozenset(), frozenset(), "", "j", self.exp, {})


async def test_token_cache() -> None:
    inner = CountingVerifier(exp=int(time.time()) + 900)
    cache = CachingVerifier(inner, ttl_s=60, leeway_s=30, max_entries=2)
    assert (await cache.verify("t1")).sub == "u"
    await cache.verify("t1")
    assert inner.calls == 1
    for _ in range(2):  # failures are never remembered
        with pytest.raises(InvalidToken):
            await cache.verify("bad")
    assert inner.calls == 3
    await cache.verify("t2")
    await cache.verify("t3")  # evicts t1, the oldest
    await cache.verify("t1")
    assert inner.calls == 6
    # Never past the token's own expiry (plus leeway).
    short = CountingVerifier(exp=int(time.time()) - 31)
    cache = CachingVerifier(short, ttl_s=60, leeway_s=30)
    await cache.verify("t")
    await cache.verify("t")
    assert short.calls == 2


async def test_token_cache_never_lets_a_disabled_user_through() -> None:
    inner = CountingVerifier(exp=int(time.time()) + 900)
    disabled: set[str] = set()
    cache = CachingVerifier(inner, ttl_s=60, leeway_s=30, is_disabled=disabled.__contains__)
    assert (await cache.verify("t1")).sub == "u"
    disabled.add("u")
    with pytest.raises(InvalidToken, match="account disabled"):
        await cache.verify("t1")  # cached signature check, refused all the same
    assert inner.calls == 1
    disabled.discard("u")
    assert (await cache.verify("t1")).sub == "u"


async def test_rate_limiter_counts_exactly_without_waiting_when_it_can() -> None:
    import asyncio

    redis = connect(testing.REDIS_URL)
    prefix = f"t{testing.new_run_id()}:"
    try:
        if time.time() % 60 > 58:  # one fixed window for the whole test
            await asyncio.sleep(60 - time.time() % 60 + 0.1)
        limiter = RateLimiter(redis, prefix, 60, 0, 5, 1.0)
        assert await limiter.check("ip", "u") is None  # a key's first request waits for Redis
        assert not limiter._background
        # A burst: what this replica sent is counted before Redis answers, so exactly five in all
        # get through, the first ones without waiting for their round trip.
        results = await asyncio.gather(*(limiter.check("ip", "u") for _ in range(10)))
        assert [r is None for r in results] == [True] * 4 + [False] * 6
        await asyncio.gather(*limiter._background)
        assert int(await redis.get(f"{prefix}gateway:rl:user:u:{int(time.time() // 60)}")) == 11
        other = await limiter.check("ip", "v")  # another user is not limited by u's count
        assert other is None
    finally:
        await testing.drop_prefix(prefix)
        await redis.aclose()
