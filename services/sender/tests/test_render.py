"""services.sender.domain.render: from a command and our view of its conversation to the bytes.

Pure: no database, no relay; a signer that signs nothing.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import pytest

from libs.common.events import Address, MailSend, NewConversation
from services.sender.domain.render import Job, Refusal, Rendered, StoredAttachment, render

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
BOX = {"id": "mb-1", "address": "support@chatflow.test", "name": "Support", "active": True}
TOKEN = "77-abcdefghij"


class NoSigner:
    def sign(self, message: bytes, from_domain: str) -> tuple[bytes, str | None]:
        return message, None


def thread() -> list[dict[str, Any]]:
    return [
        {
            "id_conversa": "c-1",
            "message_id": "<first@customer.test>",
            "mailbox_id": "mb-1",
            "number": 77,
            "conv_subject": "Where is my order?",
            "direction": "in",
            "sender": {"name": "Zoë", "address": "zoe@customer.test"},
            "to_addrs": [{"name": "", "address": "support@chatflow.test"}],
            "cc_addrs": [],
            "subject": "Where is my order?",
            "date": NOW,
            "refs": [],
            "token": TOKEN,
        }
    ]


def command(**kw: Any) -> MailSend:
    values: dict[str, Any] = {
        "send_id": str(uuid.uuid4()),
        "id_conversa": "c-1",
        "mailbox_id": "mb-1",
        "html": "<p>Hello</p>",
    }
    values.update(kw)
    return MailSend.model_validate(values)


def opening(subject: str = "Your refund") -> NewConversation:
    return NewConversation(number=77, token=TOKEN, subject=subject)


def rendered(job: Job) -> tuple[Rendered, EmailMessage]:
    out = render(job, NoSigner(), NOW, 10_000_000)
    assert isinstance(out, Rendered), out
    msg = message_from_bytes(out.mime, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return out, msg


def test_new_conversation_goes_to_its_recipients_without_reply_headers() -> None:
    cmd = command(
        to=[Address(name="Zoë Customer", address="zoe@customer.test")],
        cc=[Address(address="boss@customer.test")],
        subject="Your refund",
        conversation=opening(),
    )
    out, msg = rendered(Job(cmd, BOX, []))
    assert out.recipients == ["zoe@customer.test", "boss@customer.test"]
    assert str(msg["Subject"]) == "Your refund [#77]"
    assert "In-Reply-To" not in msg and "References" not in msg
    assert f".{TOKEN}@chatflow.test>" in str(msg["Message-ID"])
    assert msg["Reply-To"].addresses[0].addr_spec == f"support+{TOKEN}@chatflow.test"
    assert "Auto-Submitted" not in msg
    # What the threader files as our outbound message says the same as the headers.
    assert out.sent["subject"] == "Your refund [#77]"
    assert out.sent["in_reply_to"] == [] and out.sent["references"] == []
    assert out.sent["message_id"] == str(msg["Message-ID"])


def test_a_thread_in_view_wins_over_the_opening() -> None:
    cmd = command(conversation=opening("Other subject"))
    out, msg = rendered(Job(cmd, BOX, thread()))
    assert str(msg["In-Reply-To"]) == "<first@customer.test>"
    assert str(msg["Subject"]) == "Re: Where is my order? [#77]"
    assert out.recipients == ["zoe@customer.test"]


@pytest.mark.parametrize("automatic", [True, False])
def test_automatic_messages_say_auto_submitted(automatic: bool) -> None:
    _, reply = rendered(Job(command(automatic=automatic), BOX, thread()))
    _, first = rendered(
        Job(
            command(
                automatic=automatic,
                to=[Address(address="zoe@customer.test")],
                conversation=opening(),
            ),
            BOX,
            [],
        )
    )
    for msg in (reply, first):
        if automatic:
            assert msg["Auto-Submitted"] == "auto-generated"
        else:
            assert "Auto-Submitted" not in msg


def test_automatic_defaults_to_false_for_old_commands() -> None:
    assert (
        MailSend.model_validate(
            {"send_id": "s", "id_conversa": "c", "mailbox_id": "m", "html": "x"}
        ).automatic
        is False
    )


@pytest.mark.parametrize(
    ("cmd", "view", "reason"),
    [
        (command(), [], "unknown conversation"),
        (command(conversation=opening()), [], "no recipients"),
        (command(to=[], conversation=opening()), [], "no recipients"),
        (
            command(
                to=[Address(address="zoe@customer.test\r\nBcc: x@y.test")], conversation=opening()
            ),
            [],
            "invalid message",
        ),
        (command(mailbox_id="mb-2"), thread(), "unknown conversation"),
    ],
)
def test_refusals(cmd: MailSend, view: list[dict[str, Any]], reason: str) -> None:
    box = {**BOX, "id": cmd.mailbox_id}
    out = render(Job(cmd, box, view), NoSigner(), NOW, 10_000_000)
    assert isinstance(out, Refusal) and reason in out.detail, out


def upload(**kw: Any) -> StoredAttachment:
    values: dict[str, Any] = {
        "id": "up_1",
        "mailbox_id": "mb-1",
        "filename": "fatura.pdf",
        "content_type": "application/pdf",
        "data": b"%PDF-1.4 fake",
    }
    values.update(kw)
    return StoredAttachment(**values)


def test_an_upload_of_the_mailbox_is_attached() -> None:
    att = upload(mailbox_id="mb-0", mailboxes=frozenset({"mb-0", "mb-1"}))
    cmd = command(attachments=["up_1"])
    out, msg = rendered(Job(cmd, BOX, thread(), {"up_1": att}))
    (part,) = list(msg.iter_attachments())
    assert part.get_filename() == "fatura.pdf" and part.get_content() == b"%PDF-1.4 fake"
    # The sent message lists it, so the conversation shows it on our side too.
    assert out.sent["attachments"] == [
        {
            "id": "up_1",
            "filename": "fatura.pdf",
            "content_type": "application/pdf",
            "size": len(b"%PDF-1.4 fake"),
            "content_id": None,
            "inline": False,
        }
    ]


def test_an_upload_of_another_mailbox_is_refused_as_if_it_did_not_exist() -> None:
    att = upload(mailbox_id="mb-2", mailboxes=frozenset({"mb-2"}))
    out = render(
        Job(command(attachments=["up_1"]), BOX, thread(), {"up_1": att}), NoSigner(), NOW, 10**7
    )
    missing = render(Job(command(attachments=["up_1"]), BOX, thread(), {}), NoSigner(), NOW, 10**7)
    assert isinstance(out, Refusal) and isinstance(missing, Refusal)
    assert out.detail == missing.detail == "attachment 'up_1' not found"


def test_a_missing_upload_is_refused() -> None:
    out = render(Job(command(attachments=["up_9"]), BOX, thread(), {}), NoSigner(), NOW, 10**7)
    assert isinstance(out, Refusal) and "'up_9' not found" in out.detail


@pytest.mark.parametrize("html", ["<script>alert(1)</script>", "<p> </p>", "<style>p{}</style>"])
def test_a_reply_empty_once_sanitized_is_refused_with_the_reason(html: str) -> None:
    out = render(Job(command(html=html), BOX, thread(), {}), NoSigner(), NOW, 10**7)
    assert isinstance(out, Refusal) and "empty once unsafe content is removed" in out.detail
    # Not empty: a picture alone, or a file with no words.
    img = command(html='<p><img src="https://example.test/a.png" alt="chart"></p>')
    assert not isinstance(render(Job(img, BOX, thread(), {}), NoSigner(), NOW, 10**7), Refusal)
    att = upload(mailbox_id="mb-1", mailboxes=frozenset({"mb-1"}))
    bare = command(html="<p></p>", attachments=["up_1"])
    out = render(Job(bare, BOX, thread(), {"up_1": att}), NoSigner(), NOW, 10**7)
    assert not isinstance(out, Refusal)
