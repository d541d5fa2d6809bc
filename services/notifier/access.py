"""Access taken away before the token expires: disabled accounts and removed memberships.

How the change reaches every replica, and why this way: ``user.changed`` and
``membership.changed`` are handled by the shared consumer group ``notifier`` like every other
event (one replica, idempotent through the inbox), which stores the change and, in the same
transaction, outboxes a ``notifier.frame`` entry carrying an ``access`` change instead of a
frame. Every replica already reads that broadcast stream, so each one applies the change to its
own connections: it closes a disabled user's sockets (4401 "account disabled") and takes a
removed mailbox out of that user's effective mailbox set in the hub index.

This was chosen over a consumer group per replica because:
- the change sits in the frames stream in order with the frames around it: a frame that comes
  after the removal in the stream is never delivered to the removed member;
- a replica resolves its stream cursor *before* loading the stored changes, and a change missing
  from what it loaded committed after the load began, so its entry comes after the cursor: no
  change is lost across a restart, and nothing needs a start position per replica;
- per-replica groups (and their inbox rows) would pile up in Redis and PostgreSQL for every
  replica that ever ran.

Entries may arrive twice (the loaded state and the stream overlap) or, from two relays, out of
order; each carries the event's ``occurred_at`` and the newest one per account or membership wins.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from services.notifier import storage
from services.notifier.frames import AccessChange
from services.notifier.storage import AccessRows


class AccessState:
    """This replica's view: who is disabled, which memberships are gone."""

    def __init__(self) -> None:
        self.rows = AccessRows()

    async def load(self, pool: asyncpg.Pool) -> None:
        self.rows = await storage.load_access(pool)

    def is_disabled(self, user_id: str) -> bool:
        return user_id in self.rows.disabled

    def removed(self, user_id: str) -> set[str]:
        return self.rows.removed.get(user_id, set())

    def effective(self, user_id: str, mailboxes: frozenset[str]) -> set[str]:
        """The token's mailboxes less the memberships removed since."""
        gone = self.rows.removed.get(user_id)
        return set(mailboxes - gone) if gone else set(mailboxes)

    def apply(self, change: AccessChange) -> bool:
        """Take the change in; False when a newer one for the same key was applied already."""
        key = (change.user_id, change.mailbox_id or "")
        seen: datetime | None = self.rows.versions.get(key)
        if seen is not None and change.changed_at < seen:
            return False
        self.rows.versions[key] = change.changed_at
        if change.mailbox_id is None:
            if change.active:
                self.rows.disabled.discard(change.user_id)
            else:
                self.rows.disabled.add(change.user_id)
            return True
        removed = self.rows.removed.setdefault(change.user_id, set())
        if change.active:
            removed.discard(change.mailbox_id)
            if not removed:
                del self.rows.removed[change.user_id]
        else:
            removed.add(change.mailbox_id)
        return True
