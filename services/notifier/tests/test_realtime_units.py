"""Pure pieces of presence and Web Push: Topic values, presence state, endpoint checks."""

from __future__ import annotations

import re
import uuid

import pytest

from libs.common.web import ApiError
from services.notifier.presence import state_of
from services.notifier.push import topic
from services.notifier.push_http import _check_endpoint
from services.notifier.settings import NotifierSettings


@pytest.mark.parametrize("n", range(50))
def test_topic_is_a_short_urlsafe_token_per_conversation(n: int) -> None:
    cid = str(uuid.uuid4()) if n else "x" * 5000
    t = topic(cid)
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,32}", t)
    assert topic(cid) == t and topic(cid + "1") != t


def test_presence_state_groups_connections_by_user() -> None:
    members = [b"v|ana|r1.1", b"v|ana|r2.7", b"t|bia|r1.2", b"v|bia|r1.2", b"t|ana|r2.7"]
    assert state_of(members) == (["ana", "bia"], ["ana", "bia"])
    assert state_of([b"v|caio|r.1"]) == (["caio"], [])
    assert state_of([]) == ([], [])


@pytest.mark.parametrize(
    ("endpoint", "hosts", "http", "ok"),
    [
        ("https://fcm.googleapis.com/fcm/send/abc", [], False, True),
        ("https://fcm.googleapis.com/fcm/send/abc", ["googleapis.com"], False, True),
        ("https://updates.push.services.mozilla.com/wpush/v2/x", ["googleapis.com"], False, False),
        ("https://evilgoogleapis.com/x", ["googleapis.com"], False, False),
        ("http://127.0.0.1:9/push", [], False, False),
        ("http://127.0.0.1:9/push", [], True, True),
        ("ftp://push.example/x", [], True, False),
        ("https://u:p@push.example/x", [], False, False),
        ("https:///nohost", [], False, False),
    ],
)
def test_push_endpoints_are_https_on_accepted_hosts(
    endpoint: str, hosts: list[str], http: bool, ok: bool
) -> None:
    s = NotifierSettings.load(push_endpoint_hosts=hosts, push_allow_http=http)
    if ok:
        _check_endpoint(s, endpoint)
    else:
        with pytest.raises(ApiError):
            _check_endpoint(s, endpoint)
