"""``make run`` honours port overrides from the environment, and derives every URL from them."""

from __future__ import annotations

import dataclasses
import json

import pytest

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
