"""Threader's SQL: placing a message in its conversation, and the conversation queries."""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from libs.common.events import Address, ConversationState, MessageSummary
from services.threader.domain import tokens
from services.threader.domain.customers import belongs, is_broadcast
from services.threader.domain.fallback import (
    SubjectCandidate,
    continues,
    is_unlinked,
    people,
    subject_key,
    subject_matches,
)
from services.threader.domain.keys import inbound_keys, outbound_keys
from services.threader.domain.outlook import thread_index_key
from services.threader.domain.threading import decide

# The three text-search configurations every document and query goes through: 'simple' keeps
# every word (names, codes, "acao" folded from "ação"), the other two add stems ("reembolsos" ->
# "reembols", "refunds" -> "refund").  Lexemes are stripped of positions so a conversation's
# vector stays a set of words, bounded by its vocabulary rather than its length.
_TSV = (
    "strip(to_tsvector('simple', {0}) || to_tsvector('portuguese', {0})"
    " || to_tsvector('english', {0}))"
)
# Stripped vectors have no positions, so a phrase operator (which the parser also makes of one
# word it splits, such as "9955e5a84e" -> '9955e5' <-> 'a84e') could never match: each becomes AND.
_PHRASE_AS_AND = (
    "regexp_replace(websearch_to_tsquery('{cfg}', {{0}})::text, '<(-|[0-9]+)>', '&', 'g')::tsquery"
)
_TSQ = (
    "("
    + " || ".join(_PHRASE_AS_AND.format(cfg=c) for c in ("simple", "portuguese", "english"))
    + ")"
)
# A tsvector holds at most 1 MB: each message adds at most this much text, and a conversation
# whose vector is already this large keeps what it has (its first messages stay searchable).
_DOC_LIMIT = 50_000
_VECTOR_FULL = 300_000
_TAGS = re.compile(r"<[^>]*>")
_PARTS = re.compile(r"[@.+_-]+")
# What ends every token of PostgreSQL's parser: ASCII white space only (str.split() also splits
# at a no-break space or a control character, inside what the parser reads as one token).
_BLANKS = re.compile(r"[ \t\n\r\f\v]+")
_BRACKETS = str.maketrans("<>", "  ")


def fold(text: str) -> str:
    """Lowercase without accents (NFKD, combining marks dropped): the service role cannot create
    the ``unaccent`` extension, so documents and queries are folded here, the same way.

    ASCII text is only lowercased (NFKD leaves it as it is), and the marks are dropped with one
    ``str.translate``: a generator over every character was most of the threader's own CPU in
    reading a message."""
    if text.isascii():
        return text.lower()
    return unicodedata.normalize("NFKD", text.lower()).translate(_combining())


@functools.cache
def _combining() -> dict[int, None]:
    """Every code point with a combining class, mapped to nothing (built once, ~0.2 s)."""
    return {cp: None for cp in range(sys.maxunicode + 1) if unicodedata.combining(chr(cp))}


def search_document(subject: str, addrs: list[Address], text: str, html: str = "") -> str:
    """What one message adds to its conversation's search vector: subject, participants (the
    address whole and in parts, so "ana" or "example" find ana@example.com) and body.

    Each whitespace-separated word once, in order of first use: the vectors are stripped (a set
    of lexemes), and no token of PostgreSQL's parser spans ASCII white space once ``<`` and
    ``>`` are blanks (a tag such as ``<a href="x y">`` did, and dropping words between two
    brackets could make one; ``<ana@example.com>`` in a text was a tag, not an address, too).
    So the lexemes are those of the whole text. Parsing three configurations was about half the
    PostgreSQL CPU of a placement, and a mail repeats its words (a reply quotes the whole
    message before it).
    """
    people = " ".join(f"{a.name} {a.address} {_PARTS.sub(' ', a.address)}" for a in addrs)
    body = text or _TAGS.sub(" ", html)
    folded = fold(f"{subject} {people} {body}").translate(_BRACKETS)
    # Every word after a blank, the first too: at the very start "~zeca" is read as a path and
    # "zeca" would not match (found by a trial).
    words = (w for w in dict.fromkeys(_BLANKS.split(folded)) if w)
    return (" " + " ".join(words))[:_DOC_LIMIT]


@dataclass
class Placed:
    # Only the columns ``state`` and ``summary`` read: a placement returned the whole rows before,
    # bodies and the conversation's search vector (as text) included, and decoding them was a
    # good part of the threader's CPU per message.
    # Records, or the same columns as a mapping (set-based placement knows them without reading).
    conversation: Mapping[str, Any]
    message: Mapping[str, Any]
    merged: list[str]
    text: str  # the message's text, for its snippet (not read back)


