"""The admin API (``/api/admin/*``): users, mailboxes, memberships and machine clients.

Every change goes through ``directory`` so its ``*.changed`` event commits with it in the
outbox; the relay is woken after the commit. Only an active admin gets in: the token must
claim the role and the directory must still agree (a token outlives a demotion by minutes).
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Depends, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from libs.common.tokens import Identity
from libs.common.web import ApiError
from services.auth import directory, storage
from services.auth.directory import LastAdmin
from services.auth.domain import oauth
from services.auth.domain.directory import normalize_email
from services.auth.domain.oauth import Client
from services.auth.http import NO_STORE, current_user, identity

if TYPE_CHECKING:
    from services.auth.service import AuthService

Role = Literal["agent", "admin"]
MIN_PASSWORD = 12
MAX_PASSWORD = 1024
MAX_NAME = 200
CLIENT_ID = r"^[A-Za-z0-9._-]{1,100}$"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# ---- request bodies --------------------------------------------------------------------------


def _scopes(value: list[str]) -> list[str]:
    out: list[str] = []
    for s in value:
        try:
            ok = oauth.parse_scope(s) == [s]
        except oauth.OAuth2Error:
            ok = False
        if not ok:
            raise ValueError(f"not a scope token: {s!r}")
        if s not in out:
            out.append(s)
    return out


def _name(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("control characters are not allowed")
    return value.strip()


# Normalized as the CLI does it, so the API and the CLI can never disagree on an address.
Email = Annotated[str, Field(max_length=254), AfterValidator(normalize_email)]
Name = Annotated[str, Field(max_length=MAX_NAME), AfterValidator(_name)]
Scopes = Annotated[list[str], Field(max_length=50), AfterValidator(_scopes)]


class Body(BaseModel):
    """Unknown fields and loose types (``"true"`` for a bool) are errors, not guesses."""

    model_config = ConfigDict(extra="forbid", strict=True)


class NewUser(Body):
    email: Email
    name: Name = ""
    role: Role = "agent"
    # Taken exactly as sent (no trimming); the length bound keeps argon2's input sane.
    password: str = Field(min_length=MIN_PASSWORD, max_length=MAX_PASSWORD)


class UserPatch(Body):
    """Only the fields sent change; ``null`` is not a value any of them can take."""

    name: Name = ""
    role: Role = "agent"
    active: bool = True


class NewMailbox(Body):
    address: Email
    name: Name = ""


class MailboxPatch(Body):
    address: Email = ""
    name: Name = ""
    active: bool = True


class NewClient(Body):
    """A machine client: confidential, client_credentials only; the secret is generated."""

    client_id: str = Field(pattern=CLIENT_ID)
    scopes: Scopes = []


class ClientPatch(Body):
    scopes: Scopes = []
    active: bool = True


# ---- responses -------------------------------------------------------------------------------


def user_out(row: Any, mailbox_ids: list[str]) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "email": row["email"],
        "name": row["name"],
        "roles": list(row["roles"]),
        "active": row["active"],
        "mailboxes": mailbox_ids,
    }


def mailbox_out(row: Any, member_ids: list[str]) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "address": row["address"],
        "name": row["name"],
        "active": row["active"],
        "members": member_ids,
    }


def client_out(row: Any) -> dict[str, Any]:
    return {
        "client_id": row["client_id"],
        "public": row["public"],
        "grant_types": list(row["grant_types"]),
        "scopes": oauth.parse_scope(row["scopes"]),
        "redirect_uris": list(row["redirect_uris"]),
        "active": row["active"],
    }


# ---- routes ----------------------------------------------------------------------------------


def router(svc: AuthService) -> APIRouter:
    async def require_admin(who: Identity = Depends(identity)) -> Identity:
        if not who.is_admin:
            raise ApiError(403, "admin role required")
        user = await current_user(svc, who)  # 401 once disabled, 403 for a machine client
        if "admin" not in user["roles"]:
            raise ApiError(403, "admin role required")
        return who

    r = APIRouter(prefix="/api/admin", dependencies=[Depends(require_admin)])

    @asynccontextmanager
    async def change() -> AsyncIterator[Any]:
        """A transaction whose outbox rows the relay publishes right after the commit."""
        async with svc.pool.acquire() as conn:
            async with conn.transaction():
                yield conn
            svc.relay.wake()

    async def members_of_users(db: Any, ids: list[uuid.UUID] | None) -> dict[Any, list[str]]:
        out: dict[Any, list[str]] = defaultdict(list)
        for m in await storage.memberships(db, user_ids=ids):
            out[m["user_id"]].append(str(m["mailbox_id"]))
        return out

    async def members_of_boxes(db: Any, ids: list[uuid.UUID] | None) -> dict[Any, list[str]]:
        out: dict[Any, list[str]] = defaultdict(list)
        for m in await storage.memberships(db, mailbox_ids=ids):
            out[m["mailbox_id"]].append(str(m["user_id"]))
        return out

    # ---- users -------------------------------------------------------------------------------

    @r.get("/users")
    async def list_users() -> dict[str, Any]:
        async with svc.pool.acquire() as conn:
            rows = await storage.users(conn)
            boxes = await members_of_users(conn, None)
        return {"users": [user_out(u, boxes[u["id"]]) for u in rows]}

    @r.post("/users", status_code=201)
    async def create_user(body: NewUser) -> dict[str, Any]:
        hashed = await svc.passwords.hash(body.password)  # slow: outside the transaction
        try:
            async with change() as conn:
                row = await directory.create_user(conn, body.email, body.name, hashed, [body.role])
        except asyncpg.UniqueViolationError:
            raise ApiError(409, f"a user with email {body.email} exists") from None
        return user_out(row, [])

    @r.patch("/users/{user_id}")
    async def update_user(user_id: str, body: UserPatch) -> dict[str, Any]:
        sent = body.model_fields_set
        uid = _id(user_id, "user")
        try:
            async with change() as conn:
                row = await storage.user_for_update(conn, uid)
                if row is None:
                    raise ApiError(404, "no such user")
                row = await directory.update_user(
                    conn,
                    row,
                    body.name if "name" in sent else row["name"],
                    [body.role] if "role" in sent else list(row["roles"]),
                    body.active if "active" in sent else row["active"],
                )
                boxes = await members_of_users(conn, [uid])
        except LastAdmin:
            raise ApiError(409, "this would leave no active admin") from None
        return user_out(row, boxes[uid])

    # ---- mailboxes and memberships -----------------------------------------------------------

    @r.get("/mailboxes")
    async def list_mailboxes() -> dict[str, Any]:
        async with svc.pool.acquire() as conn:
            rows = await storage.mailboxes(conn)
            members = await members_of_boxes(conn, None)
        return {"mailboxes": [mailbox_out(m, members[m["id"]]) for m in rows]}

    @r.post("/mailboxes", status_code=201)
    async def create_mailbox(body: NewMailbox) -> dict[str, Any]:
        try:
            async with change() as conn:
                row = await directory.create_mailbox(conn, body.address, body.name)
        except asyncpg.UniqueViolationError:
            raise ApiError(409, f"a mailbox with address {body.address} exists") from None
        return mailbox_out(row, [])

    @r.patch("/mailboxes/{mailbox_id}")
    async def update_mailbox(mailbox_id: str, body: MailboxPatch) -> dict[str, Any]:
        sent = body.model_fields_set
        mid = _id(mailbox_id, "mailbox")
        try:
            async with change() as conn:
                row = await storage.mailbox_for_update(conn, mid)
                if row is None:
                    raise ApiError(404, "no such mailbox")
                row = await directory.update_mailbox(
                    conn,
                    row,
                    body.address if "address" in sent else row["address"],
                    body.name if "name" in sent else row["name"],
                    body.active if "active" in sent else row["active"],
                )
                members = await members_of_boxes(conn, [mid])
        except asyncpg.UniqueViolationError:
            raise ApiError(409, f"a mailbox with address {body.address} exists") from None
        return mailbox_out(row, members[mid])

    @r.put("/mailboxes/{mailbox_id}/members/{user_id}")
    async def add_member(mailbox_id: str, user_id: str, response: Response) -> dict[str, Any]:
        mid, uid = _id(mailbox_id, "mailbox"), _id(user_id, "user")
        async with change() as conn:
            await _both_exist(conn, mid, uid)
            added = await directory.add_members(conn, [uid], mid)
        response.status_code = 201 if added else 200
        return {"mailbox_id": str(mid), "user_id": str(uid), "member": True}

    @r.delete("/mailboxes/{mailbox_id}/members/{user_id}", status_code=204)
    async def remove_member(mailbox_id: str, user_id: str) -> Response:
        """Idempotent: 204 whether or not the user was a member (an event only if they were)."""
        mid, uid = _id(mailbox_id, "mailbox"), _id(user_id, "user")
        async with change() as conn:
            await _both_exist(conn, mid, uid)
            await directory.remove_member(conn, uid, mid)
        return Response(status_code=204)

    # ---- machine clients ---------------------------------------------------------------------

    @r.get("/clients")
    async def list_clients() -> dict[str, Any]:
        return {"clients": [client_out(c) for c in await storage.clients(svc.pool)]}

    @r.post("/clients", status_code=201)
    async def create_client(body: NewClient, response: Response) -> dict[str, Any]:
        """The secret is in this response and nowhere else: only its hash is stored."""
        secret = secrets.token_urlsafe(32)
        client = Client(
            body.client_id,
            False,
            await svc.passwords.hash(secret),
            (),
            ("client_credentials",),
            " ".join(body.scopes),
        )
        row = await storage.insert_client(svc.pool, client)
        if row is None:
            raise ApiError(409, f"client {body.client_id} exists")
        response.headers.update(NO_STORE)
        return {**client_out(row), "client_secret": secret}

    @r.patch("/clients/{client_id}")
    async def update_client(client_id: str, body: ClientPatch) -> dict[str, Any]:
        """Disabling a client stops it authenticating at once and ends its refresh families."""
        sent = body.model_fields_set
        if not re.match(CLIENT_ID, client_id):
            raise ApiError(404, "no such client")
        async with svc.pool.acquire() as conn, conn.transaction():
            row = await storage.client_for_update(conn, client_id)
            if row is None:
                raise ApiError(404, "no such client")
            scopes = " ".join(body.scopes) if "scopes" in sent else row["scopes"]
            active = body.active if "active" in sent else row["active"]
            updated = await storage.update_client(conn, client_id, scopes, active)
            if row["active"] and not active:
                await storage.revoke_client_families(conn, client_id)
        return client_out(updated)

    return r


def _id(value: str, what: str) -> uuid.UUID:
    """A path id; one that cannot exist is as unknown as one that does not."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ApiError(404, f"no such {what}") from None


async def _both_exist(conn: Any, mailbox_id: uuid.UUID, user_id: uuid.UUID) -> None:
    if await storage.mailbox_for_update(conn, mailbox_id) is None:
        raise ApiError(404, "no such mailbox")
    if await storage.user_by_id(conn, user_id) is None:
        raise ApiError(404, "no such user")
