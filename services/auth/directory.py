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
from libs.common.logs import correlation_id
from services.auth import storage

PRODUCER = "auth"


class LastAdmin(Exception):
    """The change would leave no active administrator, and nobody could undo it."""


def _cid() -> str | None:
    """The request id when called from an HTTP request, so its events can be traced to it."""
    return correlation_id.get() or None


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
        _cid(),
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
        _cid(),
    )


def membership_event(user_id: uuid.UUID, mailbox_id: uuid.UUID, active: bool = True) -> Envelope:
    return Envelope.of(
        MembershipChanged(user_id=str(user_id), mailbox_id=str(mailbox_id), active=active),
        PRODUCER,
        _cid(),
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


async def update_user(
    conn: Any, row: asyncpg.Record, name: str, roles: list[str], active: bool
) -> asyncpg.Record:
    """Change a user (``row`` locked by the caller); ``user.changed`` if anything changed.

    Disabling ends every login of the user (all refresh families) in the same transaction;
    the last active admin cannot lose the role or be disabled.
    """
    if name == row["name"] and roles == list(row["roles"]) and active == row["active"]:
        return row
    was_admin = row["active"] and "admin" in row["roles"]
    if was_admin and not (active and "admin" in roles):
        # Serialize admin removals, or two could each see the other as the remaining admin.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('auth.admins'))")
        if await storage.other_active_admins(conn, row["id"]) == 0:
            raise LastAdmin
    updated = await storage.update_user(conn, row["id"], name, roles, active)
    if row["active"] and not active:
        await storage.revoke_user_families(conn, row["id"])
    await outbox.add(conn, user_event(updated))
    return updated


async def update_mailbox(
    conn: Any, row: asyncpg.Record, address: str, name: str, active: bool
) -> asyncpg.Record:
    """Change a mailbox (``row`` locked by the caller); ``mailbox.changed`` if anything changed.

    A taken address raises asyncpg's UniqueViolationError.
    """
    if (address, name, active) == (row["address"], row["name"], row["active"]):
        return row
    updated = await storage.update_mailbox(conn, row["id"], name, active, address)
    await outbox.add(conn, mailbox_event(updated))
    return updated


async def remove_member(conn: Any, user_id: uuid.UUID, mailbox_id: uuid.UUID) -> bool:
    """Take a user out of a mailbox; ``membership.changed`` (inactive) if they were in it."""
    removed = await storage.remove_membership(conn, user_id, mailbox_id)
    if removed:
        await outbox.add(conn, membership_event(user_id, mailbox_id, active=False))
    return removed