# Every column but the search vector, which only SQL reads (asked as ``*``, it came back as text
# for each row: up to the whole vector of every conversation listed).
_CONV_COLUMNS = (
    "id_conversa, number, mailbox_id, channel, subject, status, created_at, last_message_at,"
    " last_inbound_at, message_count, participants, merged_into, assignee, activity_seq,"
    " broadcast, linked_to"
)
_C_CONV_COLUMNS = ", ".join(f"c.{c.strip()}" for c in _CONV_COLUMNS.split(","))

_STATE_COLUMNS = (
    "id_conversa, mailbox_id, number, channel, subject, status, assignee, message_count,"
    " last_message_at, participants"
)


@dataclass(frozen=True)
class Rules:
    """The tunable threading rules (from ThreaderSettings)."""

    subject_window: timedelta = timedelta(hours=72)
    reopen_max_age: timedelta = timedelta(days=30)  # zero: a closed conversation always reopens


def _participants(current: list[dict[str, Any]], *addrs: Address) -> list[dict[str, Any]]:
    seen = {p["address"].lower() for p in current}
    out = list(current)
    for a in addrs:
        if a.address and a.address.lower() not in seen:
            seen.add(a.address.lower())
            out.append({"name": a.name, "address": a.address})
    return out


def _base_address(address: str) -> str:
    """``support+10-abc@x`` is ``support@x`` (the token is for threading), lower-cased."""
    local, _, domain = address.lower().rpartition("@")
    return f"{local.split('+', 1)[0]}@{domain}"


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


async def _subject_candidates(
    conn: asyncpg.Connection,
    mailbox_id: str,
    key: str,
    date: datetime,
    window: timedelta,
    unlinked: bool,
    marked: bool,
    our_domain: str,
    reopen_max_age: timedelta,
) -> list[SubjectCandidate]:
    """Messages with this subject key within the window that could pair with this one (a loose
    one for a linked message, a marked one for an unmarked message), in conversations that
    could take it: not closed for longer than the reopen age."""
    rows = await conn.fetch(
        """SELECT m.id_conversa, c.created_at, m.sender, m.to_addrs, m.cc_addrs, m.date, m.loose,
                  m.marked, c.broadcast
           FROM messages m JOIN conversations c USING (id_conversa)
           WHERE m.mailbox_id = $1 AND m.subject_key = $2 AND m.subject_key <> ''
             AND m.date BETWEEN $3::timestamptz - $4::interval AND $3::timestamptz + $4::interval
             AND (m.loose OR $5) AND (m.marked OR $6)
             AND NOT (c.status = 'closed' AND $7::interval > '0'::interval
                      AND clock_timestamp() - c.last_message_at > $7::interval)
           ORDER BY m.date DESC LIMIT 500""",
        mailbox_id,
        key,
        date,
        window,
        unlinked,
        marked,
        reopen_max_age,
    )
    return [
        SubjectCandidate(
            id_conversa=str(r["id_conversa"]),
            created_at=r["created_at"],
            participants=people(
                (a["address"] for a in [r["sender"], *r["to_addrs"], *r["cc_addrs"]]), our_domain
            ),
            first_at=r["date"],
            last_at=r["date"],
            loose=r["loose"],
            marked=r["marked"],
            broadcast=r["broadcast"],
        )
        for r in rows
    ]


# Each mailbox's placement count, plus one ($1: the mailboxes, sorted: rows locked in order).
_BUMP = """INSERT INTO placement_seq AS p (mailbox_id, seq)
           SELECT m, 1 FROM unnest($1::text[]) AS m WHERE {0} ORDER BY m
           ON CONFLICT (mailbox_id) DO UPDATE SET seq = p.seq + 1"""


async def lock_mailboxes(conn: asyncpg.Connection, mailbox_ids: list[str]) -> dict[str, int]:
    """The placement lock of these mailboxes until the transaction ends, taken in one order
    (sorted), so two replicas placing batches of the same mailboxes cannot deadlock; and each
    mailbox's ``placement_seq`` bumped, as it was before (0: never placed in).

    Every transaction that places mail takes it, so the bump counts them: a read made before
    the lock is still good when nothing was placed since (``placement.prefetch``)."""
    if not mailbox_ids:
        return {}
    boxes = sorted(set(mailbox_ids))
    # One statement: the locks (an InitPlan, run before the first row) and then the bumps,
    # which read the rows' latest versions (ON CONFLICT DO UPDATE), not the statement's snapshot.
    rows = await conn.fetch(
        "WITH l AS MATERIALIZED (SELECT pg_advisory_xact_lock(hashtext('thread:' || m))"
        " FROM unnest($1::text[]) m) "
        + _BUMP.format("(SELECT count(*) FROM l) > 0")
        + " RETURNING mailbox_id, seq - 1 AS before",
        boxes,
    )
    return {r["mailbox_id"]: r["before"] for r in rows}


