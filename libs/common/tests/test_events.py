from datetime import UTC, datetime

import pytest

from libs.common.events import Envelope, EventError, MailReceived, registered


def test_every_registered_payload_round_trips_through_json() -> None:
    assert len(registered()) >= 10
    for (type_, version), model in registered().items():
        assert model.event_type == type_ and model.event_version == version  # type: ignore[attr-defined]


def test_envelope_round_trip_keeps_from_alias() -> None:
    now = datetime.now(UTC)
    payload = MailReceived.model_validate(
        {
            "ingest_id": "i",
            "mailbox_id": "m",
            "mailbox_address": "s@x.test",
            "message_id": "<a@b>",
            "from": {"name": "Zoë", "address": "z@x.test"},
            "date": now,
            "received_at": now,
        }
    )
    env = Envelope.of(payload, "ingest", correlation_id="c1")
    raw = env.to_json()
    assert '"from":{"name":"Zoë"' in raw
    back = Envelope.from_json(raw)
    assert back.correlation_id == "c1"
    assert back.payload_as(MailReceived).from_.address == "z@x.test"


@pytest.mark.parametrize(
    "raw,reason",
    [
        (b"not json", "invalid envelope"),
        (b'{"type": "mail.received", "producer": "x", "payload": {}}', "invalid mail.received"),
        (b'{"type": "no.such", "producer": "x", "payload": {}}', "unknown event type"),
        (
            b'{"type": "mail.send", "version": 9, "producer": "x", "payload": {}}',
            "unknown event type",
        ),
    ],
)
def test_bad_entries_raise_event_error(raw: bytes, reason: str) -> None:
    with pytest.raises(EventError, match=reason):
        Envelope.from_json(raw)
