"""Conversations belong to a customer (pure rules, no I/O).

The rule: an id that *we* minted (its domain is the mailbox's domain: our outbound Message-IDs,
an announcement sent from our address by another tool) links a reply only to the conversation
of the replier's own organisation.  Such ids are registered per organisation ("scoped keys",
``<id>#org``), so replies from two customers to one newsletter land in two conversations while a
colleague from the customer's organisation joins the customer's one.  Everybody else's ids
(customers' own Message-IDs, mailing lists) stay plain JWZ keys: a thread among customers is
never split by who wrote in it.

Our own message joins the conversation it was sent from and registers its id scoped for each
organisation it went to, unless it *started* a conversation addressed to several organisations
(or to none visible: Bcc only) -- a broadcast, whose replies each start a conversation of their own,
linked to it.  Everything here depends on the message alone, so the grouping stays independent
of the arrival order.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["FREEMAIL", "belongs", "is_broadcast", "is_ours", "org", "orgs", "scoped"]

# Addresses at these providers belong to people, not organisations: two gmail.com customers are
# two customers.  A short list of the big ones is enough: a missing provider only means that two
# of its users answering one broadcast share a conversation.
# fmt: off
FREEMAIL = frozenset({
    "gmail.com", "googlemail.com", "outlook.com", "hotmail.com", "live.com", "msn.com",
    "yahoo.com", "yahoo.com.br", "yahoo.co.uk", "ymail.com", "icloud.com", "me.com", "mac.com",
    "aol.com", "gmx.com", "gmx.de", "gmx.net", "web.de", "proton.me", "protonmail.com",
    "mail.com", "zoho.com", "yandex.ru", "yandex.com", "mail.ru", "qq.com", "163.com", "126.com",
    "uol.com.br", "bol.com.br", "terra.com.br", "ig.com.br", "hotmail.com.br", "outlook.com.br",
    "live.com.br", "fastmail.com", "tutanota.com", "hey.com",
})
# fmt: on


def _domain(address: str) -> str:
    return address.rpartition("@")[2].strip().lower().rstrip(".")


def org(address: str) -> str:
    """The customer an address speaks for: its domain, or the whole address at a free-mail
    provider (or when it has no domain)."""
    addr = address.strip().lower()
    dom = _domain(addr)
    if "@" not in addr or not dom or dom in FREEMAIL:
        return addr
    return dom


def orgs(addresses: Iterable[str], our_domain: str) -> list[str]:
    """Distinct organisations among these addresses, ours left out, in first-seen order."""
    ours = our_domain.lower()
    seen: dict[str, None] = {}
    for a in addresses:
        if a and "@" in a and _domain(a) != ours:
            seen.setdefault(org(a), None)
    return list(seen)


def belongs(sender: str, participants: Iterable[str], our_domain: str) -> bool:
    """Whether the sender speaks for a customer of the conversation: one of its people, or a
    colleague at their organisation. A signed token names the conversation, but anyone our mail
    was forwarded to holds it too; they get a conversation of their own, linked to it."""
    return bool(sender) and org(sender) in orgs(participants, our_domain)


def is_ours(msgid: str, our_domain: str) -> bool:
    """An id we minted: its right-hand side is the mailbox's domain (``<hex.TOKEN@domain>``)."""
    if not our_domain or not msgid.endswith(">") or "@" not in msgid:
        return False
    return msgid[:-1].rpartition("@")[2].lower() == our_domain.lower()


def scoped(key: str, customer: str) -> str:
    """The key of one of our ids as seen by one customer (``#`` never ends a real id)."""
    return f"{key}#{customer}"


def is_broadcast(to: Iterable[str], our_domain: str, conversation_has_inbound: bool) -> bool:
    """Our message starts a broadcast when it opens a conversation (nobody wrote in it yet)
    addressed (To) to several organisations, or to no visible one (Bcc).  People in Cc are the
    addressee's company; sent in a customer's conversation, it answers that customer."""
    return not conversation_has_inbound and len(orgs(to, our_domain)) != 1
