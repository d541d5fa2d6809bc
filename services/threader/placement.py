"""Set-based placement of a batch of inbound mail: a few statements per batch, not per message.

``storage.place_message`` costs four to six statements per message (the key lookup, the subject
candidates, the conversation's insert, the message with its keys, the conversation's update),
and at a hundred messages a batch each statement's round trip, planning and protocol work was
most of the threader's and PostgreSQL's CPU per message. Here a run of messages (a *segment*)
is read with one statement (the mailbox's copies of their Message-IDs, the owners of all their
thread keys, the subject candidates of all their subjects), each message is decided in Python in
stream order against that and what the earlier messages of the segment decided, and the segment
is written with one statement (new conversations, messages, thread keys, updated conversations,
activity).

The rules are ``place_message``'s, applied to the same data. A message whose case is rare (it
merges conversations, names a conversation by token or ``[#number]``, is linked to one of
several of our conversations) ends the segment:
the segment is written, the message goes through ``place_message`` in the same transaction, and
the next segment is read afresh, so it sees that message's effects.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pydantic_core

from libs.common import ids
from libs.common.events import Envelope, MailReceived
from services.threader import announcements, storage
from services.threader.announcements import Entry
from services.threader.domain import tokens
from services.threader.domain.fallback import (
    SubjectCandidate,
    continues,
    is_unlinked,
    people,
    subject_key,
    subject_matches,
)
from services.threader.domain.keys import inbound_keys
from services.threader.domain.outlook import thread_index_key

# Where a conversation created in this segment sorts among stored ones (only used to order
# subject hits, whose order matters only when there are several: those go the slow way).
_NEW_CONVERSATION_AT = datetime.max.replace(tzinfo=UTC)
_TSV = storage._TSV
_VECTOR_FULL = storage._VECTOR_FULL
_DOC_LIMIT = storage._DOC_LIMIT

SlowPath = Callable[[Envelope, MailReceived], Awaitable[list[Entry]]]


def _utc(at: datetime) -> datetime:
    """As PostgreSQL hands a timestamptz back (UTC), so events read the same either way."""
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


@dataclass
class Prepared:
    """What one message brings, computed once (pure), before the placement lock."""

    env: Envelope
    mail: MailReceived
    keys: list[str]
    ours: list[str]
    automatic: bool
    unlinked: bool
    skey: str
    marked: bool
    our_domain: str
    addrs: list[str]  # sender, To, Cc: the addresses ``people`` reads
    people_in: list[dict[str, Any]]
    doc: str
    date: datetime
    arrived: datetime
    message_uuid: uuid.UUID
    summary: dict[str, Any]  # its ``MessageSummary``, for the announcement
    columns: tuple[str, ...]  # its JSON columns as the write sends them (``_JSON_COLUMNS``)


# The message's columns the write sends as JSON text, in its order.
_JSON_COLUMNS = (
    "sender",
    "to_addrs",
    "cc_addrs",
    "attachments",
    "irt",
    "refs",
    "flags",
    "reply_to",
)


def _json(value: Any) -> str:
    """JSON text for a jsonb column (pydantic's serializer: a fifth of ``json.dumps``'s time)."""
    return pydantic_core.to_json(value).decode()


def _prepare(env: Envelope, mail: MailReceived) -> Prepared:
    our_domain = mail.mailbox_address.rpartition("@")[2].lower()
    found = inbound_keys(
        mail.message_id,
        mail.in_reply_to,
        mail.references,
        sender=mail.from_.address,
        our_domain=our_domain,
        thread_index=mail.thread_index,
    )
    reply_to = mail.reply_to or []
    own = mail.mailbox_address.lower()
    date = _utc(mail.date)
    flags = mail.flags.model_dump()
    automatic = storage.is_automatic(flags)
    message_uuid = ids.uuid4()
    summary = announcements.summary(
        message_uuid=message_uuid,
        message_id=mail.message_id,
        sender=mail.from_,
        to=mail.to,
        cc=mail.cc,
        subject=mail.subject,
        date=date,
        text=mail.text,
        in_reply_to=mail.in_reply_to,
        references=mail.references,
        reply_to=reply_to,
        automatic=automatic,
    )
    dumps = _json
    people_in = [
        p
        for p in storage._participants([], mail.from_, *reply_to, *mail.to, *mail.cc)
        if not own or storage._base_address(p["address"]) != own
    ]
    return Prepared(
        env=env,
        mail=mail,
        keys=found.join,
        ours=found.ours,
        automatic=automatic,
        unlinked=is_unlinked(
            mail.message_id, mail.in_reply_to, mail.references, thread_index_key(mail.thread_index)
        ),
        skey=subject_key(mail.subject, mail.thread_topic),
        marked=continues(mail.subject, mail.thread_topic),
        our_domain=our_domain,
        addrs=[a.address for a in (mail.from_, *mail.to, *mail.cc)],
        people_in=people_in,
        doc=storage.search_document(
            mail.subject, [mail.from_, *mail.to, *mail.cc], mail.text, mail.html
        ),
        date=date,
        arrived=_utc(mail.received_at or mail.date),
        message_uuid=message_uuid,
        summary=summary,
        columns=(
            dumps(summary["from"]),
            dumps(summary["to"]),
            dumps(summary["cc"]),
            dumps([a.model_dump() for a in mail.attachments]),
            dumps(mail.in_reply_to),
            dumps(mail.references),
            dumps(flags),
            dumps(summary["reply_to"]),
        ),
    )


@dataclass
class _Conv:
    """A conversation as this segment knows it: as read, then as its messages change it."""

    id: uuid.UUID
    mailbox_id: str
    channel: str
    subject: str
    number: int | None
    status: str
    assignee: str | None
    message_count: int
    last_message_at: datetime
    participants: list[dict[str, Any]]
    broadcast: bool
    created_at: datetime
    stale: bool  # closed and quiet past the reopen age
    merged_into: uuid.UUID | None
    new: bool = False
    linked_to: uuid.UUID | None = None
    # What the segment's messages add, written at the flush.
    added: int = 0
    people_added: list[dict[str, Any]] = field(default_factory=list)
    docs: list[str] = field(default_factory=list)
    latest: datetime | None = None  # the newest arrival of a message that is activity
    human_inbound: bool = False  # a person wrote: reopens, counts for unread

    def stored_copy(self) -> _Conv:
        """This conversation for a later segment: as stored, nothing added yet."""
        return dataclasses.replace(
            self, new=False, added=0, people_added=[], docs=[], latest=None, human_inbound=False
        )

    def stored(self, r: asyncpg.Record) -> None:
        """The write's row of it (what SQL decided: number, count, status...)."""
        self.number = r["number"]
        self.status = r["status"]
        self.assignee = r["assignee"]
        self.message_count = r["message_count"]
        self.last_message_at = r["last_message_at"]
        self.participants = r["participants"]
        self.created_at = r["created_at"]

    @classmethod
    def of(cls, r: asyncpg.Record) -> _Conv:
        return cls(
            id=r["id_conversa"],
            mailbox_id=r["c_mailbox_id"],
            channel=r["channel"],
            subject=r["c_subject"],
            number=r["number"],
            status=r["status"],
            assignee=r["assignee"],
            message_count=r["message_count"],
            last_message_at=r["last_message_at"],
            participants=r["participants"],
            broadcast=r["broadcast"],
            created_at=r["created_at"],
            stale=r["stale"],
            merged_into=r["merged_into"],
        )


