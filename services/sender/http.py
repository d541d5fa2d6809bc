"""The sender's part of the public API: agents upload the files their mail will attach.

``POST /api/attachments`` (multipart, one ``file`` part, optional ``mailbox`` field) stores the
bytes content-addressed by sha256 and answers ``{"id", "filename", "content_type", "size"}``;
the id goes into a reply's or a new conversation's ``attachments``. An upload is recorded for
the uploader's mailboxes (or the one named): only a send from one of them may attach it and only
their agents may download it (``GET /api/attachments/up_…``); anyone else gets 404.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.types import Message

from libs.common import roster
from libs.common.tokens import Identity
from libs.common.web import ApiError, identity_dependency, read_limited_body
from services.sender import storage
from services.sender.domain import uploads

identity = identity_dependency(lambda request: request.app.state.service.verifier)
router = APIRouter()
# Room for the multipart framing around the file (boundaries, part headers, the mailbox field).
_FRAMING = 64 * 1024


async def agent(request: Request, who: Identity = Depends(identity)) -> Identity:
    """An agent, with the token's mailboxes less those auth has since taken them out of
    (``libs.common.roster``): uploads and their downloads follow a removal at once."""
    if not who.is_agent:
        raise ApiError(403, "this API is for agents")
    return await roster.effective(request.app.state.service.pool, who)


class Uploaded(BaseModel):
    id: str
    filename: str
    content_type: str
    size: int


class ErrorDetail(BaseModel):
    code: str
    message: str


class Error(BaseModel):
    """Every error of the API: ``{"error": {"code", "message"}}``."""

    error: ErrorDetail


_MULTIPART: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "mailbox": {
                            "type": "string",
                            "description": "the one mailbox it is for; default: all of yours",
                        },
                    },
                }
            }
        },
    }
}


@router.post(
    "/api/attachments",
    status_code=201,
    response_model=Uploaded,
    openapi_extra=_MULTIPART,
    responses={
        400: {"model": Error, "description": "Not a multipart body with one file part"},
        403: {"model": Error, "description": "Not an agent token, or an agent without mailboxes"},
        404: {"model": Error, "description": "The mailbox named is not one of the agent's"},
        413: {"model": Error, "description": "Larger than the upload limit"},
        415: {"model": Error, "description": "Not multipart/form-data"},
        422: {"model": Error, "description": "An empty file"},
    },
)
async def upload(request: Request, who: Identity = Depends(agent)) -> Uploaded:
    """Upload one file for a later reply or new conversation (multipart field ``file``)."""
    svc = request.app.state.service
    limit: int = svc.settings.upload_max_bytes
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise ApiError(415, "expected multipart/form-data")
    body = await read_limited_body(request, limit + _FRAMING, f"upload larger than {limit} bytes")

    async def replay() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=1)
    except MultiPartException as exc:
        raise ApiError(400, f"bad multipart body: {exc.message}") from exc
    try:
        part = form.get("file")
        if not isinstance(part, UploadFile):
            raise ApiError(400, "missing file part 'file'")
        data = await part.read()
        if len(data) > limit:
            raise ApiError(413, f"upload larger than {limit} bytes")
        if not data:
            # An empty file is always a mistake of the picker or the network, and it would
            # reach the customer as an attachment with nothing in it.
            raise ApiError(422, "the file is empty")
        asked = form.get("mailbox")
        if asked is not None:
            if not isinstance(asked, str) or asked not in who.mailboxes:
                raise ApiError(404, "mailbox not found")
            boxes = [asked]
        else:
            boxes = sorted(who.mailboxes)
        if not boxes:
            raise ApiError(403, "this agent has no mailbox to send from")
        filename = uploads.safe_filename(part.filename)
        content_type = uploads.safe_content_type(part.content_type, filename)
    finally:
        await form.close()
    upload_id = uploads.new_id()
    async with svc.pool.acquire() as conn, conn.transaction():
        await storage.put_upload(
            conn,
            upload_id=upload_id,
            mailboxes=boxes,
            user_id=who.sub,
            filename=filename,
            content_type=content_type,
            data=data,
        )
    return Uploaded(id=upload_id, filename=filename, content_type=content_type, size=len(data))


def _disposition(name: str) -> str:
    """``attachment`` with an ASCII fallback and the RFC 6266 / 5987 UTF-8 name."""
    ascii_ = "".join(
        ch if ch.isascii() and ch.isprintable() and ch not in '"\\' else "_" for ch in name
    )
    value = f'attachment; filename="{ascii_}"'
    if not name.isascii():
        value += f"; filename*=UTF-8''{quote(name, safe='')}"
    return value


@router.get("/api/attachments/{att_id}", include_in_schema=False)
async def download(att_id: str, request: Request, who: Identity = Depends(agent)) -> Response:
    """An upload, for agents of a mailbox it was recorded for (404 for anyone else).

    Documented with ingest's download: the gateway sends ``up_`` ids here, the others there.
    """
    if not uploads.is_upload_id(att_id):
        raise ApiError(404, "attachment not found")
    row = await storage.upload(request.app.state.service.pool, att_id)
    if row is None or not (set(row["mailboxes"]) | {row["mailbox_id"]}) & who.mailboxes:
        raise ApiError(404, "attachment not found")
    return Response(
        bytes(row["data"]),
        media_type="application/octet-stream",  # never rendered by the browser as what it says
        headers={
            "content-disposition": _disposition(row["filename"]),
            "x-content-type-options": "nosniff",
            "x-original-content-type": row["content_type"],
            "cache-control": "private, no-store",
        },
    )
