"""Which upstream serves a public path, and whether it needs a token first.

The table is small and explicit on purpose: only listed prefixes leave the gateway, so a new
upstream route is a deliberate change here rather than an accident of a catch-all.
"""

from __future__ import annotations

from dataclasses import dataclass

AUTH, INGEST, THREADER, SENDER = "auth", "ingest", "threader", "sender"
NOTIFIER = "notifier"  # its HTTP API: Web Push subscriptions
# Agents' uploads live in the sender (their mail attaches them) under ids with this prefix;
# every other attachment id is an inbound one, kept by ingest.
UPLOAD_PREFIX = "up_"


@dataclass(frozen=True, slots=True)
class Target:
    upstream: str | None  # None: an /api path nobody serves (404 after the token check)
    needs_token: bool


_API: tuple[tuple[str, str], ...] = (
    ("/api/me", AUTH),
    ("/api/mailboxes", AUTH),
    # More specific prefixes first: the quarantine is ingest's, the rest of /api/admin is auth's.
    ("/api/admin/quarantine", INGEST),
    ("/api/admin", AUTH),
    ("/api/messages", INGEST),
    ("/api/conversations", THREADER),
    ("/api/attachments", INGEST),
    ("/api/push", NOTIFIER),
)
_OPEN: tuple[tuple[str, str], ...] = (("/oauth", AUTH), ("/.well-known", AUTH))
_UNKNOWN_API = Target(None, True)


def under(path: str, prefix: str) -> bool:
    """``prefix`` itself or anything below it, but not ``/api/meta`` for ``/api/me``."""
    return path == prefix or path.startswith(prefix + "/")


def _attachments(path: str, method: str) -> str:
    """``POST /api/attachments`` (an upload) and ``/api/attachments/up_…`` go to the sender."""
    if path == "/api/attachments":
        return SENDER if method == "POST" else INGEST
    first = path[len("/api/attachments/") :].split("/", 1)[0]
    return SENDER if first.startswith(UPLOAD_PREFIX) else INGEST


def resolve(path: str, method: str = "GET") -> Target | None:
    """The target of ``method path``; None when the gateway does not proxy it at all."""
    if under(path, "/api"):
        if under(path, "/api/attachments"):
            return Target(_attachments(path, method.upper()), True)
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