@dataclass
class _Placed:
    """One message decided in the segment, and its conversation's state right after it."""

    m: Prepared
    conv: _Conv
    message_count: int
    participants: list[dict[str, Any]]
    status: str
    last_message_at: datetime


@dataclass
class _Loose:
    """A message of this segment as a subject candidate for the later ones."""

    conv: _Conv
    addrs: list[str]
    date: datetime
    loose: bool
    marked: bool


_CONV_SQL = """c.id_conversa, c.mailbox_id AS c_mailbox_id, c.channel, c.subject AS c_subject,
    c.number, c.status, c.assignee, c.message_count, c.last_message_at, c.participants,
    c.broadcast, c.created_at, c.merged_into,
    c.status = 'closed' AND $11::interval > '0'::interval
        AND clock_timestamp() - c.last_message_at > $11::interval AS stale"""
_NO_CONV_SQL = """NULL::uuid, NULL::text, NULL::text, NULL::text, NULL::bigint, NULL::text,
    NULL::text, NULL::int, NULL::timestamptz, NULL::jsonb, NULL::boolean, NULL::timestamptz,
    NULL::uuid, NULL::boolean"""
_NO_MSG_SQL = """NULL::jsonb AS sender, NULL::jsonb AS to_addrs, NULL::jsonb AS cc_addrs,
    NULL::timestamptz AS date, NULL::boolean AS loose, NULL::boolean AS marked"""

