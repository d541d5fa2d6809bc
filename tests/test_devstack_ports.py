"""``make run`` honours port overrides from the environment, and derives every URL from them."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading

import pytest

from libs.common import testing
from tools import devstack
from tools.devstack import PORT_VARS, Ports, Stack


def test_every_port_has_its_variable() -> None:
    assert set(PORT_VARS) == {f.name for f in dataclasses.fields(Ports)}
    assert len(set(PORT_VARS.values())) == len(PORT_VARS)


def test_overridden_ports_are_where_the_stack_points() -> None:
    ports = Ports.from_env(
        {"CHATFLOW_GATEWAY_PUBLIC_PORT": "9443", "CHATFLOW_AUTH_HTTP_PORT": "9102"}
    )
    assert (ports.gateway, ports.auth, ports.threader) == (9443, 9102, Ports().threader)
    stack = Stack(ports=ports, inherit_env=False)
    env = stack.env("gateway")
    assert env["CHATFLOW_GATEWAY_PUBLIC_PORT"] == "9443"
    assert env["CHATFLOW_AUTH_HTTP_PORT"] == "9102"
    assert env["CHATFLOW_GATEWAY_AUTH_URL"] == "https://127.0.0.1:9102"
    assert env["CHATFLOW_JWT_ISSUER"] == stack.origin == "https://127.0.0.1:9443"
    assert "https://127.0.0.1:9443" in json.loads(env["CHATFLOW_ALLOWED_ORIGINS"])
    assert env["CHATFLOW_AUTH_WEB_REDIRECT_URI"] == "https://127.0.0.1:9443/callback"
    assert Ports.from_env({}) == Ports()


@pytest.mark.parametrize("value", ["", "http", "0", "70000", "-1"])
def test_a_bad_port_is_refused_by_name(value: str) -> None:
    with pytest.raises(ValueError, match="CHATFLOW_INGEST_SMTP_PORT"):
        Ports.from_env({"CHATFLOW_INGEST_SMTP_PORT": value})


def _listening() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", testing.free_port()))
    s.listen()
    return s


def test_a_port_in_use_is_named_with_the_variable_that_moves_it() -> None:
    """Two ``make run``: the second must say which port is taken, not report the first's stack
    as its own."""
    with _listening() as taken:
        port = taken.getsockname()[1]
        ports = Ports(*(testing.free_port() for _ in range(10)))
        ports.smtp = port
        with pytest.raises(devstack.PortsBusy) as info:
            devstack.check_ports(ports)
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "CHATFLOW_INGEST_SMTP_PORT" in message
    devstack.check_ports(ports)  # free again


def test_make_run_refuses_to_start_on_a_busy_port(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked first: nothing is migrated or started, and the exit code says it failed."""
    started: list[str] = []
    monkeypatch.setattr(Stack, "migrate", lambda self: started.append("migrate"))
    monkeypatch.setattr(Stack, "start", lambda self, with_sink=True: started.append("start"))
    with _listening() as taken:
        for var in PORT_VARS.values():
            monkeypatch.setenv(var, str(testing.free_port()))
        monkeypatch.setenv("CHATFLOW_GATEWAY_PUBLIC_PORT", str(taken.getsockname()[1]))
        with pytest.raises(SystemExit) as info:
            devstack.main(["run"])
    assert info.value.code not in (0, None)
    assert "CHATFLOW_GATEWAY_PUBLIC_PORT" in capsys.readouterr().err
    assert started == []


def _fake_service(stack: Stack, name: str, code: str) -> None:
    stack._spawn(name, ["-c", code], {**os.environ})


def test_a_service_that_fails_to_start_makes_a_non_zero_exit() -> None:
    stack = Stack(ports=Ports(*(testing.free_port() for _ in range(10))), echo=False)
    _fake_service(stack, "auth", "import sys; sys.exit(3)")
    rc = devstack.supervise(stack, threading.Event(), "", ready_timeout=20)
    assert rc != 0


def test_a_service_that_exits_later_makes_a_non_zero_exit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack = Stack(ports=Ports(*(testing.free_port() for _ in range(10))), echo=False)
    monkeypatch.setattr(Stack, "wait_ready", lambda self, *a, **k: None)
    _fake_service(stack, "auth", "import sys, time; time.sleep(0.5); sys.exit(3)")
    _fake_service(stack, "gateway", "import time; time.sleep(60)")
    rc = devstack.supervise(stack, threading.Event(), "", ready_timeout=20)
    assert rc != 0
    assert stack.procs["gateway"].poll() is not None  # the others were stopped


def test_ctrl_c_is_a_clean_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    stack = Stack(ports=Ports(*(testing.free_port() for _ in range(10))), echo=False)
    monkeypatch.setattr(Stack, "wait_ready", lambda self, *a, **k: None)
    _fake_service(stack, "gateway", "import time; time.sleep(60)")
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    assert devstack.supervise(stack, stop, "", ready_timeout=20) == 0
