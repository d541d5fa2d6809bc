"""From a ``mail.send`` command and our view of its conversation to the signed bytes we deliver.

Pure: no I/O, the clock comes in as ``now``. Every way a command can be unsendable ends in a
:class:`Refusal` whose ``detail`` says why in words an agent can act on; nothing unsendable is
queued, and nothing is dropped without a ``failed`` status.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from libs.common.events import MailSend, SentMessage
from services.sender.domain import compose as c


class Signer(Protocol):
    def sign(self, message: bytes, from_domain: str) -> tuple[bytes, str | None]: ...


@dataclass
class StoredAttachment:
    id: str
    mailbox_id: str
    filename: str
    content_type: str
    data: bytes
    content_id: str | None = None
    # Every mailbox whose agents may send it (an upload records its uploader's mailboxes).
    mailboxes: frozenset[str] = frozenset()

    def usable_by(self, mailbox_id: str) -> bool:
        return mailbox_id == self.mailbox_id or mailbox_id in self.mailboxes


@dataclass
class Rendered:
    """What the queue stores and sends: exactly these bytes, on every attempt."""

    mime: bytes
    message_id: str
    mail_from: str
    recipients: list[str]
    sent: dict[str, Any]
    dkim_domain: str | None


@dataclass
class Refusal:
    detail: str


@dataclass
class Job:
    cmd: MailSend
    mailbox: Mapping[str, Any] | None
    thread: Sequence[Mapping[str, Any]]
    attachments: dict[str, StoredAttachment] = field(default_factory=dict)


def _addr(d: Mapping[str, Any]) -> c.Addr:
    return c.Addr(name=d.get("name") or "", address=d["address"])


def plan(
    cmd: MailSend, box: Mapping[str, Any], thread: Sequence[Mapping[str, Any]], now: datetime
) -> tuple[c.Draft, c.ThreadContext]:
    """Who gets the message and which headers thread it, from our view of the conversation.

    With no message of the conversation in our view, the command must open it
    (``cmd.conversation``): its first message goes to ``cmd.to`` with no In-Reply-To.
    """
    cc = [c.Addr(a.name, a.address) for a in cmd.cc] if cmd.cc is not None else []
    domain = box["address"].rpartition("@")[2]
    local = box["address"].rpartition("@")[0]
    if thread:
        last = thread[-1]
        last_in = next((m for m in reversed(thread) if m["direction"] == "in"), None)
        if cmd.to is not None:
            to = [c.Addr(a.name, a.address) for a in cmd.to]
        elif last_in is not None:
            # Its Reply-To if it has one (a web form's noreply@ asks for the customer there).
            to = [_addr(a) for a in last_in.get("reply_to") or []] or [_addr(last_in["sender"])]
        else:
            to = [_addr(a) for a in last["to_addrs"]]
        number = last["number"]
        # The threader's signed token (number-hmac) names the conversation in the Message-ID and
        # the Reply-To, so an answer that lost its References still finds it.
        signed = next((m.get("token") for m in reversed(thread) if m.get("token")), None)
        subject = cmd.subject or thread[0]["conv_subject"] or thread[0]["subject"]
        last_id: str | None = last["message_id"]
        refs = list(last["refs"])
    else:
        opening = cmd.conversation
        assert opening is not None, "render() checks that a thread or an opening is there"
        to = [c.Addr(a.name, a.address) for a in cmd.to or []]
        number, signed = opening.number, opening.token
        subject, last_id, refs = opening.subject or cmd.subject or "", None, []
    token = str(number) if number is not None else cmd.id_conversa.split("-")[0]
    draft = c.Draft(
        mailbox=c.Addr(box["name"], box["address"]),
        to=to,
        cc=cc,
        html=cmd.html,
        attachments=[],
        # Short enough that clients' folders keep it one plain token (long ids get encoded).
        message_id=f"<{uuid.UUID(cmd.send_id).hex}.{signed or token}@{domain}>",
        reply_to=c.Addr(box["name"], f"{local}+{signed}@{domain}") if signed else None,
        date=now,
        auto_generated=cmd.automatic,
    )
    ctx = c.ThreadContext(subject=subject, last_message_id=last_id, references=refs, token=token)
    return draft, ctx


def render(job: Job, signer: Signer, now: datetime, max_bytes: int) -> Rendered | Refusal:
    """Compose, sign and size-check one command (the caller waited for mailbox and thread)."""
    cmd, box = job.cmd, job.mailbox
    if box is None:
        return Refusal(f"unknown mailbox {cmd.mailbox_id!r}")
    if not box["active"]:
        return Refusal(f"mailbox {box['address']} is inactive")
    if not job.thread and cmd.conversation is None:
        return Refusal(f"unknown conversation {cmd.id_conversa!r}")
    if job.thread and cmd.mailbox_id != job.thread[-1]["mailbox_id"]:
        # The same words as an unknown one: the agent learns nothing of other mailboxes.
        return Refusal(f"unknown conversation {cmd.id_conversa!r}")
    files: list[c.Attachment] = []
    for att_id in cmd.attachments:
        att = job.attachments.get(att_id)
        if att is None or not att.usable_by(cmd.mailbox_id):
            # Another mailbox's upload reads as a missing one (found by a trial: the detail
            # said it existed, and for which mailbox).
            return Refusal(f"attachment {att_id!r} not found")
        files.append(c.Attachment(att.filename, att.content_type, att.data, att.content_id))
    try:
        draft, ctx = plan(cmd, box, job.thread, now)
        draft.attachments = files
        if not draft.to:
            return Refusal("no recipients: To is empty and the conversation has no sender")
        composed = c.compose_message(draft, ctx)
        if not composed.text.strip() and not files and "<img" not in composed.html:
            # "<script>…</script>" passes every form check and sanitizes to nothing: the
            # customer would get an empty mail (found by a trial).
            return Refusal("the reply is empty once unsafe content is removed")
        mime = composed.raw
        mail_from = c.envelope_address(c.Addr("", draft.mailbox.address), "From")
        recipients = list(
            dict.fromkeys(
                [c.envelope_address(c.Addr("", a.address), "To") for a in draft.to]
                + [c.envelope_address(c.Addr("", a.address), "Cc") for a in draft.cc]
            )
        )
    except (c.HeaderInjection, c.InvalidDraft) as exc:
        return Refusal(f"invalid message: {exc}")
    # Checked before signing too: no CPU spent on a message that cannot go anyway.
    if len(mime) > max_bytes:
        return Refusal(f"message is {len(mime)} bytes, over the limit of {max_bytes} bytes")
    signed, dkim_domain = signer.sign(mime, mail_from.rpartition("@")[2])
    if len(signed) > max_bytes:
        return Refusal(f"message is {len(signed)} bytes, over the limit of {max_bytes} bytes")
    sent = SentMessage.model_validate(
        {
            "message_id": draft.message_id,
            "from": {"name": draft.mailbox.name, "address": draft.mailbox.address},
            "to": [{"name": a.name, "address": a.address} for a in draft.to],
            "cc": [{"name": a.name, "address": a.address} for a in draft.cc],
            "subject": composed.subject,
            "date": draft.date,
            "text": composed.text,
            "html": composed.html,
            "in_reply_to": composed.in_reply_to,
            "references": composed.references,
            # What the agent sees listed on the sent message (downloads through the gateway).
            "attachments": [
                {
                    "id": job.attachments[att_id].id,
                    "filename": job.attachments[att_id].filename,
                    "content_type": job.attachments[att_id].content_type,
                    "size": len(job.attachments[att_id].data),
                    "content_id": job.attachments[att_id].content_id,
                    "inline": job.attachments[att_id].content_id is not None,
                }
                for att_id in cmd.attachments
            ],
        }
    )
    return Rendered(
        mime=signed,
        message_id=draft.message_id,
        mail_from=mail_from,
        recipients=recipients,
        sent=sent.model_dump(mode="json"),
        dkim_domain=dkim_domain,
    )
