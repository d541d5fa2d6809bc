"""Who may read what, through the real gateway: agents only inside their mailboxes, machines never.

Two mailboxes, one agent each (the demo agent A in ``support@``, a new agent B only in a new
mailbox), a machine client with ``client_credentials``. Each mailbox receives a mail with an
attachment over SMTP+STARTTLS. Outside its mailboxes an agent gets the same 404 as for an id that
does not exist; a machine token gets 403 on agent data; no token gets 401.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any
from urllib.parse import quote

import aiosmtplib
import httpx
import pytest

from tests.conftest import DEMO_PASSWORD
from tests.oauth_client import login
from tools.devstack import Stack

pytestmark = pytest.mark.xdist_group("stack")

PASSWORD_B = "billing agent password 7 horses"
MACHINE_SECRET = "machine-secret-" + "x" * 24
PDF = b"%PDF-1.4\n% not really a pdf\n" + bytes(range(256))
CSV = b"id,amount\n1,42.00\n"
CYRILLIC_NAME = "отчёт 2024.csv"


@dataclass
class Side:
    """One agent and the conversation that arrived in its own mailbox."""

    token: str
    mailbox: str
    conversation: str
    attachment: str
    attachment_name: str
    attachment_bytes: bytes


@dataclass
class World:
    a: Side
    b: Side
    machine: str


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def mail_with_attachment(
    to: str, subject: str, data: bytes, filename: str, maintype: str, subtype: str
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Zoë Customer <zoe@customer.test>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="customer.test")
    msg.set_content("Please see the attached file.")
    msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg


async def deliver(stack: Stack, msg: EmailMessage, ca: ssl.SSLContext) -> None:
    """Send over STARTTLS; a new mailbox is refused until ingest has heard of it, so retry."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while True:
        try:
            await aiosmtplib.send(
                msg,
                hostname="127.0.0.1",
                port=stack.ports.smtp,
                start_tls=True,
                tls_context=ca,
                timeout=15,
            )
            return
        except aiosmtplib.SMTPRecipientsRefused:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.25)


