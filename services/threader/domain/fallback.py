"""The last resort for mail with no link at all: subject + participants + time (pure).

A message whose headers name no other message (no In-Reply-To, References or Thread-Index)
joins a conversation only when all three agree: the same normalized subject, a person in
common (ours left out) and a date within the window of the conversation's messages.  Never the
subject alone: two customers who both write "Question" share no person, so they stay apart.

The relation is between two messages, and symmetric, so the grouping does not depend on the
arrival order: same subject key, a person in common, dates within the window, at least one of
the two unlinked ("loose") and at least one of the two marked as a continuation (Re:, Fwd: ...,
or an Outlook Thread-Topic other than its subject): two fresh messages that merely share a
subject ("root message" twice) are two conversations, a reply that lost its headers is not.  A linked message therefore also looks for loose messages, so
the pair is found whichever came first.  Every match is joined (matches merged), as a
Message-ID link would be.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.threader.domain.threading import (
    candidate_ids,
    has_reply_marker,
    normalize_subject,
)

__all__ = [
    "SubjectCandidate",
    "continues",
    "is_unlinked",
    "people",
    "subject_key",
    "subject_matches",
]

_OUR_NUMBER = re.compile(r"\[#\d{1,18}\]")
_WS = re.compile(r"\s+")


def subject_key(subject: str | None, thread_topic: str | None = None) -> str:
    """The matching key: Thread-Topic when Outlook sent one (the subject without prefixes),
    else the subject, normalized, without our ``[#number]`` tag."""
    base = thread_topic.strip() if thread_topic and thread_topic.strip() else subject
    if not base:
        return ""
    return _WS.sub(" ", _OUR_NUMBER.sub(" ", normalize_subject(_OUR_NUMBER.sub(" ", base)))).strip()


def is_unlinked(
    message_id: str | None,
    in_reply_to: Iterable[str] | None,
    references: Iterable[str] | None,
    thread_index_key: str | None = None,
) -> bool:
    """True when the headers name no message but this one (and no Outlook thread)."""
    own = candidate_ids(message_id, [], [])
    return thread_index_key is None and candidate_ids(message_id, in_reply_to, references) == own


def people(addresses: Iterable[str], our_domain: str) -> frozenset[str]:
    """The addresses that count as participants: lowercased, ours left out."""
    ours = our_domain.lower()
    return frozenset(
        a.strip().lower()
        for a in addresses
        if a and "@" in a and a.rpartition("@")[2].lower() != ours
    )


@dataclass(frozen=True)
class SubjectCandidate:
    """A stored message with the same subject key (or a span of them in one conversation:
    ``first_at``..``last_at``), as the storage layer found it."""

    id_conversa: str
    created_at: datetime  # the conversation's, to pick the oldest
    participants: frozenset[str]  # as `people` returns them
    first_at: datetime
    last_at: datetime
    loose: bool  # the message named no other message
    marked: bool = True  # its subject continues something (see `continues`)
    broadcast: bool = False  # its conversation is a broadcast of ours


def continues(subject: str | None, thread_topic: str | None = None) -> bool:
    """The subject marks a continuation: a reply/forward prefix, or Outlook's Thread-Topic
    (the thread's first subject) differing from it."""
    if has_reply_marker(subject):
        return True
    topic = (thread_topic or "").strip()
    return bool(topic) and subject_key(topic) != subject_key(subject)


def subject_matches(
    key: str,
    unlinked: bool,
    who: frozenset[str],
    date: datetime,
    candidates: Sequence[SubjectCandidate],
    window: timedelta,
    marked: bool = True,
) -> list[str]:
    """Conversations this message joins by subject, oldest first, once each (empty: none).

    ``who`` is the message's people (sender, To, Cc, ours left out).  A broadcast of ours is
    never joined this way: its participants are everybody it went to.
    """
    if not key or not who or window <= timedelta(0):
        return []
    hits = [
        c
        for c in candidates
        if not c.broadcast
        and (unlinked or c.loose)
        and (marked or c.marked)
        and who & c.participants
        and c.first_at - window <= date <= c.last_at + window
    ]
    hits.sort(key=lambda c: (c.created_at, c.id_conversa))
    return list(dict.fromkeys(c.id_conversa for c in hits))
