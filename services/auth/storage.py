"""Auth's SQL (schema ``auth`` via search_path): directory, OAuth2 state, signing keys.

Single-use credentials are spent with one conditional UPDATE, so two concurrent requests with
the same code or refresh token cannot both succeed.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg

from services.auth.domain.oauth import Client

# asyncpg's Connection, a pool's connection proxy, or the Pool itself (single statements).
Db = Any


# ---- users ---------------------------------------------------------------------------------

USER_COLS = "id, email, name, password_hash, roles, active"
PUBLIC_USER_COLS = "id, email, name, roles, active"


async def user_by_email(db: Db, email: str) -> asyncpg.Record | None:
    return await db.fetchrow(f"SELECT {USER_COLS} FROM users WHERE email = $1", email)


async def user_by_id(db: Db, user_id: uuid.UUID | str) -> asyncpg.Record | None:
    return await db.fetchrow(f"SELECT {USER_COLS} FROM users WHERE id = $1", _uuid(user_id))


async def insert_user(
    db: Db, email: str, name: str, password_hash: str, roles: list[str]
) -> asyncpg.Record:
    return await db.fetchrow(
        f"""INSERT INTO users (email, name, password_hash, roles) VALUES ($1, $2, $3, $4)
            RETURNING {USER_COLS}""",
        email,
        name,
        password_hash,
        roles,
    )


async def update_user(
    db: Db, user_id: uuid.UUID, name: str, roles: list[str], active: bool
) -> asyncpg.Record:
    return await db.fetchrow(
        f"""UPDATE users SET name = $2, roles = $3, active = $4, updated_at = now()
            WHERE id = $1 RETURNING {USER_COLS}""",
        user_id,
        name,
        roles,
        active,
    )


async def users(db: Db) -> list[asyncpg.Record]:
    return list(await db.fetch(f"SELECT {PUBLIC_USER_COLS} FROM users ORDER BY email"))


async def user_for_update(db: Db, user_id: uuid.UUID) -> asyncpg.Record | None:
    """The user row, locked until the transaction ends (read-modify-write without races)."""
    return await db.fetchrow(f"SELECT {USER_COLS} FROM users WHERE id = $1 FOR UPDATE", user_id)


async def other_active_admins(db: Db, user_id: uuid.UUID) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM users WHERE active AND 'admin' = ANY(roles) AND id <> $1",
            user_id,
        )
    )


async def set_password(db: Db, user_id: uuid.UUID, password_hash: str) -> None:
    await db.execute(
        "UPDATE users SET password_hash = $2, updated_at = now() WHERE id = $1",
        user_id,
        password_hash,
    )


async def upsert_bench_users(
    db: Db, emails: list[str], password_hash: str, roles: list[str]
) -> list[asyncpg.Record]:
    """Create (or reset) many users in one statement; returns id and email of each."""
    return await db.fetch(
        """INSERT INTO users (email, name, password_hash, roles)
           SELECT e, e, $2, $3 FROM unnest($1::text[]) AS e
           ON CONFLICT (email) DO UPDATE
              SET password_hash = $2, roles = $3, active = true, updated_at = now()
           RETURNING id, email, name, roles, active""",
        emails,
        password_hash,
        roles,
    )


# ---- mailboxes and memberships -------------------------------------------------------------

MAILBOX_COLS = "id, address, name, active"


async def mailbox_by_address(db: Db, address: str) -> asyncpg.Record | None:
    return await db.fetchrow(f"SELECT {MAILBOX_COLS} FROM mailboxes WHERE address = $1", address)


async def insert_mailbox(db: Db, address: str, name: str) -> asyncpg.Record:
    return await db.fetchrow(
        f"INSERT INTO mailboxes (address, name) VALUES ($1, $2) RETURNING {MAILBOX_COLS}",
        address,
        name,
    )


async def mailboxes(db: Db) -> list[asyncpg.Record]:
    return list(await db.fetch(f"SELECT {MAILBOX_COLS} FROM mailboxes ORDER BY address"))


async def mailbox_for_update(db: Db, mailbox_id: uuid.UUID) -> asyncpg.Record | None:
    return await db.fetchrow(
        f"SELECT {MAILBOX_COLS} FROM mailboxes WHERE id = $1 FOR UPDATE", mailbox_id
    )


async def update_mailbox(
    db: Db, mailbox_id: uuid.UUID, name: str, active: bool, address: str | None = None
) -> asyncpg.Record:
    return await db.fetchrow(
        f"""UPDATE mailboxes SET name = $2, active = $3, address = COALESCE($4, address),
                   updated_at = now()
            WHERE id = $1 RETURNING {MAILBOX_COLS}""",
        mailbox_id,
        name,
        active,
        address,
    )


async def add_memberships(
    db: Db, user_ids: list[uuid.UUID], mailbox_id: uuid.UUID
) -> list[uuid.UUID]:
    """Add users to a mailbox; returns the ids that were not members before."""
    rows = await db.fetch(
        """INSERT INTO memberships (user_id, mailbox_id)
           SELECT u, $2 FROM unnest($1::uuid[]) AS u
           ON CONFLICT DO NOTHING RETURNING user_id""",
        user_ids,
        mailbox_id,
    )
    return [r["user_id"] for r in rows]


async def remove_membership(db: Db, user_id: uuid.UUID, mailbox_id: uuid.UUID) -> bool:
    """True if the user was a member."""
    res = await db.execute(
        "DELETE FROM memberships WHERE user_id = $1 AND mailbox_id = $2", user_id, mailbox_id
    )
    return bool(int(res.split()[-1]))


async def memberships(
    db: Db, *, user_ids: list[uuid.UUID] | None = None, mailbox_ids: list[uuid.UUID] | None = None
) -> list[asyncpg.Record]:
    """(user_id, mailbox_id) pairs, whatever the mailbox's state, for the given users or boxes."""
    return list(
        await db.fetch(
            """SELECT user_id, mailbox_id FROM memberships
               WHERE ($1::uuid[] IS NULL OR user_id = ANY($1::uuid[]))
                 AND ($2::uuid[] IS NULL OR mailbox_id = ANY($2::uuid[]))
               ORDER BY created_at, user_id""",
            user_ids,
            mailbox_ids,
        )
    )


