"""The shared lifecycle in a real process: ready checks, and SIGTERM finishing in-flight work."""

from __future__ import annotations

import os
import signal
import ssl
from pathlib import Path

import httpx

from libs.common import testing
from libs.common.bus import Bus
from libs.common.settings import ROOT, ServiceSettings
from libs.common.tests.helpers import sample, setup_schema


async def test_sigterm_finishes_the_handler_acks_and_exits(
    bus: Bus, database_url: str, tmp_path: Path
) -> None:
    pool = await setup_schema(database_url)
    port = testing.free_port()
    started = tmp_path / "started"
    env = testing.service_env(
        database_url, bus.prefix, CHATFLOW_COMMONTEST_HTTP_PORT=str(port), SLOW_STARTED=str(started)
    )
    proc = testing.start_python(["libs.common.tests.helpers", "service"], env, tmp_path / "svc.log")
    try:
        testing.wait_port(port, 20, proc)
        ca = ssl.create_default_context(cafile=str(ROOT / "var/certs/ca.pem"))
        async with httpx.AsyncClient(verify=ca) as http:
            ready = await testing.eventually(
                lambda: http.get(f"https://127.0.0.1:{port}/readyz"), timeout=10
            )
            assert ready.status_code == 200, ready.text
            assert ready.json()["checks"] == {"postgres": True, "redis": True, "loops": True}
            metrics = await http.get(f"https://127.0.0.1:{port}/metrics")
            assert "chatflow_outbox_lag_seconds" in metrics.text
        env_ = sample(42)
        await bus.publish(env_)
        await testing.eventually(started.exists, timeout=10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, (tmp_path / "svc.log").read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    rows = await pool.fetch("SELECT handled_by FROM effects WHERE event_id = $1", env_.id)
    assert [r["handled_by"] for r in rows] == ["slow"]
    assert (await bus.redis.xpending(bus.stream("mailbox.changed"), "g"))["pending"] == 0
    log = (tmp_path / "svc.log").read_text()
    assert '"msg": "stopped"' in log and '"service": "commontest"' in log
    await pool.close()


def test_service_values_win_over_shared_ones(monkeypatch: object) -> None:
    class S(ServiceSettings):
        service = "demo"
        items: list[str] = []

    os.environ["CHATFLOW_HTTP_PORT"] = "9000"
    os.environ["CHATFLOW_DEMO_HTTP_PORT"] = "9001"
    os.environ["CHATFLOW_DEMO_ITEMS"] = '["a", "b"]'
    try:
        s = S.load()
        assert s.http_port == 9001
        assert s.items == ["a", "b"]
        assert s.db_role == "chatflow_demo" and s.db_schema == "demo"
        assert s.own_database_url.startswith("postgresql://chatflow_demo@127.0.0.1:5432/")
    finally:
        for k in ("CHATFLOW_HTTP_PORT", "CHATFLOW_DEMO_HTTP_PORT", "CHATFLOW_DEMO_ITEMS"):
            del os.environ[k]


async def test_stream_length_is_bounded(bus: Bus) -> None:
    small = Bus(bus.redis, bus.prefix, maxlen=10)
    for i in range(300):
        await small.publish(sample(i))
    assert await bus.redis.xlen(small.stream("mailbox.changed")) < 300
