"""Sender settings (``CHATFLOW_SENDER_*``)."""

from __future__ import annotations

from libs.common.settings import ServiceSettings


class SenderSettings(ServiceSettings):
    service = "sender"
    http_port: int = 8105
    relay_host: str = "127.0.0.1"
    relay_port: int = 2526
    relay_starttls: bool = True
    relay_implicit_tls: bool = False
    relay_username: str = ""
    relay_password: str = ""
    relay_timeout_s: float = 30.0
    retry_base_s: float = 30.0
    retry_max_s: float = 3600.0
    max_queue_age_s: float = 4 * 24 * 3600.0
    delivery_poll_ms: int = 500
    delivery_concurrency: int = 4
    # How long a send waits for its conversation to reach our view before failing.
    unknown_conversation_wait_s: float = 3.0
