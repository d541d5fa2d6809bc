"""Unread badges: the counting rules, pure, shared by the SQL, the replicas and the tests.

Why counters and not one row per (agent, conversation): the notifier does not know every member
of a mailbox (tokens name mailboxes; memberships arrive only as changes), and a new message must
not cost one write or one frame per agent. So each conversation keeps two counters and each agent
one marker per conversation they read:

- ``in_seq``: inbound messages so far (a merge adds the merged conversation's);
- ``cleared``: ``in_seq`` when the conversation was last closed (closing clears every badge);
- ``read``: the agent's ``in_seq`` when they last marked it read (absent: 0).

An agent's unread count is ``in_seq - max(cleared, read)``: a new inbound message adds one for
everyone (a closed conversation that gets one is unread again), closing zeroes it for everyone,
a read zeroes it for that agent, reopening changes nothing. A merge adds the merged counters to
the survivor's and rewrites each reader's marker so the survivor's count is the sum of both.

Frames carry the counters (the same for every member), so one frame per event serves the whole
mailbox and each replica derives every connected agent's number with ``BadgeView``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class Counters:
    in_seq: int = 0
    cleared: int = 0


def unread(c: Counters, read: int = 0) -> int:
    return max(0, c.in_seq - max(c.cleared, read))


def inbound(c: Counters) -> Counters:
    return Counters(c.in_seq + 1, c.cleared)


def close(c: Counters) -> Counters:
    return Counters(c.in_seq, c.in_seq)


def mark_read(c: Counters) -> int:
    """The reader's new marker: everything inbound so far."""
    return c.in_seq


def merge(survivor: Counters, merged: Counters) -> Counters:
    return Counters(survivor.in_seq + merged.in_seq, survivor.cleared + merged.cleared)


def merged_read(survivor: Counters, read_s: int, merged: Counters, read_m: int) -> int:
    """A reader's marker on the survivor after a merge, so that its unread count is the sum.

    With ``r' = max(c_s, r_s) + max(c_m, r_m) >= c_s + c_m``:
    ``(s_s + s_m) - r' = (s_s - max(c_s, r_s)) + (s_m - max(c_m, r_m))``.
    """
    return max(survivor.cleared, read_s) + max(merged.cleared, read_m)


def relevant(c: Counters, read: int) -> bool:
    """A marker at or below ``cleared`` says nothing the counters don't: it need not be kept."""
    return read > c.cleared