async def count_placement(conn: asyncpg.Connection, mailbox_ids: list[str]) -> None:
    """Bump these mailboxes' placement counts without the placement lock: for a change that
    a placement's decisions read (a conversation's status), made outside one."""
    await conn.execute(_BUMP.format("true"), sorted(set(mailbox_ids)))


async def place_message(
    conn: asyncpg.Connection,
    *,
    mailbox_id: str,
    channel: str,
    message_id: str,
    in_reply_to: list[str],
    references: list[str],
    direction: str,
    sender: Address,
    to: list[Address],
    cc: list[Address],
    subject: str,
    date: datetime,
    text: str,
    html: str,
    attachments: list[dict[str, Any]],
    status: str | None,
    flags: dict[str, Any],
    id_conversa: str | None = None,
    token_secret: bytes = b"",
    our_domain: str = "",
    thread_index: str | None = None,
    thread_topic: str | None = None,
    rules: Rules = Rules(),
    arrived: datetime | None = None,
    reply_to: list[Address] | None = None,
    own_address: str = "",
    locked: bool = False,
) -> Placed | None:
    """Thread one message; None when this mailbox already has this Message-ID (a retry, a Bcc copy).

    ``arrived`` (when we received it; ``date`` if not given) is the conversation's activity, what
    the list is ordered by: a sender's clock, wrong by years either way, must not pin a
    conversation to the top or bury a fresh reply. ``date`` stays the message's own.

    Serialized per mailbox with an advisory lock so two replicas can't split one thread
    (``locked``: the caller took it already, with ``lock_mailboxes``).
    ``id_conversa`` forces the conversation (our own outbound messages know theirs).  The rules,
    in order: thread keys (``domain.keys``: JWZ ids, our ids scoped per customer, the Outlook
    thread), the subject fallback (``domain.fallback``), our signed token, the subject number
    from a participant; then a broadcast is only linked to, and a closed conversation older than
    the reopen age hands its thread to a new conversation linked to it.
    """
    automatic = direction == "in" and is_automatic(flags)
    if not locked:
        await lock_mailboxes(conn, [mailbox_id])
    our_domain = our_domain.lower()
    inbound = direction == "in"
    broadcast = False
    ours: list[str] = []
    if inbound:
        found = inbound_keys(
            message_id,
            in_reply_to,
            references,
            sender=sender.address,
            our_domain=our_domain,
            thread_index=thread_index,
        )
        keys, ours = found.join, found.ours
    else:
        if id_conversa is not None:
            has_inbound = bool(
                await conn.fetchval(
                    "SELECT 1 FROM messages WHERE id_conversa = $1::uuid AND direction = 'in'",
                    id_conversa,
                )
            )
            broadcast = is_broadcast([a.address for a in to], our_domain, has_inbound)
        keys = outbound_keys(
            message_id,
            in_reply_to,
            references,
            recipients=[a.address for a in [*to, *cc]],
            our_domain=our_domain,
            broadcast=broadcast,
        )
    # The keys' conversations, and a row with ``dup`` if this mailbox has the Message-ID
    # already (after the lock: a statement of its own, so it sees what was committed meanwhile).
    rows = await conn.fetch(
        """SELECT NULL::text AS message_id, NULL::uuid AS id_conversa,
                  NULL::timestamptz AS created_at, NULL::boolean AS stale, true AS dup
           FROM messages WHERE mailbox_id = $1 AND message_id = $4
           UNION ALL
           SELECT k.message_id, c.id_conversa, c.created_at,
                  c.status = 'closed' AND $3::interval > '0'::interval
                  AND clock_timestamp() - c.last_message_at > $3::interval,
                  false
           FROM thread_keys k JOIN conversations c USING (id_conversa)
           WHERE k.mailbox_id = $1 AND k.message_id = ANY($2::text[])""",
        mailbox_id,
        [*keys, *ours],
        rules.reopen_max_age,
        message_id,
    )
    if any(r["dup"] for r in rows):
        return None
    found_owners = {r["message_id"]: (str(r["id_conversa"]), r["created_at"]) for r in rows}
    stale_known = {str(r["id_conversa"]): bool(r["stale"]) for r in rows}
    owners = {k: v for k, v in found_owners.items() if k in keys}
    decision = decide(message_id, in_reply_to, references, owners, keys=keys)
    chosen = {decision.id_conversa, *decision.merge}
    created = {c: at for c, at in owners.values() if c in chosen}
    ti_key = thread_index_key(thread_index)
    unlinked = inbound and is_unlinked(message_id, in_reply_to, references, ti_key)
    skey = subject_key(subject, thread_topic)
    marked = continues(subject, thread_topic)
    if inbound and skey and rules.subject_window > timedelta(0):
        cands = await _subject_candidates(
            conn,
            mailbox_id,
            skey,
            date,
            rules.subject_window,
            unlinked,
            marked,
            our_domain,
            rules.reopen_max_age,
        )
        who = people([a.address for a in [sender, *to, *cc]], our_domain)
        hits = set(subject_matches(skey, unlinked, who, date, cands, rules.subject_window, marked))
        created.update({c.id_conversa: c.created_at for c in cands if c.id_conversa in hits})
    ranked = sorted(created, key=lambda c: (created[c], c))
    target = id_conversa or (ranked[0] if ranked else None)
    linked_to: str | None = None
    if target is None and inbound and token_secret:
        named = await _named_conversation(
            conn,
            mailbox_id,
            sender,
            [*to, *cc],
            [*in_reply_to, *references],
            subject,
            token_secret,
            our_domain,
        )
        if named is not None:
            target, theirs, broadcast_named = named
            if broadcast_named or not theirs:
                # An answer to a broadcast, or from someone our mail was forwarded to: a
                # conversation of its own, linked to the one named.
                target, linked_to = None, target
    if target is None and ours:
        linked = sorted({found_owners[k] for k in ours if k in found_owners}, key=lambda o: o[1])
        if linked:
            linked_to = await _survivor(conn, uuid.UUID(linked[0][0]))
    # A forced conversation (our own outbound mail) absorbs whatever the links also point at.
    merged = [m for m in ranked if m != target]
    stale: uuid.UUID | None = None
    # An auto-reply or a bounce joins even an old closed conversation: it reopens nothing, and
    # is no activity (the list does not move for it).
    if (
        target is not None
        and inbound
        and not automatic
        and id_conversa is None
        and rules.reopen_max_age
    ):
        # Closed and quiet past the reopen age: known from the key lookup, else asked.
        is_stale = stale_known.get(target)
        if is_stale is None:
            is_stale = bool(
                await conn.fetchval(
                    """SELECT status = 'closed' AND clock_timestamp() - last_message_at > $2
                       FROM conversations WHERE id_conversa = $1""",
                    uuid.UUID(target),
                    rules.reopen_max_age,
                )
            )
        if is_stale:
            stale, linked_to, target = uuid.UUID(target), target, None
    if target is None:
        target = str(uuid.uuid4())
        await conn.execute(
            """INSERT INTO conversations (id_conversa, mailbox_id, channel, subject, created_at,
                                          last_message_at, linked_to)
               VALUES ($1, $2, $3, $4, clock_timestamp(), $5, $6)""",
            uuid.UUID(target),
            mailbox_id,
            channel,
            subject,
            arrived or date,
            uuid.UUID(linked_to) if linked_to else None,
        )
        if stale is not None:
            # The old thread goes on here: later mail naming its messages lands in this one.
            await conn.execute(
                "UPDATE thread_keys SET id_conversa = $2 WHERE id_conversa = $1",
                stale,
                uuid.UUID(target),
            )
    for old_id in merged:
        await _merge(conn, uuid.UUID(old_id), uuid.UUID(target))
    msg_uuid = uuid.uuid4()
    # The message and its thread keys in one statement.
    message = await conn.fetchrow(
        """WITH m AS (
               INSERT INTO messages (id, id_conversa, mailbox_id, channel, message_id, direction,
                                     sender, to_addrs, cc_addrs, subject, date, text_body,
                                     html_body, attachments, status, in_reply_to, refs, flags,
                                     subject_key, loose, marked, reply_to)
               VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20,
                       $21,$22)
               RETURNING id, message_id, direction, sender, to_addrs, cc_addrs, subject, date,
                         in_reply_to, refs, reply_to, flags),
           k AS (INSERT INTO thread_keys (mailbox_id, message_id, id_conversa)
                 SELECT $3, key, $2 FROM unnest($23::text[]) AS key
                 ON CONFLICT (mailbox_id, message_id) DO NOTHING)
           SELECT * FROM m""",
        msg_uuid,
        uuid.UUID(target),
        mailbox_id,
        channel,
        message_id,
        direction,
        sender.model_dump(),
        [a.model_dump() for a in to],
        [a.model_dump() for a in cc],
        subject,
        date,
        text,
        html,
        attachments,
        status,
        in_reply_to,
        references,
        flags,
        skey,
        unlinked,
        marked,
        [a.model_dump() for a in reply_to or []],
        list(keys),
    )
    # The message's people, deduplicated; those the conversation lacks (by address, without
    # case) are appended in SQL, and the activity row is written by the same statement.
    # The people on the other side: not the mailbox itself, nor its +token addresses.
    people_in = [
        p
        for p in _participants([], sender, *(reply_to or []), *to, *cc)
        if not own_address or _base_address(p["address"]) != own_address.lower()
    ]
    doc = search_document(subject, [sender, *to, *cc], text, html)
    conversation = await conn.fetchrow(
        f"""WITH u AS (UPDATE conversations SET
               last_message_at = CASE WHEN $7 THEN last_message_at
                                      ELSE GREATEST(last_message_at, $2) END,
               search = CASE WHEN octet_length(search::text) < {_VECTOR_FULL}
                             THEN search || {_TSV.format("$5::text")} ELSE search END,
               activity_seq = nextval('activity_seq'),
               last_inbound_at = CASE WHEN $3 = 'in' AND NOT $7 THEN clock_timestamp()
                                      ELSE last_inbound_at END,
               message_count = (SELECT count(*) FROM messages WHERE id_conversa = $1),
               participants = participants || coalesce((
                   SELECT jsonb_agg(n.value ORDER BY n.ord)
                   FROM jsonb_array_elements($4::jsonb) WITH ORDINALITY AS n(value, ord)
                   WHERE NOT EXISTS (
                       SELECT 1 FROM jsonb_array_elements(conversations.participants) p
                       WHERE lower(p ->> 'address') = lower(n.value ->> 'address'))),
                   '[]'::jsonb),
               status = CASE WHEN $3 = 'in' AND NOT $7 AND status = 'closed' THEN 'open'
                             ELSE status END,
               broadcast = broadcast OR $6
           WHERE id_conversa = $1 RETURNING {_STATE_COLUMNS}, activity_seq),
           a AS (INSERT INTO activity (seq, id_conversa, last_message_at)
                 SELECT activity_seq, id_conversa, last_message_at FROM u)
           SELECT * FROM u""",
        uuid.UUID(target),
        arrived or date,
        direction,
        people_in,
        doc,
        broadcast,
        automatic,
    )
    return Placed(conversation, message, merged, text)


