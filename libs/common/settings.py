"""Settings from the environment.

Every service reads ``CHATFLOW_<NAME>`` for what all services share (database, Redis, TLS files)
and ``CHATFLOW_<SERVICE>_<NAME>`` for its own values, the latter winning, so ops can point one
service elsewhere without touching the others.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, get_origin
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parents[2]


class ServiceSettings(BaseSettings):
    """Settings common to every service; subclasses set ``service`` and add their own fields."""

    model_config = SettingsConfigDict(extra="ignore")
    service: ClassVar[str] = "common"

    database_url: str = "postgresql://postgres@127.0.0.1:5432/chatflow"
    # The service's own login; empty means "the admin URL with this service's role as user".
    service_database_url: str = ""
    db_pool_min: int = 2
    db_pool_max: int = 10
    redis_url: str = "redis://127.0.0.1:6379/0"
    stream_prefix: str = "chatflow:"
    stream_maxlen: int = 1_000_000

    http_host: str = "127.0.0.1"
    http_port: int = 8100
    tls_cert: Path = ROOT / "var/certs/server.pem"
    tls_key: Path = ROOT / "var/certs/server.key"
    tls_ca: Path = ROOT / "var/certs/ca.pem"

    jwt_issuer: str = "https://127.0.0.1:8443"
    jwt_audience: str = "chatflow"
    jwt_leeway_s: int = 30

    log_level: str = "INFO"
    consumer_block_ms: int = 1000
    consumer_claim_idle_ms: int = 30_000
    consumer_claim_interval_ms: int = 5_000
    consumer_max_deliveries: int = 5
    outbox_poll_ms: int = 500
    shutdown_grace_s: float = 10.0

    @classmethod
    def load(cls, **overrides: Any) -> ServiceSettings:
        """Read shared ``CHATFLOW_*`` values, then the service's ``CHATFLOW_<SERVICE>_*`` ones."""
        values: dict[str, Any] = {}
        own = f"CHATFLOW_{cls.service.upper()}_"
        for name, info in cls.model_fields.items():
            for key in (f"CHATFLOW_{name.upper()}", f"{own}{name.upper()}"):
                if key in os.environ:
                    raw = os.environ[key]
                    complex_ = get_origin(info.annotation) in (list, dict, set, tuple)
                    values[name] = json.loads(raw) if complex_ else raw
        values.update(overrides)
        return cls.model_validate(values)

    @property
    def db_schema(self) -> str:
        return self.service

    @property
    def db_role(self) -> str:
        return f"chatflow_{self.service}"

    @property
    def own_database_url(self) -> str:
        """URL the service runs with: its own role, which can reach only its own schema."""
        if self.service_database_url:
            return self.service_database_url
        parts = urlsplit(self.database_url)
        host = parts.hostname or ""
        netloc = f"{self.db_role}@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def field(default: Any, description: str) -> Any:
    """A settings field with a description (shows up in docs/configuration)."""
    return Field(default=default, description=description)
