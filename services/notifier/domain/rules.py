"""Pure decisions of the notifier: stream-id order, send-status precedence, frame audiences."""

from __future__ import annotations

from collections.abc import Iterable

# A later status of the same send never yields to an earlier one that arrives late.
_STATUS_RANK = {"requested": 0, "queued": 1, "deferred": 2, "sent": 3, "failed": 3}


def status_rank(status: str) -> int:
    return _STATUS_RANK.get(status, 0)


def stream_id(entry_id: str) -> tuple[int, int]:
    """``"1700000000000-3"`` as a comparable pair (Redis ids order by time, then sequence)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def is_after(entry_id: str, other: str | None) -> bool:
    return other is None or stream_id(entry_id) > stream_id(other)


def needs_resync(after: str, first_in_stream: str | None) -> bool:
    """The stream is trimmed from its head, so if ``after`` is gone, frames after it may be too."""
    return first_in_stream is None or stream_id(after) < stream_id(first_in_stream)


def in_audience(mailboxes: Iterable[str], sub: str, mailbox_id: str, user_id: str | None) -> bool:
    return mailbox_id in mailboxes and (not user_id or user_id == sub)
