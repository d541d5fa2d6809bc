"""Gateway settings (``CHATFLOW_GATEWAY_*``): public listener, upstreams, limits."""

from __future__ import annotations

import json
from typing import Any, ClassVar
from urllib.parse import urlsplit

from pydantic import field_validator

from libs.common.settings import ServiceSettings, field

MIB = 1024 * 1024


class GatewaySettings(ServiceSettings):
    service: ClassVar[str] = "gateway"
    http_port: int = 8101

    public_host: str = field("127.0.0.1", "address of the public HTTPS/WSS listener")
    public_port: int = field(8443, "port of the public HTTPS/WSS listener")

    auth_url: str = field("https://127.0.0.1:8102", "auth service base URL")
    ingest_url: str = field("https://127.0.0.1:8103", "ingest service base URL")
    threader_url: str = field("https://127.0.0.1:8104", "threader service base URL")
    sender_url: str = field("https://127.0.0.1:8105", "sender service base URL (uploads)")
    notifier_url: str = field("https://127.0.0.1:8106", "notifier HTTP base URL (Web Push API)")
    notifier_ws_url: str = field("wss://127.0.0.1:8116/ws", "notifier WebSocket URL")

    allowed_origins: list[str] = field(
        ["https://127.0.0.1:8443", "https://localhost:8443"],
        "origins allowed for CORS and WebSockets (a JSON list in the environment)",
    )
    max_body_bytes: int = field(25 * MIB, "largest request body accepted (413 above)")
    body_buffer_bytes: int = field(
        MIB,
        "a request body up to this size is read whole before an upstream connection is taken, "
        "so a slow client holds none; larger ones (uploads) stream through",
    )
    body_timeout_s: float = field(
        30.0, "a buffered request body must arrive whole within this, seconds (408 after)"
    )
    max_in_flight_per_ip: int = field(
        64,
        "requests of one client IP holding an upstream connection at once (429 above; "
        "0 = off): slow uploads and downloads of one address cannot take the whole pool",
    )
    hsts_max_age_s: int = field(63_072_000, "Strict-Transport-Security max-age")

    token_cache_ttl_s: float = field(60.0, "remember a verified token this long (0 = off)")

    rate_limit_window_s: int = field(60, "fixed rate-limit window")
    rate_limit_per_ip: int = field(1200, "requests per window per client IP (0 = off)")
    rate_limit_per_user: int = field(600, "requests per window per token subject (0 = off)")
    rate_limit_timeout_s: float = field(0.25, "give up on Redis after this and let the request in")

    upstream_connect_timeout_s: float = field(3.0, "TCP+TLS connect timeout to an upstream")
    upstream_read_timeout_s: float = field(60.0, "wait for upstream bytes at most this long")
    upstream_write_timeout_s: float = field(60.0, "wait to send bytes upstream at most this long")
    upstream_pool_timeout_s: float = field(5.0, "wait for a free upstream connection (503 after)")
    upstream_max_connections: int = field(256, "upstream connections in total")
    upstream_max_keepalive: int = field(64, "idle keep-alive upstream connections kept")
    upstream_keepalive_expiry_s: float = field(30.0, "close idle upstream connections after")

    ws_auth_timeout_s: float = field(10.0, "time for the first-frame auth message")
    ws_open_timeout_s: float = field(5.0, "upstream WebSocket handshake timeout")
    ws_max_message_bytes: int = field(4 * MIB, "largest client WebSocket message (as notifier)")
    ws_max_upstream_message_bytes: int = field(16 * MIB, "largest message from the notifier")
    ws_trunks: int = field(
        2, "trunks to the notifier per gateway process, each carrying many agents (ADR 0005)"
    )
    notifier_trunk_path: str = field("/trunk", "the notifier's trunk path, on its WebSocket port")
    ws_slow_consumer_bytes: int = field(
        MIB, "an agent's socket buffering more than this is closed (4008); it resumes later"
    )
    ws_ping_interval_s: float = field(20.0, "keepalive ping to every agent's socket")
    ws_ping_timeout_s: float = field(
        20.0, "an agent's socket not answering a ping in this is closed"
    )

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _origins(cls, v: Any) -> Any:
        """Also accept a plain string (JSON or comma-separated) passed to ``load`` directly."""
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                return json.loads(v)
            return [o.strip() for o in v.split(",") if o.strip()]
        return v

    @field_validator("allowed_origins")
    @classmethod
    def _origins_exact(cls, v: list[str]) -> list[str]:
        """Origins compare as exact strings, so a trailing slash would never match."""
        return [o.rstrip("/") for o in v]

    @field_validator("auth_url", "ingest_url", "threader_url", "sender_url", "notifier_url")
    @classmethod
    def _https(cls, v: str) -> str:
        """Upstream traffic carries bearer tokens: TLS only."""
        if urlsplit(v).scheme != "https":
            raise ValueError("upstream URLs must be https://")
        return v.rstrip("/")

    @field_validator("notifier_ws_url")
    @classmethod
    def _wss(cls, v: str) -> str:
        if urlsplit(v).scheme != "wss":
            raise ValueError("the notifier URL must be wss://")
        return v
