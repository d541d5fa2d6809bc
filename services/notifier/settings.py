"""Notifier settings (env ``CHATFLOW_NOTIFIER_*``): ops port, WebSocket listener, limits."""

from __future__ import annotations

from typing import ClassVar

from libs.common.settings import ServiceSettings, field


class NotifierSettings(ServiceSettings):
    service: ClassVar[str] = "notifier"
    http_port: int = 8106

    ws_port: int = field(8116, "WSS port of the agents' live connection (reached via the gateway)")
    ws_path: str = field("/ws", "the only path the WebSocket server upgrades")
    allowed_origins: list[str] = field(
        ["https://127.0.0.1:8443", "https://localhost:8443"],
        "Origin values accepted at the upgrade (the gateway forwards the browser's); JSON in env",
    )
    allow_missing_origin: bool = field(
        False, "also accept upgrades without an Origin header (non-browser clients, tests)"
    )
    ws_max_size: int = field(4 * 1024 * 1024, "largest client frame in bytes (bigger: close 1009)")
    ws_write_limit: int = field(64 * 1024, "high-water mark of a connection's write buffer")
    ws_slow_consumer_bytes: int = field(
        1024 * 1024, "a connection whose transport buffers more than this is closed (4008)"
    )
    ws_ping_interval_s: float = field(20.0, "keepalive ping interval")
    ws_ping_timeout_s: float = field(20.0, "close when a ping is not answered in this time")
    ws_close_timeout_s: float = field(5.0, "wait this long for a closing handshake, then abort")
    ws_auth_timeout_s: float = field(5.0, "time for the first auth frame (no bearer subprotocol)")
    resume_max_entries: int = field(
        5000, "scan at most this many frames for a resume; beyond that the client gets resync"
    )
    frames_retention_s: int = field(3600, "frames older than this are trimmed from the stream")
    frames_trim_interval_s: float = field(60.0, "how often the frames stream is trimmed")
