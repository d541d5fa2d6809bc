"""Threader settings (``CHATFLOW_THREADER_*``)."""

from __future__ import annotations

from libs.common.settings import ServiceSettings


class ThreaderSettings(ServiceSettings):
    service = "threader"
    http_port: int = 8104
    page_max: int = 100