async def arrived(http: httpx.AsyncClient, token: str, subject: str) -> dict[str, Any]:
    """The conversation with ``subject`` once the threader has it, in full."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while loop.time() < deadline:
        r = await http.get("/api/conversations", params={"q": subject}, headers=bearer(token))
        assert r.status_code == 200, r.text
        items = r.json()["items"]
        if items:
            detail = await http.get(
                f"/api/conversations/{items[0]['id_conversa']}", headers=bearer(token)
            )
            assert detail.status_code == 200, detail.text
            return dict(detail.json())
        await asyncio.sleep(0.2)
    raise AssertionError(f"no conversation {subject!r} after 20s")


async def side(
    http: httpx.AsyncClient,
    stack: Stack,
    ca: ssl.SSLContext,
    token: str,
    address: str,
    data: bytes,
    filename: str,
    mime: tuple[str, str],
) -> Side:
    subject = f"Access check {uuid.uuid4().hex[:10]}"
    await deliver(stack, mail_with_attachment(address, subject, data, filename, *mime), ca)
    conv = await arrived(http, token, subject)
    attachments = [a for m in conv["messages"] for a in m["attachments"]]
    assert len(attachments) == 1, conv
    return Side(
        token=token,
        mailbox=conv["mailbox"],
        conversation=conv["id_conversa"],
        attachment=attachments[0]["id"],
        attachment_name=attachments[0]["filename"],
        attachment_bytes=data,
    )


@pytest.fixture(scope="module")
async def http(stack: Stack, ca_context: ssl.SSLContext) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.origin, verify=ca_context, timeout=20) as client:
        yield client


@pytest.fixture(scope="module")
async def world(stack: Stack, ca_context: ssl.SSLContext, http: httpx.AsyncClient) -> World:
    tag = uuid.uuid4().hex[:8]
    box_b, agent_b, client = f"billing-{tag}@chatflow.test", f"bea-{tag}@chatflow.test", tag

    def cli(*args: str, stdin: str | None = None) -> str:
        return stack.run_cmd("auth", *args, stdin=stdin)

    await asyncio.to_thread(cli, "create-mailbox", "--address", box_b, "--name", "Billing")
    await asyncio.to_thread(
        cli, "create-user", "--email", agent_b, "--password-stdin", stdin=PASSWORD_B + "\n"
    )
    await asyncio.to_thread(cli, "add-member", "--email", agent_b, "--mailbox", box_b)
    await asyncio.to_thread(
        cli,
        "create-client",
        "--client-id",
        f"machine-{client}",
        "--scopes",
        "streams:publish",
        "--secret-stdin",
        stdin=MACHINE_SECRET + "\n",
    )

    token_a = str(
        (await login(stack.origin, "agent@chatflow.test", DEMO_PASSWORD, ca_context))[
            "access_token"
        ]
    )
    token_b = str((await login(stack.origin, agent_b, PASSWORD_B, ca_context))["access_token"])
    machine = await http.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", "scope": "streams:publish"},
        auth=(f"machine-{client}", MACHINE_SECRET),
    )
    assert machine.status_code == 200, machine.text
    assert machine.json()["scope"] == "streams:publish"

    a = await side(
        http,
        stack,
        ca_context,
        token_a,
        "support@chatflow.test",
        PDF,
        "invoice.pdf",
        ("application", "pdf"),
    )
    b = await side(http, stack, ca_context, token_b, box_b, CSV, CYRILLIC_NAME, ("text", "csv"))
    assert a.mailbox != b.mailbox
    return World(a=a, b=b, machine=str(machine.json()["access_token"]))


def claims(token: str) -> dict[str, Any]:
    body = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))))


# ---- agents stay inside their mailboxes ---------------------------------------------------------


async def test_tokens_carry_the_expected_mailboxes(world: World) -> None:
    assert claims(world.a.token)["mailboxes"] == [world.a.mailbox]
    assert claims(world.b.token)["mailboxes"] == [world.b.mailbox]
    machine = claims(world.machine)
    assert machine["roles"] == [] and machine["mailboxes"] == []


async def test_agent_sees_and_downloads_its_own(world: World, http: httpx.AsyncClient) -> None:
    for me in (world.a, world.b):
        r = await http.get(f"/api/conversations/{me.conversation}", headers=bearer(me.token))
        assert r.status_code == 200, r.text
        read = await http.post(
            f"/api/conversations/{me.conversation}/read", headers=bearer(me.token)
        )
        assert read.status_code == 204, read.text
        got = await http.get(f"/api/attachments/{me.attachment}", headers=bearer(me.token))
        assert got.status_code == 200, got.text
        assert got.content == me.attachment_bytes
        assert got.headers["content-type"] == "application/octet-stream"
        assert got.headers["x-content-type-options"] == "nosniff"
        assert got.headers["content-disposition"].startswith("attachment;")


async def test_non_ascii_attachment_name_is_sent_as_rfc6266(
    world: World, http: httpx.AsyncClient
) -> None:
    """A Cyrillic file name used to be put raw into a latin-1 header: a 500 for the download."""
    assert world.b.attachment_name == CYRILLIC_NAME
    got = await http.get(f"/api/attachments/{world.b.attachment}", headers=bearer(world.b.token))
    assert got.status_code == 200, got.text
    disposition = got.headers["content-disposition"]
    assert disposition.startswith('attachment; filename="')
    assert f"filename*=UTF-8''{quote(CYRILLIC_NAME, safe='')}" in disposition
    assert got.headers["x-original-content-type"] == "text/csv"


@pytest.mark.parametrize(("who", "other"), [("b", "a"), ("a", "b")])
async def test_agent_gets_404_outside_its_mailboxes(
    world: World, http: httpx.AsyncClient, who: str, other: str
) -> None:
    me, them = getattr(world, who), getattr(world, other)
    missing = str(uuid.uuid4())
    h = bearer(me.token)
    for conv in (them.conversation, missing):
        detail = await http.get(f"/api/conversations/{conv}", headers=h)
        read = await http.post(f"/api/conversations/{conv}/read", headers=h)
        reply = await http.post(
            f"/api/conversations/{conv}/replies", json={"html": "<p>hi</p>"}, headers=h
        )
        for r in (detail, read, reply):
            assert r.status_code == 404, (r.request.url, r.status_code, r.text)
            assert r.json() == {"error": {"code": "not_found", "message": "conversation not found"}}
    # Someone else's attachment looks exactly like one that does not exist.
    foreign = await http.get(f"/api/attachments/{them.attachment}", headers=h)
    absent = await http.get(f"/api/attachments/{missing}", headers=h)
    assert foreign.status_code == absent.status_code == 404
    assert (
        foreign.json()
        == absent.json()
        == {"error": {"code": "not_found", "message": "attachment not found"}}
    )


async def test_listing_never_shows_other_mailboxes(world: World, http: httpx.AsyncClient) -> None:
    for me, them in ((world.b, world.a), (world.a, world.b)):
        seen: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            params = {"limit": "100", **({"cursor": cursor} if cursor else {})}
            r = await http.get("/api/conversations", params=params, headers=bearer(me.token))
            assert r.status_code == 200, r.text
            seen += r.json()["items"]
            cursor = r.json()["next_cursor"]
            if cursor is None:
                break
        assert me.conversation in {c["id_conversa"] for c in seen}
        assert them.conversation not in {c["id_conversa"] for c in seen}
        assert {c["mailbox"] for c in seen} == {me.mailbox}
        # Asking for the other mailbox by id is an empty page, not an error that confirms it.
        r = await http.get(
            "/api/conversations", params={"mailbox": them.mailbox}, headers=bearer(me.token)
        )
        assert r.status_code == 200 and r.json() == {"items": [], "next_cursor": None}


# ---- machines and anonymous callers ------------------------------------------------------------


async def test_machine_token_gets_403_on_agent_data(world: World, http: httpx.AsyncClient) -> None:
    h = bearer(world.machine)
    conv, att = world.a.conversation, world.a.attachment
    requests = [
        http.get("/api/conversations", headers=h),
        http.get(f"/api/conversations/{conv}", headers=h),
        http.get(f"/api/conversations/{uuid.uuid4()}", headers=h),
        http.post(f"/api/conversations/{conv}/read", headers=h),
        http.post(f"/api/conversations/{conv}/replies", json={"html": "<p>x</p>"}, headers=h),
        http.post(f"/api/conversations/{conv}/replies", json={"bad": 1}, headers=h),
        http.get(f"/api/attachments/{att}", headers=h),
        http.get(f"/api/attachments/{world.b.attachment}", headers=h),
    ]
    for r in await asyncio.gather(*requests):
        assert r.status_code == 403, (r.request.method, r.request.url, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json")
        assert r.json()["error"]["code"] == "forbidden"


async def test_no_token_is_401(world: World, http: httpx.AsyncClient) -> None:
    conv, att = world.a.conversation, world.a.attachment
    for method, path in (
        ("GET", "/api/conversations"),
        ("GET", f"/api/conversations/{conv}"),
        ("POST", f"/api/conversations/{conv}/read"),
        ("POST", f"/api/conversations/{conv}/replies"),
        ("GET", f"/api/attachments/{att}"),
    ):
        for headers in ({}, {"Authorization": "Bearer not.a.token"}, {"Authorization": "Basic x"}):
            r = await http.request(method, path, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json()["error"]["code"] == "unauthorized"


# ---- bad input on a real conversation is a 4xx, never a 500 -------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        '{"html": "<p>nul \\u0000 byte</p>"}',
        '{"html": "<p>lone \\ud800 surrogate</p>"}',
        '{"html": "<p>x</p>", "to": [{"address": "a@b.test\\r\\nBcc: c@d.test"}]}',
        '{"html": "<p>x</p>", "to": [{"name": "Eve\\r\\nBcc: c@d.test", "address": "a@b.test"}]}',
        '{"html": "<p>x</p>", "to": [{"address": "no-at-sign"}]}',
        '{"html": "<p>x</p>", "to": [{"address": "a@b@c.test"}]}',
        '{"html": "<p>x</p>", "to": []}',
        '{"html": "<p>x</p>", "client_id": "a\\u0000b"}',
        '{"html": "<p>x</p>", "attachments": ["../../etc/passwd"]}',
        '{"html": ""}',
        '{"html": 5}',
        "[]",
        "not json",
    ],
)
async def test_bad_reply_bodies_are_422(world: World, http: httpx.AsyncClient, body: str) -> None:
    r = await http.post(
        f"/api/conversations/{world.a.conversation}/replies",
        content=body.encode(),
        headers={**bearer(world.a.token), "content-type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid"


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"q": "back\\slash"}, 200),
        ({"q": "ends with \\"}, 200),
        ({"q": "100%_"}, 200),
        ({"q": "nul\x00"}, 422),
        ({"cursor": "!!!"}, 422),
        ({"cursor": "bm90IGpzb24"}, 400),
        ({"cursor": base64.urlsafe_b64encode(b'["2024-01-01T00:00:00", "x"]').decode()}, 400),
        ({"cursor": base64.urlsafe_b64encode(b'["2024-01-01T00:00:00", 1, 2]').decode()}, 400),
        ({"cursor": base64.urlsafe_b64encode(b"{}").decode()}, 400),
        ({"status": "archived"}, 422),
        ({"limit": "0"}, 422),
        ({"limit": "1e9"}, 422),
    ],
)
async def test_listing_parameters(
    world: World, http: httpx.AsyncClient, params: dict[str, str], status: int
) -> None:
    r = await http.get("/api/conversations", params=params, headers=bearer(world.a.token))
    assert r.status_code == status, r.text


async def test_backslash_search_matches_literally(world: World, http: httpx.AsyncClient) -> None:
    """Punctuation such as ``\\`` must neither fail the search nor make it match everything:
    full-text search reads the words around it."""
    r = await http.get(
        "/api/conversations", params={"q": "Access\\ check"}, headers=bearer(world.a.token)
    )
    assert r.status_code == 200
    assert all("Access check" in i["subject"] for i in r.json()["items"])
    r = await http.get("/api/conversations", params={"q": "\\"}, headers=bearer(world.a.token))
    assert r.status_code == 200 and r.json()["items"] == []
