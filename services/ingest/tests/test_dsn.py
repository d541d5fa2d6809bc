"""DSN extraction (domain/dsn.py) on the shapes real MTAs send, and on the corpora's bounces."""

from __future__ import annotations

import pytest

from libs.common import testing
from services.ingest.domain.dsn import parse_dsn

CORPORA = testing.CORPORA
OURS = "<5f2a9c.17-ab12cd@chatflow.test>"


def postfix(original: str = OURS, *, action: str = "failed", status: str = "5.1.1") -> bytes:
    return f"""Return-Path: <>
From: MAILER-DAEMON@mx.customer.test (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: support@chatflow.test
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="8A1B2C3D4E.1700000000/mx.customer.test"
Message-Id: <20261203120000.8A1B2C3D4E@mx.customer.test>

This is a MIME-encapsulated message.

--8A1B2C3D4E.1700000000/mx.customer.test
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

--8A1B2C3D4E.1700000000/mx.customer.test
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.customer.test
X-Postfix-Queue-ID: 8A1B2C3D4E
X-Postfix-Sender: rfc822; support@chatflow.test
Arrival-Date: Thu,  3 Dec 2026 12:00:00 +0000 (UTC)

Final-Recipient: rfc822; nobody@customer.test
Original-Recipient: rfc822;nobody@customer.test
Action: {action}
Status: {status}
Remote-MTA: dns; mail.customer.test
Diagnostic-Code: smtp; 550 {status} <nobody@customer.test>: Recipient address
    rejected: User unknown in virtual mailbox table

--8A1B2C3D4E.1700000000/mx.customer.test
Content-Description: Undelivered Message
Content-Type: message/rfc822

From: Support <support@chatflow.test>
To: nobody@customer.test
Subject: Re: your order
Message-ID: {original}
Date: Thu, 3 Dec 2026 11:59:00 +0000

Hello.

--8A1B2C3D4E.1700000000/mx.customer.test--
""".replace("\n", "\r\n").encode()


def exim() -> bytes:
    return b"""From: Mail Delivery System <Mailer-Daemon@exim.customer.test>
To: support@chatflow.test
Subject: Mail delivery failed: returning message to sender
Message-Id: <E1abc-000123-AB@exim.customer.test>
X-Failed-Recipients: gone@customer.test
Auto-Submitted: auto-replied
Content-Type: multipart/report; report-type=delivery-status; boundary=1700000000-eximdsn-42

--1700000000-eximdsn-42
Content-type: text/plain; charset=us-ascii

This message was created automatically by mail delivery software.

  gone@customer.test
    host mail.customer.test [192.0.2.1]
    SMTP error from remote mail server after RCPT TO:<gone@customer.test>:
    550 5.1.1 mailbox unavailable

--1700000000-eximdsn-42
Content-type: message/delivery-status

Reporting-MTA: dns; exim.customer.test

Action: failed
Final-Recipient: rfc822;gone@customer.test
Status: 5.0.0
Remote-MTA: dns; mail.customer.test
Diagnostic-Code: smtp; 550 5.1.1 mailbox unavailable

--1700000000-eximdsn-42
Content-type: text/rfc822-headers

Return-path: <support@chatflow.test>
From: support@chatflow.test
Message-ID: <ab12.17-ff00@chatflow.test>
Subject: Re: hi

--1700000000-eximdsn-42--
"""


def exchange() -> bytes:
    return b"""From: postmaster@outlook.customer.test
To: support@chatflow.test
Subject: Undeliverable: Re: invoice
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="b1"
X-MS-Exchange-Message-Is-Ndr:
In-Reply-To: <exchange-irt@chatflow.test>
Auto-Submitted: auto-replied

--b1
Content-Type: multipart/alternative; boundary="b2"

--b2
Content-Type: text/plain; charset="us-ascii"

Delivery has failed to these recipients or groups.

--b2
Content-Type: text/html; charset="us-ascii"

<p>Delivery has failed</p>

--b2--

--b1
Content-Type: message/delivery-status

Reporting-MTA: dns;DB5PR06MB1800.eurprd06.prod.outlook.test
Received-From-MTA: dns;mx.chatflow.test
Arrival-Date: Thu, 3 Dec 2026 11:00:00 +0000

Final-Recipient: rfc822;noname@customer.test
Action: failed
Status: 5.1.10
Diagnostic-Code: smtp;550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found
X-Display-Name: noname

--b1--
"""


def gmail_plain() -> bytes:
    return b"""Return-Path: <>
From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>
To: support@chatflow.test
X-Failed-Recipients: typo@gmial.test
Subject: Delivery Status Notification (Failure)
Message-ID: <001a11c2449205704f04e0cbff5b@google.com>
Content-Type: text/plain; charset=ISO-8859-1

Delivery to the following recipient failed permanently:

     typo@gmial.test

The error that the other server returned was:
550 5.1.2 The domain does not exist

----- Original message -----

From: support@chatflow.test
Message-ID: <gmail-original.1-aa@chatflow.test>
Subject: Re: hi

hello
"""


