"""``/api/push``: an agent's devices subscribe to Web Push (reached through the gateway).

The endpoint is a URL the browser's push service gave it, and the notifier will POST to it: it
must be https (``push_allow_http`` only for tests) and, when ``push_endpoint_hosts`` is set, on
one of those hosts, so the API cannot be used to make the notifier call arbitrary addresses.
Endpoints are capability URLs: never logged, never returned to anyone but their owner.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Request, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from libs.common.tokens import Identity
from libs.common.web import ApiError, identity_dependency
from services.notifier import push, push_store
from services.notifier.settings import NotifierSettings

identity = identity_dependency(lambda request: request.app.state.service.verifier)
router = APIRouter()


_B64URL = re.compile(r"^[A-Za-z0-9_-]+={0,2}$")
_URL_CHARS = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces or controls


def _b64url(raw: str) -> bytes:
    if not _B64URL.match(raw):
        raise ValueError("must be base64url")
    try:
        return base64.urlsafe_b64decode(raw.rstrip("=") + "=" * (-len(raw.rstrip("=")) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("must be base64url") from exc


def _url(value: str) -> str:
    if not _URL_CHARS.match(value):
        raise ValueError("must be a URL of printable ASCII characters")
    try:
        urlsplit(value).port  # noqa: B018 - raises on a malformed host or port
    except ValueError as exc:
        raise ValueError("must be a URL") from exc
    return value


Endpoint = Annotated[str, Field(min_length=8, max_length=2048), AfterValidator(_url)]


def _p256dh(value: str) -> str:
    key = _b64url(value)
    if len(key) != 65 or key[0] != 4:
        raise ValueError("must be an uncompressed P-256 public key")
    return value


def _auth(value: str) -> str:
    if len(_b64url(value)) != 16:
        raise ValueError("must be 16 bytes")
    return value


class PushKeys(BaseModel):
    model_config = ConfigDict(extra="ignore")

    p256dh: Annotated[str, Field(max_length=200), AfterValidator(_p256dh)]
    auth: Annotated[str, Field(max_length=100), AfterValidator(_auth)]


class PushSubscriptionIn(BaseModel):
    """What the browser's ``PushSubscription.toJSON()`` gives (``expirationTime`` is ignored)."""

    model_config = ConfigDict(extra="ignore")

    endpoint: Endpoint
    keys: PushKeys


class PushEndpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    endpoint: Endpoint


class PushSubscriptionOut(BaseModel):
    endpoint: str
    created: bool


class PushVapidKey(BaseModel):
    public_key: str = Field(description="applicationServerKey for pushManager.subscribe")


async def agent(who: Identity = Depends(identity)) -> Identity:
    if not who.is_agent:
        raise ApiError(403, "this API is for agents")
    return who


def _check_endpoint(settings: NotifierSettings, endpoint: str) -> None:
    parts = urlsplit(endpoint)
    schemes = {"https", "http"} if settings.push_allow_http else {"https"}
    host = (parts.hostname or "").lower()
    if parts.scheme not in schemes or not host or parts.username or parts.password:
        raise ApiError(422, "endpoint must be an https URL of a push service", "bad_endpoint")
    allowed = [h.lower() for h in settings.push_endpoint_hosts]
    if allowed and not any(host == h or host.endswith("." + h) for h in allowed):
        raise ApiError(422, "endpoint is not on an accepted push service", "bad_endpoint")


@router.get("/api/push/vapid-key", responses={401: {}, 403: {}, 404: {}})
async def vapid_key(request: Request, who: Identity = Depends(agent)) -> PushVapidKey:
    vapid = request.app.state.service.vapid
    if vapid is None:
        raise ApiError(404, "Web Push is not configured")
    return PushVapidKey(public_key=push.public_key(vapid))


@router.post(
    "/api/push/subscriptions",
    status_code=201,
    responses={200: {"model": PushSubscriptionOut}, 401: {}, 403: {}, 422: {}},
)
async def subscribe(
    body: PushSubscriptionIn, request: Request, response: Response, who: Identity = Depends(agent)
) -> PushSubscriptionOut:
    """Register this device (201), or refresh it and its mailboxes (200)."""
    svc = request.app.state.service
    _check_endpoint(svc.cfg, body.endpoint)
    mailboxes = sorted(svc.access.effective(who.sub, who.mailboxes))
    created = await push_store.subscribe(
        svc.pool, who.sub, body.endpoint, body.keys.p256dh, body.keys.auth, mailboxes
    )
    if not created:
        response.status_code = 200
    return PushSubscriptionOut(endpoint=body.endpoint, created=created)


@router.delete("/api/push/subscriptions", status_code=204, response_model=None, responses={404: {}})
async def unsubscribe(body: PushEndpoint, request: Request, who: Identity = Depends(agent)) -> None:
    """Forget this device (the browser unsubscribed, or the agent logs out)."""
    if not await push_store.unsubscribe(request.app.state.service.pool, who.sub, body.endpoint):
        raise ApiError(404, "no such subscription")
