"""Processes that compose and sign (``render_workers``): the CPU of a send, off the event loop.

Composing with the stdlib ``email`` package (and parsing the result back, see compose.py) is
most of a message's CPU; in worker processes it runs on other cores while the service's own
loop keeps its SMTP sessions and database round trips moving.
"""

from __future__ import annotations

from datetime import datetime

from services.sender.domain.render import Job, Refusal, Rendered, render
from services.sender.signing import DkimKey, Signer

_signer: Signer | None = None


def init(keys: dict[str, DkimKey], rsa_backend: str) -> None:
    """Worker initializer: the keys were checked by the service; load them once per process."""
    global _signer
    _signer = Signer(keys, rsa_backend)


def render_job(job: Job, now: datetime, max_bytes: int) -> Rendered | Refusal:
    assert _signer is not None, "worker not initialized"
    return render(job, _signer, now, max_bytes)
