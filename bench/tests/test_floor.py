"""The floor bench measures what it says: every frame to every socket, timed across processes."""

from __future__ import annotations

from bench import floor


def test_every_frame_reaches_every_socket_and_is_timed() -> None:
    out = floor.run(floor.options(["--agents", "30", "--rate", "20", "--seconds", "1"]))
    assert out["frames_due"] == 20 * 30
    assert out["frames_received"] == out["frames_due"]
    # Ten connections spread over the order, each timing each of the 20 frames.
    assert out["latency_ms"]["samples"] == 10 * 20
    assert 0 < out["latency_ms"]["p50"] <= out["latency_ms"]["p99"] <= out["latency_ms"]["max"]
    # CPU is read in clock ticks (10 ms): a second of 30 sockets may be under one.
    assert out["cpu_us_per_frame"]["server"] >= 0 and out["cpu_us_per_frame"]["clients"] >= 0