def test_postfix_dsn_names_the_original_and_the_failed_recipient() -> None:
    dsn = parse_dsn(postfix())
    assert dsn is not None and dsn.structured
    assert dsn.original_message_id == OURS
    assert dsn.reporting_mta == "mx.customer.test"
    (r,) = dsn.recipients
    assert (r.address, r.action, r.status) == ("nobody@customer.test", "failed", "5.1.1")
    assert r.diagnostic.startswith("550 5.1.1 <nobody@customer.test>: Recipient address rejected")
    assert "\n" not in r.diagnostic and r.remote_mta == "mail.customer.test"
    assert dsn.failed == [r]


def test_a_delayed_dsn_is_reported_but_nothing_failed() -> None:
    dsn = parse_dsn(postfix(action="delayed", status="4.4.1"))
    assert dsn is not None and dsn.original_message_id == OURS
    assert [r.action for r in dsn.recipients] == ["delayed"] and dsn.failed == []


def test_exim_dsn_takes_the_id_from_rfc822_headers() -> None:
    dsn = parse_dsn(exim())
    assert dsn is not None
    assert dsn.original_message_id == "<ab12.17-ff00@chatflow.test>"
    assert [(r.address, r.status) for r in dsn.failed] == [("gone@customer.test", "5.0.0")]


def test_exchange_ndr_without_the_original_falls_back_to_in_reply_to() -> None:
    dsn = parse_dsn(exchange())
    assert dsn is not None
    assert dsn.original_message_id == "<exchange-irt@chatflow.test>"
    (r,) = dsn.failed
    assert r.status == "5.1.10" and "RecipientNotFound" in r.diagnostic


def test_gmail_plain_text_bounce_is_guessed_from_its_quoted_original() -> None:
    dsn = parse_dsn(gmail_plain())
    assert dsn is not None and not dsn.structured
    assert dsn.original_message_id == "<gmail-original.1-aa@chatflow.test>"
    (r,) = dsn.failed
    assert r.address == "typo@gmial.test" and r.status == "5.1.2"
    assert r.diagnostic == "550 5.1.2 The domain does not exist"


def test_qmail_bounce_lists_recipients_in_its_text() -> None:
    raw = b"""From: MAILER-DAEMON@qmail.customer.test
To: support@chatflow.test
Subject: failure notice

Hi. This is the qmail-send program at qmail.customer.test.
I'm afraid I wasn't able to deliver your message to the following addresses.
This is a permanent error; I've given up. Sorry it didn't work out.

<old@customer.test>:
192.0.2.7 does not like recipient.
Remote host said: 550 5.1.1 <old@customer.test>... User unknown
Giving up on 192.0.2.7.

--- Below this line is a copy of the message.

Return-Path: <support@chatflow.test>
Message-ID: <qmail-orig.3-cc@chatflow.test>
From: support@chatflow.test
<nobody@elsewhere.test>:
"""
    dsn = parse_dsn(raw)
    assert dsn is not None and not dsn.structured
    assert dsn.original_message_id == "<qmail-orig.3-cc@chatflow.test>"
    (r,) = dsn.failed
    assert (r.address, r.status) == ("old@customer.test", "5.1.1")
    assert r.diagnostic == "Remote host said: 550 5.1.1 <old@customer.test>... User unknown"


def test_a_mail_from_postmaster_that_names_no_recipient_is_not_a_bounce() -> None:
    raw = (
        b"From: postmaster@customer.test\r\nTo: support@chatflow.test\r\nSubject: Re: hi\r\n"
        b"In-Reply-To: <ours.1-aa@chatflow.test>\r\n\r\nThanks, all fine.\r\n"
        b"-----Original Message-----\r\nMessage-ID: <ours.1-aa@chatflow.test>\r\n"
    )
    assert parse_dsn(raw) is None


def test_original_message_id_field_is_used_when_nothing_is_attached() -> None:
    raw = (
        b"From: MAILER-DAEMON@x.test\r\nContent-Type: multipart/report; "
        b'report-type=delivery-status; boundary="z"\r\n\r\n--z\r\n'
        b"Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; x.test\r\n"
        b"X-Original-Message-ID: <field@chatflow.test>\r\n\r\n"
        b"Final-Recipient: rfc822; a@b.test\r\nAction: failed\r\nStatus: 5.2.2\r\n\r\n--z--\r\n"
    )
    dsn = parse_dsn(raw)
    assert dsn is not None and dsn.original_message_id == "<field@chatflow.test>"