async def _named_conversation(
    conn: asyncpg.Connection,
    mailbox_id: str,
    sender: Address,
    recipients: list[Address],
    ids: list[str],
    subject: str,
    secret: bytes,
    our_domain: str,
) -> tuple[str, bool, bool] | None:
    """With no Message-ID link: our signed token in a Reply-To address or a Message-ID, else the
    ``[#number]`` of the subject, but only from someone already in that conversation.

    Returns the conversation, whether the sender is one of its customers (``belongs``: the token
    travels with every forwarded copy of our mail, the subject number is checked by address
    already) and whether it is a broadcast."""
    numbers = tokens.numbers_named([a.address for a in recipients], ids, secret)
    for number in numbers:
        row = await conn.fetchrow(
            "SELECT id_conversa FROM conversations WHERE number = $1 AND mailbox_id = $2",
            number,
            mailbox_id,
        )
        if row is not None:
            named = await _survivor(conn, row["id_conversa"])
            conv = await conn.fetchrow(
                "SELECT participants, broadcast FROM conversations WHERE id_conversa = $1::uuid",
                named,
            )
            people = [p.get("address", "") for p in conv["participants"] or []]
            return named, belongs(sender.address, people, our_domain), bool(conv["broadcast"])
    in_subject = tokens.subject_number(subject)
    if in_subject is None or not sender.address:
        return None
    row = await conn.fetchrow(
        """SELECT id_conversa FROM conversations
           WHERE number = $1 AND mailbox_id = $2
             AND participants @> jsonb_build_array(jsonb_build_object('address', $3::text))""",
        in_subject,
        mailbox_id,
        sender.address,
    )
    if row is None:
        # Addresses are compared without case: look again the slow way.
        row = await conn.fetchrow(
            """SELECT id_conversa FROM conversations c
               WHERE number = $1 AND mailbox_id = $2 AND EXISTS (
                   SELECT 1 FROM jsonb_array_elements(c.participants) p
                   WHERE lower(p ->> 'address') = lower($3))""",
            in_subject,
            mailbox_id,
            sender.address,
        )
    if row is None:
        return None
    named = await _survivor(conn, row["id_conversa"])
    is_broadcast_conv = await conn.fetchval(
        "SELECT broadcast FROM conversations WHERE id_conversa = $1::uuid", named
    )
    return named, True, bool(is_broadcast_conv)


