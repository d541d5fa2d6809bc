"""Unread badges against a reference model, under random sequences of events (hypothesis).

The reference counts the obvious way: one number per (agent, conversation). The implementation
keeps counters and read markers (``domain.badges``) the way ``badge_store`` does in SQL, and
every agent's ``BadgeView`` is loaded from a snapshot taken at a random point and then fed every
change frame in order, skipping what its snapshot saw. Both must agree after every event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from services.notifier.domain.badges import (
    BadgeOp,
    BadgeView,
    Counters,
    Snapshot,
    close,
    inbound,
    inbound_groups,
    merge,
    merged_read,
    relevant,
    unread,
)

USERS = ("ana", "bia", "caio")
CONVS = ("c1", "c2", "c3", "c4")
MAILBOX = "mb"


@dataclass
class Reference:
    unread: dict[tuple[str, str], int] = field(default_factory=dict)

    def inbound(self, c: str) -> None:
        for u in USERS:
            self.unread[u, c] = self.unread.get((u, c), 0) + 1

    def close(self, c: str) -> None:
        for u in USERS:
            self.unread[u, c] = 0

    def read(self, u: str, c: str) -> None:
        self.unread[u, c] = 0

    def merge(self, into: str, gone: str) -> None:
        for u in USERS:
            self.unread[u, into] = self.unread.get((u, into), 0) + self.unread.pop((u, gone), 0)

    def total(self, u: str) -> int:
        return sum(n for (user, _), n in self.unread.items() if user == u)


@dataclass
class Ledger:
    """The SQL of ``badge_store`` in memory: counters, markers, one op per change."""

    counters: dict[str, Counters] = field(default_factory=dict)
    reads: dict[tuple[str, str], int] = field(default_factory=dict)
    ops: list[tuple[BadgeOp, str | None]] = field(default_factory=list)

    def _op(self, op: str, c: str, before: Counters, after: Counters, **kw: Any) -> None:
        fields = {
            "op": op,
            "id_conversa": c,
            "mailbox": MAILBOX,
            "xid": len(self.ops) + 1,
            "in_seq_before": before.in_seq,
            "cleared_before": before.cleared,
            "in_seq": after.in_seq,
            "cleared": after.cleared,
            **kw,
        }
        self.ops.append((BadgeOp.of(fields), kw.pop("to_user", None)))

    def inbound(self, c: str) -> None:
        before = self.counters.get(c, Counters())
        self.counters[c] = after = inbound(before)
        self._op("in", c, before, after)

    def close(self, c: str) -> None:
        before = self.counters.get(c)
        if before is None or before.cleared == before.in_seq:
            return
        self.counters[c] = after = close(before)
        for key in [k for k in self.reads if k[1] == c]:
            del self.reads[key]
        self._op("close", c, before, after)

    def read(self, u: str, c: str) -> None:
        cur = self.counters.get(c)
        prev = self.reads.get((u, c), 0)
        if cur is None or unread(cur, prev) == 0:
            return
        self.reads[u, c] = cur.in_seq
        self._op("read", c, cur, cur, read=cur.in_seq, read_before=prev, to_user=u)

    def merge(self, into: str, gone: str) -> None:
        mc = self.counters.pop(gone, None)
        if mc is None:
            return
        before = self.counters.get(into, Counters())
        for u in USERS:
            rs, rm = self.reads.pop((u, into), None), self.reads.pop((u, gone), None)
            if rs is not None or rm is not None:
                self.reads[u, into] = merged_read(before, rs or 0, mc, rm or 0)
        self.counters[into] = after = merge(before, mc)
        for u in USERS:
            if self.reads.get((u, into), 0) <= after.cleared:
                self.reads.pop((u, into), None)
        merged = [{"id_conversa": gone, "in_seq": mc.in_seq, "cleared": mc.cleared}]
        self._op("merge", into, before, after, merged=merged)

    def unread(self, u: str, c: str) -> int:
        cur = self.counters.get(c)
        return 0 if cur is None else unread(cur, self.reads.get((u, c), 0))

    def load(self, u: str) -> tuple[int, dict[str, int]]:
        """What ``badge_store.load`` reads for one agent: the total and the relevant markers."""
        total = sum(self.unread(u, c) for c in self.counters)
        marks = {
            c: r
            for (user, c), r in self.reads.items()
            if user == u and relevant(self.counters[c], r)
        }
        return total, marks


event = st.one_of(
    st.tuples(st.just("in"), st.sampled_from(CONVS)),
    st.tuples(st.just("out"), st.sampled_from(CONVS)),
    st.tuples(st.just("close"), st.sampled_from(CONVS)),
    st.tuples(st.just("reopen"), st.sampled_from(CONVS)),
    st.tuples(st.just("read"), st.sampled_from(CONVS), st.sampled_from(USERS)),
    st.tuples(st.just("merge"), st.sampled_from(CONVS), st.sampled_from(CONVS)),
)


@settings(max_examples=400, deadline=None)
@given(events=st.lists(event, max_size=60), snap_at=st.lists(st.integers(0, 60), min_size=3))
def test_counters_and_views_match_the_reference(
    events: list[tuple[str, ...]], snap_at: list[int]
) -> None:
    ref, led = Reference(), Ledger()
    alias: dict[str, str] = {}  # merged ids answer with their survivor, as the threader does
    views: dict[str, BadgeView] = {}
    bulk: dict[str, BadgeView] = {}  # the same agents, fed "in" ops by inbound_groups
    loads = {u: snap_at[i] % (len(events) + 1) for i, u in enumerate(USERS)}

    def live(c: str) -> str:
        while c in alias:
            c = alias[c]
        return c

    for step, ev in enumerate([*events, ("end", "")]):
        for u in USERS:
            if loads[u] == step:  # this agent connects now: one snapshot of everything so far
                total, marks = led.load(u)
                for vs in (views, bulk):
                    vs[u] = BadgeView(u)
                    vs[u].load(
                        Snapshot(len(led.ops) + 1, len(led.ops) + 1), {MAILBOX: total}, marks
                    )
        kind, c = ev[0], live(ev[1]) if ev[1] else ""
        seen = len(led.ops)
        if kind == "in":
            ref.inbound(c)
            led.inbound(c)
        elif kind == "close" and (c in led.counters):
            ref.close(c)
            led.close(c)
        elif kind == "read" and c in led.counters:
            ref.read(ev[2], c)
            led.read(ev[2], c)
        elif kind == "merge":
            gone = live(ev[2])
            if gone != c and gone in led.counters:
                ref.merge(c, gone)
                led.merge(c, gone)
                alias[gone] = c
        # "out" and "reopen" change no badge; a close of a conversation never seen is nothing.
        for op, to_user in led.ops[seen:]:
            for u, view in views.items():
                n = view.apply(op, to_user)
                if n is not None:
                    assert n == ref.unread.get((u, op.id_conversa), 0), (u, op)
            if op.op == "in":
                grouped = inbound_groups(list(bulk.items()), op)
                got = {u: key for key, us in grouped.items() for u in us}
                assert sum(len(us) for us in grouped.values()) == len(got)
                for u, (n, total) in got.items():
                    assert n == ref.unread.get((u, op.id_conversa), 0), (u, op)
                    assert total == bulk[u].totals[MAILBOX]
            else:
                for view in bulk.values():
                    view.apply(op, to_user)
        for u in USERS:
            for conv in {k[1] for k in ref.unread} | set(led.counters):
                assert led.unread(u, conv) == ref.unread.get((u, conv), 0), (u, conv)
            if u in views:
                assert views[u].totals[MAILBOX] == ref.total(u), (u, step)
                assert bulk[u] == views[u], (u, step)


def test_snapshot_visibility() -> None:
    s = Snapshot.parse("100:105:101,103")
    assert s.sees(99) and s.sees(102) and s.sees(104)
    assert not s.sees(101) and not s.sees(103) and not s.sees(105) and not s.sees(200)
    assert Snapshot.parse("7:7:") == Snapshot(7, 7)


def test_a_closed_conversation_with_a_new_message_is_unread_again() -> None:
    c = close(inbound(inbound(Counters())))
    assert unread(c) == 0 and unread(c, read=1) == 0
    assert unread(inbound(c)) == 1
    assert unread(inbound(c), read=2) == 1


def test_merge_adds_each_readers_counts() -> None:
    s, m = Counters(5, 1), Counters(3, 0)  # a reader read s up to 4, m up to 2
    r = merged_read(s, 4, m, 2)
    assert unread(merge(s, m), r) == unread(s, 4) + unread(m, 2) == 2
    assert unread(merge(s, m), merged_read(s, 0, m, 0)) == unread(s) + unread(m) == 7