def test_recipient_blocks_without_blank_lines_between_them() -> None:
    raw = (
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=q\r\n\r\n"
        b"--q\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; m.test\r\nFinal-Recipient: rfc822; one@x.test\r\nAction: failed\r\n"
        b"Status: 5.1.1\r\nFinal-Recipient: rfc822; two@x.test\r\nAction: delivered\r\n"
        b"Status: 2.0.0\r\n--q--\r\n"
    )
    dsn = parse_dsn(raw)
    assert dsn is not None and dsn.original_message_id is None
    assert [(r.address, r.action) for r in dsn.recipients] == [
        ("one@x.test", "failed"),
        ("two@x.test", "delivered"),
    ]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00\xff" * 100,
        b"From: a@b.test\r\nSubject: hello\r\n\r\nordinary mail\r\n",
        b"From: a@b.test\r\nContent-Type: multipart/report; report-type=disposition-notification;"
        b" boundary=x\r\n\r\n--x\r\nContent-Type: message/disposition-notification\r\n\r\n"
        b"Disposition: manual-action/MDN-sent-manually; displayed\r\n--x--\r\n",
        b"Content-Type: multipart/report; boundary=x\r\n\r\n--x\r\nContent-Type: "
        b"message/delivery-status\r\n\r\n" + b"Final-Recipient: " + b"A" * 100_000 + b"\r\n--x--",
    ],
)
def test_what_is_not_a_usable_report_gives_none_or_a_bounded_one(raw: bytes) -> None:
    dsn = parse_dsn(raw)
    assert dsn is None or (
        dsn.original_message_id is None and all(len(r.address) <= 320 for r in dsn.recipients)
    )


def test_not_a_bounce_is_none() -> None:
    assert parse_dsn(b"From: a@b.test\r\nSubject: hi\r\n\r\nMessage-ID: <x@y>\r\n") is None
    assert parse_dsn(b"") is None and parse_dsn(b"\x00\xff" * 100) is None


# ---- the corpora's bounces (expected values read from the files by hand) --------------------

CASES = {
    "flanker/tests/fixtures/messages/bounce/mailbox-full.eml": (
        "<4E326A95.3010907@example.com>",
        [("user@aol.com", "failed", "5.2.2")],
    ),
    "flanker/tests/fixtures/messages/bounce/zed.eml": (
        "<20090708054735.GC7578@example.com>",
        [("asdfasdfasdfasdfasdfasdfewrqertrtyrthsfgdfgadfqeadvxzvz@gmail.com", "failed", "5.1.1")],
    ),
    "flanker/tests/fixtures/messages/bounce/office365.eml": (
        "<20171013111011.20866.254C2F3A4D7AA526@ninomail.com>",
        [("noname@example.com", "failed", "5.1.10")],
    ),
    "flanker/tests/fixtures/messages/bounce/no-mx.eml": (
        "<19E44CA63F984902B7D654F8FF40F89D@bo>",
        [("user@example.com", "delayed", "4.4.4")],
    ),
    "flanker/tests/fixtures/messages/bounce/gmail-invalid-address.eml": (
        "<CAKsfaBUUGqVZiaMrmH3TRPfq1odQPtM7Ey5YW1SgyJJRHtAjgw@mail.gmail.com>",
        [("awfawfawfawfawfaw@someserverhere.com", "failed", "5.1.0")],
    ),
    "mimekit/UnitTests/TestData/messages/delivery-status.txt": (
        "<31FC7EB4.41C6@netscape.com>",
        [("newsletter-request@imusic.com", "failed", "")],
    ),
    "mimekit/UnitTests/TestData/messages/delivery-status-no-blank-line.txt": (
        "<31FC7EB4.41C6@netscape.com>",
        [("newsletter-request@imusic.com", "failed", "")],
    ),
    "zammad/mail055.box": (
        "<20170526150141.232.13312@example.zammad.loc>",
        [("ticket-bounce-trigger2@example.com", "failed", "5.1.1")],
    ),
    "enmime/dsn/testdata/multi_recipient_dsn.raw": (
        None,
        [
            ("arathib@vnet.ibm.com", "failed", "5.0.0"),
            ("johnh@hpnjld.njd.hp.com", "delayed", "4.0.0"),
            ("wsnell@sdcc13.ucsd.edu", "failed", "5.0.0"),
        ],
    ),
    "nodemailer-mailparser/test/fixtures/delivery-status.eml": (
        "<xxxxx@email.amazonses.com>",
        [("xxxx@xxxx.com", "failed", "5.1.1")],
    ),
}


@pytest.mark.skipif(not CORPORA.exists(), reason="corpora not on this machine")
@pytest.mark.parametrize("path", sorted(CASES))
def test_corpus_bounces(path: str) -> None:
    original, recipients = CASES[path]
    dsn = parse_dsn((CORPORA / path).read_bytes())
    assert dsn is not None
    assert dsn.original_message_id == original
    assert [(r.address, r.action, r.status) for r in dsn.recipients] == recipients


@pytest.mark.skipif(not CORPORA.exists(), reason="corpora not on this machine")
def test_every_corpus_message_gives_a_result_without_raising() -> None:
    files = [p for p in CORPORA.rglob("*") if p.is_file() and p.stat().st_size < 2_000_000]
    reports = sum(parse_dsn(p.read_bytes()) is not None for p in files)
    assert len(files) > 100 and 20 <= reports < len(files) // 2