# kind 1: a thread key's conversation; 0: the mailbox has this Message-ID already; 2: a message
# with the same subject key within the window (``storage._subject_candidates``'s filter); 3 (the
# prefetch only): a mailbox's placement count (``n``) as the statement's snapshot saw it.
_READ = f"""
SELECT 1 AS kind, NULL::bigint AS n, k.mailbox_id, k.message_id AS key, {_CONV_SQL},
       {_NO_MSG_SQL}
FROM unnest($3::text[], $4::text[]) AS q (mb, key)
JOIN thread_keys k ON k.mailbox_id = q.mb AND k.message_id = q.key
JOIN conversations c ON c.id_conversa = k.id_conversa
UNION ALL
SELECT 0, NULL, d.mailbox_id, d.message_id, {_NO_CONV_SQL}, {_NO_MSG_SQL}
FROM unnest($1::text[], $2::text[]) AS q (mb, mid)
JOIN messages d ON d.mailbox_id = q.mb AND d.message_id = q.mid
UNION ALL
SELECT 2, q.n, NULL, NULL, x.*
FROM unnest($5::text[], $6::text[], $7::timestamptz[], $8::boolean[], $9::boolean[], $10::int[])
     AS q (mb, skey, at, unlinked, marked, n)
CROSS JOIN LATERAL (
    SELECT {_CONV_SQL}, m.sender, m.to_addrs, m.cc_addrs, m.date, m.loose, m.marked
    FROM messages m JOIN conversations c ON c.id_conversa = m.id_conversa
    WHERE m.mailbox_id = q.mb AND m.subject_key = q.skey AND m.subject_key <> ''
      AND m.date BETWEEN q.at - $12::interval AND q.at + $12::interval
      AND (m.loose OR q.unlinked) AND (m.marked OR q.marked)
      AND NOT (c.status = 'closed' AND $11::interval > '0'::interval
               AND clock_timestamp() - c.last_message_at > $11::interval)
    ORDER BY m.date DESC LIMIT 500) AS x
"""

# Kind 3 rows also carry the database's clock (as ``date``), which ``stale`` was read at.
_PREFETCH = (
    _READ
    + f"""UNION ALL
SELECT 3, s.seq, s.mailbox_id, NULL, {_NO_CONV_SQL}, NULL::jsonb, NULL::jsonb, NULL::jsonb,
       clock_timestamp(), NULL::boolean, NULL::boolean
FROM (SELECT mb, p.seq FROM unnest($13::text[]) AS mb
      LEFT JOIN placement_seq p ON p.mailbox_id = mb) AS s (mailbox_id, seq)
"""
)

_PEOPLE_APPENDED = """c.participants || coalesce((
    SELECT jsonb_agg(n.value ORDER BY n.ord)
    FROM jsonb_array_elements(x.people::jsonb) WITH ORDINALITY AS n (value, ord)
    WHERE NOT EXISTS (
        SELECT 1 FROM jsonb_array_elements(c.participants) p
        WHERE lower(p ->> 'address') = lower(n.value ->> 'address'))), '[]'::jsonb)"""

