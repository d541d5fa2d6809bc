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


async def update_mailbox(db: Db, mailbox_id: uuid.UUID, name: str, active: bool) -> asyncpg.Record:
    return await db.fetchrow(
        f"""UPDATE mailboxes SET name = $2, active = $3, updated_at = now()
            WHERE id = $1 RETURNING {MAILBOX_COLS}""",
        mailbox_id,
        name,
        active,
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
    if not client_id or len(client_id) > 200:
        return None
    r = await db.fetchrow(
        """SELECT client_id, public, secret_hash, redirect_uris, grant_types, scopes
           FROM oauth_clients WHERE client_id = $1""",
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


# ---- signing keys --------------------------------------------------------------------------


async def active_key(db: Db) -> asyncpg.Record | None:
    return await db.fetchrow(
        """SELECT kid, private_jwk FROM signing_keys WHERE retired_at IS NULL
           ORDER BY created_at DESC LIMIT 1"""
    )


async def published_keys(db: Db, grace_s: int) -> list[dict[str, Any]]:
    """Public JWKs of active keys and of keys retired within ``grace_s`` (tokens still live)."""
    rows = await db.fetch(
        """SELECT public_jwk FROM signing_keys
           WHERE retired_at IS NULL OR retired_at > now() - make_interval(secs => $1)
           ORDER BY created_at DESC""",
        float(grace_s),
    )
    return [dict(r["public_jwk"]) for r in rows]


async def insert_key(
    db: Db, kid: str, private_jwk: dict[str, Any], public_jwk: dict[str, Any]
) -> None:
    await db.execute(
        "INSERT INTO signing_keys (kid, private_jwk, public_jwk) VALUES ($1, $2, $3)",
        kid,
        private_jwk,
        public_jwk,
    )


async def retire_keys_except(db: Db, kid: str) -> int:
    res = await db.execute(
        "UPDATE signing_keys SET retired_at = now() WHERE retired_at IS NULL AND kid <> $1", kid
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