async def _survivor(conn: asyncpg.Connection, id_conversa: uuid.UUID) -> str:
    for _ in range(10):
        merged = await conn.fetchval(
            "SELECT merged_into FROM conversations WHERE id_conversa = $1", id_conversa
        )
        if merged is None:
            break
        id_conversa = merged
    return str(id_conversa)


async def _merge(conn: asyncpg.Connection, old: uuid.UUID, into: uuid.UUID) -> None:
    await conn.execute("UPDATE messages SET id_conversa = $2 WHERE id_conversa = $1", old, into)
    await conn.execute("UPDATE thread_keys SET id_conversa = $2 WHERE id_conversa = $1", old, into)
    await conn.execute(
        "UPDATE conversations SET merged_into = $2 WHERE merged_into = $1", old, into
    )
    await conn.execute(
        "UPDATE conversations SET merged_into = $2, message_count = 0 WHERE id_conversa = $1",
        old,
        into,
    )
    await conn.execute(
        f"""UPDATE conversations SET search = search || (SELECT search FROM conversations
                                                         WHERE id_conversa = $1)
            WHERE id_conversa = $2 AND octet_length(search::text) < {_VECTOR_FULL}""",
        old,
        into,
    )


def state(conv: Mapping[str, Any], token_secret: bytes = b"") -> ConversationState:
    return ConversationState(
        id_conversa=str(conv["id_conversa"]),
        mailbox_id=conv["mailbox_id"],
        number=conv["number"],
        token=tokens.sign(conv["number"], token_secret) if token_secret else None,
        channel=conv["channel"],
        subject=conv["subject"],
        status=conv["status"],
        assignee=conv["assignee"],
        message_count=conv["message_count"],
        last_message_at=conv["last_message_at"],
        participants=[Address(**p) for p in conv["participants"]],
    )