# One statement writes a segment. The sub-statements share one snapshot, so the count of a
# conversation's messages adds what ``m`` inserts; foreign keys are checked at its end.
_WRITE = f"""
WITH nc AS (
    INSERT INTO conversations (id_conversa, mailbox_id, channel, subject, created_at,
                               last_message_at, last_inbound_at, message_count, participants,
                               search, activity_seq, linked_to)
    SELECT x.id, x.mb, x.channel, x.subject, clock_timestamp(), x.latest,
           CASE WHEN x.human THEN clock_timestamp() END, x.added, x.people::jsonb,
           {_TSV.format("x.doc")}, nextval('activity_seq'), x.linked_to
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
                $6::boolean[], $7::int[], $8::text[], $9::text[], $10::uuid[])
         WITH ORDINALITY AS x (id, mb, channel, subject, latest, human, added, people, doc,
                               linked_to, n)
    ORDER BY x.n
    RETURNING id_conversa, number, status, assignee, message_count, last_message_at,
              participants, activity_seq, created_at
), u AS (
    UPDATE conversations c SET
        last_message_at = GREATEST(c.last_message_at, x.latest),
        search = CASE WHEN octet_length(c.search::text) < {_VECTOR_FULL}
                      THEN c.search || {_TSV.format("x.doc")} ELSE c.search END,
        activity_seq = nextval('activity_seq'),
        last_inbound_at = CASE WHEN x.human THEN clock_timestamp() ELSE c.last_inbound_at END,
        message_count = (SELECT count(*) FROM messages WHERE id_conversa = c.id_conversa)
                        + x.added,
        participants = {_PEOPLE_APPENDED},
        status = CASE WHEN x.human AND c.status = 'closed' THEN 'open' ELSE c.status END
    FROM unnest($11::uuid[], $12::timestamptz[], $13::boolean[], $14::int[], $15::text[],
                $16::text[]) AS x (id, latest, human, added, people, doc)
    WHERE c.id_conversa = x.id
    RETURNING c.id_conversa, c.number, c.status, c.assignee, c.message_count,
              c.last_message_at, c.participants, c.activity_seq, c.created_at
), m AS (
    INSERT INTO messages (id, id_conversa, mailbox_id, channel, message_id, direction, sender,
                          to_addrs, cc_addrs, subject, date, text_body, html_body, attachments,
                          status, in_reply_to, refs, flags, subject_key, loose, marked, reply_to)
    SELECT x.id, x.conv, x.mb, x.channel, x.mid, 'in', x.sender::jsonb, x.to_addrs::jsonb,
           x.cc_addrs::jsonb, x.subject, x.date, x.text_body, x.html_body, x.attachments::jsonb,
           NULL, ARRAY(SELECT jsonb_array_elements_text(x.irt::jsonb)),
           ARRAY(SELECT jsonb_array_elements_text(x.refs::jsonb)), x.flags::jsonb, x.skey,
           x.loose, x.marked, x.reply_to::jsonb
    FROM unnest($17::uuid[], $18::uuid[], $19::text[], $20::text[], $21::text[], $22::text[],
                $23::text[], $24::text[], $25::text[], $26::timestamptz[], $27::text[],
                $28::text[], $29::text[], $30::text[], $31::text[], $32::text[],
                $33::text[], $34::boolean[], $35::boolean[], $36::text[])
         WITH ORDINALITY AS x (id, conv, mb, channel, mid, sender, to_addrs, cc_addrs, subject,
                               date, text_body, html_body, attachments, irt, refs, flags, skey,
                               loose, marked, reply_to, n)
    ORDER BY x.n
), k AS (
    INSERT INTO thread_keys (mailbox_id, message_id, id_conversa)
    SELECT * FROM unnest($37::text[], $38::text[], $39::uuid[])
    ON CONFLICT (mailbox_id, message_id) DO NOTHING
), r AS (
    UPDATE thread_keys t SET id_conversa = x.new
    FROM unnest($40::uuid[], $41::uuid[]) AS x (old, new) WHERE t.id_conversa = x.old
), a AS (
    INSERT INTO activity (seq, id_conversa, last_message_at)
    SELECT activity_seq, id_conversa, last_message_at FROM nc
    UNION ALL SELECT activity_seq, id_conversa, last_message_at FROM u
)
SELECT id_conversa, number, status, assignee, message_count, last_message_at, participants,
       created_at
FROM nc
UNION ALL
SELECT id_conversa, number, status, assignee, message_count, last_message_at, participants,
       created_at
FROM u
"""

# A conversation's documents past the first chunk (rare: more than _DOC_LIMIT characters of new
# words for one conversation in one segment), each appended as one message's document was.
_MORE_SEARCH = f"""
UPDATE conversations c SET search = CASE WHEN octet_length(c.search::text) < {_VECTOR_FULL}
                                         THEN c.search || {_TSV.format("x.doc")}
                                         ELSE c.search END
FROM unnest($1::uuid[], $2::text[]) AS x (id, doc) WHERE c.id_conversa = x.id
"""


def _chunks(docs: list[str]) -> list[str]:
    """The documents joined into chunks of at most _DOC_LIMIT characters (each one is)."""
    out: list[str] = []
    for doc in docs:
        if out and len(out[-1]) + len(doc) <= _DOC_LIMIT:
            out[-1] += doc
        else:
            out.append(doc)
    return out or [""]


