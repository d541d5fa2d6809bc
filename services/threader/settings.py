"""Threader settings (``CHATFLOW_THREADER_*``)."""

from __future__ import annotations

from pathlib import Path

from libs.common.settings import ROOT, ServiceSettings


class ThreaderSettings(ServiceSettings):
    service = "threader"
    http_port: int = 8104
    page_max: int = 100
    # Mail with no link joins a conversation by subject + a person in common only within this
    # many hours of its messages (0 turns the subject fallback off).
    subject_window_hours: float = 72.0
    # A closed conversation quiet for longer than this many days is not reopened by new mail:
    # the mail starts a new conversation linked to it (0: always reopen).
    reopen_max_age_days: float = 30.0
    # Consumers of mail.received in the process: with two, a batch's Python work overlaps the
    # placement of the batch before it in PostgreSQL (placements still go in stream order).
    received_consumers: int = 2
    # Entries each of them reads at once: under a backlog, a batch's fixed costs (its round
    # trips, the lock, the commit) shared by more mail; a quiet stream still gives batches of
    # one. 200 threaded ~10 % more than 100 on the bench; 400 no more than 200.
    received_batch: int = 200
    # The HMAC key of conversation tokens: the value, or a file holding it (made by make certs).
    thread_token_secret: str = ""
    thread_token_secret_file: Path = ROOT / "var/certs/thread-token.key"

    def token_secret(self) -> bytes:
        if self.thread_token_secret:
            return self.thread_token_secret.encode()
        return self.thread_token_secret_file.read_bytes().strip()