def snippet(text: str, size: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= size else flat[: size - 1] + "…"


def summary(msg: Mapping[str, Any], text: str | None = None) -> MessageSummary:
    """``text``: the message's text when the record was read without its body."""
    return MessageSummary.model_validate(
        {
            "id": str(msg["id"]),
            "message_id": msg["message_id"],
            "direction": msg["direction"],
            "from": msg["sender"],
            "to": msg["to_addrs"],
            "cc": msg["cc_addrs"],
            "subject": msg["subject"],
            "date": msg["date"],
            "snippet": snippet(msg["text_body"] if text is None else text),
            "in_reply_to": list(msg["in_reply_to"]),
            "references": list(msg["refs"]),
            "reply_to": msg["reply_to"],
            "automatic": sent_by_a_machine(msg),
        }
    )


def sent_by_a_machine(msg: Mapping[str, Any]) -> bool:
    """A stored inbound message that ingest flagged automatic (an auto-reply, a bounce)."""
    return bool(msg["direction"] == "in" and is_automatic(msg["flags"]))


def is_automatic(flags: dict[str, Any] | None) -> bool:
    """Ingest's flags say a machine sent it: an auto-reply or a bounce."""
    return flags is not None and bool(flags.get("auto_submitted") or flags.get("bounce"))


async def resolve(pool: asyncpg.Pool, id_conversa: uuid.UUID) -> asyncpg.Record | None:
    """The conversation, following merges: an old id answers with its survivor."""
    for _ in range(10):
        row = await pool.fetchrow(
            f"SELECT {_CONV_COLUMNS} FROM conversations WHERE id_conversa = $1", id_conversa
        )
        if row is None or row["merged_into"] is None:
            return row
        id_conversa = row["merged_into"]
    return None


async def snapshot(conn: asyncpg.Connection, mailboxes: list[str]) -> int:
    """The activity seq a walk of the list starts at.

    Run inside a transaction: the shared advisory locks wait for placements in flight in these
    mailboxes (they hold the exclusive per-mailbox lock until commit), so every change with a
    seq up to the answer is visible, and any later change gets a larger seq.
    """
    await conn.execute(
        "SELECT pg_advisory_xact_lock_shared(hashtext('thread:' || m)) FROM unnest($1::text[]) m",
        sorted(set(mailboxes)),
    )
    return int(await conn.fetchval("SELECT coalesce(max(seq), 0) FROM activity"))


async def list_conversations(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    user_id: str,
    mailboxes: list[str],
    status: str | None,
    q: str | None,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
    as_of: int,
    assignee: str | None = None,
    unread: bool | None = None,
) -> list[asyncpg.Record]:
    """One page, ordered by each conversation's position as of activity seq ``as_of``.

    Conversations unchanged since then sit where they are (index order); the few that moved
    since are placed by their last ``activity`` row up to ``as_of``, and those created after it
    are left out.  ``walk_key`` is that position: the cursor for the next page is built from it.
    Filters (status, assignee, unread, q) apply to the current state.
    """
    conds = ["c.merged_into IS NULL", "c.mailbox_id = ANY($1::text[])"]
    args: list[Any] = [mailboxes, user_id, limit, as_of]
    if status:
        args.append(status)
        conds.append(f"c.status = ${len(args)}")
    if assignee:
        args.append(assignee)
        conds.append(f"c.assignee = ${len(args)}")
    unread_sql = """(c.last_inbound_at IS NOT NULL AND NOT EXISTS (
                        SELECT 1 FROM reads r0 WHERE r0.id_conversa = c.id_conversa
                          AND r0.user_id = $2 AND r0.read_at >= c.last_inbound_at))"""
    if unread is not None:
        conds.append(unread_sql if unread else f"NOT {unread_sql}")
    if q:
        args.append(fold(q))
        conds.append(f"c.search @@ {_TSQ.format(f'${len(args)}::text')}")
        if getattr(conn, "is_in_transaction", lambda: False)():
            # A generic plan cannot know how common the words are: a rare word wants the GIN
            # index, a common one the ordered walk that stops after a page.  Plan per query.
            await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
    where = " AND ".join(conds)
    before_now = before_then = "TRUE"
    if after:
        args.extend(after)
        a, b = len(args) - 1, len(args)
        before_now = f"(c.last_message_at, c.id_conversa) < (${a}, ${b})"
        before_then = f"(h.last_message_at, c.id_conversa) < (${a}, ${b})"
    # One ordered index walk per mailbox (``mailbox_id = ANY(...)`` cannot use the index order,
    # so it would sort every conversation of the mailboxes), merged by the outer sort.
    each = where.replace("c.mailbox_id = ANY($1::text[])", "c.mailbox_id = mb.id")
    sql = f"""WITH pos AS (
                (SELECT x.id_conversa, x.walk_key FROM unnest($1::text[]) AS mb(id)
                 CROSS JOIN LATERAL (
                     SELECT c.id_conversa, c.last_message_at AS walk_key FROM conversations c
                     WHERE {each} AND c.activity_seq <= $4 AND {before_now}
                     ORDER BY c.last_message_at DESC, c.id_conversa DESC LIMIT $3) x)
                UNION ALL
                (SELECT c.id_conversa, h.last_message_at FROM conversations c
                 CROSS JOIN LATERAL (SELECT a.last_message_at FROM activity a
                                     WHERE a.id_conversa = c.id_conversa AND a.seq <= $4
                                     ORDER BY a.seq DESC LIMIT 1) h
                 WHERE {where} AND c.activity_seq > $4 AND {before_then}))
              SELECT {_C_CONV_COLUMNS}, pos.walk_key,
                     (c.last_inbound_at IS NOT NULL AND
                      (r.read_at IS NULL OR r.read_at < c.last_inbound_at)) AS unread
              FROM pos JOIN conversations c USING (id_conversa)
              LEFT JOIN reads r ON r.id_conversa = c.id_conversa AND r.user_id = $2
              ORDER BY pos.walk_key DESC, c.id_conversa DESC LIMIT $3"""
    return list(await conn.fetch(sql, *args))


async def client_id_use(
    conn: asyncpg.Connection, user_id: str, client_id: str
) -> asyncpg.Record | None:
    """What an agent's ``client_id`` was first used for: kind, conversation and send."""
    row: asyncpg.Record | None = await conn.fetchrow(
        """SELECT kind, id_conversa, send_id FROM outbound_starts
           WHERE user_id = $1 AND client_id = $2""",
        user_id,
        client_id,
    )
    return row


async def claim_reply_client_id(
    conn: asyncpg.Connection, user_id: str, client_id: str, id_conversa: uuid.UUID, send_id: str
) -> asyncpg.Record | None:
    """Record a REST reply's ``client_id`` in the caller's transaction; None if it is new, else
    its first use (a concurrent twin waits on the key for the first to commit)."""
    if await conn.fetchval(
        """INSERT INTO outbound_starts (user_id, client_id, id_conversa, send_id, kind)
           VALUES ($1, $2, $3, $4::uuid, 'reply') ON CONFLICT DO NOTHING RETURNING 1""",
        user_id,
        client_id,
        id_conversa,
        send_id,
    ):
        return None
    return await client_id_use(conn, user_id, client_id)


async def record_account(
    conn: asyncpg.Connection | asyncpg.Pool, user_id: str, active: bool, changed_at: datetime
) -> None:
    """Keep auth's word on an account (``user.changed``): a disabled one is assigned nothing.
    An older change than the one stored is ignored."""
    await conn.execute(
        """INSERT INTO agent_accounts AS a (user_id, active, changed_at) VALUES ($1, $2, $3)
           ON CONFLICT (user_id) DO UPDATE SET active = EXCLUDED.active,
               changed_at = EXCLUDED.changed_at
           WHERE EXCLUDED.changed_at >= a.changed_at""",
        user_id,
        active,
        changed_at,
    )


async def assignable(
    conn: asyncpg.Connection | asyncpg.Pool, mailbox_id: str, user_id: str
) -> bool:
    """Whether ``user_id`` is an agent of ``mailbox_id`` now: a member whose account is enabled."""
    return bool(
        await conn.fetchval(
            """SELECT EXISTS (SELECT 1 FROM mailbox_agents
                              WHERE mailbox_id = $1 AND user_id = $2 AND active)
                  AND NOT EXISTS (SELECT 1 FROM agent_accounts WHERE user_id = $2 AND NOT active)""",
            mailbox_id,
            user_id,
        )
    )


async def update_state(
    conn: asyncpg.Connection,
    id_conversa: uuid.UUID,
    *,
    status: str | None,
    assignee: str | None,
    set_assignee: bool,
) -> tuple[asyncpg.Record, bool] | None:
    """Apply a status/assignee change; (row, changed), or None when it was merged meanwhile.

    The row lock orders this against a placement reopening the same conversation. The
    mailbox's placement count is bumped first (and so in the placements' lock order: count,
    then conversation rows): a placement that read ahead of its lock decided on the status
    it read, and the count tells it to read again (found by a review).
    """
    mailbox_id = await conn.fetchval(
        "SELECT mailbox_id FROM conversations WHERE id_conversa = $1", id_conversa
    )
    if mailbox_id is None:
        return None
    await count_placement(conn, [mailbox_id])
    row = await conn.fetchrow(
        f"SELECT {_CONV_COLUMNS} FROM conversations"
        " WHERE id_conversa = $1 AND merged_into IS NULL FOR UPDATE",
        id_conversa,
    )
    if row is None:
        return None
    new_status = status or row["status"]
    new_assignee = assignee if set_assignee else row["assignee"]
    if new_status == row["status"] and new_assignee == row["assignee"]:
        return row, False
    row = await conn.fetchrow(
        "UPDATE conversations SET status = $2, assignee = $3 WHERE id_conversa = $1"
        f" RETURNING {_CONV_COLUMNS}",
        id_conversa,
        new_status,
        new_assignee,
    )
    return row, True


async def messages_of(pool: asyncpg.Pool, id_conversa: uuid.UUID) -> list[asyncpg.Record]:
    return list(
        await pool.fetch(
            "SELECT * FROM messages WHERE id_conversa = $1 ORDER BY date, created_at", id_conversa
        )
    )


async def is_unread(pool: asyncpg.Pool, user_id: str, id_conversa: uuid.UUID) -> bool:
    """Same rule as the list: an inbound message arrived after this agent last read it."""
    return bool(
        await pool.fetchval(
            """SELECT c.last_inbound_at IS NOT NULL
                      AND (r.read_at IS NULL OR r.read_at < c.last_inbound_at)
               FROM conversations c
               LEFT JOIN reads r ON r.id_conversa = c.id_conversa AND r.user_id = $1
               WHERE c.id_conversa = $2""",
            user_id,
            id_conversa,
        )
    )


async def mark_read(
    conn: asyncpg.Connection | asyncpg.Pool, user_id: str, id_conversa: uuid.UUID
) -> datetime:
    read_at: datetime = await conn.fetchval(
        """INSERT INTO reads (user_id, id_conversa, read_at) VALUES ($1, $2, now())
           ON CONFLICT (user_id, id_conversa) DO UPDATE SET read_at = now()
           RETURNING read_at""",
        user_id,
        id_conversa,
    )
    return read_at


async def record_read(
    conn: asyncpg.Connection | asyncpg.Pool, user_id: str, id_conversa: uuid.UUID, at: datetime
) -> None:
    """A read done elsewhere (the notifier's ``read`` frame): the newest read wins."""
    await conn.execute(
        """INSERT INTO reads (user_id, id_conversa, read_at) VALUES ($1, $2, $3)
           ON CONFLICT (user_id, id_conversa)
           DO UPDATE SET read_at = GREATEST(reads.read_at, EXCLUDED.read_at)""",
        user_id,
        id_conversa,
        at,
    )


async def mark_message_failed(conn: asyncpg.Connection, mailbox_id: str, message_id: str) -> bool:
    """Our sent message bounced: its status in the conversation becomes ``failed``."""
    done: str = await conn.execute(
        """UPDATE messages SET status = 'failed'
           WHERE mailbox_id = $1 AND message_id = $2 AND direction = 'out'""",
        mailbox_id,
        message_id,
    )
    return done != "UPDATE 0"