class _Segment:
    """Messages decided against one read of the database and each other, then one write."""

    def __init__(self, mails: Sequence[Prepared], rules: storage.Rules, token_secret: bytes):
        self.mails = mails
        self.rules = rules
        self.token_secret = token_secret
        self.dups: set[tuple[str, str]] = set()
        self.owners: dict[tuple[str, str], _Conv] = {}
        self.convs: dict[uuid.UUID, _Conv] = {}
        self.candidates: dict[int, list[asyncpg.Record]] = {}
        self.loose: dict[tuple[str, str], list[_Loose]] = {}
        self.placed: list[_Placed] = []
        self.new_keys: dict[tuple[str, str], uuid.UUID] = {}
        self.repoint: list[tuple[uuid.UUID, uuid.UUID]] = []  # stale conversation -> new one
        # The same, read where a key's owner is looked up (remapping every owner at each
        # repoint cost a pass over them all: a fifth of the mail in the bench meets a
        # conversation closed long ago).
        self.moved: dict[uuid.UUID, _Conv] = {}
        self.own_loose: list[tuple[tuple[str, str], _Loose]] = []  # this segment's messages

    def read_args(self) -> list[Any]:
        mbs, mids, key_mbs, keys = [], [], [], []
        s_mbs, s_keys, s_at, s_unlinked, s_marked, s_n = [], [], [], [], [], []
        window = self.rules.subject_window
        for n, m in enumerate(self.mails):
            mb = m.mail.mailbox_id
            mbs.append(mb)
            mids.append(m.mail.message_id)
            for k in (*m.keys, *m.ours):
                key_mbs.append(mb)
                keys.append(k)
            if m.skey and window > timedelta(0):
                s_mbs.append(mb)
                s_keys.append(m.skey)
                s_at.append(m.date)
                s_unlinked.append(m.unlinked)
                s_marked.append(m.marked)
                s_n.append(n)
        return [
            mbs,
            mids,
            key_mbs,
            keys,
            s_mbs,
            s_keys,
            s_at,
            s_unlinked,
            s_marked,
            s_n,
            self.rules.reopen_max_age,
            window,
        ]

    async def read(self, conn: asyncpg.Connection) -> None:
        self.take(await conn.fetch(_READ, *self.read_args()))

    def take(
        self,
        rows: Sequence[asyncpg.Record],
        after: Carried | None = None,
        boxes: set[str] | frozenset[str] = frozenset(),
        clock: datetime | None = None,
    ) -> None:
        """The read's rows; ``after``: the batch this process placed since the read, whose
        effects in ``boxes`` are laid over the rows (it made them stale); ``clock``: the
        database's when it read."""
        if after is not None:
            # Its conversations as it stored them (the rows hold their earlier state), their
            # ``stale`` decided again at the read's time, as for the rows (it depends on the
            # time: a copy carried from batch to batch kept the first one's; found by a review).
            age = self.rules.reopen_max_age
            for cid, c in after.convs.items():
                if c.mailbox_id in boxes:
                    copy = self.convs[cid] = c.stored_copy()
                    copy.stale = (
                        copy.status == "closed"
                        and age > timedelta(0)
                        and clock is not None
                        and clock - copy.last_message_at > age
                    )
        for r in rows:
            kind = r["kind"]
            if kind == 0:
                self.dups.add((r["mailbox_id"], r["key"]))
                continue
            if kind == 3:
                continue
            conv = self.convs.get(r["id_conversa"])
            if conv is None:
                conv = self.convs[r["id_conversa"]] = _Conv.of(r)
            if kind == 1:
                self.owners[(r["mailbox_id"], r["key"])] = conv
            else:
                self.candidates.setdefault(r["n"], []).append(r)
        if after is None:
            return
        self.dups |= {d for d in after.dups if d[0] in boxes}
        for key, conv in self.owners.items():
            if conv.id in after.moved:  # its thread went to a new conversation
                self.owners[key] = self.convs[after.moved[conv.id]]
        for key, cid in after.keys.items():
            if key[0] in boxes:
                self.owners[key] = self.convs[cid]
        for skey, e in after.loose:
            if skey[0] in boxes:
                self.loose.setdefault(skey, []).append(
                    dataclasses.replace(e, conv=self.convs[e.conv.id])
                )

    def carried(self, before: dict[str, int]) -> Carried:
        """What this segment changed, for the next batch's prefetch (``take``)."""
        touched = {p.conv.id: p.conv for p in self.placed}
        return Carried(
            convs=touched,
            keys={k: self._current(cid) for k, cid in self.new_keys.items()},
            moved=dict(self.repoint),
            dups={(p.m.mail.mailbox_id, p.m.mail.message_id) for p in self.placed},
            loose=list(self.own_loose),
            before=dict(before),
        )

    def _subject_hits(self, n: int, m: Prepared) -> list[_Conv]:
        """The conversations this message joins by subject (``place_message``'s rule)."""
        if not m.skey or self.rules.subject_window <= timedelta(0):
            return []
        window = self.rules.subject_window
        cands: list[SubjectCandidate] = []
        by_id: dict[str, _Conv] = {}
        for r in self.candidates.get(n, ()):
            conv = self.convs[r["id_conversa"]]
            if conv.stale:
                continue
            cid = str(conv.id)
            by_id[cid] = conv
            addrs = (a["address"] for a in [r["sender"], *r["to_addrs"], *r["cc_addrs"]])
            cands.append(
                SubjectCandidate(
                    id_conversa=cid,
                    created_at=conv.created_at,
                    participants=people(addrs, m.our_domain),
                    first_at=r["date"],
                    last_at=r["date"],
                    loose=r["loose"],
                    marked=r["marked"],
                    broadcast=conv.broadcast,
                )
            )
        for e in self.loose.get((m.mail.mailbox_id, m.skey), ()):
            if e.conv.stale or not (e.loose or m.unlinked) or not (e.marked or m.marked):
                continue
            if not e.date - window <= m.date <= e.date + window:
                continue
            cid = str(e.conv.id)
            by_id[cid] = e.conv
            cands.append(
                SubjectCandidate(
                    id_conversa=cid,
                    created_at=_NEW_CONVERSATION_AT if e.conv.new else e.conv.created_at,
                    participants=people(e.addrs, m.our_domain),
                    first_at=e.date,
                    last_at=e.date,
                    loose=e.loose,
                    marked=e.marked,
                    broadcast=e.conv.broadcast,
                )
            )
        if not cands:
            return []
        who = people(m.addrs, m.our_domain)
        hits = subject_matches(m.skey, m.unlinked, who, m.date, cands, window, m.marked)
        return [by_id[h] for h in hits]

    def place(self, n: int, m: Prepared) -> bool:
        """Decide message ``n`` here; False when it needs ``place_message`` (a rare case)."""
        mb = m.mail.mailbox_id
        if (mb, m.mail.message_id) in self.dups:
            return True  # this mailbox has it already: nothing to do, nothing to announce
        chosen: dict[uuid.UUID, _Conv] = {}
        for k in m.keys:
            conv = self._owner((mb, k))
            if conv is not None:
                chosen[conv.id] = conv
        for conv in self._subject_hits(n, m):
            chosen[conv.id] = conv
        if len(chosen) > 1 or any(c.merged_into is not None for c in chosen.values()):
            return False  # a merge
        target = next(iter(chosen.values()), None)
        linked_to: uuid.UUID | None = None
        if target is None and self.token_secret:
            mail = m.mail
            named = tokens.numbers_named(
                [a.address for a in (*mail.to, *mail.cc)],
                [*mail.in_reply_to, *mail.references],
                self.token_secret,
            )
            if named or (tokens.subject_number(mail.subject) is not None and mail.from_.address):
                return False  # a token or a [#number] to look up
        if target is None and m.ours:
            linked = {c.id: c for k in m.ours if (c := self._owner((mb, k))) is not None}
            if len(linked) > 1 or any(c.merged_into is not None for c in linked.values()):
                return False
            if linked:
                linked_to = next(iter(linked))
        if target is not None and not m.automatic and self.rules.reopen_max_age and target.stale:
            # Closed and quiet past the reopen age: a new conversation linked to it takes its
            # thread (its keys, the ones this segment registered for it too).
            old, target = target, self._new(m, target.id)
            self.moved[old.id] = target
            self.repoint.append((old.id, target.id))
        elif target is None:
            target = self._new(m, linked_to)
        self._apply(m, target)
        return True

    def _owner(self, key: tuple[str, str]) -> _Conv | None:
        """The conversation a thread key belongs to now (following this segment's repoints)."""
        conv = self.owners.get(key)
        while conv is not None and conv.id in self.moved:
            conv = self.moved[conv.id]
        return conv

    def _current(self, cid: uuid.UUID) -> uuid.UUID:
        while cid in self.moved:
            cid = self.moved[cid].id
        return cid

    def _new(self, m: Prepared, linked_to: uuid.UUID | None) -> _Conv:
        mail = m.mail
        conv = _Conv(
            id=ids.uuid4(),
            mailbox_id=mail.mailbox_id,
            channel=mail.channel,
            subject=mail.subject,
            number=None,
            status="open",
            assignee=None,
            message_count=0,
            last_message_at=m.arrived,
            participants=[],
            broadcast=False,
            created_at=_NEW_CONVERSATION_AT,
            stale=False,
            merged_into=None,
            new=True,
            linked_to=linked_to,
        )
        self.convs[conv.id] = conv
        return conv

    def _apply(self, m: Prepared, conv: _Conv) -> None:
        mb = m.mail.mailbox_id
        for k in m.keys:
            if (mb, k) not in self.owners:
                self.owners[(mb, k)] = conv
                self.new_keys[(mb, k)] = conv.id
        self.dups.add((mb, m.mail.message_id))
        if m.skey:
            entry = _Loose(conv, m.addrs, m.date, m.unlinked, m.marked)
            self.loose.setdefault((mb, m.skey), []).append(entry)
            self.own_loose.append(((mb, m.skey), entry))
        seen = {p["address"].lower() for p in conv.participants}
        for p in m.people_in:
            if p["address"].lower() not in seen:
                seen.add(p["address"].lower())
                conv.participants = [*conv.participants, p]
                conv.people_added.append(p)
        conv.message_count += 1
        conv.added += 1
        conv.docs.append(m.doc)
        if not m.automatic:
            conv.human_inbound = True
            conv.latest = m.arrived if conv.latest is None else max(conv.latest, m.arrived)
            conv.last_message_at = max(conv.last_message_at, m.arrived)
            if conv.status == "closed":
                conv.status = "open"
        self.placed.append(
            _Placed(
                m=m,
                conv=conv,
                message_count=conv.message_count,
                participants=conv.participants,
                status=conv.status,
                last_message_at=conv.last_message_at,
            )
        )

    async def write(self, conn: asyncpg.Connection) -> list[Entry]:
        """One statement for the segment's rows; the events of its messages, in order."""
        if not self.placed:
            return []
        touched = list({p.conv.id: p.conv for p in self.placed}.values())
        new = [c for c in touched if c.new]
        old = [c for c in touched if not c.new]
        chunks = {c.id: _chunks(c.docs) for c in touched}
        msgs = [p.m.mail for p in self.placed]
        cols = list(zip(*(p.m.columns for p in self.placed), strict=True))
        dumps = _json
        key_rows = [(mb, k, self._current(cid)) for (mb, k), cid in self.new_keys.items()]
        rows = await conn.fetch(
            _WRITE,
            [c.id for c in new],
            [c.mailbox_id for c in new],
            [c.channel for c in new],
            [c.subject for c in new],
            [c.last_message_at for c in new],
            [c.human_inbound for c in new],
            [c.added for c in new],
            [dumps(c.people_added) for c in new],
            [chunks[c.id][0] for c in new],
            [c.linked_to for c in new],
            [c.id for c in old],
            [c.latest for c in old],
            [c.human_inbound for c in old],
            [c.added for c in old],
            [dumps(c.people_added) for c in old],
            [chunks[c.id][0] for c in old],
            [p.m.message_uuid for p in self.placed],
            [p.conv.id for p in self.placed],
            [x.mailbox_id for x in msgs],
            [x.channel for x in msgs],
            [x.message_id for x in msgs],
            cols[0],  # sender
            cols[1],  # to_addrs
            cols[2],  # cc_addrs
            [x.subject for x in msgs],
            [p.m.date for p in self.placed],
            [x.text for x in msgs],
            [x.html for x in msgs],
            cols[3],  # attachments
            cols[4],  # in_reply_to
            cols[5],  # refs
            cols[6],  # flags
            [p.m.skey for p in self.placed],
            [p.m.unlinked for p in self.placed],
            [p.m.marked for p in self.placed],
            cols[7],  # reply_to
            [r[0] for r in key_rows],
            [r[1] for r in key_rows],
            [r[2] for r in key_rows],
            [old for old, _ in self.repoint],
            [new for _, new in self.repoint],
        )
        for depth in range(1, max(len(c) for c in chunks.values())):
            more = [(cid, c[depth]) for cid, c in chunks.items() if len(c) > depth]
            await conn.execute(_MORE_SEARCH, [x[0] for x in more], [x[1] for x in more])
        final = {r["id_conversa"]: r for r in rows}
        later: dict[uuid.UUID, int] = {}
        events: list[Entry] = []
        for p in reversed(self.placed):
            # The state right after this message: the stored one less the later messages.
            after = later.get(p.conv.id, 0)
            later[p.conv.id] = after + 1
            f = final[p.conv.id]
            last = after == 0
            conv = {
                "id_conversa": p.conv.id,
                "mailbox_id": p.conv.mailbox_id,
                "number": f["number"],
                "channel": p.conv.channel,
                "subject": p.conv.subject,
                "status": f["status"] if last else p.status,
                "assignee": f["assignee"],
                "message_count": f["message_count"] - after,
                "last_message_at": f["last_message_at"] if last else p.last_message_at,
                "participants": f["participants"] if last else p.participants,
            }
            events.append(
                announcements.message_added(
                    p.m.env.correlation_id, conv, p.m.summary, self.token_secret
                )
            )
        events.reverse()
        for cid, f in final.items():
            self.convs[cid].stored(f)
        return events


