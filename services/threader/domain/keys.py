"""The thread keys a message registers and looks up (pure): JWZ ids, customer scoping, Outlook.

Grouping is the connected components of "shares a key": these functions decide the keys, so
every rule that is a function of the message alone (customer scoping, Thread-Index) keeps the
result independent of the arrival order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from services.threader.domain.customers import is_ours, org, orgs, scoped
from services.threader.domain.outlook import thread_index_key
from services.threader.domain.threading import candidate_ids

__all__ = ["Keys", "inbound_keys", "outbound_keys"]


@dataclass(frozen=True)
class Keys:
    """join: keys that put the message in their owner's conversation (and are registered).
    ours: the plain form of our own ids it names: their owner is only linked to (a broadcast
    whose reply starts a conversation of its own)."""

    join: list[str]
    ours: list[str]


def inbound_keys(
    message_id: str | None,
    in_reply_to: Iterable[str] | None,
    references: Iterable[str] | None,
    *,
    sender: str,
    our_domain: str,
    thread_index: str | None = None,
) -> Keys:
    """Customers' ids stay plain; each of our ids is scoped to the sender's organisation; the
    Outlook thread (Thread-Index root) is one more key."""
    customer = org(sender) if sender else ""
    join: dict[str, None] = {}
    ours: list[str] = []
    for k in candidate_ids(message_id, in_reply_to, references):
        if is_ours(k, our_domain):
            join.setdefault(scoped(k, customer), None)
            ours.append(k)
        else:
            join.setdefault(k, None)
    ti = thread_index_key(thread_index)
    if ti:
        join.setdefault(ti, None)
    return Keys(join=list(join), ours=ours)


def outbound_keys(
    message_id: str | None,
    in_reply_to: Iterable[str] | None,
    references: Iterable[str] | None,
    *,
    recipients: Iterable[str],
    our_domain: str,
    broadcast: bool,
) -> list[str]:
    """Our message registers its own id and the customers' ids it names plain, and each of our
    ids (its own and those it names) scoped to every organisation it went to -- except a
    broadcast, whose replies must each start their own conversation.  Our earlier ids are
    never plain here: a reply in one customer's conversation that names our broadcast must not
    pull the broadcast (and every other customer's answers) into it."""
    own = candidate_ids(message_id, [], [])
    base = candidate_ids(message_id, in_reply_to, references)
    out: dict[str, None] = {k: None for k in base if k in own or not is_ours(k, our_domain)}
    if not broadcast:
        customers = orgs(recipients, our_domain)
        for k in base:
            if is_ours(k, our_domain):
                for c in customers:
                    out.setdefault(scoped(k, c), None)
    return list(out)
