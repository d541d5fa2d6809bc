"""Ingest settings (``CHATFLOW_INGEST_*``)."""

from __future__ import annotations

from typing import Self

from pydantic import model_validator

from libs.common.settings import ServiceSettings, field


class IngestSettings(ServiceSettings):
    service = "ingest"
    http_port: int = 8103
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 2525
    smtp_hostname: str = "mx.chatflow.test"
    # An internal relay in front of us may be allowed to skip STARTTLS; on by default.
    smtp_require_starttls: bool = True
    smtp_max_message_bytes: int = field(
        25 * 1024 * 1024, "advertised as SIZE; a larger declared SIZE or DATA is refused with 552"
    )
    smtp_max_recipients: int = field(
        100, "RCPTs per transaction (RFC 5321 asks for at least 100); past it 452"
    )
    smtp_max_line_length: int = field(
        998, "octets per line without CRLF (RFC 5322 2.1.1); a longer line refuses the message"
    )
    smtp_max_header_fields: int = field(
        500, "header fields per message; more refuses the message (protects the reader)"
    )
    smtp_max_received_headers: int = field(
        50, "Received headers (hops) per message; more is refused as a mail loop (554 5.4.6)"
    )
    smtp_idle_timeout_s: float = field(
        300.0,
        "seconds allowed between commands, and for the whole DATA transfer, before 421 and close",
    )
    smtp_session_max_s: float = field(
        1800.0, "seconds a session may last in total, however busy, before 421 and close"
    )
    smtp_postmaster: str = field(
        "",
        "the mailbox address that receives postmaster@ mail (RFC 5321 4.5.1: an MX accepts it for "
        "every domain it serves); empty: the first active mailbox of that domain by address",
    )
    lmtp_host: str = "127.0.0.1"
    lmtp_port: int = field(0, "LMTP listener (RFC 2033) for an MTA in front of us; 0 = off")
    lmtp_require_starttls: bool = field(
        True, "LMTP MAIL needs STARTTLS first; turn off only for a loopback-only Postfix"
    )

    @model_validator(mode="after")
    def _limits_make_sense(self) -> Self:
        if self.smtp_max_line_length < 78 or self.smtp_max_message_bytes < 1024:
            raise ValueError("smtp_max_line_length >= 78 and smtp_max_message_bytes >= 1024")
        if self.smtp_idle_timeout_s <= 0 or self.smtp_session_max_s <= 0:
            raise ValueError("SMTP timeouts must be positive")
        return self
