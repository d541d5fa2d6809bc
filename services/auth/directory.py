"""Directory changes and the events that announce them, written in the caller's transaction.

Every change to users, mailboxes or memberships goes through here, so the outbox row that
tells ingest, sender and notifier about it commits with the row itself.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from libs.common import outbox
from libs.common.events import Envelope, MailboxChanged, MembershipChanged, UserChanged
from services.auth import storage

PRODUCER = "auth"


def user_event(row: asyncpg.Record) -> Envelope:
    return Envelope.of(
        UserChanged(
            user_id=str(row["id"]),
            email=row["email"],
            name=row["name"],
            roles=list(row["roles"]),
            active=row["active"],
        ),
        PRODUCER,
    )


def mailbox_event(row: asyncpg.Record) -> Envelope:
    return Envelope.of(
        MailboxChanged(
            mailbox_id=str(row["id"]),
            address=row["address"],
            name=row["name"],
            active=row["active"],
        ),
        PRODUCER,
    )


def membership_event(user_id: uuid.UUID, mailbox_id: uuid.UUID, active: bool = True) -> Envelope:
    return Envelope.of(
        MembershipChanged(user_id=str(user_id), mailbox_id=str(mailbox_id), active=active), PRODUCER
    )


async def create_mailbox(conn: Any, address: str, name: str) -> asyncpg.Record:
    row = await storage.insert_mailbox(conn, address, name)
    await outbox.add(conn, mailbox_event(row))
    return row


async def ensure_mailbox(conn: Any, address: str, name: str) -> tuple[asyncpg.Record, bool]:
    """The mailbox with this address, named ``name`` and active; True if anything changed."""
    row = await storage.mailbox_by_address(conn, address)
    if row is None:
        return await create_mailbox(conn, address, name), True
    if row["name"] == name and row["active"]:
        return row, False
    row = await storage.update_mailbox(conn, row["id"], name, True)
    await outbox.add(conn, mailbox_event(row))
    return row, True


async def create_user(
    conn: Any, email: str, name: str, password_hash: str, roles: list[str]
) -> asyncpg.Record:
    row = await storage.insert_user(conn, email, name, password_hash, roles)
    await outbox.add(conn, user_event(row))
    return row


async def ensure_user_roles(conn: Any, row: asyncpg.Record, roles: list[str]) -> asyncpg.Record:
    """Add ``roles`` and reactivate; writes ``user.changed`` only if that changed something."""
    merged = list(row["roles"]) + [r for r in roles if r not in row["roles"]]
    if merged == list(row["roles"]) and row["active"]:
        return row
    row = await storage.update_user(conn, row["id"], row["name"], merged, True)
    await outbox.add(conn, user_event(row))
    return row


async def add_members(conn: Any, user_ids: list[uuid.UUID], mailbox_id: uuid.UUID) -> int:
    """Add users to a mailbox; ``membership.changed`` for each one that was not a member."""
    added = await storage.add_memberships(conn, user_ids, mailbox_id)
    if added:
        await outbox.add(conn, *[membership_event(u, mailbox_id) for u in added])
    return len(added)
