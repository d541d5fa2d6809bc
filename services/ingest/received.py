"""Turning what the reader found into the channel-neutral ``mail.received`` payload.

The HTML's ``cid:`` images are linked to their stored parts here (``domain/cid.py``), because
the attachment ids only exist once ``IngestHandler.store`` has inserted the parts.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from libs.common.events import Address, AttachmentRef, MailFlags, MailReceived
from services.ingest.domain.cid import cid_map, link_inline_images
from services.ingest.storage import Mailbox


def _addr(a: Any) -> Address:
    return Address(name=a.name or "", address=a.address)


def to_event(
    read: Any, ingest_id: str, box: Mailbox, parts: list[tuple[str, Any]], received_at: datetime
) -> MailReceived:
    date = read.date or received_at
    html, shown = link_inline_images(
        read.html, cid_map((att_id, p.content_id) for att_id, p in parts)
    )
    return MailReceived.model_validate(
        {
            "ingest_id": ingest_id,
            "mailbox_id": box.id,
            "mailbox_address": box.address,
            "message_id": read.message_id,
            "in_reply_to": read.in_reply_to,
            "references": read.references,
            "from": _addr(read.from_) if read.from_ else Address(name="", address=""),
            "to": [_addr(a) for a in read.to],
            "cc": [_addr(a) for a in read.cc],
            "reply_to": [_addr(a) for a in read.reply_to],
            "subject": read.subject,
            "date": date,
            "received_at": received_at,
            "text": read.text,
            "html": html,
            # The reader keeps these two among its headers; empty means absent.
            "thread_index": read.headers.get("Thread-Index") or None,
            "thread_topic": read.headers.get("Thread-Topic") or None,
            "attachments": [
                AttachmentRef(
                    id=att_id,
                    filename=p.filename,
                    content_type=p.content_type,
                    size=len(p.data),
                    content_id=p.content_id,
                    inline=p.inline or att_id in shown,
                )
                for att_id, p in parts
            ],
            "flags": MailFlags(
                generated_message_id="generated_message_id" in read.defects
                or read.message_id.endswith("@chatflow.generated>"),
                date_fallback=read.date is None,
                auto_submitted=read.auto_submitted,
                bounce=read.bounce,
                truncated=read.flags.text_truncated or read.flags.html_truncated,
                incomplete=read.flags.depth_limited or read.flags.headers_only,
            ),
        }
    )
