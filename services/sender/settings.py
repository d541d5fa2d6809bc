"""Sender settings (``CHATFLOW_SENDER_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, model_validator

from libs.common.settings import ServiceSettings, field


class DkimKeySetting(BaseModel):
    """One signing key: ``{"selector": "s1", "key_file": "/etc/dkim/s1.pem"}`` (or ``"key"``: PEM)."""

    selector: str
    key_file: Path | None = None
    key: str = ""


class SenderSettings(ServiceSettings):
    service = "sender"
    http_port: int = 8105

    # ---- the relay (smarthost) every message goes through
    relay_host: str = "127.0.0.1"
    relay_port: int = 2526
    relay_starttls: bool = True
    relay_implicit_tls: bool = False
    relay_username: str = ""
    relay_password: str = ""
    relay_ehlo_name: str = field("", "name we give in EHLO; empty = this host's FQDN")
    relay_timeout_s: float = field(30.0, "connect, greeting and per-command reply timeout")
    relay_data_timeout_s: float = field(
        600.0, "wait for the reply to the final '.' (RFC 5321 4.5.3.2.6 asks for 10 minutes)"
    )
    relay_max_connections: int = field(
        8, "SMTP connections (and so transactions in flight) per relay at most"
    )
    relay_idle_s: float = field(
        30.0, "a pooled connection idle longer than this is closed rather than reused"
    )
    relay_max_messages_per_connection: int = field(100, "then QUIT and open a new one")

    # ---- the queue
    retry_base_s: float = field(30.0, "first retry after a 4xx/connection failure (jittered)")
    retry_max_s: float = field(3600.0, "retry interval cap (exponential backoff up to this)")
    max_queue_age_s: float = field(
        4 * 24 * 3600.0, "a message still undelivered this long after it was queued fails"
    )
    delivery_poll_ms: int = 500
    send_consumers: int = field(
        8, "readers of mail.send in this process: commands they hold at once commit together"
    )
    delivery_concurrency: int = field(32, "sends in flight per process, over all relays")
    prepare_batch: int = field(20, "commands composed (and signed) per transaction")
    prepare_workers: int = field(
        2, "prepare passes at once: one composes and signs while another waits for the database"
    )
    render_workers: int = field(
        0, "processes that compose and sign (the CPU of a send); 0 = in the service's own loop"
    )
    recover_interval_s: float = field(
        5.0, "how often rows left in 'sending' by a dead process are looked for"
    )
    unconfirmed_policy: Literal["assume_sent", "resend"] = field(
        "assume_sent",
        "a row whose final '.' may have reached the relay when its process died: "
        "'assume_sent' (never a duplicate) or 'resend' (never a loss; the relay or receiver "
        "must dedupe by Message-ID). See services/sender/delivery.py.",
    )
    # How long a send waits for its conversation (and mailbox) to reach our view before failing.
    unknown_conversation_wait_s: float = 3.0
    max_message_bytes: int = field(
        25 * 1024 * 1024, "composed size limit (attachments included); larger sends fail"
    )

    # ---- agents' uploads (POST /api/attachments)
    upload_max_bytes: int = field(10 * 1024 * 1024, "largest file an agent may upload (413 above)")
    upload_orphan_ttl_s: float = field(
        24 * 3600.0, "an upload no send has used this long after it was made is deleted"
    )
    upload_expire_interval_s: float = field(600.0, "how often unused uploads are looked for")

    # ---- DKIM
    dkim_keys_dir: Path | None = field(
        None, "directory of <domain>.<selector>.key PEM files (RSA); the selector has no dots"
    )
    dkim_keys: dict[str, DkimKeySetting] = field(
        {}, 'JSON {"<domain>": {"selector": ..., "key_file": ... | "key": PEM}}'
    )
    dkim_rsa: Literal["openssl", "dkimpy"] = field(
        "openssl",
        "RSA for the signature: OpenSSL (via cryptography) or dkimpy's pure-Python one; "
        "PKCS#1 v1.5 is deterministic, so both give the same bytes",
    )

    @model_validator(mode="after")
    def _sane(self) -> Self:
        if self.relay_max_connections < 1 or self.delivery_concurrency < 1:
            raise ValueError("relay_max_connections and delivery_concurrency must be >= 1")
        if self.retry_base_s <= 0 or self.retry_max_s < self.retry_base_s:
            raise ValueError("need 0 < retry_base_s <= retry_max_s")
        return self