def prepare(items: Sequence[tuple[Envelope, MailReceived]]) -> list[Prepared]:
    """What each message brings (keys, subject key, search document...), computed once."""
    return [_prepare(env, mail) for env, mail in items]


@dataclass
class Prefetched:
    """A batch's first read, made before its turn without the placement lock (while the batch
    before it holds the lock), and each mailbox's placement count that read's snapshot saw."""

    mails: Sequence[Prepared]
    rows: list[asyncpg.Record]
    seqs: dict[str, int]
    clock: datetime  # the database's, when it read (what ``stale`` was decided at)


@dataclass
class Carried:
    """What a batch placed in one segment changed, as it stored it, and the placement counts
    it bumped: the next batch's prefetch may have read the state before it."""

    convs: dict[uuid.UUID, _Conv]  # the conversations it placed mail in
    keys: dict[tuple[str, str], uuid.UUID]  # the thread keys it added
    moved: dict[uuid.UUID, uuid.UUID]  # stale conversation -> the new one with its thread
    dups: set[tuple[str, str]]  # the Message-IDs it stored
    loose: list[tuple[tuple[str, str], _Loose]]  # its messages as subject candidates
    before: dict[str, int]  # each mailbox's count before its bump


async def prefetch(
    pool: asyncpg.Pool, mails: Sequence[Prepared], rules: storage.Rules
) -> Prefetched:
    """The read of a batch's first segment, ahead of its turn (``place_received`` checks that
    it still stands): PostgreSQL's other core does it while the batch before is written."""
    seg = _Segment(mails, rules, b"")
    boxes = sorted({m.mail.mailbox_id for m in mails})
    rows = await pool.fetch(_PREFETCH, *seg.read_args(), boxes)
    counts = [r for r in rows if r["kind"] == 3]
    return Prefetched(
        mails, rows, {r["mailbox_id"]: r["n"] or 0 for r in counts}, counts[0]["date"]
    )


