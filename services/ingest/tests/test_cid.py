"""``cid:`` images linked to their parts (domain/cid.py), on the sanitizer's real output and on
the corpora's messages with inline images."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from libs.common import testing
from services.ingest.domain.cid import cid_map, link_inline_images
from services.ingest.domain.mime_reader import read_message, sanitize_html

CORPORA = testing.CORPORA
A, B = str(uuid.uuid4()), str(uuid.uuid4())


def linked(html: str, parts: dict[str, str]) -> tuple[str, set[str]]:
    return link_inline_images(sanitize_html(html), cid_map((v, k) for k, v in parts.items()))


def test_a_cid_source_becomes_the_attachment_url() -> None:
    out, shown = linked('<p><img src="cid:logo@x.test" alt="Logo"></p>', {"<logo@x.test>": A})
    assert out == f'<p><img src="/api/attachments/{A}" data-attachment-id="{A}" alt="Logo"></p>'
    assert shown == {A}


@pytest.mark.parametrize(
    "src",
    [
        "cid:logo@x.test",
        "CID:logo@x.test",
        " cid:logo@x.test ",
        "cid:logo%40x.test",  # RFC 2392: the URL is percent-encoded
        "cid:LOGO@X.TEST",  # case changed between header and URL
        "cid:&lt;logo@x.test&gt;",  # angle brackets some clients keep
    ],
)
def test_the_forms_clients_write(src: str) -> None:
    out, shown = linked(f'<img src="{src}">', {"logo@x.test": A})
    assert f'src="/api/attachments/{A}"' in out and shown == {A}


def test_exact_match_wins_over_case_folded() -> None:
    out, _ = linked('<img src="cid:Pic"><img src="cid:pic">', {"Pic": A, "pic": B})
    assert out.index(A) < out.index(B)


def test_what_is_not_linked() -> None:
    html = (
        '<img src="cid:missing@x"><a href="cid:logo@x">link</a>'
        '<img src="https://tracker.test/p.gif"><p>cid:logo@x in text</p>'
    )
    out, shown = linked(html, {"logo@x": A})
    assert shown == set() and A not in out
    assert 'src="cid:missing@x"' in out
    assert 'data-remote-src="https://tracker.test/p.gif"' in out  # still needs consent
    assert "cid:logo@x in text" in out


def test_only_uuid_ids_are_written() -> None:
    out, shown = link_inline_images('<img src="cid:a">', {"a": '" onerror="alert(1)'})
    assert out == '<img src="cid:a">' and shown == set()


def test_no_parts_or_no_cid_is_the_same_html() -> None:
    html = sanitize_html("<p>hello <img src='cid:a'></p>")
    assert link_inline_images(html, {}) == (html, set())
    assert link_inline_images("<p>plain</p>", {"a": A}) == ("<p>plain</p>", set())


def test_first_part_with_a_content_id_wins() -> None:
    assert cid_map([(A, "<x@y>"), (B, "x@y"), (B, None), (B, "  ")]) == {"x@y": A}


def _corpus_files() -> list[Path]:
    if not CORPORA.exists():
        return []
    out = []
    for p in sorted(CORPORA.rglob("*")):
        if not p.is_file() or p.suffix in (".html", ".yml", ".tnef", ".json") or "mbox" in p.name:
            continue
        data = p.read_bytes()
        if re.search(rb'src=(3D)?"?cid:', data, re.I) and len(data) < 5_000_000:
            out.append(p)
    return out


@pytest.mark.skipif(not CORPORA.exists(), reason="corpora not on this machine")
def test_corpus_messages_with_inline_images_link_every_named_part() -> None:
    files = _corpus_files()
    linked_total = 0
    for path in files:
        read = read_message(path.read_bytes())
        ids = [(str(uuid.uuid4()), p.content_id) for p in read.parts]
        by_cid = cid_map(ids)
        html, shown = link_inline_images(read.html, by_cid)
        named = {c for c in re.findall(r'src="cid:([^"]*)"', read.html, re.I)}
        expected = {by_cid[c] for c in named if c in by_cid}
        assert shown == expected, path
        for att in shown:
            assert f'src="/api/attachments/{att}" data-attachment-id="{att}"' in html, path
        left = set(re.findall(r'src="cid:([^"]*)"', html, re.I))
        assert not left & set(by_cid), path
        linked_total += len(shown)
    assert len(files) >= 20 and linked_total >= 25
