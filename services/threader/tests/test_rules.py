"""Unit tests of the pure threading rules past Message-IDs: subject keys and the subject
fallback, Outlook's Thread-Index, and the customer scoping of our own ids."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest

from services.threader.domain.customers import (
    belongs,
    is_broadcast,
    is_ours,
    org,
    orgs,
    scoped,
)
from services.threader.domain.fallback import (
    SubjectCandidate,
    continues,
    is_unlinked,
    people,
    subject_key,
    subject_matches,
)
from services.threader.domain.keys import inbound_keys, outbound_keys
from services.threader.domain.outlook import thread_index_key, thread_index_root, thread_topic
from services.threader.domain.threading import normalize_subject

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
WINDOW = timedelta(hours=72)
OURS = "chatflow.test"

# --------------------------------------------------------------------------- subjects


@pytest.mark.parametrize(
    "prefix",
    [
        "Re:", "RE:", "re:", "Fwd:", "FW:", "Fw:", "Enc:", "ENC:", "RES:", "Res:", "Resp:",
        "AW:", "WG:", "SV:", "VS:", "Vs:", "Antw:", "TR:", "R:",
        "Re[2]:", "Re(2):", "RE [3]:", "Re^2:", "[support-list]", "[Acme Help] Re:",
    ],
)  # fmt: skip
def test_every_prefix_of_the_issue_is_stripped(prefix: str) -> None:
    assert normalize_subject(f"{prefix} Pedido 42 atrasado") == "pedido 42 atrasado"
    assert subject_key(f"{prefix}   PEDIDO 42\tatrasado") == "pedido 42 atrasado"


def test_stacked_prefixes_whitespace_and_case() -> None:
    assert subject_key("RE: Fwd: AW: [list] Re[2]:   Hello   World ") == "hello world"
    assert subject_key("Hello World") == subject_key("hello world") == "hello world"


def test_our_ticket_number_is_not_part_of_the_key() -> None:
    assert subject_key("Re: Broken tablet [#1042]") == "broken tablet"
    assert subject_key("[#1042] Re: Broken tablet") == "broken tablet"


def test_words_that_only_look_like_prefixes_stay() -> None:
    assert subject_key("Refund: please") == "refund: please"
    assert subject_key("Result of the test") == "result of the test"
    assert subject_key("") == subject_key(None) == subject_key("Re:") == ""


def test_thread_topic_wins_over_the_subject() -> None:
    assert subject_key("AW: Re: Rechnung 7", "Rechnung 7") == "rechnung 7"
    assert subject_key("Rechnung 7", "   ") == "rechnung 7"


# --------------------------------------------------------------------------- subject fallback


def cand(
    cid: str,
    who: set[str],
    *,
    first: datetime = T0,
    last: datetime | None = None,
    loose: bool = True,
    broadcast: bool = False,
    created: datetime = T0,
) -> SubjectCandidate:
    return SubjectCandidate(
        id_conversa=cid,
        created_at=created,
        participants=frozenset(who),
        first_at=first,
        last_at=last or first,
        loose=loose,
        broadcast=broadcast,
    )


def test_same_subject_same_person_within_window_joins() -> None:
    c = cand("c1", {"zoe@customer.test"})
    got = subject_matches("question", True, frozenset({"zoe@customer.test"}), T0, [c], WINDOW)
    assert got == ["c1"]


def test_two_customers_writing_question_stay_apart() -> None:
    c = cand("c1", {"ana@one.test"})
    assert subject_matches("question", True, frozenset({"bob@two.test"}), T0, [c], WINDOW) == []


def test_outside_the_window_stays_apart() -> None:
    c = cand("c1", {"zoe@customer.test"}, first=T0, last=T0 + timedelta(hours=1))
    who = frozenset({"zoe@customer.test"})
    late = T0 + timedelta(hours=1) + WINDOW + timedelta(seconds=1)
    early = T0 - WINDOW - timedelta(seconds=1)
    assert subject_matches("q", True, who, late, [c], WINDOW) == []
    assert subject_matches("q", True, who, early, [c], WINDOW) == []
    assert subject_matches("q", True, who, T0 - WINDOW, [c], WINDOW) == ["c1"]
    assert subject_matches("q", True, who, T0, [c], timedelta(0)) == []  # turned off


def test_an_empty_key_or_nobody_never_matches() -> None:
    c = cand("c1", {"zoe@customer.test"})
    assert subject_matches("", True, frozenset({"zoe@customer.test"}), T0, [c], WINDOW) == []
    assert subject_matches("q", True, frozenset(), T0, [c], WINDOW) == []


def test_a_linked_message_only_meets_loose_conversations() -> None:
    tight = cand("c1", {"zoe@customer.test"}, loose=False)
    loose = cand("c2", {"zoe@customer.test"}, loose=True, created=T0 + timedelta(seconds=1))
    who = frozenset({"zoe@customer.test"})
    assert subject_matches("q", False, who, T0, [tight, loose], WINDOW) == ["c2"]
    assert subject_matches("q", True, who, T0, [loose, tight], WINDOW) == ["c1", "c2"]


def test_a_broadcast_is_never_joined_by_subject() -> None:
    c = cand("c1", {"a@one.test", "b@two.test"}, broadcast=True)
    assert subject_matches("news", True, frozenset({"a@one.test"}), T0, [c], WINDOW) == []


def test_unlinked_means_no_other_message_named() -> None:
    ti = thread_index_key(base64.b64encode(bytes(range(1, 23))).decode())
    assert is_unlinked("<a@x>", [], [])
    assert is_unlinked("<a@x>", ["<a@x>"], ["junk"])  # a self link or junk is no link
    assert not is_unlinked("<a@x>", ["<b@x>"], [])
    assert not is_unlinked("<a@x>", [], ["<b@x>"])
    assert not is_unlinked("<a@x>", [], [], ti)


def test_people_leave_us_out() -> None:
    got = people(["Zoe@Customer.test", "support@chatflow.test", "", "nobody"], OURS)
    assert got == {"zoe@customer.test"}


# --------------------------------------------------------------------------- Thread-Index

HEADER = bytes(range(1, 23))


def ti(*blocks: bytes, header: bytes = HEADER) -> str:
    return base64.b64encode(header + b"".join(blocks)).decode()


def test_replies_share_the_first_22_bytes() -> None:
    root = thread_index_key(ti())
    assert root is not None and root.endswith("@thread-index.invalid>")
    assert thread_index_key(ti(b"\x01" * 5)) == root
    assert thread_index_key(ti(b"\x01" * 5, b"\x02" * 5)) == root
    other = thread_index_key(ti(header=bytes(range(2, 24))))
    assert other is not None and other != root
    assert thread_index_root(ti(b"\x09" * 5)) == HEADER


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "not base64 !!",
        base64.b64encode(HEADER[:21]).decode(),  # shorter than the header
        base64.b64encode(HEADER + b"\x01\x02").decode(),  # not 22 + 5n
        base64.b64encode(bytes(22)).decode(),  # a blank index would join strangers
    ],
)
def test_what_is_not_a_thread_index(value: str | None) -> None:
    assert thread_index_key(value) is None


def test_folded_and_unpadded_values_still_read() -> None:
    value = ti(b"\x01" * 5)
    folded = value[:10] + "\r\n " + value[10:]
    assert thread_index_key(folded) == thread_index_key(value)
    assert thread_index_key(value.rstrip("=")) == thread_index_key(value)
    assert thread_topic("  Rechnung\r\n 7 ") == "Rechnung 7"


def test_values_in_outlooks_textual_form() -> None:
    # Written the way Outlook writes them (constructed here, not captured): an original of 22
    # bytes ("...eg==") and a reply that adds one 5-byte block.
    first = "AdmP1eNqrFrJbx9WT1Kq3zq9vmCXeg=="
    reply = "AdmP1eNqrFrJbx9WT1Kq3zq9vmCXegAAFV0w"
    assert thread_index_key(first) is not None
    assert thread_index_key(first) == thread_index_key(reply)


# --------------------------------------------------------------------------- customers


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("Zoe@Customer.TEST", "customer.test"),
        ("ana@sub.acme.test", "sub.acme.test"),
        ("someone@gmail.com", "someone@gmail.com"),
        ("x@UOL.com.br", "x@uol.com.br"),
        ("no-domain", "no-domain"),
    ],
)
def test_org(address: str, expected: str) -> None:
    assert org(address) == expected


def test_orgs_leave_us_out_and_dedupe() -> None:
    got = orgs(["a@acme.test", "b@acme.test", "support@chatflow.test", "c@gmail.com"], OURS)
    assert got == ["acme.test", "c@gmail.com"]


def test_is_ours() -> None:
    assert is_ours("<ab12.7-abcdefghij@chatflow.test>", OURS)
    assert is_ours("<x@CHATFLOW.test>", OURS)
    assert not is_ours("<x@customer.test>", OURS)
    assert not is_ours("<x@chatflow.test.evil>", OURS)
    assert not is_ours("<x@chatflow.test>", "")


def test_broadcast_is_a_conversation_we_open_to_several_customers() -> None:
    assert is_broadcast(["a@one.test", "b@two.test"], OURS, conversation_has_inbound=False)
    assert is_broadcast([], OURS, conversation_has_inbound=False)  # Bcc only
    assert is_broadcast(["support@chatflow.test"], OURS, conversation_has_inbound=False)
    assert not is_broadcast(["a@one.test", "a2@one.test"], OURS, conversation_has_inbound=False)
    assert not is_broadcast(["a@one.test", "b@two.test"], OURS, conversation_has_inbound=True)
    # Cc is not counted: "To the customer, Cc their consultant" opens the customer's conversation
    assert not is_broadcast(["a@one.test"], OURS, conversation_has_inbound=False)


def test_inbound_keys_scope_our_ids_to_the_sender_and_keep_the_rest_plain() -> None:
    ours = "<n1.5-abcdefghij@chatflow.test>"
    k = inbound_keys(
        "<r1@one.test>",
        [ours],
        ["<root@lists.test>", ours],
        sender="a@one.test",
        our_domain=OURS,
        thread_index=ti(b"\x01" * 5),
    )
    assert k.join == [
        "<r1@one.test>",
        scoped(ours, "one.test"),
        "<root@lists.test>",
        thread_index_key(ti()),
    ]
    assert k.ours == [ours]
    colleague = inbound_keys("<r2@one.test>", [ours], [], sender="c@one.test", our_domain=OURS)
    other = inbound_keys("<r3@two.test>", [ours], [], sender="b@two.test", our_domain=OURS)
    assert scoped(ours, "one.test") in colleague.join
    assert scoped(ours, "one.test") not in other.join


def test_outbound_keys_register_our_id_for_each_customer_unless_broadcast() -> None:
    own = "<o1.5-abcdefghij@chatflow.test>"
    normal = outbound_keys(
        own,
        ["<q@one.test>"],
        ["<q@one.test>"],
        recipients=["a@one.test", "x@gmail.com"],
        our_domain=OURS,
        broadcast=False,
    )
    assert normal == [own, "<q@one.test>", scoped(own, "one.test"), scoped(own, "x@gmail.com")]
    news = outbound_keys(
        own, [], [], recipients=["a@one.test", "b@two.test"], our_domain=OURS, broadcast=True
    )
    assert news == [own]


@pytest.mark.parametrize(
    ("subject", "marked"),
    [
        ("Re: Question", True),
        ("[list] Fwd: Question", True),
        ("Question (fwd)", True),
        ("[Fwd: Question]", True),
        ("RES: Pedido", True),
        ("Question", False),
        ("[list] Question", False),
        ("Refund: please", False),
        ("", False),
    ],
)
def test_continuation_markers(subject: str, marked: bool) -> None:
    assert continues(subject) is marked


def test_outlook_topic_other_than_the_subject_marks_a_continuation() -> None:
    assert continues("Rechnung", "Rechnung") is False
    assert continues("Stand der Dinge", "Rechnung") is True


def test_two_fresh_messages_that_share_a_subject_stay_apart() -> None:
    fresh = cand("c1", {"zoe@customer.test"}, loose=True)
    fresh = SubjectCandidate(**{**fresh.__dict__, "marked": False})
    who = frozenset({"zoe@customer.test"})
    assert subject_matches("root message", True, who, T0, [fresh], WINDOW, marked=False) == []
    assert subject_matches("root message", True, who, T0, [fresh], WINDOW, marked=True) == ["c1"]


def test_our_reply_never_names_our_earlier_ids_plain() -> None:
    """An answer to one customer that references our broadcast keeps the broadcast apart."""
    news = "<n1.5-abcdefghij@chatflow.test>"
    got = outbound_keys(
        "<o2.9-abcdefghij@chatflow.test>",
        ["<ra@one.test>"],
        [news, "<ra@one.test>"],
        recipients=["a@one.test"],
        our_domain=OURS,
        broadcast=False,
    )
    assert news not in got
    assert got == [
        "<o2.9-abcdefghij@chatflow.test>",
        "<ra@one.test>",
        scoped("<o2.9-abcdefghij@chatflow.test>", "one.test"),
        scoped(news, "one.test"),
    ]


@pytest.mark.parametrize(
    ("sender", "participants", "expected"),
    [
        ("ana@acme.test", ["ana@acme.test"], True),
        ("Bea@ACME.test", ["ana@acme.test"], True),  # a colleague, any case
        ("mallory@evil.test", ["ana@acme.test"], False),  # our mail, forwarded to her
        ("joe@gmail.com", ["ana@gmail.com"], False),  # free mail: people, not companies
        ("ana@gmail.com", ["Ana@Gmail.com"], True),
        ("x@evil.test", ["ana@acme.test", "cc@evil.test"], True),  # we copied evil.test
        ("agent@chatflow.test", ["agent@chatflow.test"], False),  # ours are not customers
        ("", ["ana@acme.test"], False),
        ("ana@acme.test", [], False),
    ],
)
def test_who_belongs_to_a_conversation_named_by_its_token(
    sender: str, participants: list[str], expected: bool
) -> None:
    assert belongs(sender, participants, "chatflow.test") is expected
