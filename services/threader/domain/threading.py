"""Pure conversation-threading rules for the threader service (no I/O).

Grouping rule (JWZ/notmuch-like, header evidence only): a message belongs with
every conversation that owns any of its Message-ID, In-Reply-To or References
ids.  The final grouping is therefore the connected components of the
"message shares an id with message" graph, which makes it independent of the
arrival order.  Subjects never merge conversations here: `normalize_subject`
only produces a key for a later, stricter subject+participants matcher.

The storage layer owns persistence: for each new message it looks up the owners
of `candidate_ids(...)`, calls `decide(...)` and applies the `Decision`.
`MemoryThreader` is the in-memory reference of exactly that loop.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.header import decode_header, make_header

__all__ = [
    "Decision",
    "MemoryThreader",
    "candidate_ids",
    "decide",
    "has_reply_marker",
    "normalize_msgid",
    "normalize_subject",
]

# --------------------------------------------------------------------------- Message-IDs

_BRACKETED = re.compile(r"<([^<>]*)>")
_WS = re.compile(r"\s+")
_MAX_ID_LEN = 998  # RFC 5322 line limit; anything longer is garbage, not an id


# What an id core may not hold: controls, space, DEL and brackets (one regex search: the
# character-by-character loop was a tenth of the threader's CPU per message).
_BAD_CORE = re.compile(r"[\x00-\x20<>\x7f]")


def _valid_core(core: str) -> bool:
    """An id core is usable if non-empty, bounded and free of control/bracket chars."""
    if not core or len(core) > _MAX_ID_LEN:
        return False
    return _BAD_CORE.search(core) is None


def _ids_in(raw: str | None) -> list[str]:
    """All usable ids in one header value or list item, as ``<core>``.

    Bracketed ids are taken wherever they occur (prose and comments around them
    are ignored: RFC 822-era In-Reply-To lines, notmuch T510).  Whitespace inside
    brackets is dropped because it only comes from broken folding.  A bare token
    is accepted only when the whole item is a single ``x@y`` word, so callers that
    already stripped the brackets work, while prose such as ``mumble`` is junk.
    """
    if not raw:
        return []
    found = _BRACKETED.findall(raw)
    if found:
        cores = [_WS.sub("", f) for f in found]
        return [f"<{c}>" for c in cores if _valid_core(c)]
    token = raw.strip()
    if "@" in token and not _WS.search(token) and "(" not in token and _valid_core(token):
        return [f"<{token}>"]
    return []


def normalize_msgid(raw: str | None) -> str | None:
    """The first usable id in ``raw`` as ``<core>`` (case kept: ids are case-sensitive)."""
    ids = _ids_in(raw)
    return ids[0] if ids else None


def _all_ids(items: Iterable[str] | str | None) -> list[str]:
    """Ids from a list of header values/ids; a plain string is treated as one value."""
    if items is None:
        return []
    if isinstance(items, str):
        items = [items]
    out: list[str] = []
    for item in items:
        out.extend(_ids_in(item))
    return out


def candidate_ids(
    message_id: str | None,
    in_reply_to: Iterable[str] | None,
    references: Iterable[str] | None,
) -> list[str]:
    """Ids the storage layer must look up for a new message.

    Order: own id, In-Reply-To ids, References ids; first occurrence wins when
    deduplicating.  Items may be raw header values or single ids, with or without
    brackets.  Ids keep their case (RFC 5322 ids are case-sensitive) and are only
    stripped of whitespace; junk without a usable id is dropped.
    """
    seen: dict[str, None] = {}
    own = normalize_msgid(message_id)
    if own:
        seen[own] = None
    for mid in _all_ids(in_reply_to) + _all_ids(references):
        seen.setdefault(mid, None)
    return list(seen)


def _strict_single_id(items: list[str]) -> str | None:
    """The id if In-Reply-To is exactly one ``<id>`` and nothing else (notmuch's strict parse)."""
    ids: list[str] = []
    for item in items:
        if not item or not item.strip():
            continue
        found = _ids_in(item)
        leftover = _BRACKETED.sub("", item).strip() if "<" in item else ""
        if leftover or not found:
            return None
        ids.extend(found)
    return ids[0] if len(set(ids)) == 1 else None


def _as_list(items: Iterable[str] | str | None) -> list[str]:
    """Accept None, one header value or a list of values/ids."""
    if items is None:
        return []
    if isinstance(items, str):
        return [items]
    return list(items)


def _parent(own: str | None, in_reply_to: list[str], references: list[str]) -> str | None:
    """Declared parent: a clean In-Reply-To wins over References (notmuch T510), else the
    last References id, else any id found in a dodgy In-Reply-To.  Self links are ignored.
    The parent may be a ghost; display code falls back to the last existing reference."""
    strict = _strict_single_id(in_reply_to)
    if strict and strict != own:
        return strict
    for mid in reversed(_all_ids(references)):
        if mid != own:
            return mid
    for mid in _all_ids(in_reply_to):
        if mid != own:
            return mid
    return None


# --------------------------------------------------------------------------- decision


@dataclass
class Decision:
    """What the storage layer must do with one inbound message.

    id_conversa: existing conversation to join, or None = create a new one.
    merge: other existing conversations this message proves to be the same thread;
        fold them into the chosen one (re-point their keys and messages).
    keys: ids to register as owned by the chosen conversation (own id, In-Reply-To,
        References), so a parent or sibling arriving later finds it (ghost parents).
    parent: declared parent id for tree display (may be a ghost); not used for grouping.
    """

    id_conversa: str | None
    merge: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    parent: str | None = None


def decide(
    message_id: str | None,
    in_reply_to: Iterable[str] | None,
    references: Iterable[str] | None,
    owners: Mapping[str, tuple[str, datetime]],
    keys: Iterable[str] | None = None,
) -> Decision:
    """Pick the conversation for a new message from the owners of its candidate ids.

    ``owners`` maps a registered id (as returned by `candidate_ids`) to
    ``(id_conversa, conversation_created_at)``; extra entries are ignored.  The
    oldest owning conversation (created_at, then id) survives so long-lived
    conversation ids stay stable; every other owner is listed in ``merge``.
    A duplicate Message-ID is just an owned own-id, so it joins the first copy's
    conversation.  Use timezone-aware datetimes consistently (naive and aware
    values cannot be compared).  ``keys`` replaces the candidate ids when the caller derived
    its own (customer-scoped ids, the Outlook thread: see ``domain.keys``).
    """
    irt = _as_list(in_reply_to)
    refs = _as_list(references)
    keys = list(keys) if keys is not None else candidate_ids(message_id, irt, refs)
    created: dict[str, datetime] = {}
    for key in keys:
        owner = owners.get(key)
        if owner is None:
            continue
        conv, at = owner
        if conv not in created or at < created[conv]:
            created[conv] = at
    ranked = sorted(created, key=lambda c: (created[c], c))
    own = normalize_msgid(message_id)
    return Decision(
        id_conversa=ranked[0] if ranked else None,
        merge=ranked[1:],
        keys=keys,
        parent=_parent(own, irt, refs),
    )


# --------------------------------------------------------------------------- reference threader


class MemoryThreader:
    """In-memory reference of the storage loop: look up owners, `decide`, apply.

    Used by tests and benchmarks as the oracle for the database implementation.
    Conversation ids are ``conv-000001``... in creation order; creation times are
    synthetic and increasing, so "oldest" means "created first".  Deletion is not
    modelled: re-threading a changed mailbox means replaying it into a new instance.
    """

    _EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

    def __init__(self) -> None:
        self._owner: dict[str, str] = {}  # registered id -> conversation
        self._keys: dict[str, set[str]] = {}  # conversation -> registered ids
        self._members: dict[str, list[str]] = {}  # conversation -> message labels
        self._created: dict[str, datetime] = {}
        self._next = 0
        self._anon = 0
        self.decisions: list[Decision] = []

    def add(
        self,
        message_id: str | None,
        in_reply_to: Iterable[str] | None = (),
        references: Iterable[str] | None = (),
        key: str | None = None,
    ) -> str:
        """Thread one message and return its id_conversa.

        ``key`` labels the message in `groups` (default: its normalized Message-ID,
        or a synthetic label when it has none, so id-less messages still count).
        """
        irt = _as_list(in_reply_to)
        refs = _as_list(references)
        lookups = candidate_ids(message_id, irt, refs)
        owners = {
            k: (self._owner[k], self._created[self._owner[k]]) for k in lookups if k in self._owner
        }
        decision = decide(message_id, irt, refs, owners)
        self.decisions.append(decision)
        conv = decision.id_conversa or self._new_conversation()
        for other in decision.merge:
            self._merge_into(conv, other)
        for k in decision.keys:
            self._owner[k] = conv
            self._keys[conv].add(k)
        if key is None:
            key = normalize_msgid(message_id)
        if key is None:
            self._anon += 1
            key = f"<no-message-id-{self._anon}@memorythreader.invalid>"
        self._members[conv].append(key)
        return conv

    def _new_conversation(self) -> str:
        self._next += 1
        conv = f"conv-{self._next:06d}"
        self._created[conv] = self._EPOCH + timedelta(seconds=self._next)
        self._keys[conv] = set()
        self._members[conv] = []
        return conv

    def _merge_into(self, survivor: str, other: str) -> None:
        for k in self._keys.pop(other):
            self._owner[k] = survivor
            self._keys[survivor].add(k)
        self._members[survivor].extend(self._members.pop(other))
        del self._created[other]

    def conversation_of(self, message_id: str) -> str | None:
        """Current conversation owning an id (None if never seen)."""
        mid = normalize_msgid(message_id)
        return self._owner.get(mid) if mid else None

    def conversations(self) -> dict[str, list[str]]:
        """Conversation id -> message labels in arrival order."""
        return {c: list(m) for c, m in self._members.items() if m}

    def groups(self) -> list[set[str]]:
        """Message labels per final conversation (duplicates collapse into one label)."""
        return [set(m) for m in self._members.values() if m]


# --------------------------------------------------------------------------- subjects

# Reply and forward markers, compared case-folded.  From the brief, RFC 5256 and the
# Stalwart mail-parser lists (pt-BR RES/ENC/Resp, de AW/WG, nl Antw/Doorst, nordic
# SV/VS/VB/VL/FS, fr/tr TR, it R/RIF/I, pl ODP/PD, tr YNT/İLT, hu Továbbítás, el, he,
# ar, zh).
# fmt: off
_REPLY_WORDS = {
    "re", "res", "resp", "sv", "antw", "ref", "aw", "r", "rif", "bls", "odp", "ynt", "atb",
    "απ", "השב", "vá", "رد", "回复", "回覆", "答复",
}
_FORWARD_WORDS = {
    "fwd", "fw", "rv", "enc", "vs", "doorst", "vl", "tr", "wg", "i", "fs", "trs", "vb", "pd",
    "i̇lt", "yml", "továbbítás", "πρθ", "הועבר", "إعادة توجيه", "轉寄", "转发",
}
# fmt: on
_REPLY = {w.casefold() for w in _REPLY_WORDS}
_FORWARD = {w.casefold() for w in _FORWARD_WORDS}
# Trailing "(fwd)" markers; single letters excluded so "Widget (R)" / "Part (I)" survive.
_TRAILERS = {w for w in _FORWARD | {"回覆"} if len(w) > 1}


def _alternation(words: set[str]) -> str:
    """Regex alternation, longest first so "fwd" is tried before "fw"."""
    return "|".join(re.escape(w) for w in sorted(words, key=lambda w: (-len(w), w)))


_COLON = "[:\uff1a]"  # ASCII or full-width colon (CJK clients write 回复：)
# "re:", "re :", "re[2]:", "re (2):", "re^2:", "fwd[a]:", "re [list]:" (RFC 5256 subj-refwd).
_PREFIX_RE = re.compile(
    rf"(?:{_alternation(_REPLY | _FORWARD)})\s*(?:\[[^\[\]]*\]|\(\d+\)|\^\d+)?\s*{_COLON}"
)
_BLOB_RE = re.compile(r"\[[^\[\]]*\]")
_TRAILER_RE = re.compile(rf"\(\s*(?:{_alternation(_TRAILERS)})\s*\)\s*$")
_FWD_WRAPPER_RE = re.compile(rf"\[\s*(?:{_alternation(_FORWARD)})\s*{_COLON}")


def _decode_words(subject: str) -> str:
    """Decode RFC 2047 encoded-words left in a raw header; keep the text if it fails."""
    if "=?" not in subject:
        return subject
    try:
        return str(make_header(decode_header(subject)))
    except (LookupError, ValueError, UnicodeError):
        return subject


def _matching_bracket(text: str, start: int) -> int:
    """Index of the ``]`` closing ``text[start] == '['``, or -1 if unbalanced."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "[":
            depth += 1
        elif text[i] == "]":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _only_blobs(text: str) -> bool:
    """True if text is nothing but ``[...]`` blobs and whitespace (e.g. "[xyz]")."""
    return not _BLOB_RE.sub("", text).strip()


def _strip_once(s: str) -> str:
    """One pass of RFC 5256 steps 2-6 (extended): trailers, leaders, blobs, fwd wrapper."""
    # (2) trailing "(fwd)" markers
    while True:
        t = _TRAILER_RE.sub("", s).rstrip()
        if t == s:
            break
        s = t
    # (3)/(4) leading reply/forward prefixes and [blob]s, one at a time
    while True:
        s = s.lstrip()
        m = _PREFIX_RE.match(s)
        if m:
            s = s[m.end() :]
            continue
        b = _BLOB_RE.match(s)
        # drop a leading blob only if real text follows: "[xyz]" and "[a] [b]" are subjects
        if b and not _only_blobs(s[b.end() :]):
            s = s[b.end() :]
            continue
        break
    # (6) "[fwd: subject]" wrapping the whole subject
    w = _FWD_WRAPPER_RE.match(s)
    if w and _matching_bracket(s, 0) == len(s) - 1:
        return s[w.end() : -1].strip()
    return s.strip()


def normalize_subject(subject: str | None) -> str:
    """Base subject used as a matching key: no Re/Fwd/localized prefixes, counters
    (Re[2]:, Re(2):, Re^2:), leading [list] tags, [fwd: ...] wrappers or trailing
    (fwd); whitespace collapsed and case-folded.  Only a key: never merge on it alone.
    """
    if not subject:
        return ""
    # case-fold first: the key is case-insensitive and "İLT" only matches once folded
    s = _WS.sub(" ", _decode_words(subject)).strip().casefold()
    for _ in range(64):  # fixed point; the bound only guards pathological input
        t = _strip_once(s)
        if t == s:
            break
        s = t
    return _WS.sub(" ", s).strip()


def has_reply_marker(subject: str | None) -> bool:
    """True when the subject says it continues something: a reply or forward prefix (after any
    leading ``[list]`` tags), a trailing ``(fwd)`` or a ``[fwd: ...]`` wrapper."""
    if not subject:
        return False
    s = _WS.sub(" ", _decode_words(subject)).strip().casefold()
    while True:
        if _PREFIX_RE.match(s) or _FWD_WRAPPER_RE.match(s) or _TRAILER_RE.search(s):
            return True
        b = _BLOB_RE.match(s)
        if not b:
            return False
        s = s[b.end() :].lstrip()
