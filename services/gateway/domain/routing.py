"""Which upstream serves a public path, and whether it needs a token first.

The table is small and explicit on purpose: only listed prefixes leave the gateway, so a new
upstream route is a deliberate change here rather than an accident of a catch-all.
"""

from __future__ import annotations

from dataclasses import dataclass

AUTH, INGEST, THREADER = "auth", "ingest", "threader"


@dataclass(frozen=True, slots=True)
class Target:
    upstream: str | None  # None: an /api path nobody serves (404 after the token check)
    needs_token: bool


_API: tuple[tuple[str, str], ...] = (
    ("/api/me", AUTH),
    ("/api/mailboxes", AUTH),
    ("/api/admin", AUTH),
    ("/api/conversations", THREADER),
    ("/api/attachments", INGEST),
)
_OPEN: tuple[tuple[str, str], ...] = (("/oauth", AUTH), ("/.well-known", AUTH))
_UNKNOWN_API = Target(None, True)


def under(path: str, prefix: str) -> bool:
    """``prefix`` itself or anything below it, but not ``/api/meta`` for ``/api/me``."""
    return path == prefix or path.startswith(prefix + "/")


def resolve(path: str) -> Target | None:
    """The target of ``path``; None when the gateway does not proxy it at all."""
    if under(path, "/api"):
        for prefix, upstream in _API:
            if under(path, prefix):
                return Target(upstream, True)
        return _UNKNOWN_API
    for prefix, upstream in _OPEN:
        if under(path, prefix):
            return Target(upstream, False)
    return None


def has_dot_segments(path: str) -> bool:
    """``.``/``..`` segments (also percent-encoded ones, the path is decoded) could make an
    upstream see a different route than the one the gateway checked; they are refused."""
    return any(seg in (".", "..") for seg in path.split("/"))
