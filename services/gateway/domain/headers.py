"""Header rules at the edge: what is forwarded, what is added, what every response carries."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable

RawHeaders = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1 connection-specific fields, plus the non-standard ones still seen in the wild.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Set by the gateway itself; a client's own values must never reach an upstream.
_REQUEST_DROP = HOP_BY_HOP | {
    b"host",
    b"expect",
    b"forwarded",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-forwarded-port",
    b"x-real-ip",
    b"x-request-id",
}
# Framing and identity of the upstream's own server (Access-Control-* goes too: CORS is decided
# at the edge only, see ``downstream_response_headers``).
_RESPONSE_DROP = HOP_BY_HOP | {b"date", b"server", b"x-request-id"}

CSP = "default-src 'self'; frame-ancestors 'none'; connect-src 'self' wss:"
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def sane_request_id(value: str | None) -> str:
    """The client's id when it is short and plain (it ends up in logs), else a new one."""
    if value and _REQUEST_ID.fullmatch(value):
        return value
    return uuid.uuid4().hex


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """Fields named in ``Connection`` are hop-by-hop for this hop too."""
    out: set[bytes] = set()
    for k, v in headers:
        if k.lower() == b"connection":
            out.update(t.strip().lower() for t in v.split(b","))
    return out


def upstream_request_headers(
    raw: RawHeaders, *, client_ip: str, request_id: str, host: bytes | None
) -> RawHeaders:
    """The client's headers minus hop-by-hop and spoofable ones, plus the gateway's own.

    ``X-Forwarded-For`` is replaced, not appended: nothing trusted sits in front of the gateway.
    """
    extra = _connection_tokens(raw)
    out = [(k, v) for k, v in raw if (kl := k.lower()) not in _REQUEST_DROP and kl not in extra]
    out.append((b"x-forwarded-for", client_ip.encode()))
    out.append((b"x-forwarded-proto", b"https"))
    if host:
        out.append((b"x-forwarded-host", host))
    out.append((b"x-request-id", request_id.encode()))
    return out


def downstream_response_headers(raw: Iterable[tuple[bytes, bytes]]) -> RawHeaders:
    """Upstream response headers for the client: duplicates (Set-Cookie) and order kept."""
    raw = list(raw)
    extra = _connection_tokens(raw)
    out: RawHeaders = []
    for k, v in raw:
        kl = k.lower()
        if kl in _RESPONSE_DROP or kl in extra or kl.startswith(b"access-control-"):
            continue
        out.append((kl, v))
    return out


def public_location(headers: RawHeaders, internal: Iterable[bytes]) -> RawHeaders:
    """``headers`` with a ``Location`` on one of the ``internal`` origins (``https://host:port``,
    lower case) made relative, so it resolves against the public origin the client used.

    Where the services listen is nobody's business outside, and a client sent there would
    bypass the gateway; the services do not redirect to themselves, this makes sure.
    """
    prefixes = tuple(internal)
    out: RawHeaders = []
    for k, v in headers:
        if k == b"location":
            low = v.lower()
            for p in prefixes:
                if low.startswith(p) and low[len(p) : len(p) + 1] in (b"", b"/", b"?", b"#"):
                    rest = v[len(p) :]
                    v = rest if rest.startswith(b"/") else b"/" + rest
                    break
        out.append((k, v))
    return out


def security_headers(hsts_max_age_s: int) -> RawHeaders:
    """Added to every public response; an upstream's own CSP wins (see ``with_security``)."""
    return [
        (b"strict-transport-security", f"max-age={hsts_max_age_s}; includeSubDomains".encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"x-frame-options", b"DENY"),
    ]


def with_security(headers: RawHeaders, fixed: RawHeaders, request_id: str) -> RawHeaders:
    """``headers`` with the fixed security headers (replacing any), a CSP unless the response
    brings its own (auth's pages may need a nonce), and the request id."""
    names = {k for k, _ in fixed} | {b"x-request-id"}
    out = [(k, v) for k, v in headers if k.lower() not in names]
    if not any(k.lower() == b"content-security-policy" for k, _ in out):
        out.append((b"content-security-policy", CSP.encode()))
    out.extend(fixed)
    out.append((b"x-request-id", request_id.encode()))
    return out


def header(raw: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """First value of a (lower-case) header name in ASGI raw headers."""
    for k, v in raw:
        if k == name:
            return v
    return None