async def user_mailboxes(db: Db, user_id: uuid.UUID | str) -> list[asyncpg.Record]:
    """The active mailboxes the user is a member of (what the ``mailboxes`` claim lists)."""
    return await db.fetch(
        """SELECT m.id, m.address, m.name FROM memberships ms
           JOIN mailboxes m ON m.id = ms.mailbox_id
           WHERE ms.user_id = $1 AND m.active ORDER BY m.address""",
        _uuid(user_id),
    )


async def mailbox_ids_by_user(db: Db, user_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[str]]:
    rows = await db.fetch(
        """SELECT ms.user_id, m.id FROM memberships ms JOIN mailboxes m ON m.id = ms.mailbox_id
           WHERE ms.user_id = ANY($1::uuid[]) AND m.active""",
        user_ids,
    )
    out: dict[uuid.UUID, list[str]] = {u: [] for u in user_ids}
    for r in rows:
        out[r["user_id"]].append(str(r["id"]))
    return out


# ---- clients -------------------------------------------------------------------------------


async def client(db: Db, client_id: str) -> Client | None:
    """An enabled client; a disabled one is as unknown as one that never existed."""
    if not client_id or len(client_id) > 200 or "\x00" in client_id:  # PG text has no NUL
        return None
    r = await db.fetchrow(
        """SELECT client_id, public, secret_hash, redirect_uris, grant_types, scopes
           FROM oauth_clients WHERE client_id = $1 AND active""",
        client_id,
    )
    if r is None:
        return None
    return Client(
        r["client_id"],
        r["public"],
        r["secret_hash"],
        tuple(r["redirect_uris"]),
        tuple(r["grant_types"]),
        r["scopes"],
    )


async def upsert_client(db: Db, c: Client) -> None:
    await db.execute(
        """INSERT INTO oauth_clients (client_id, public, secret_hash, redirect_uris, grant_types,
                                      scopes)
           VALUES ($1, $2, $3, $4, $5, $6)
           ON CONFLICT (client_id) DO UPDATE SET public = $2, secret_hash = $3,
               redirect_uris = $4, grant_types = $5, scopes = $6""",
        c.client_id,
        c.public,
        c.secret_hash,
        list(c.redirect_uris),
        list(c.grant_types),
        c.scopes,
    )


