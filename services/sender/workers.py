"""Processes that compose and sign (``render_workers``): the CPU of a send, off the event loop.

Composing and DKIM-signing is about a third of a message's CPU (compose.py writes the common
case itself; RSA runs in OpenSSL); in worker processes it runs on other cores while the
service's own loop keeps its SMTP sessions and database round trips moving. Handing a job to a
process costs more than it saves for a 5 KB reply (bench.sender: 7.5 against 4.9 ms of CPU per
message), so the default is 0; more sender
processes (replicas) are the way to use more cores.
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
