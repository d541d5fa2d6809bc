"""libs.common.ids: version 4 UUIDs from pooled random bytes, distinct in a forked child."""

from __future__ import annotations

import os
import uuid

from libs.common import ids


def test_ids_are_random_version_4_and_distinct() -> None:
    got = [ids.uuid4() for _ in range(2000)]
    assert all(u.version == 4 and u.variant == uuid.RFC_4122 for u in got)
    assert len(set(got)) == len(got)


def test_a_forked_child_does_not_hand_out_the_parents_next_ids() -> None:
    ids.uuid4()  # the pool holds ids now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, then out
        os.write(write, ids.uuid4().bytes)
        os._exit(0)
    os.waitpid(pid, 0)
    child = uuid.UUID(bytes=os.read(read, 16))
    os.close(read)
    os.close(write)
    assert child != ids.uuid4()
