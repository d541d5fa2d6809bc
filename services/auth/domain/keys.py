"""Which signing key signs at a given moment: the rule behind zero-downtime rotation.

A rotated key is published at once but signs only from ``signs_from``, a lead later than the
verifiers' minimum refetch interval, so no verifier meets its kid before it can fetch it. The key
it replaces is retired at that same moment and stays published for the grace period.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K")


@dataclass(frozen=True)
class Scheduled(Generic[K]):
    kid: str
    key: K
    signs_from: float  # epoch seconds on the database's clock
    retired_at: float | None  # may lie in the future: when the next key takes over


def signing(schedule: Iterable[Scheduled[K]], now: float) -> Scheduled[K] | None:
    """The newest key that has started signing and is not retired at ``now``."""
    best: Scheduled[K] | None = None
    for k in schedule:
        if k.signs_from > now or (k.retired_at is not None and k.retired_at <= now):
            continue
        if best is None or k.signs_from >= best.signs_from:
            best = k
    return best
