"""The committed AsyncAPI document is what the event models say."""

from __future__ import annotations

import yaml

from libs.common.events import registered
from libs.common.settings import ROOT
from tools import asyncapi


def test_committed_asyncapi_matches_the_models() -> None:
    committed = (ROOT / "docs/asyncapi.yaml").read_text()
    assert committed == asyncapi.render(), "run: python -m tools.asyncapi > docs/asyncapi.yaml"


def test_every_registered_type_has_a_channel_and_a_schema() -> None:
    doc = yaml.safe_load(asyncapi.render())
    for type_, version in registered():
        assert doc["channels"][type_]["address"] == f"{{prefix}}{type_}"
        assert f"{type_}.v{version}" in doc["components"]["messages"]
    assert "deadletter" in doc["channels"]
    assert "MailReceived" in doc["components"]["schemas"]
    assert "from" in doc["components"]["schemas"]["MailReceived"]["properties"]
