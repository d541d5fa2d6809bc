"""The event streams as an AsyncAPI 3 document, generated from the payload registry.

``python -m tools.asyncapi > docs/asyncapi.yaml``; a test keeps the committed file equal to what
the code produces, so the published stream contract cannot drift from the models.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml
from pydantic import BaseModel

import services.gateway.access
import services.notifier.drafts
import services.notifier.frames
from libs.common.events import Envelope, registered

PRODUCERS = {
    "auth.jwks": "auth",
    "mailbox.changed": "auth",
    "user.changed": "auth",
    "membership.changed": "auth",
    "mail.received": "ingest",
    "mail.bounced": "ingest",
    "conversation.message_added": "threader",
    "conversation.updated": "threader",
    "conversation.merged": "threader",
    "conversation.read": "threader (REST mark-read), notifier (the WebSocket read frame)",
    "mail.send": "notifier, threader, other systems (a command)",
    "mail.status": "sender",
    "notifier.frame": "notifier (internal: every notifier replica reads it)",
    "notifier.draft": "notifier (internal: every notifier replica reads it)",
    "gateway.access": "gateway (internal: every gateway replica reads it)",
}


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")


def build() -> dict[str, Any]:
    channels: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    envelope = _schema(Envelope)
    schemas["Envelope"] = envelope
    _ = services.gateway.access  # imported for its registration
    _ = services.notifier.drafts  # and this one for notifier.draft
    for (type_, version), model in sorted(registered().items()):
        name = f"{type_}.v{version}"
        schema = _schema(model)
        for sub_name, sub in schema.pop("$defs", {}).items():
            schemas[sub_name] = sub
        schemas[model.__name__] = schema
        messages[name] = {
            "name": type_,
            "title": f"{type_} v{version}",
            "summary": (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else type_,
            "contentType": "application/json",
            "payload": {
                "allOf": [
                    {"$ref": "#/components/schemas/Envelope"},
                    {
                        "type": "object",
                        "properties": {
                            "type": {"const": type_},
                            "version": {"const": version},
                            "payload": {"$ref": f"#/components/schemas/{model.__name__}"},
                        },
                    },
                ]
            },
        }
        channels[type_] = {
            "address": f"{{prefix}}{type_}",
            "description": (
                f"Redis stream; each entry has one field `e`, the JSON envelope. "
                f"Producer: {PRODUCERS.get(type_, 'unknown')}."
            ),
            "parameters": {"prefix": {"description": "CHATFLOW_STREAM_PREFIX (default chatflow:)"}},
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
        }
        operations[f"publish.{type_}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{type_}"},
        }
    channels["deadletter"] = {
        "address": "{prefix}deadletter",
        "description": (
            "Entries that failed validation or max_deliveries: fields stream, entry_id, group, "
            "reason, e (the original envelope) and at."
        ),
        "parameters": {"prefix": {"description": "CHATFLOW_STREAM_PREFIX"}},
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "ChatFLOW event streams",
            "version": "1",
            "description": "Redis Streams between ChatFLOW services and other systems.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


def render() -> str:
    return yaml.safe_dump(build(), sort_keys=True, allow_unicode=True)


if __name__ == "__main__":
    sys.stdout.write(render())