# ---- snapshot visibility ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A PostgreSQL snapshot (``pg_current_snapshot()``): which transactions it already saw.

    A badge frame carries the id of the transaction that changed the counters; the agent's
    badges loaded on connect come from one snapshot, so a frame of a transaction visible in it
    is already counted there and is skipped, whatever order the relay published it in.
    """

    xmin: int
    xmax: int
    xip: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))

    def sees(self, xid: int) -> bool:
        return xid < self.xmin or (xid < self.xmax and xid not in self.xip)


# ---- one agent's badges on a replica -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BadgeOp:
    """What a badge frame in the stream says (see ``frames.badge_op``)."""

    op: str  # "in" | "close" | "read" | "merge"
    id_conversa: str
    mailbox: str
    xid: int
    counters: Counters  # after the change
    before: Counters  # before it (for a merge: the survivor's)
    read: int = 0  # "read": the reader's new marker
    read_before: int = 0  # "read": the reader's previous marker
    merged: tuple[tuple[str, Counters], ...] = ()  # "merge": each merged id and its counters

    @classmethod
    def of(cls, f: dict[str, Any]) -> BadgeOp:
        return cls(
            op=str(f["op"]),
            id_conversa=str(f["id_conversa"]),
            mailbox=str(f["mailbox"]),
            xid=int(f["xid"]),
            counters=Counters(int(f["in_seq"]), int(f["cleared"])),
            before=Counters(int(f["in_seq_before"]), int(f["cleared_before"])),
            read=int(f.get("read", 0)),
            read_before=int(f.get("read_before", 0)),
            merged=tuple(
                (str(m["id_conversa"]), Counters(int(m["in_seq"]), int(m["cleared"])))
                for m in f.get("merged", ())
            ),
        )


@dataclass
class BadgeView:
    """An agent's badges as one replica keeps them: mailbox totals and the markers that matter.

    Loaded from one snapshot on connect (``load``), then moved by the frames that snapshot did not
    see. Totals move by each change's difference, which does not depend on the order two frames
    of one conversation arrive in; per conversation only the agent's relevant read markers are
    kept, so memory grows with what they read, not with the mailbox.
    """

    user_id: str
    totals: dict[str, int] = field(default_factory=dict)
    reads: dict[str, int] = field(default_factory=dict)
    snapshot: Snapshot | None = None

    def load(self, snapshot: Snapshot, totals: dict[str, int], reads: dict[str, int]) -> None:
        self.snapshot = snapshot
        self.totals = dict(totals)
        self.reads = dict(reads)

    def apply(self, op: BadgeOp, to_user: str | None = None) -> int | None:
        """Apply one frame; the agent's unread count of ``op.id_conversa`` after it, or None when
        the frame is not theirs or their snapshot already counted it."""
        snap = self.snapshot
        if snap is None:
            return None
        xid = op.xid
        if xid < snap.xmin or (xid < snap.xmax and xid not in snap.xip):  # snap.sees(xid), inline
            return None
        conv = op.id_conversa
        r = self.reads.get(conv, 0)
        if op.op == "in":
            # The common case, for every agent of the mailbox: ``cleared`` and the agent's marker
            # stay, so whether the marker is kept does not change; only the total moves.
            totals = self.totals
            totals[op.mailbox] = totals.get(op.mailbox, 0) + 1
            c = op.counters
            return max(0, c.in_seq - max(c.cleared, r))
        if op.op == "read" and to_user != self.user_id:
            return None
        if op.op == "close":
            delta = -unread(op.before, r)
        elif op.op == "read":
            delta = unread(op.counters, op.read) - unread(op.before, op.read_before)
            r = op.read
        elif op.op == "merge":
            delta = 0  # the same mailbox: its total is unchanged
            cur = op.before
            for merged_id, mc in op.merged:
                r = merged_read(cur, r, mc, self.reads.pop(merged_id, 0))
                cur = merge(cur, mc)
        else:
            return None
        if relevant(op.counters, r):
            self.reads[conv] = r
        else:
            self.reads.pop(conv, None)
        self.totals[op.mailbox] = self.totals.get(op.mailbox, 0) + delta
        return unread(op.counters, r)


def inbound_groups(views: list[tuple[K, BadgeView]], op: BadgeOp) -> dict[tuple[int, int], list[K]]:
    """``BadgeView.apply`` of one ``"in"`` op to many views at once: their keys grouped by the
    (unread, mailbox total) each has after it, one frame per group.

    The same rule as ``apply`` in one loop without a call per agent: a new mail in a mailbox of a
    thousand agents is a thousand applies, and the calls were most of the notifier's CPU.
    """
    assert op.op == "in"
    groups: dict[tuple[int, int], list[K]] = {}
    xid, conv, mailbox = op.xid, op.id_conversa, op.mailbox
    in_seq, cleared = op.counters.in_seq, op.counters.cleared
    for item, view in views:
        snap = view.snapshot
        if snap is None or xid < snap.xmin or (xid < snap.xmax and xid not in snap.xip):
            continue
        totals = view.totals
        total = totals.get(mailbox, 0) + 1
        totals[mailbox] = total
        r = view.reads.get(conv, 0) if view.reads else 0
        n = in_seq - (cleared if cleared > r else r)
        key = (n if n > 0 else 0, total)
        group = groups.get(key)
        if group is None:
            groups[key] = [item]
        else:
            group.append(item)
    return groups