CLIENT_COLS = "client_id, public, redirect_uris, grant_types, scopes, active, created_at"


async def insert_client(db: Db, c: Client) -> asyncpg.Record | None:
    """Register a new client; None if the client id is taken."""
    return await db.fetchrow(
        f"""INSERT INTO oauth_clients (client_id, public, secret_hash, redirect_uris,
                                       grant_types, scopes)
            VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (client_id) DO NOTHING
            RETURNING {CLIENT_COLS}""",
        c.client_id,
        c.public,
        c.secret_hash,
        list(c.redirect_uris),
        list(c.grant_types),
        c.scopes,
    )


async def clients(db: Db) -> list[asyncpg.Record]:
    return list(await db.fetch(f"SELECT {CLIENT_COLS} FROM oauth_clients ORDER BY client_id"))


async def client_for_update(db: Db, client_id: str) -> asyncpg.Record | None:
    return await db.fetchrow(
        f"SELECT {CLIENT_COLS} FROM oauth_clients WHERE client_id = $1 FOR UPDATE", client_id
    )


async def update_client(db: Db, client_id: str, scopes: str, active: bool) -> asyncpg.Record:
    return await db.fetchrow(
        f"""UPDATE oauth_clients SET scopes = $2, active = $3 WHERE client_id = $1
            RETURNING {CLIENT_COLS}""",
        client_id,
        scopes,
        active,
    )


# ---- authorization codes -------------------------------------------------------------------


async def insert_code(
    db: Db,
    code_hash: str,
    client_id: str,
    user_id: uuid.UUID,
    redirect_uri: str,
    code_challenge: str,
    scope: str,
    ttl_s: int,
) -> None:
    await db.execute(
        """INSERT INTO auth_codes (code, client_id, user_id, redirect_uri, code_challenge, scope,
                                   expires_at)
           VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7))""",
        code_hash,
        client_id,
        user_id,
        redirect_uri,
        code_challenge,
        scope,
        float(ttl_s),
    )


async def spend_code(db: Db, code_hash: str) -> tuple[asyncpg.Record | None, bool]:
    """Mark the code used. Returns (row, first_use); row is None for an unknown code."""
    row = await db.fetchrow(
        """UPDATE auth_codes SET used_at = now() WHERE code = $1 AND used_at IS NULL
           RETURNING *, expires_at > now() AS fresh""",
        code_hash,
    )
    if row is not None:
        return row, True
    row = await db.fetchrow("SELECT *, false AS fresh FROM auth_codes WHERE code = $1", code_hash)
    return row, False


async def set_code_family(db: Db, code_hash: str, family_id: uuid.UUID) -> None:
    await db.execute("UPDATE auth_codes SET family_id = $2 WHERE code = $1", code_hash, family_id)


# ---- refresh tokens ------------------------------------------------------------------------


async def insert_refresh(
    db: Db,
    token_hash: str,
    family_id: uuid.UUID,
    user_id: uuid.UUID,
    client_id: str,
    scope: str,
    ttl_s: int,
    family_expires_at: datetime,
) -> None:
    await db.execute(
        """INSERT INTO refresh_tokens (hash, family_id, user_id, client_id, scope, expires_at,
                                       family_expires_at)
           VALUES ($1, $2, $3, $4, $5, LEAST(now() + make_interval(secs => $6), $7), $7)""",
        token_hash,
        family_id,
        user_id,
        client_id,
        scope,
        float(ttl_s),
        family_expires_at,
    )


async def spend_refresh(db: Db, token_hash: str) -> tuple[asyncpg.Record | None, bool]:
    """Mark a live refresh token used. Returns (row, first_use); row None if unknown."""
    row = await db.fetchrow(
        """UPDATE refresh_tokens SET used_at = now()
           WHERE hash = $1 AND used_at IS NULL AND revoked_at IS NULL
           RETURNING *, expires_at > now() AS fresh""",
        token_hash,
    )
    if row is not None:
        return row, True
    row = await db.fetchrow(
        "SELECT *, false AS fresh FROM refresh_tokens WHERE hash = $1", token_hash
    )
    return row, False


