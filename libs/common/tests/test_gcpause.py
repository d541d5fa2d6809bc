"""The collector's pauses are measured, and a started service's objects are frozen out of them."""

from __future__ import annotations

import gc

from libs.common import gcpause


def _count(generation: str) -> float:
    for metric in gcpause.PAUSE.collect():
        for s in metric.samples:
            if s.name.endswith("_count") and s.labels["generation"] == generation:
                return s.value
    return 0.0


def test_every_collection_is_timed_and_startup_objects_are_frozen() -> None:
    gcpause.install()
    gcpause.install()  # once only
    assert gc.callbacks.count(gcpause._callback) == 1
    before = _count("2")
    gc.collect()
    assert _count("2") == before + 1
    frozen = gc.get_freeze_count()
    try:
        gcpause.freeze()
        assert gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()
        gc.callbacks.remove(gcpause._callback)
