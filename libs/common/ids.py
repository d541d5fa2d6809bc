"""Random (version 4) UUIDs, their bytes read from the kernel a block at a time.

``uuid.uuid4`` asks ``os.urandom`` for 16 bytes per id: a system call each, which on a busy
two-core VM cost ~7 us of the threader's CPU per id (four ids per mail: its row, the event's
id and correlation id...). The bytes are the same CSPRNG's; a forked child starts a pool of
its own, so two processes never hand out the same ids.
"""

from __future__ import annotations

import os
import uuid

_PER_READ = 256  # ids per os.urandom call
_pool: list[bytes] = []


def uuid4() -> uuid.UUID:
    if not _pool:
        raw = os.urandom(16 * _PER_READ)
        _pool.extend(raw[i : i + 16] for i in range(0, len(raw), 16))
    return uuid.UUID(bytes=_pool.pop(), version=4)


os.register_at_fork(after_in_child=_pool.clear)
