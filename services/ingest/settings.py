"""Ingest settings (``CHATFLOW_INGEST_*``)."""

from __future__ import annotations

from libs.common.settings import ServiceSettings


class IngestSettings(ServiceSettings):
    service = "ingest"
    http_port: int = 8103
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 2525
    smtp_hostname: str = "mx.chatflow.test"
    # An internal relay in front of us may be allowed to skip STARTTLS; on by default.
    smtp_require_starttls: bool = True
    smtp_max_message_bytes: int = 25 * 1024 * 1024
    smtp_max_recipients: int = 100
