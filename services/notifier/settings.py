"""Notifier settings (env ``CHATFLOW_NOTIFIER_*``): ops port, WebSocket listener, limits."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from libs.common.settings import ROOT, ServiceSettings, field


class NotifierSettings(ServiceSettings):
    service: ClassVar[str] = "notifier"
    http_port: int = 8106

    ws_port: int = field(8116, "WSS port of the agents' live connection (reached via the gateway)")
    ws_path: str = field("/ws", "the path of an agent's own WebSocket")
    trunk_path: str = field(
        "/trunk", "the path of a gateway's trunk: many agents on one WebSocket (ADR 0005)"
    )
    trunk_max_buffer_bytes: int = field(
        64 * 1024 * 1024, "a trunk whose write buffer grows past this is dropped (gateway stuck)"
    )
    trunk_max_queued_frames: int = field(
        4096,
        "an agent on a trunk with this many frames not handled yet is closed (1008); from 32 on,"
        " the gateway stops reading its socket until it catches up",
    )
    trunk_max_message_bytes: int = field(
        64 * 1024 * 1024, "largest trunk message (one agent's is held to ws_max_size)"
    )
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

    badge_snapshot_max: int = field(
        500, "conversations listed in the badge snapshot after auth (totals count them all)"
    )
    presence_view_ttl_s: float = field(
        60.0, "a view (and an open connection) lasts this long unless its replica refreshes it"
    )
    presence_typing_ttl_s: float = field(5.0, "typing stops this long after the last typing frame")
    presence_heartbeat_s: float = field(20.0, "how often a replica refreshes its views")
    draft_max_message_bytes: int = field(256 * 1024, "largest decoded Yjs sync message")
    draft_max_doc_bytes: int = field(1024 * 1024, "largest draft: snapshot plus its update log")
    draft_compact_every: int = field(200, "updates in a draft's log before they are compacted")
    draft_compact_bytes: int = field(256 * 1024, "or this many bytes of log")
    draft_max_open_per_connection: int = field(16, "drafts one connection may have open")
    vapid_private_key_file: Path = field(
        ROOT / "var/certs/vapid.pem", "VAPID P-256 key (PEM) signing Web Push; absent: push off"
    )
    vapid_subject: str = field("mailto:support@chatflow.test", "VAPID sub claim (RFC 8292)")
    push_delay_s: float = field(
        2.0, "wait this long after a message before pushing (a live frame or a read comes first)"
    )
    push_ttl_s: int = field(3600, "TTL of a push: the push service drops it after that")
    push_poll_s: float = field(1.0, "how often a replica looks for due pushes")
    push_allow_http: bool = field(
        False, "accept http:// push endpoints (tests with a local push service only)"
    )
    push_endpoint_hosts: list[str] = field(
        [], "if set, only push endpoints on these hosts (or their subdomains) are accepted; JSON"
    )