async def refresh_by_hash(db: Db, token_hash: str) -> asyncpg.Record | None:
    return await db.fetchrow("SELECT * FROM refresh_tokens WHERE hash = $1", token_hash)


async def revoke_family(db: Db, family_id: uuid.UUID) -> int:
    res = await db.execute(
        "UPDATE refresh_tokens SET revoked_at = now() WHERE family_id = $1 AND revoked_at IS NULL",
        family_id,
    )
    return int(res.split()[-1])


async def revoke_user_families(db: Db, user_id: uuid.UUID) -> int:
    """End every login of a user (all their refresh-token families)."""
    res = await db.execute(
        "UPDATE refresh_tokens SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
        user_id,
    )
    return int(res.split()[-1])


async def revoke_client_families(db: Db, client_id: str) -> int:
    res = await db.execute(
        "UPDATE refresh_tokens SET revoked_at = now() WHERE client_id = $1 AND revoked_at IS NULL",
        client_id,
    )
    return int(res.split()[-1])


# ---- signing keys --------------------------------------------------------------------------
# A key is "live" until retired_at, which may lie in the future (when the next key takes over).

_LIVE = "(retired_at IS NULL OR retired_at > clock_timestamp())"


async def signing_key_now(db: Db) -> asyncpg.Record | None:
    """The key that signs right now: the newest live one whose ``signs_from`` has passed."""
    return await db.fetchrow(
        f"""SELECT kid, private_jwk FROM signing_keys
            WHERE {_LIVE} AND signs_from <= clock_timestamp()
            ORDER BY signs_from DESC, created_at DESC LIMIT 1"""
    )


async def key_schedule(db: Db) -> list[asyncpg.Record]:
    """Every live key with its times as epoch seconds, and the database's clock (``db_now``)."""
    return list(
        await db.fetch(
            f"""SELECT kid, private_jwk,
                       extract(epoch FROM signs_from)::float8 AS signs_from,
                       extract(epoch FROM retired_at)::float8 AS retired_at,
                       extract(epoch FROM clock_timestamp())::float8 AS db_now
                FROM signing_keys WHERE {_LIVE} ORDER BY signs_from, created_at"""
        )
    )


async def published_keys(db: Db, grace_s: int) -> list[dict[str, Any]]:
    """Public JWKs of live keys (signing or about to) and of keys retired within ``grace_s``."""
    rows = await db.fetch(
        """SELECT public_jwk FROM signing_keys
           WHERE retired_at IS NULL OR retired_at > now() - make_interval(secs => $1)
           ORDER BY signs_from DESC, created_at DESC""",
        float(grace_s),
    )
    return [dict(r["public_jwk"]) for r in rows]


async def insert_key(
    db: Db, kid: str, private_jwk: dict[str, Any], public_jwk: dict[str, Any], lead_s: float
) -> datetime:
    """Store a key that signs ``lead_s`` seconds from now; returns that moment."""
    signs_from: datetime = await db.fetchval(
        """INSERT INTO signing_keys (kid, private_jwk, public_jwk, signs_from)
           VALUES ($1, $2, $3, clock_timestamp() + make_interval(secs => $4))
           RETURNING signs_from""",
        kid,
        private_jwk,
        public_jwk,
        float(lead_s),
    )
    return signs_from


async def retire_keys_at(db: Db, kid: str, at: datetime) -> int:
    """Retire every other key at ``at`` (never later than a retirement already set)."""
    res = await db.execute(
        """UPDATE signing_keys SET retired_at = $2
           WHERE kid <> $1 AND (retired_at IS NULL OR retired_at > $2)""",
        kid,
        at,
    )
    return int(res.split()[-1])


# ---- housekeeping --------------------------------------------------------------------------


async def sweep(db: Db, keep_s: int) -> int:
    """Delete codes and refresh families that expired more than ``keep_s`` ago."""
    a = await db.execute(
        "DELETE FROM auth_codes WHERE expires_at < now() - make_interval(secs => $1)", float(keep_s)
    )
    b = await db.execute(
        "DELETE FROM refresh_tokens WHERE family_expires_at < now() - make_interval(secs => $1)",
        float(keep_s),
    )
    return int(a.split()[-1]) + int(b.split()[-1])


def _uuid(value: uuid.UUID | str) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(value)