def _prefetch_stands(
    ahead: Prefetched, before: dict[str, int], carried: Carried | None
) -> tuple[bool, set[str]]:
    """Whether the prefetch is as good as a read under the lock, and the mailboxes whose rows
    need the carried batch laid over them.

    Per mailbox: nothing was placed since its snapshot (its count is the one the lock bumped
    from), or only the carried batch was (it bumped from the prefetch's count, and the lock from
    the next one). Anything else: read again.
    """
    over: set[str] = set()
    for mb, seen in ahead.seqs.items():
        now = before.get(mb)
        if now == seen:
            continue
        if carried is not None and carried.before.get(mb) == seen and now == seen + 1:
            over.add(mb)
            continue
        return False, set()
    return True, over


async def place_received(
    conn: asyncpg.Connection,
    mails: Sequence[Prepared],
    *,
    rules: storage.Rules,
    token_secret: bytes,
    slow: SlowPath,
    ahead: Prefetched | None = None,
    before: dict[str, int] | None = None,
    carried: Carried | None = None,
) -> tuple[list[Entry], Carried | None]:
    """Thread new inbound mail in stream order (ids recorded, mailboxes locked by the caller,
    ``before`` the counts its lock bumped from); the events to publish, in order (``prepare``
    made ``mails``), and what the next batch may carry (None when a message went the slow way).
    ``slow`` places one message the per-message way. ``ahead``: this batch's prefetch;
    ``carried``: the batch this process placed before it."""
    events: list[Entry] = []
    i, window = 0, len(mails)
    first = True
    clean = True
    seg: _Segment | None = None
    while i < len(mails):
        seg = _Segment(mails[i : i + window], rules, token_secret)
        stands, over = False, set[str]()
        if first and ahead is not None and before is not None and ahead.mails is mails:
            stands, over = _prefetch_stands(ahead, before, carried)
        if stands:
            assert ahead is not None
            seg.take(ahead.rows, carried if over else None, over, ahead.clock)
        else:
            await seg.read(conn)
        first = False
        done = 0
        for n, m in enumerate(seg.mails):
            if not seg.place(n, m):
                break
            done += 1
        events += await seg.write(conn)
        i += done
        if done < len(seg.mails):
            clean = False
            events += await slow(mails[i].env, mails[i].mail)
            i += 1
            # What follows a rare case often is one too (a corpus replayed, a merge storm):
            # read less ahead until a segment goes through whole.
            window = max(8, len(seg.mails) // 2)
        else:
            window = len(mails)
    if not clean or seg is None or before is None:
        return events, None
    return events, seg.carried(before)
