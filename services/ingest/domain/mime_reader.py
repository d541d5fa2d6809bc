"""Read one raw RFC 5322 message (bytes) into a structured, display-safe result.

Pure domain code: no I/O, no database, no network. The ingest service hands us the bytes it
received; we return what the rest of ChatFLOW needs (ids for threading, addresses, a readable
text body, sanitized HTML, attachments, loop/bounce hints) and never crash on hostile or broken
input. The only exception we raise is :class:`Unreadable`, for input that is not a message at
all, so the caller can quarantine it with ``str(exc)`` as the reason.

Design notes (why, not what):

* The structure comes from the stdlib ``email`` parser with ``policy.default``. Header *values*
  are read from ``raw_items()`` and decoded here, because lazily parsed header objects can raise on
  broken input and because Python's codecs do not know several charset labels that real mail uses
  (``iso-8859-8-i``, ``ks_c_5601-1987`` text that is really CP949, ``gb2312`` text that is GBK).
* Addresses are parsed with ``email.headerregistry`` (RFC 5322 aware: groups, quoted names,
  encoded display names) but an encoded-word used as the *local part* is never decoded: RFC 2047
  forbids it, and decoding it lets an attacker smuggle ``@`` or ``>`` into the address
  ("Splitting the email atom", 2024). We keep the literal local part and record a defect.
* Single-line fields (subject, names, the ``headers`` dict) have every line-break character
  removed, so a caller that copies them into an outgoing header cannot be tricked into header
  injection (CVE-2024-6923).
* HTML is sanitized with nh3 (ammonia) using an allow-list; remote images are neutralised into a
  ``data-remote-src`` attribute so opening a ticket never pings a tracker.
* ``auto_submitted`` is True when any of these hold (the usual loop-prevention signals):
  ``Auto-Submitted`` present and not ``no``; ``Precedence`` is ``bulk``, ``junk``, ``list`` or
  ``auto_reply``; ``X-Autoreply``, ``X-Autorespond``, ``X-Autoreply-From`` or
  ``X-Mail-Autoreply`` present; ``X-Auto-Response-Suppress`` lists ``All`` or ``OOF`` (Exchange
  sets those on messages that must not trigger replies; ``DR``/``RN``/``NRN`` alone are just
  receipt suppression and are common on human mail, so they do not count). Bounces are reported
  separately in ``bounce``; callers that suppress auto-replies should check both.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import html as html_lib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy as email_policy
from email import utils as email_utils
from email.generator import BytesGenerator
from email.headerregistry import BaseHeader, HeaderRegistry
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser, BytesParser
from html.parser import HTMLParser
from io import BytesIO
from typing import Any, TypeVar, cast

import nh3

_T = TypeVar("_T")

__all__ = [
    "Addr",
    "Flags",
    "Part",
    "ReadMessage",
    "Unreadable",
    "decode_bytes",
    "decode_header_text",
    "html_to_text",
    "normalize_msgid_list",
    "parse_address_list",
    "parse_date",
    "read_message",
    "sanitize_html",
    "single_line",
    "unflow",
]

# Limits keep hostile input from costing unbounded time or memory.
MAX_DEPTH = 24  # MIME nesting we descend into; deeper parts are skipped (flagged)
MAX_PARTS = 1000  # leaf + container parts visited per message
MAX_ADDRESS_HEADER = 64 * 1024  # characters of one address header we parse
MAX_MSGIDS = 256  # ids kept from one References header (first + most recent)
MAX_MSGID_LEN = 998  # RFC 5322 line limit; longer "ids" are garbage
MAX_SUBJECT = 4096
MAX_HTML_CHARS = 2 * 1024 * 1024  # HTML fed to the sanitizer / text extractor
# Text shown to agents, carried by the event and the API; a longer body is cut there and kept
# whole as an attachment (message.txt), so nothing is lost and a conversation stays light.
MAX_TEXT_CHARS = 1024 * 1024
MAX_DEFECTS = 200


class _MemoHeaders(HeaderRegistry):
    """``policy.default``'s header factory, memoized (the reader's hot path, measured).

    The stock one builds a new header class with ``type()`` on every call, and the parser asks for
    a part's Content-Type five times; header objects are immutable ``str`` subclasses, so one
    parsed ``(name, value)`` can be shared. Only the MIME fields the parser re-reads are kept,
    short ones, a few dozen (a parsed 200-character field weighs about 100 KB).
    """

    MEMO_FIELDS = frozenset({"content-type", "content-disposition", "content-transfer-encoding"})
    MAX_VALUE = 256
    MAX_ENTRIES = 64

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[type, type] = {}
        self._parsed: dict[tuple[str, str], BaseHeader] = {}

    def __getitem__(self, name: str) -> Any:
        base = self.registry.get(name.lower(), self.default_class)
        cls = self._classes.get(base)
        if cls is None:
            cls = self._classes[base] = super().__getitem__(name)
        return cls

    def __call__(self, name: str, value: str) -> Any:
        if len(value) > self.MAX_VALUE or name.lower() not in self.MEMO_FIELDS:
            return self[name](name, value)
        key = (name, value)
        header = self._parsed.get(key)
        if header is None:
            if len(self._parsed) >= self.MAX_ENTRIES:
                self._parsed.clear()
            header = self._parsed[key] = self[name](name, value)
        return header


_POLICY = email_policy.default.clone(header_factory=_MemoHeaders())
_COMPAT = email_policy.compat32
# Serialise nested messages without re-folding their headers (keep the sender's bytes).
_GEN_POLICY = email_policy.default.clone(refold_source="none", linesep="\r\n")


class Unreadable(Exception):
    """The input cannot be read as a message at all; ``str(exc)`` is the quarantine reason."""


@dataclass
class Addr:
    """One mailbox: decoded display name and address (domain lower-cased, IDN as unicode)."""

    name: str
    address: str


@dataclass
class Part:
    """An attachment or inline part; ``data`` is the decoded payload."""

    filename: str
    content_type: str
    content_id: str | None
    inline: bool
    data: bytes


@dataclass
class Flags:
    """Facts about how the message was read that callers may want to act on."""

    generated_message_id: bool = False  # Message-ID missing/garbage; we made a deterministic one
    in_reply_to_junk: bool = False  # In-Reply-To held prose/comments/garbage (trust References)
    header_block_repaired: bool = False  # leading junk / unindented continuation lines fixed
    headers_only: bool = False  # body could not be parsed (nesting too deep); headers kept
    depth_limited: bool = False  # some MIME parts were below MAX_DEPTH / past MAX_PARTS
    html_truncated: bool = False  # HTML body longer than MAX_HTML_CHARS was cut
    text_truncated: bool = False  # text longer than MAX_TEXT_CHARS was cut (whole: message.txt)


@dataclass
class ReadMessage:
    """Everything ingest needs from one message; all strings are already decoded."""

    message_id: str
    in_reply_to: list[str]
    references: list[str]
    from_: Addr | None
    to: list[Addr]
    cc: list[Addr]
    reply_to: list[Addr]
    subject: str
    date: datetime | None
    text: str
    html: str
    parts: list[Part]
    auto_submitted: bool
    bounce: bool
    defects: list[str]
    headers: dict[str, str]
    flags: Flags = field(default_factory=Flags)


# --------------------------------------------------------------------------------------------
# Charsets
# --------------------------------------------------------------------------------------------

# Labels seen in mail that Python does not know, or knows as a too-narrow subset. Supersets are
# chosen so that mislabelled text (GBK bytes labelled gb2312, CP949 labelled euc-kr) decodes.
_CHARSET_ALIASES: dict[str, str] = {
    "iso-8859-8-i": "iso-8859-8",
    "iso-8859-8-e": "iso-8859-8",
    "iso_8859-8-i": "iso-8859-8",
    "iso-8859-6-i": "iso-8859-6",
    "iso-8859-6-e": "iso-8859-6",
    "logical": "iso-8859-8",
    "visual": "iso-8859-8",
    "ks_c_5601-1987": "cp949",
    "ks_c_5601-1989": "cp949",
    "ks_c_5601": "cp949",
    "ksc5601": "cp949",
    "ksc_5601": "cp949",
    "ks_c_5601_1987": "cp949",
    "euc-kr": "cp949",
    "euc_kr": "cp949",
    "x-windows-949": "cp949",
    "windows-949": "cp949",
    "uhc": "cp949",
    "gb2312": "gb18030",
    "gb_2312-80": "gb18030",
    "gb_2312": "gb18030",
    "csgb2312": "gb18030",
    "euc-cn": "gb18030",
    "x-euc-cn": "gb18030",
    "chinese": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "cp936": "gb18030",
    "windows-936": "gb18030",
    "big5": "cp950",
    "x-x-big5": "cp950",
    "big-5": "cp950",
    "cn-big5": "cp950",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "x-sjis": "cp932",
    "sjis": "cp932",
    "ms_kanji": "cp932",
    "csshiftjis": "cp932",
    "windows-31j": "cp932",
    "x-ms-cp932": "cp932",
    "x-euc-jp": "euc_jp",
    "unicode-1-1-utf-7": "utf-7",
    "x-unicode-2-0-utf-7": "utf-7",
    "utf8": "utf-8",
    "x-utf8": "utf-8",
    "x-unicode20utf8": "utf-8",
    "unicode-1-1-utf-8": "utf-8",
    "windows-874": "cp874",
    "x-windows-874": "cp874",
    "iso-8859-11": "cp874",
    "tis-620": "cp874",
    "x-user-defined": "cp1252",
    "iso-10646-ucs-2": "utf-16-be",
    "ucs-2": "utf-16-be",
    "latin-9": "iso-8859-15",
    "macintosh": "mac-roman",
    "x-mac-roman": "mac-roman",
    # WHATWG: these labels mean windows-1252 in practice (smart quotes, euro sign).
    "iso-8859-1": "cp1252",
    "iso8859-1": "cp1252",
    "iso_8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "l1": "cp1252",
    "iso-8859-9": "cp1254",
    "latin5": "cp1254",
}

# Labels that say nothing useful: decode as "undeclared" (utf-8, then cp1252).
_UNDECLARED = {
    "",
    "us-ascii",
    "ascii",
    "ansi_x3.4-1968",
    "us",
    "iso646-us",
    "x-unknown",
    "unknown",
    "unknown-8bit",
    "x-unknown-8bit",
    "default",
    "none",
    "8bit",
    "7bit",
}

# Python text codecs that must never be applied to untrusted mail.
_FORBIDDEN_CODECS = {
    "unicode-escape",
    "raw-unicode-escape",
    "punycode",
    "idna",
    "undefined",
    "mbcs",
    "oem",
    "unicode-internal",
}

# Single-byte families where valid multi-byte UTF-8 is far more likely a mislabel than real text.
_SINGLE_BYTE_PREFIXES = ("cp125", "iso8859", "iso-8859", "latin", "koi8", "mac-", "cp437", "cp85")

_ISO2022_JP_RE = re.compile(rb"\x1b(?:\$[@B]|\$\(D|\(I|\(J|\$\(O|\$\(Q)")
_ISO2022_KR_RE = re.compile(rb"\x1b\$\)C")
_META_CHARSET_RE = re.compile(
    rb"""<meta[^>]{0,200}?charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]{1,40})""", re.IGNORECASE
)

# cp1252 for 0x80-0x9F where defined; latin-1 (C1 controls) for the five undefined bytes.
_CP1252_C1 = {
    i: ord(bytes([i]).decode("cp1252"))
    for i in range(0x80, 0xA0)
    if i not in (0x81, 0x8D, 0x8F, 0x90, 0x9D)
}


def _lookup_codec(label: str | None) -> str | None:
    """Map a declared charset label to a safe Python text codec name, or None if unusable."""
    if not label:
        return None
    name = label.strip().strip("\"'").strip().lower()
    if "*" in name:  # RFC 2231 language suffix: utf-8*en
        name = name.split("*", 1)[0]
    if name.startswith("x-mac-"):
        name = name[2:]
    name = _CHARSET_ALIASES.get(name, name)
    if name in _UNDECLARED or len(name) > 40:
        return None
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError):
        return None
    if not getattr(info, "_is_text_encoding", True) or info.name in _FORBIDDEN_CODECS:
        return None
    return info.name


def _is_single_byte(codec: str) -> bool:
    return codec.startswith(_SINGLE_BYTE_PREFIXES)


def _cp1252_lenient(data: bytes) -> str:
    """Decode as windows-1252, keeping its five undefined bytes as latin-1: never fails."""
    return data.decode("latin-1").translate(_CP1252_C1)


def _try_decode(data: bytes, codec: str) -> str | None:
    try:
        return data.decode(codec)
    except (UnicodeDecodeError, LookupError, ValueError):
        return None


def _iso2022_candidates(data: bytes) -> list[str]:
    if _ISO2022_KR_RE.search(data):
        return ["iso2022_kr"]
    if _ISO2022_JP_RE.search(data):
        return ["iso2022_jp", "iso2022_jp_ext", "iso2022_jp_2", "iso2022_jp_3"]
    return []


def decode_bytes(
    data: bytes,
    charset: str | None,
    notes: list[str] | None = None,
    hints: tuple[str, ...] = (),
) -> str:
    """Decode text whatever its label says; never raises.

    Order: escape-sequence charsets (ISO-2022-JP/KR, often unlabelled), the declared charset
    (via aliases), UTF-8, any ``hints`` (e.g. other charsets the message declares), then
    windows-1252 with latin-1 for its holes. ``notes`` collects what went wrong, for defects.
    """
    if not data:
        return ""
    codec = _lookup_codec(charset)
    label = (charset or "").strip().lower()
    if charset and codec is None and label not in _UNDECLARED and notes is not None:
        notes.append(f"unknown-charset:{label[:40]}")
    if charset and label in _UNDECLARED and label and notes is not None and not data.isascii():
        notes.append(f"charset-mismatch:{label[:40]}")
    if data.isascii():
        if codec is not None and codec.startswith(("utf-16", "utf-32", "utf-7", "iso2022", "hz")):
            text = _try_decode(data, codec)
            if text is not None:
                return text
        if b"\x1b" in data:
            # 7-bit ISO-2022 text is often unlabelled or labelled us-ascii/utf-8/latin-1.
            for cand in _iso2022_candidates(data):
                text = _try_decode(data, cand)
                if text is not None:
                    if notes is not None and not label.startswith("iso-2022"):
                        notes.append(f"charset-detected:{cand}")
                    return text
        return data.decode("ascii")
    if codec is None:
        if data.startswith(codecs.BOM_UTF8):
            return data[3:].decode("utf-8", "replace")
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            text = _try_decode(data, "utf-16")
            if text is not None:
                return text
    else:
        text = _try_decode(data, codec)
        if text is not None:
            if _is_single_byte(codec):
                as_utf8 = _try_decode(data, "utf-8")
                if as_utf8 is not None:
                    if notes is not None:
                        notes.append(f"charset-mismatch:{label[:40]}->utf-8")
                    return as_utf8
            return text
        if notes is not None:
            notes.append(f"charset-mismatch:{label[:40]}")
    text = _try_decode(data, "utf-8")
    if text is not None:
        return text
    damaged = data.decode("utf-8", "replace")
    bad = damaged.count("\ufffd")
    good = sum(1 for ch in damaged if ord(ch) > 0x7F) - bad
    if good >= 4 * bad:
        # Real UTF-8 with a few broken sequences (truncation, a stray byte): keep it UTF-8.
        if notes is not None:
            notes.append("invalid-utf-8")
        return damaged
    for hint in hints:
        hcodec = _lookup_codec(hint)
        if hcodec and hcodec != codec and not _is_single_byte(hcodec):
            text = _try_decode(data, hcodec)
            if text is not None:
                return text
    if codec is not None and codec not in ("utf-8", "cp1252"):
        # Declared multi-byte charset with a few bad bytes: keep most of the text.
        return data.decode(codec, "replace")
    if notes is not None:
        notes.append("charset-fallback:cp1252")
    return _cp1252_lenient(data)


def _raw_to_bytes(value: str) -> bytes:
    """Undo BytesParser's ASCII+surrogateescape decoding of header/payload text."""
    return value.encode("utf-8", "surrogateescape")


def _has_surrogates(value: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in value)


def _mostly_utf8(data: bytes) -> str | None:
    """UTF-8 with a few broken bytes, decoded with U+FFFD for those; None when it is not.

    A header that is UTF-8 but for a stray byte must not be read as Latin-1 whole (every
    character of 日本 turned to mojibake, found by a trial). "Mostly" means at least twice as
    many bytes in valid multi-byte sequences as bytes that are not: Latin-1 or cp1252 text has
    almost none of the former (its accented letters are single bytes that UTF-8 refuses).
    """
    text = data.decode("utf-8", "replace")
    bad = text.count("\ufffd")
    good = sum(len(ch.encode("utf-8")) for ch in text if ord(ch) > 0x7F and ch != "\ufffd")
    return text if good >= 2 * bad > 0 else None


def _raw_text(value: str, hints: tuple[str, ...] = (), notes: list[str] | None = None) -> str:
    """Turn raw header text into real text: raw 8-bit bytes are decoded, not dropped."""
    if not _has_surrogates(value):
        return value
    data = _raw_to_bytes(value)
    text = _try_decode(data, "utf-8")
    if text is not None:
        return text
    mostly = _mostly_utf8(data)
    if mostly is not None:
        if notes is not None:
            notes.append("raw-8bit-header-invalid-utf8")
        return mostly
    multi = tuple(h for h in hints if not _is_single_byte(_lookup_codec(h) or "cp1252"))
    if notes is not None:
        notes.append("raw-8bit-header")
    return decode_bytes(data, None, notes, hints=multi)


# --------------------------------------------------------------------------------------------
# Header text (RFC 2047)
# --------------------------------------------------------------------------------------------

_EW_RE = re.compile(r"=\?([^?\s]{1,60})\?([bBqQ])\?([^?]*)\?=")
_FOLD_RE = re.compile(r"\r?\n(?=[ \t])")
# Every character str.splitlines() breaks on, plus NUL/C0 controls other than tab.
_LINEBREAKS_RE = re.compile("[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]+")
_CONTROL_RE = re.compile("[\x00-\x08\x0e-\x1b\x7f]")
_QHEX_RE = re.compile(rb"=([0-9A-Fa-f]{2})")


def _unfold(value: str) -> str:
    return _FOLD_RE.sub("", value)


def single_line(value: str) -> str:
    """Remove every line break and control character, so the value stays in one header."""
    value = _LINEBREAKS_RE.sub(" ", value)
    value = _CONTROL_RE.sub("", value)
    return value.replace("\t", " ")


def _q_decode(text: str) -> bytes:
    raw = _raw_to_bytes(text.replace("_", " "))
    return _QHEX_RE.sub(lambda m: bytes([int(m.group(1), 16)]), raw)


def _b_decode(text: str) -> bytes | None:
    clean = re.sub(r"[^A-Za-z0-9+/]", "", text)
    if len(clean) % 4 == 1:
        clean = clean[:-1]
    clean += "=" * (-len(clean) % 4)
    try:
        return base64.b64decode(clean)
    except (binascii.Error, ValueError):
        return None


def decode_header_text(
    value: str, hints: tuple[str, ...] = (), notes: list[str] | None = None
) -> str:
    """Decode an unstructured header value (RFC 2047), tolerant of real-world breakage.

    Whitespace between adjacent encoded-words is dropped and their bytes are joined before
    decoding, so words split across folded lines (even inside a multi-byte character) decode
    without stray spaces (cpython #128110). Malformed words are left as literal text.
    """
    value = _unfold(value)
    pieces: list[tuple[str | None, str | bytes]] = []  # (charset, bytes) or (None, text)
    pos = 0
    for m in _EW_RE.finditer(value):
        gap = value[pos : m.start()]
        prev_is_ew = bool(pieces) and pieces[-1][0] is not None
        if gap and not (prev_is_ew and gap.strip(" \t\r\n") == ""):
            pieces.append((None, gap))
        charset, enc, payload = m.group(1), m.group(2).upper(), m.group(3)
        decoded = _q_decode(payload) if enc == "Q" else _b_decode(payload)
        if decoded is None:
            pieces.append((None, m.group(0)))
            if notes is not None:
                notes.append("bad-encoded-word")
        else:
            cs = charset.split("*", 1)[0].lower()
            if pieces and pieces[-1][0] == cs:
                prev = pieces[-1][1]
                assert isinstance(prev, bytes)
                pieces[-1] = (cs, prev + decoded)
            else:
                pieces.append((cs, decoded))
        pos = m.end()
    tail = value[pos:]
    if tail:
        pieces.append((None, tail))
    out: list[str] = []
    for cs, chunk in pieces:
        if cs is None:
            assert isinstance(chunk, str)
            out.append(_raw_text(chunk, hints, notes))
        else:
            assert isinstance(chunk, bytes)
            out.append(decode_bytes(chunk, cs, notes, hints))
    return "".join(out)


def _clean_line(value: str) -> str:
    """Single-line, collapsed, trimmed display text (names, header dict values)."""
    return re.sub(r"[ \t]{2,}", " ", single_line(value)).strip(" \t")


# --------------------------------------------------------------------------------------------
# Message-IDs
# --------------------------------------------------------------------------------------------

_BARE_ID_RE = re.compile(r"[^\s<>()\",;@\[\]\\]+@[^\s<>()\",;@\[\]\\]+")


def _scan_msgids(value: str) -> tuple[list[str], bool]:
    """Return ids found in ``value`` and whether anything else (prose, comments) was there."""
    ids: list[str] = []
    junk = False
    bare: list[str] = []
    i, n = 0, len(value)
    word: list[str] = []
    next_gt = 0  # position of the next ">" at or after i (-1: none left)

    def flush_word() -> None:
        nonlocal junk
        if word:
            token = "".join(word)
            word.clear()
            if _BARE_ID_RE.fullmatch(token):
                bare.append(token)
            else:
                junk = True

    while i < n:
        ch = value[i]
        if ch == "(":  # comment, may nest
            flush_word()
            junk = True
            depth = 0
            while i < n:
                if value[i] == "\\":
                    i += 2
                    continue
                if value[i] == "(":
                    depth += 1
                elif value[i] == ")":
                    depth -= 1
                    if depth == 0:
                        break
                i += 1
            i += 1
        elif ch == '"':  # quoted prose
            flush_word()
            junk = True
            i += 1
            while i < n and value[i] != '"':
                i += 2 if value[i] == "\\" else 1
            i += 1
        elif ch == "<":
            flush_word()
            if next_gt != -1 and next_gt <= i:
                next_gt = value.find(">", i + 1)  # cached: keeps hostile "<<<<" input linear
            end = next_gt
            nxt = value.find("<", i + 1, end if end != -1 else n)
            if end == -1 or nxt != -1:
                junk = True
                i = nxt if nxt != -1 else n
                continue
            inner = value[i + 1 : end].strip()
            if inner and not any(c.isspace() for c in inner) and len(inner) <= MAX_MSGID_LEN:
                ids.append(f"<{inner}>")
            else:
                junk = True
            i = end + 1
        elif ch.isspace() or ch == ",":
            flush_word()
            i += 1
        else:
            word.append(ch)
            i += 1
    flush_word()
    if not ids and bare:
        ids = [f"<{b}>" for b in bare if len(b) <= MAX_MSGID_LEN]
    elif bare:
        junk = True
    return ids, junk


def _msgid_text(value: str) -> str:
    """One line of an id header; encoded words decoded first.

    Python's own email folder encodes an over-long id as an encoded word (``=?utf-8?q?=3C...``);
    the id inside is what the sender meant.
    """
    text = single_line(_unfold(value))
    if "=?" in text:
        text = single_line(decode_header_text(text))
    if _has_surrogates(text):
        # Raw 8-bit bytes (an IDN domain written in UTF-8, a Latin-1 letter): decoded the same
        # way whatever else the message declares, so every copy of the id reads the same.
        text = single_line(_raw_text(text))
    return text


def normalize_msgid_list(value: str) -> list[str]:
    """Extract message ids (with angle brackets) from a Message-ID/In-Reply-To/References value.

    Tolerates folding, comments, prose (``Your message of ... <id>``), trailing garbage and
    missing angle brackets (bare ``local@domain`` tokens when no bracketed id exists). Order is
    kept, duplicates are removed. Very long lists keep the first id (thread root) and the most
    recent ones, which is what threading needs.
    """
    if not value:
        return []
    ids, _junk = _scan_msgids(_msgid_text(value))
    seen: set[str] = set()
    out: list[str] = []
    for mid in ids:
        if mid not in seen:
            seen.add(mid)
            out.append(mid)
    if len(out) > MAX_MSGIDS:
        out = [out[0], *out[-(MAX_MSGIDS - 1) :]]
    return out


# --------------------------------------------------------------------------------------------
# Addresses
# --------------------------------------------------------------------------------------------

_EW_CHARSET_RE = re.compile(r"=\?([^?\s*]{1,60})(\*[^?\s]*)?\?([bBqQ])\?")
_EW_IN_LOCAL_RE = re.compile(r"\?=[^\s<>,;@\"]*@")


def _canonical_ew_charsets(value: str) -> str:
    """Rewrite encoded-word charset labels to names Python decodes correctly (only the label)."""

    def repl(m: re.Match[str]) -> str:
        codec = _lookup_codec(m.group(1)) or "utf-8"
        return f"=?{codec}?{m.group(3)}?"

    return _EW_CHARSET_RE.sub(repl, value)


def _norm_domain(domain: str) -> str:
    domain = domain.strip().lower()
    if "xn--" in domain and len(domain) <= 253 and domain.isascii():
        try:
            domain = domain.encode("ascii").decode("idna")
        except (UnicodeError, ValueError):
            pass
    return domain


def _make_addr(
    name: str, local: str, domain: str, hints: tuple[str, ...], notes: list[str]
) -> Addr | None:
    local = single_line(local).strip()
    if not local:
        return None
    address = f"{local}@{_norm_domain(single_line(domain))}" if domain else local
    if "=?" in name:
        name = decode_header_text(name, hints, notes)
    else:
        name = _raw_text(name, hints, notes)
    name = _clean_line(name)
    if len(name) >= 2 and name[0] == name[-1] and name[0] in "\"'":
        name = name[1:-1].strip()
    return Addr(name=name, address=address)


# The plain forms most mail uses, ``Name Words <local@domain>`` and ``local@domain`` (comma
# separated): read without headerregistry, which costs about 0.1 ms per address. Anything else
# (quotes, comments, dots or encoded words in a name, groups, literals) takes the full parser;
# ``test_simple_address_fast_path_agrees_with_headerregistry`` holds the two to the same result.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL = rf"{_ATOM}(?:\.{_ATOM})*"
_DOMAIN = r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_SIMPLE_ADDR_RE = re.compile(
    rf"(?:(?P<name>{_ATOM}(?: {_ATOM})*) )?<(?P<l1>{_LOCAL})@(?P<d1>{_DOMAIN})>"
    rf"|(?P<l2>{_LOCAL})@(?P<d2>{_DOMAIN})"
)


def _simple_addresses(value: str) -> list[tuple[str, str, str]] | None:
    """``(display name, local part, domain)`` of a list of plain addresses, else None."""
    if "=?" in value or not value.isascii():
        return None
    out: list[tuple[str, str, str]] = []
    for item in value.split(","):
        m = _SIMPLE_ADDR_RE.fullmatch(item.strip(" "))
        if m is None:
            return None
        if m["l1"] is not None:
            out.append((m["name"] or "", m["l1"], m["d1"]))
        else:
            out.append(("", m["l2"], m["d2"]))
    return out


def _defanged_word(m: re.Match[str]) -> str:
    """One encoded word as a quoted string of its text, controls as spaces."""
    try:
        text = decode_header_text(m.group(0))
    except Exception:  # a word that does not decode stays as it was
        return m.group(0)
    text = (
        _CONTROL_RE.sub(" ", _LINEBREAKS_RE.sub(" ", text))
        .replace("\\", "\\\\")
        .replace('"', '\\"')
    )
    return f'"{text}"'


def _parse_defanged(value: str, notes: list[str]) -> list[tuple[str, str, str]] | None:
    """headerregistry again, on the value with its encoded words turned into quoted text.

    It refuses a name that decodes to CR or LF (the fix of CVE-2024-6923), and the legacy
    parser, reading the encoded word as plain text, took an address written inside the name
    for the sender's (found by a trial). Quoted, the name is a name and the angle address wins.
    """
    if not _EW_RE.search(value):
        return None
    try:
        header = _POLICY.header_factory("to", _EW_RE.sub(_defanged_word, value))
        parsed = [(a.display_name, a.username, a.domain) for a in header.addresses]
    except Exception:  # still hostile: the legacy parser has its turn
        return None
    notes.append("address-encoded-words-defanged")
    return parsed


def parse_address_list(
    raw: str, hints: tuple[str, ...] = (), notes: list[str] | None = None
) -> list[Addr]:
    """Parse an address header value into mailboxes; never raises.

    headerregistry first (RFC 5322 groups, quoting, encoded names); its decoding of
    encoded-words inside the local part is undone by taking the literal local part from the
    raw value. The legacy parser is the fallback; both are guarded against recursion bombs.
    """
    notes = notes if notes is not None else []
    value = single_line(_unfold(raw)).strip()
    if not value:
        return []
    if len(value) > MAX_ADDRESS_HEADER:
        cut = value.rfind(",", 0, MAX_ADDRESS_HEADER)
        value = value[: cut if cut > 0 else MAX_ADDRESS_HEADER]
        notes.append("address-header-truncated")
    decoded_value = _raw_text(value, hints, notes) if _has_surrogates(value) else value
    ew_in_local = bool(_EW_IN_LOCAL_RE.search(decoded_value))
    out: list[Addr] = []
    parsed = _simple_addresses(decoded_value)
    if parsed is None:
        try:
            header = _POLICY.header_factory("to", _canonical_ew_charsets(decoded_value))
            parsed = [(a.display_name, a.username, a.domain) for a in header.addresses]
        except Exception:  # header parsing of hostile input can raise anything
            notes.append("address-parse-fallback")
            parsed = _parse_defanged(decoded_value, notes)
    if parsed is None or (any(not d for _n, _l, d in parsed) and "@" in decoded_value):
        # headerregistry gave up or lost a domain (e.g. "a@example.com." with a trailing dot):
        # let the lenient legacy parser try, and keep whichever found more real addresses.
        legacy: list[tuple[str, str, str]] = []
        try:
            for name, spec in email_utils.getaddresses([decoded_value]):
                local, _, domain = spec.rpartition("@") if "@" in spec else (spec, "", "")
                legacy.append((name, local, domain))
        except Exception:  # legacy parser recurses on ':' bombs
            notes.append("address-legacy-parse-failed")
        if parsed is None or sum(1 for x in legacy if x[2]) > sum(1 for x in parsed if x[2]):
            parsed = legacy
    if not parsed:
        return []
    lowered = decoded_value.lower()
    for name, local, domain in parsed:
        if ew_in_local and domain and local.lower() not in lowered:
            # headerregistry decoded an encoded-word in the local part: take the literal one.
            m = re.search(r"([^\s<>,;:\"]+)@" + re.escape(domain), decoded_value, re.IGNORECASE)
            if not m:
                notes.append("address-dropped-encoded-local-part")
                continue
            local = m.group(1)
            notes.append("encoded-word-in-local-part")
        if not name and domain:
            # "addr (Name)" form: RFC 5322 treats the comment as a comment; mail clients show it.
            literal = re.escape(f"{local}@{domain}")
            cm = re.search(literal + r"\s*\(([^()]{1,200})\)", decoded_value, re.IGNORECASE)
            if cm:
                name = cm.group(1)
        addr = _make_addr(name, local, domain, hints, notes)
        if addr is not None:
            out.append(addr)
    return out


# --------------------------------------------------------------------------------------------
# Dates
# --------------------------------------------------------------------------------------------


def parse_date(raw: str | None) -> datetime | None:
    """Parse an RFC 5322 date to an aware datetime; None for missing/garbage/implausible."""
    if not raw:
        return None
    value = single_line(_unfold(raw)).strip()
    if not value or len(value) > 200:
        return None
    try:
        dt = email_utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        dt = None
    if dt is None:
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    if not 1970 <= dt.year <= 2200:
        return None
    return dt


# --------------------------------------------------------------------------------------------
# Raw header access
# --------------------------------------------------------------------------------------------


class _RawHeaders(list[tuple[str, str]]):
    """A part's ``raw_items()``, in order, indexed by lower-cased name on first lookup: reading
    one message asks for some thirty names, and a scan of every field per name was an eighth of
    the reader's time."""

    _index: dict[str, list[str]] | None = None

    def values_of(self, name: str) -> list[str]:
        if self._index is None:
            index: dict[str, list[str]] = {}
            for k, v in self:
                index.setdefault(k.strip().lower(), []).append(v)
            self._index = index
        return list(self._index.get(name.lower(), ()))


def _raw_items(msg: Message) -> _RawHeaders:
    try:
        items = msg.raw_items()
        return _RawHeaders((str(k), v if isinstance(v, str) else str(v)) for k, v in items)
    except Exception:  # defensive: never let header storage crash us
        return _RawHeaders()


def _raw_all(items: _RawHeaders, name: str) -> list[str]:
    return items.values_of(name)


def _raw_first(items: _RawHeaders, name: str) -> str | None:
    values = items.values_of(name)
    return values[0] if values else None


@dataclass
class _PartInfo:
    """Content-Type/Disposition facts about one part, read tolerantly from raw headers."""

    ctype: str
    params: dict[str, str]
    disposition: str | None
    filename: str | None
    cte: str
    content_id: str | None


_Param = str | tuple[str, str, str]


def _legacy_params(lm: Message, header: str) -> list[tuple[str, _Param]]:
    """``header``'s parameters as ``get_param`` reads them, parsed once for all the names asked
    (each ``get_param`` parses the whole field again)."""
    try:
        params = lm.get_params(None, header)
    except Exception:  # legacy param parsing of garbage
        return []
    out: list[tuple[str, _Param]] = []
    for key, value in params or ():
        if isinstance(value, tuple):
            value = (str(value[0] or ""), str(value[1] or ""), str(value[2] or ""))
        out.append((str(key).lower(), value))
    return out


def _legacy_param(params: list[tuple[str, _Param]], name: str) -> _Param | None:
    """The first parameter called ``name`` (case-insensitive), as ``get_param`` returns it."""
    for key, value in params:
        if key == name:
            return value
    return None


def _param_text(
    value: str | tuple[str, str, str] | None, hints: tuple[str, ...], notes: list[str]
) -> str | None:
    """Decode a parameter value: RFC 2231 (charset'lang'pct), raw 8-bit or RFC 2047 in quotes."""
    if value is None:
        return None
    if isinstance(value, tuple):
        charset, _lang, text = value
        try:
            data = text.encode("raw-unicode-escape")
        except UnicodeError:
            data = _raw_to_bytes(text)
        return decode_bytes(data, charset or None, notes, hints)
    if "=?" in value:
        return decode_header_text(value, hints, notes)
    return _raw_text(value, hints, notes)


def _part_info(
    part: Message, hints: tuple[str, ...], notes: list[str], in_multipart: bool = False
) -> _PartInfo:
    items = _raw_items(part)
    raw_ct = _raw_first(items, "content-type")
    raw_cd = _raw_first(items, "content-disposition")
    lm = Message(policy=_COMPAT)
    if raw_ct is not None:
        lm["Content-Type"] = single_line(_unfold(raw_ct))
    if raw_cd is not None:
        lm["Content-Disposition"] = single_line(_unfold(raw_cd))
    try:
        default = part.get_default_type()
    except Exception:
        default = "text/plain"
    ctype = default
    if raw_ct is None and default == "text/plain" and in_multipart:
        notes.append("missing-content-type")
    if raw_ct is not None:
        try:
            ctype = lm.get_content_type()
        except Exception:
            ctype = "text/plain"
        declared = single_line(_unfold(raw_ct)).split(";", 1)[0].strip().lower()
        if declared.replace(" ", "") != ctype:
            notes.append("invalid-content-type")
    ct_params = _legacy_params(lm, "content-type") if raw_ct is not None else []
    params: dict[str, str] = {}
    if raw_ct is not None:
        for key in ("charset", "format", "delsp", "report-type"):
            val = _legacy_param(ct_params, key)
            text = _param_text(val, hints, notes)
            if text is not None:
                params[key] = single_line(text).strip()
    disposition: str | None = None
    if raw_cd is not None:
        try:
            disposition = lm.get_content_disposition()
        except Exception:
            disposition = None
    fname = None
    if raw_cd is not None:
        fname = _legacy_param(_legacy_params(lm, "content-disposition"), "filename")
    if fname is None:
        fname = _legacy_param(ct_params, "name")
    filename = _clean_filename(_param_text(fname, hints, notes))
    cte = single_line(_raw_first(items, "content-transfer-encoding") or "").strip().lower()
    if cte not in _KNOWN_CTES:
        notes.append(f"unknown-transfer-encoding:{cte[:40]}")
    raw_cid = _raw_first(items, "content-id")
    content_id = None
    if raw_cid is not None:
        content_id = single_line(_unfold(raw_cid)).strip().strip("<>").strip() or None
    return _PartInfo(ctype, params, disposition, filename, cte, content_id)


_KNOWN_CTES = {
    "",
    "7bit",
    "8bit",
    "binary",
    "base64",
    "quoted-printable",
    "x-uuencode",
    "uuencode",
    "x-uue",
    "uue",
}

_FILENAME_BAD_RE = re.compile(r"[\x00-\x1f\x7f]")


def _clean_filename(name: str | None) -> str | None:
    """Single-line, path-free, bounded file name (names end up on disk and in headers)."""
    if name is None:
        return None
    name = _FILENAME_BAD_RE.sub("", single_line(name))
    name = re.split(r"[\\/]", name)[-1].strip()
    if name in ("", ".", ".."):
        return None
    if len(name) > 200:
        stem, dot, ext = name.rpartition(".")
        name = (stem[: 200 - len(ext) - 1] + "." + ext) if dot and len(ext) <= 16 else name[:200]
    return name


_EXT_BY_TYPE = {
    "text/plain": ".txt",
    "text/html": ".html",
    "text/calendar": ".ics",
    "text/csv": ".csv",
    "text/rfc822-headers": ".txt",
    "text/x-vcard": ".vcf",
    "text/vcard": ".vcf",
    "message/rfc822": ".eml",
    "message/global": ".eml",
    "message/delivery-status": ".txt",
    "message/global-delivery-status": ".txt",
    "message/disposition-notification": ".txt",
    "message/feedback-report": ".txt",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/gif": ".gif",
    "image/webp": ".webp",
    "application/pdf": ".pdf",
    "application/pgp-signature": ".asc",
    "application/pgp-encrypted": ".asc",
    "application/pkcs7-signature": ".p7s",
    "application/ms-tnef": ".dat",
    "application/zip": ".zip",
}


# --------------------------------------------------------------------------------------------
# Plain text helpers
# --------------------------------------------------------------------------------------------


def unflow(text: str, delsp: bool = False) -> str:
    """Join RFC 3676 format=flowed lines (soft breaks end in a space; quotes kept apart)."""
    out: list[str] = []
    para: str | None = None
    pdepth = 0

    def render(depth: int, body: str) -> str:
        return (">" * depth + " " + body) if depth else body

    for line in text.split("\n"):
        depth = len(line) - len(line.lstrip(">"))
        content = line[depth:]
        if content.startswith(" "):
            content = content[1:]  # space-stuffing
        sig = content == "-- "
        if para is not None and depth == pdepth and not sig:
            para += content
        else:
            if para is not None:
                out.append(render(pdepth, para))
            para, pdepth = content, depth
        flowed = content.endswith(" ") and not sig
        if flowed:
            if delsp:
                para = para[:-1]
        else:
            out.append(render(pdepth, para))
            para = None
    if para is not None:
        out.append(render(pdepth, para))
    return "\n".join(out)


def _normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")


def _text_to_html(text: str) -> str:
    return "<div>" + html_lib.escape(text).replace("\n", "<br>\n") + "</div>"


# --------------------------------------------------------------------------------------------
# HTML -> text
# --------------------------------------------------------------------------------------------

_BLOCK_TAGS = {
    "address",
    "article",
    "aside",
    "blockquote",
    "center",
    "dd",
    "details",
    "div",
    "dl",
    "dt",
    "fieldset",
    "figcaption",
    "figure",
    "footer",
    "form",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "header",
    "hr",
    "li",
    "main",
    "nav",
    "ol",
    "p",
    "pre",
    "section",
    "summary",
    "table",
    "tbody",
    "tfoot",
    "thead",
    "tr",
    "ul",
}
_PARA_TAGS = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "table", "pre", "ul", "ol"}
_SKIP_TAGS = {
    "script",
    "style",
    "head",
    "title",
    "template",
    "noscript",
    "svg",
    "math",
    "object",
    "iframe",
    "select",
}


class _TextExtractor(HTMLParser):
    """Collect readable text from HTML, keeping line and paragraph breaks.

    Block boundaries request a number of pending newlines (the maximum wins, so nested blocks
    do not pile up blank lines); ``<br>`` adds one. They are written before the next text.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip: dict[str, int] = {}
        self.pre = 0
        self.pending = 0

    def _skipping(self) -> bool:
        return any(self.skip.values())

    def _block(self, n: int) -> None:
        self.pending = max(self.pending, n)

    def _br(self) -> None:
        self.pending += 1

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body":
            self.skip.pop("head", None)
            self.skip.pop("title", None)
        if tag in _SKIP_TAGS:
            self.skip[tag] = self.skip.get(tag, 0) + 1
            return
        if tag == "br":
            self._br()
        elif tag in ("td", "th"):
            if self.out and not self.pending and not self.out[-1].endswith((" ", "\n")):
                self.out.append(" ")
        elif tag in _BLOCK_TAGS:
            self._block(2 if tag in _PARA_TAGS else 1)
        if tag == "pre":
            self.pre += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "br":
            self._br()
        elif tag == "hr" or tag in _BLOCK_TAGS:
            self._block(1)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            if self.skip.get(tag):
                self.skip[tag] -= 1
            return
        if tag in _BLOCK_TAGS:
            self._block(2 if tag in _PARA_TAGS else 1)
        if tag == "pre" and self.pre:
            self.pre -= 1

    def handle_data(self, data: str) -> None:
        if self._skipping():
            return
        if self.pre:
            text = data.replace("\r\n", "\n").replace(" ", "\x00")
        else:
            text = re.sub(r"[ \t\r\n\f]+", " ", data)
            if not text.strip(" "):
                if self.out and not self.pending and not self.out[-1].endswith((" ", "\n")):
                    self.out.append(" ")
                return
        if self.pending:
            if self.out:
                self.out.append("\n" * self.pending)
            self.pending = 0
        self.out.append(text)


_TAG_TOKEN_RE = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9:-]{0,40})")
_VOID_TAGS = {
    "area",
    "base",
    "br",
    "col",
    "embed",
    "hr",
    "img",
    "input",
    "link",
    "meta",
    "param",
    "source",
    "track",
    "wbr",
}
MAX_HTML_NESTING = 200


_IMPLIED_CLOSE = {
    "p": {"p"},
    "li": {"li"},
    "dt": {"dt", "dd"},
    "dd": {"dt", "dd"},
    "option": {"option"},
    "tr": {"tr", "td", "th"},
    "td": {"td", "th"},
    "th": {"td", "th"},
}


def _nesting_plan(html: str, limit: int) -> tuple[int, list[tuple[int, int]]]:
    """Simulate tag nesting cheaply; return the peak depth and the spans of tags over ``limit``.

    A stack of open names models what makes html5ever slow (a deep stack of open elements).
    End tags close only an element found near the top of the stack (a stray ``</p>`` closes
    nothing, as in a browser), and ``<p>``/``<li>``/``<td>``... close their open sibling.
    """
    stack: list[str] = []
    peak = 0
    drop: list[tuple[int, int]] = []
    for m in _TAG_TOKEN_RE.finditer(html):
        name = m.group(2).lower()
        if name in _VOID_TAGS:
            continue
        if m.group(1):
            for k in range(len(stack) - 1, max(-1, len(stack) - 17), -1):
                if stack[k] == name:
                    del stack[k:]
                    break
            continue
        implied = _IMPLIED_CLOSE.get(name)
        while implied and stack and stack[-1] in implied:
            stack.pop()
        stack.append(name)
        peak = max(peak, len(stack))
        if len(stack) > limit:
            end = html.find(">", m.end())
            drop.append((m.start(), len(html) if end == -1 else end + 1))
    return peak, drop


def _limit_nesting(html: str, limit: int = MAX_HTML_NESTING) -> str:
    """Drop opening tags nested deeper than ``limit`` (their text stays).

    html5ever (inside nh3) is quadratic in the depth of its stack of open elements: 50,000
    nested ``<div>`` take seconds. This linear pre-pass bounds that. Every ``<name`` counts as
    an opening tag (in HTML ``<div/>`` opens a div too) and a dropped tag is removed up to the
    next ``>``. Its view of the markup is approximate; the result still goes through nh3.
    """
    peak, drop = _nesting_plan(html, limit)
    if peak <= limit:
        return html
    out: list[str] = []
    pos = 0
    for start, end in drop:
        if start < pos:
            continue
        out.append(html[pos:start])
        pos = end
    out.append(html[pos:])
    return "".join(out)


def html_to_text(html: str) -> str:
    """Readable text from HTML: tags stripped, script/style dropped, paragraph breaks kept.

    The HTML is first normalised by nh3 (linear time, Rust) down to the structural tags we
    need; stdlib html.parser is quadratic on some hostile input (unclosed ``<!--`` or ``<a``
    runs), but not on nh3's well-formed output.
    """
    if not html:
        return ""
    try:
        normalised = _TEXT_CLEANER.clean(_limit_nesting(html[:MAX_HTML_CHARS].replace("\x00", "")))
    except Exception:
        return ""
    parser = _TextExtractor()
    try:
        parser.feed(normalised)
        parser.close()
        raw = "".join(parser.out)
    except Exception:  # html.parser can assert on odd declarations
        raw = html_lib.unescape(re.sub(r"<[^>]*>", " ", normalised))
    raw = raw.replace("\xa0", " ")
    lines = [ln.strip(" ").replace("\x00", " ") for ln in raw.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


_TEXT_CLEANER = nh3.Cleaner(
    tags=_BLOCK_TAGS | {"br", "td", "th", "pre"},
    clean_content_tags=_SKIP_TAGS - {"head"}
    | {"frame", "frameset", "embed", "applet", "xmp", "noembed", "noframes"},
    attributes={},
    strip_comments=True,
    link_rel=None,
)


# --------------------------------------------------------------------------------------------
# HTML sanitizing
# --------------------------------------------------------------------------------------------

_ALLOWED_TAGS = {
    "a",
    "abbr",
    "acronym",
    "address",
    "article",
    "aside",
    "b",
    "bdi",
    "bdo",
    "big",
    "blockquote",
    "br",
    "caption",
    "center",
    "cite",
    "code",
    "col",
    "colgroup",
    "dd",
    "del",
    "details",
    "dfn",
    "div",
    "dl",
    "dt",
    "em",
    "figcaption",
    "figure",
    "font",
    "footer",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "header",
    "hr",
    "i",
    "img",
    "ins",
    "kbd",
    "li",
    "main",
    "mark",
    "nav",
    "ol",
    "p",
    "pre",
    "q",
    "s",
    "samp",
    "section",
    "small",
    "span",
    "strike",
    "strong",
    "sub",
    "summary",
    "sup",
    "table",
    "tbody",
    "td",
    "tfoot",
    "th",
    "thead",
    "time",
    "tr",
    "tt",
    "u",
    "ul",
    "var",
    "wbr",
}
# Removed together with their content: active or invisible content, namespace-confusion hosts.
_CLEAN_CONTENT_TAGS = {
    "script",
    "style",
    "title",
    "template",
    "noscript",
    "iframe",
    "frame",
    "frameset",
    "object",
    "embed",
    "applet",
    "svg",
    "math",
    "xmp",
    "noembed",
    "noframes",
    "select",
}
_GENERIC_ATTRS = {
    "style",
    "title",
    "dir",
    "lang",
    "align",
    "valign",
    "width",
    "height",
    "bgcolor",
    "color",
}
_ALLOWED_ATTRS: dict[str, set[str]] = {
    "*": _GENERIC_ATTRS,
    "a": {"href"},
    "img": {"src", "alt", "border", "hspace", "vspace"},
    "font": {"face", "size"},
    "table": {"border", "cellpadding", "cellspacing", "summary"},
    "td": {"colspan", "rowspan", "nowrap", "abbr", "scope"},
    "th": {"colspan", "rowspan", "nowrap", "abbr", "scope"},
    "col": {"span"},
    "colgroup": {"span"},
    "ol": {"start", "type", "reversed"},
    "ul": {"type"},
    "li": {"value", "type"},
    "time": {"datetime"},
    "del": {"datetime"},
    "ins": {"datetime"},
    "bdo": {"dir"},
}
_STYLE_PROPS = {
    "color",
    "background-color",
    "font",
    "font-family",
    "font-size",
    "font-style",
    "font-weight",
    "font-variant",
    "text-align",
    "text-decoration",
    "text-indent",
    "text-transform",
    "line-height",
    "letter-spacing",
    "word-spacing",
    "white-space",
    "vertical-align",
    "direction",
    "unicode-bidi",
    "margin",
    "margin-top",
    "margin-right",
    "margin-bottom",
    "margin-left",
    "padding",
    "padding-top",
    "padding-right",
    "padding-bottom",
    "padding-left",
    "border",
    "border-top",
    "border-right",
    "border-bottom",
    "border-left",
    "border-color",
    "border-style",
    "border-width",
    "border-collapse",
    "border-spacing",
    "border-radius",
    "width",
    "min-width",
    "max-width",
    "height",
    "min-height",
    "max-height",
    "list-style-type",
    "table-layout",
    "display",
    "word-break",
    "word-wrap",
    "overflow-wrap",
}
_BAD_CSS_RE = re.compile(
    r"url\s*\(|expression\s*\(|image-set\s*\(|image\s*\(|element\s*\(|paint\s*\(|"
    r"javascript\s*:|vbscript\s*:|@import|behavior|-moz-binding|\\",
    re.IGNORECASE,
)
_SAFE_DATA_IMG_RE = re.compile(r"data:image/(?:png|gif|jpe?g|webp|bmp);base64,", re.IGNORECASE)
_IMG_TAG_RE = re.compile(r"<img\b[^>]*>", re.IGNORECASE)
_REMOTE_SRC_RE = re.compile(r'(\s)src="((?:https?:)?//[^"]*)"', re.IGNORECASE)
_SUSPICIOUS_TEXT_ATTR_RE = re.compile(r"[<>]|javascript\s*:|vbscript\s*:", re.IGNORECASE)
_STYLE_ATTR_RE = re.compile(r'\sstyle="([^"]*)"', re.IGNORECASE)


def _clean_style(value: str) -> str | None:
    """Keep plain declarations; drop anything that can load or run (url(), expression())."""
    value = re.sub(r"/\*.*?\*/", "", value, flags=re.DOTALL)
    if "\\" in value or "/*" in value:
        return None
    kept: list[str] = []
    for decl in value.split(";"):
        prop, sep, val = decl.partition(":")
        prop = prop.strip().lower()
        if not sep or not re.fullmatch(r"[a-z][a-z-]{0,40}", prop):
            continue
        if prop not in _STYLE_PROPS or _BAD_CSS_RE.search(val):
            continue
        kept.append(f"{prop}: {val.strip()}")
    return "; ".join(kept) or None


def _attribute_filter(tag: str, attr: str, value: str) -> str | None:
    """Per-attribute policy on top of nh3's allow-lists (runs after its URL-scheme check)."""
    if attr == "style":
        return _clean_style(value)
    low = value.strip().lower()
    if attr == "href":
        return None if low.startswith(("data:", "cid:")) else value
    if tag == "img" and attr == "src":
        if low.startswith(("cid:", "http:", "https:", "//")):
            return value.strip()
        if _SAFE_DATA_IMG_RE.match(low):
            return value.strip()
        return None
    if _SUSPICIOUS_TEXT_ATTR_RE.search(value):
        # Markup or script URLs inside title/alt only serve mXSS or phishing tricks.
        return None
    return value


_CLEANER = nh3.Cleaner(
    tags=_ALLOWED_TAGS,
    clean_content_tags=_CLEAN_CONTENT_TAGS,
    attributes=_ALLOWED_ATTRS,
    attribute_filter=_attribute_filter,
    strip_comments=True,
    link_rel="noopener noreferrer nofollow",
    url_schemes={"http", "https", "mailto", "tel", "cid", "data"},
    filter_style_properties=_STYLE_PROPS,
    url_relative="deny",
)


def _neutralise_img(match: re.Match[str]) -> str:
    return _REMOTE_SRC_RE.sub(r'\1data-remote-src="\2"', match.group(0))


def _final_style_check(match: re.Match[str]) -> str:
    return "" if _BAD_CSS_RE.search(html_lib.unescape(match.group(1))) else match.group(0)


def sanitize_html(html: str) -> str:
    """Make untrusted email HTML safe to show inside the agent UI.

    nh3 allow-list (no script/style/iframe/form/svg/base/meta/link, no on* attributes, only
    http(s)/mailto/tel links, relative URLs dropped), CSS filtered, remote images turned into
    ``data-remote-src`` (nothing loads until the caller opts in), ``cid:`` sources kept so the
    caller can link them to inline parts.
    """
    if not html:
        return ""
    html = _limit_nesting(html[:MAX_HTML_CHARS].replace("\x00", ""))
    try:
        cleaned = _CLEANER.clean(html)
    except Exception:  # never hand back unsanitized HTML
        return html_lib.escape(html_to_text(html))
    cleaned = _IMG_TAG_RE.sub(_neutralise_img, cleaned)
    return _STYLE_ATTR_RE.sub(_final_style_check, cleaned)


# --------------------------------------------------------------------------------------------
# MIME walking
# --------------------------------------------------------------------------------------------

# Alternatives that duplicate the chosen text/plain + text/html bodies (not attachments).
_REDUNDANT_ALTERNATIVES = {
    "text/watch-html",
    "text/x-watch-html",
    "text/x-amp-html",
    "text/enriched",
    "text/richtext",
}


@dataclass
class _Seg:
    """One body segment: its plain text and/or its raw (unsanitized) HTML."""

    plain: str | None = None
    html: str | None = None
    fallback: bool = False  # inline text attachment: body only if nothing else is

    def as_text(self) -> str:
        if self.plain is not None and (self.plain.strip() or self.html is None):
            return self.plain
        return html_to_text(self.html or "")


@dataclass
class _Ctx:
    hints: tuple[str, ...]
    notes: list[str] = field(default_factory=list)
    parts: list[Part] = field(default_factory=list)
    visited: list[Message] = field(default_factory=list)
    bounce: bool = False
    depth_limited: bool = False
    count: int = 0


_UU_CTES = {"x-uuencode", "uuencode", "x-uue", "uue"}


def _uudecode(data: bytes) -> bytes:
    """Decode uuencoded data, tolerating a missing ``begin``/``end`` frame (Python is strict)."""
    out: list[bytes] = []
    lines = data.splitlines()
    if any(ln.startswith(b"begin ") for ln in lines):
        lines = lines[next(i for i, ln in enumerate(lines) if ln.startswith(b"begin ")) + 1 :]
    for line in lines:
        if line.strip() in (b"end", b"`", b""):
            if line.strip() == b"end":
                break
            continue
        try:
            out.append(binascii.a2b_uu(line))
        except binascii.Error:
            nbytes = (((line[0] - 32) & 63) * 4 + 5) // 3  # same recovery as the uu module
            try:
                out.append(binascii.a2b_uu(line[:nbytes]))
            except binascii.Error:
                continue
    return b"".join(out)


def _payload_bytes(part: Message, info: _PartInfo, ctx: _Ctx) -> bytes:
    if info.cte in _UU_CTES:
        try:
            raw_uu = part.get_payload()
        except Exception:
            raw_uu = None
        if isinstance(raw_uu, str):
            return _uudecode(_raw_to_bytes(raw_uu))
    try:
        data = part.get_payload(decode=True)
    except Exception as exc:  # CTE header parse / decoder errors
        ctx.notes.append(f"payload-decode-error:{type(exc).__name__}")
        data = None
    if isinstance(data, bytes | bytearray):
        return bytes(data)
    try:
        raw = part.get_payload()
    except Exception:
        return b""
    if isinstance(raw, str):
        data = _raw_to_bytes(raw)
        if info.cte == "base64":
            return _b_decode(data.decode("ascii", "ignore")) or b""
        return data
    return b""


def _serialise_body(part: Message, ctype: str, ctx: _Ctx) -> bytes:
    """Bytes of a message/* part's body (e.g. the whole attached message), headers excluded."""
    try:
        payload = part.get_payload()
        if (
            isinstance(payload, list)
            and len(payload) == 1
            and ctype in ("message/rfc822", "message/global")
        ):
            buf = BytesIO()
            inner = cast(EmailMessage, payload[0])
            BytesGenerator(buf, mangle_from_=False, policy=_GEN_POLICY).flatten(inner)
            return buf.getvalue()
        buf = BytesIO()
        BytesGenerator(buf, mangle_from_=False, policy=_GEN_POLICY).flatten(
            cast(EmailMessage, part)
        )
        out = buf.getvalue()
        if out.startswith(b"\r\n"):
            return out[2:]
        _head, sep, body = out.partition(b"\r\n\r\n")
        return body if sep else out
    except Exception as exc:  # generator on broken trees / deep recursion
        ctx.notes.append(f"serialise-error:{type(exc).__name__}")
        try:
            raw = part.get_payload()
            return _raw_to_bytes(raw) if isinstance(raw, str) else b""
        except Exception:
            return b""


def _inner_subject(part: Message, ctx: _Ctx) -> str:
    try:
        payload = part.get_payload()
    except Exception:
        return ""
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        raw = _raw_first(_raw_items(payload[0]), "subject")
        if raw:
            return _clean_line(decode_header_text(raw, ctx.hints, ctx.notes))
    return ""


def _visit_nested(part: Message, ctx: _Ctx, limit: int = 200) -> None:
    """Remember the nodes of an attached message so its parser defects are reported too."""
    stack: list[Message] = [part]
    while stack and limit > 0:
        node = stack.pop()
        limit -= 1
        if node is not part:
            ctx.visited.append(node)
        try:
            payload = node.get_payload() if node.is_multipart() else None
        except Exception:
            payload = None
        if isinstance(payload, list):
            stack.extend(p for p in payload if isinstance(p, Message))


def _add_part(part: Message, info: _PartInfo, ctx: _Ctx, is_container: bool) -> None:
    if is_container:
        _visit_nested(part, ctx)
        data = _serialise_body(part, info.ctype, ctx)
    else:
        data = _payload_bytes(part, info, ctx)
    ctype = info.ctype
    filename = info.filename
    if filename is None and ctype in ("message/rfc822", "message/global"):
        subject = re.sub(r'[\\/:*?"<>|]', "_", _inner_subject(part, ctx))
        filename = _clean_filename(f"{subject[:150]}.eml") if subject.strip(" ._") else None
        filename = filename or "message.eml"
    if filename is None:
        filename = f"part-{len(ctx.parts) + 1}{_EXT_BY_TYPE.get(ctype, '.bin')}"
    if info.disposition == "inline":
        inline = True
    elif info.disposition == "attachment":
        inline = False
    else:
        inline = info.content_id is not None
    ctx.parts.append(
        Part(
            filename=filename,
            content_type=ctype,
            content_id=info.content_id,
            inline=inline,
            data=data,
        )
    )


def _text_of(part: Message, info: _PartInfo, ctx: _Ctx) -> str:
    data = _payload_bytes(part, info, ctx)
    charset = info.params.get("charset")
    hints = ctx.hints
    if info.ctype == "text/html" and (_lookup_codec(charset) is None):
        meta = _META_CHARSET_RE.search(data[:4096])
        if meta:
            charset = meta.group(1).decode("ascii", "ignore")
    text = _normalize_newlines(decode_bytes(data, charset, ctx.notes, hints))
    if info.ctype == "text/plain" and info.params.get("format", "").lower() == "flowed":
        text = unflow(text, info.params.get("delsp", "").lower() == "yes")
    return text


def _join(segs: list[_Seg], attr: str) -> str | None:
    values = [getattr(s, attr) for s in segs if getattr(s, attr) is not None]
    if not values:
        return None
    return "".join(values) if attr == "html" else _join_text(values)


def _join_text(values: list[str]) -> str:
    out = ""
    for v in values:
        if out and not out.endswith("\n"):
            out += "\n"
        out += v
    return out


def _collect(part: Message, ctx: _Ctx, depth: int, in_alternative: bool = False) -> list[_Seg]:
    """Walk the MIME tree (bounded), returning body segments and filling ``ctx.parts``."""
    ctx.count += 1
    if depth > MAX_DEPTH or ctx.count > MAX_PARTS:
        if not ctx.depth_limited:
            ctx.notes.append("mime-limit-reached")
        ctx.depth_limited = True
        return []
    ctx.visited.append(part)
    info = _part_info(part, ctx.hints, ctx.notes, in_multipart=depth > 0)
    ctype = info.ctype
    try:
        container = part.is_multipart()
        children = part.get_payload() if container else []
    except Exception:
        container, children = False, []
    if ctype in ("message/delivery-status", "message/global-delivery-status"):
        ctx.bounce = True
    if ctype.startswith("multipart/") and container and isinstance(children, list):
        if (
            ctype == "multipart/report"
            and info.params.get("report-type", "").lower() == "delivery-status"
        ):
            ctx.bounce = True
        if ctype == "multipart/alternative":
            plain: str | None = None
            html: str | None = None
            for child in children:
                if not isinstance(child, Message):
                    continue
                segs = _collect(child, ctx, depth + 1, in_alternative=True)
                cp, ch = _join(segs, "plain"), _join(segs, "html")
                plain = cp if cp is not None and (cp.strip() or plain is None) else plain
                html = ch if ch is not None else html
            return [_Seg(plain, html)] if plain is not None or html is not None else []
        segs_all: list[_Seg] = []
        for child in children:
            if isinstance(child, Message):
                segs_all.extend(_collect(child, ctx, depth + 1))
        return segs_all
    if container:  # message/rfc822, message/delivery-status ...: one part, not walked into
        _add_part(part, info, ctx, container)
        return []
    is_body_type = ctype in ("text/plain", "text/html") or (
        ctype.startswith("multipart/") and depth == 0
    )
    if ctype.startswith("multipart/"):
        ctx.notes.append("multipart-without-parts")
        ctype = info.ctype = "text/plain"
    if is_body_type and info.disposition != "attachment" and (info.filename is None or depth == 0):
        text = _text_of(part, info, ctx)
        return [_Seg(html=text)] if ctype == "text/html" else [_Seg(plain=text)]
    if in_alternative and ctype in _REDUNDANT_ALTERNATIVES:
        return []
    _add_part(part, info, ctx, container)
    if is_body_type and info.disposition == "inline":
        # Inline text with a file name: mail clients show it in the body; so do we, but only
        # when the message has no other body text (see read_message).
        text = _text_of(part, info, ctx)
        seg = _Seg(html=text) if ctype == "text/html" else _Seg(plain=text)
        seg.fallback = True
        return [seg]
    return []


# --------------------------------------------------------------------------------------------
# Parsing entry
# --------------------------------------------------------------------------------------------

_HEADER_LINE_RE = re.compile(rb"[!-9;-~]+:")  # what Python's feedparser accepts
_OBS_HEADER_RE = re.compile(rb"([!-9;-~]+)[ \t]+:")  # RFC 5322 obs: WSP before the colon
_KNOWN_HEADERS = {
    b"from",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"content-type",
    b"mime-version",
    b"received",
    b"reply-to",
    b"in-reply-to",
    b"references",
    b"return-path",
    b"sender",
    b"content-transfer-encoding",
    b"delivered-to",
}


def _repair_header_block(raw: bytes) -> tuple[bytes, bool]:
    """Fix a header block that Python would cut short at a junk line.

    Python ends the header block at the first line that is not a header, so everything after
    (From, Subject ...) silently becomes body. We drop leading junk ("---- Original message ----",
    blank lines, a BOM), remove obsolete whitespace before a colon, and indent unindented
    continuation lines, but junk is only repaired when two or more well-known header fields follow
    it, so a
    body that merely lacks the blank separator line is not swallowed into a header.
    """
    stripped = raw[3:] if raw.startswith(codecs.BOM_UTF8) else raw
    stripped = stripped.lstrip(b"\r\n")
    changed = len(stripped) != len(raw)
    end = re.search(rb"\r?\n\r?\n", stripped)
    head = stripped[: end.start()] if end else stripped
    rest = stripped[end.start() :] if end else b""
    lines = head.split(b"\n")
    kinds: list[str] = []
    for i, line in enumerate(lines):
        if line[:1] in (b" ", b"\t"):
            kinds.append("cont")
        elif _HEADER_LINE_RE.match(line) or (i == 0 and line.startswith(b"From ")):
            kinds.append("hdr")
        elif _OBS_HEADER_RE.match(line):
            kinds.append("obs")
        else:
            kinds.append("junk")
    if "junk" not in kinds and "obs" not in kinds:
        return (stripped, True) if changed else (raw, False)
    junk_at = [i for i, k in enumerate(kinds) if k == "junk"]
    tail: list[bytes] = []  # lines left exactly as they were (Python will treat them as body)
    if junk_at:
        known_after = sum(
            1
            for j in range(junk_at[-1] + 1, len(lines))
            if kinds[j] in ("hdr", "obs")
            and _OBS_HEADER_RE.sub(rb"\1:", lines[j]).split(b":", 1)[0].lower() in _KNOWN_HEADERS
        )
        if known_after < 2:
            if "obs" not in kinds[: junk_at[0]]:
                return (stripped, True) if changed else (raw, False)
            tail = lines[junk_at[0] :]
            lines, kinds = lines[: junk_at[0]], kinds[: junk_at[0]]
    fixed: list[bytes] = []
    seen_header = False
    for line, kind in zip(lines, kinds, strict=True):
        if kind == "junk":
            if seen_header and line.strip():
                fixed.append(b" " + line)
            continue
        seen_header = True
        fixed.append(_OBS_HEADER_RE.sub(rb"\1:", line, count=1) if kind == "obs" else line)
    return b"\n".join(fixed + tail) + rest, True


def _parse(raw: bytes, ctx: _Ctx, flags: Flags) -> Message:
    try:
        return BytesParser(policy=_POLICY).parsebytes(raw)
    except RecursionError:
        ctx.notes.append("nesting-too-deep")
    except Exception as exc:  # fall back to the lenient legacy policy
        ctx.notes.append(f"parser-fallback:{type(exc).__name__}")
        try:
            return BytesParser(policy=_COMPAT).parsebytes(raw)
        except RecursionError:
            ctx.notes.append("nesting-too-deep")
        except Exception as exc2:
            ctx.notes.append(f"parser-failed:{type(exc2).__name__}")
    flags.headers_only = True
    try:
        return BytesHeaderParser(policy=_COMPAT).parsebytes(raw)
    except Exception as exc:
        raise Unreadable(f"cannot parse message headers: {type(exc).__name__}") from exc


def _declared_charsets(msg: Message, limit: int = 50) -> tuple[str, ...]:
    """Charsets the message declares anywhere: hints for raw 8-bit headers."""
    found: list[str] = []
    stack: list[tuple[Message, int]] = [(msg, 0)]
    seen = 0
    while stack and seen < limit:
        node, depth = stack.pop()
        seen += 1
        for value in _raw_all(_raw_items(node), "content-type"):
            m = re.search(r"charset\s*=\s*\"?([A-Za-z0-9_.:-]{1,40})", value, re.IGNORECASE)
            if m and m.group(1).lower() not in found:
                found.append(m.group(1).lower())
        try:
            payload = node.get_payload() if node.is_multipart() and depth < MAX_DEPTH else None
        except Exception:
            payload = None
        if isinstance(payload, list):
            stack.extend((p, depth + 1) for p in reversed(payload) if isinstance(p, Message))
    return tuple(found)


def _is_auto_submitted(items: _RawHeaders) -> bool:
    def first(name: str) -> str | None:
        value = _raw_first(items, name)
        return None if value is None else single_line(_unfold(value)).strip().lower()

    auto = first("auto-submitted")
    if auto is not None and auto.split(";", 1)[0].strip() not in ("no", ""):
        return True
    prec = first("precedence")
    if prec is not None and prec.split(";", 1)[0].strip() in ("bulk", "junk", "list", "auto_reply"):
        return True
    for name in ("x-autoreply", "x-autorespond", "x-autoreply-from", "x-mail-autoreply"):
        if first(name) is not None:
            return True
    suppress = first("x-auto-response-suppress")
    if suppress is not None:
        tokens = {t.strip() for t in re.split(r"[,\s]+", suppress) if t.strip()}
        if tokens & {"all", "oof"}:
            return True
    return False


_KEPT_HEADERS = ("Thread-Index", "Thread-Topic", "List-Id", "X-Mailer", "User-Agent")


def _dedupe(values: list[str]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for v in values:
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out[:MAX_DEFECTS]


def _guard(notes: list[str], label: str, fn: Callable[[], _T], default: _T) -> _T:
    """Run one extraction step; a bug in it costs that field (noted), never the message."""
    try:
        return fn()
    except Exception as exc:
        notes.append(f"internal-error:{label}:{type(exc).__name__}")
        return default


def _first_msgid(items: _RawHeaders) -> list[str]:
    for value in _raw_all(items, "message-id"):
        ids = normalize_msgid_list(value)
        if ids:
            return ids
    return []


def _pick_from(items: _RawHeaders, hints: tuple[str, ...], notes: list[str]) -> Addr | None:
    """First From mailbox with a domain (a garbage first From header is skipped)."""
    values = _raw_all(items, "from")
    if len(values) > 1:
        notes.append("multiple-from-headers")
    fallback: Addr | None = None
    for value in values:
        found = parse_address_list(value, hints, notes)
        with_domain = [a for a in found if "@" in a.address]
        if with_domain:
            return with_domain[0]
        if found and fallback is None:
            fallback = found[0]
    return fallback


def read_message(raw: bytes) -> ReadMessage:
    """Read one raw RFC 5322 message. Never raises except :class:`Unreadable`."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise Unreadable(f"expected bytes, got {type(raw).__name__}")
    raw = bytes(raw)
    if not raw.strip(b" \t\r\n\x00" + codecs.BOM_UTF8):
        raise Unreadable("empty message")
    flags = Flags()
    ctx = _Ctx(hints=())
    try:
        fixed, repaired = _repair_header_block(raw)
    except Exception:
        fixed, repaired = raw, False
    if repaired:
        flags.header_block_repaired = True
        ctx.notes.append("header-block-repaired")
    msg = _parse(fixed, ctx, flags)
    items = _raw_items(msg)
    if not items:
        raise Unreadable("no header fields found")
    try:
        ctx.hints = _declared_charsets(msg)
    except Exception:
        ctx.hints = ()
    hints, notes = ctx.hints, ctx.notes

    def header_text(name: str) -> str:
        value = _raw_first(items, name)
        if value is None:
            return ""
        try:
            return single_line(decode_header_text(value, hints, notes)).strip(" \t")
        except Exception as exc:  # belt and braces: one header never kills all
            notes.append(f"internal-error:{name}:{type(exc).__name__}")
            return ""

    def addresses(name: str) -> list[Addr]:
        out: list[Addr] = []
        for value in _raw_all(items, name):
            try:
                out.extend(parse_address_list(value, hints, notes))
            except Exception as exc:
                notes.append(f"internal-error:{name}:{type(exc).__name__}")
        return out

    # Identity and threading.
    message_ids: list[str] = _guard(notes, "message-id", lambda: _first_msgid(items), [])
    if message_ids:
        message_id = message_ids[0]
    else:
        message_id = f"<{hashlib.sha256(raw).hexdigest()}@chatflow.generated>"
        flags.generated_message_id = True
    irt_raw = _raw_first(items, "in-reply-to")
    in_reply_to: list[str] = []
    if irt_raw is not None:
        no_ids: tuple[list[str], bool] = ([], True)
        ids, junk = _guard(notes, "in-reply-to", lambda: _scan_msgids(_msgid_text(irt_raw)), no_ids)
        in_reply_to = normalize_msgid_list(" ".join(ids))
        flags.in_reply_to_junk = junk
    references: list[str] = _guard(
        notes,
        "references",
        lambda: normalize_msgid_list(" ".join(_raw_all(items, "references"))),
        [],
    )

    # People.
    from_ = _guard(notes, "from", lambda: _pick_from(items, hints, notes), None)
    to = [a for a in addresses("to") if "@" in a.address]
    cc = [a for a in addresses("cc") if "@" in a.address]
    reply_to = [a for a in addresses("reply-to") if "@" in a.address]

    subject = header_text("subject")
    if len(subject) > MAX_SUBJECT:
        subject = subject[:MAX_SUBJECT]
        notes.append("subject-truncated")
    date = _guard(notes, "date", lambda: parse_date(_raw_first(items, "date")), None)
    if date is None and _raw_first(items, "date"):
        notes.append("invalid-date")
    headers = {name: header_text(name) for name in _KEPT_HEADERS if _raw_first(items, name)}

    # Body and parts.
    segs: list[_Seg] = []
    if not flags.headers_only:
        try:
            segs = _collect(msg, ctx, 0)
        except RecursionError:
            notes.append("nesting-too-deep")
            flags.depth_limited = True
        except Exception as exc:  # a bug must cost the body, not the whole message
            notes.append(f"internal-error:body:{type(exc).__name__}")
    flags.depth_limited = flags.depth_limited or ctx.depth_limited
    if any(not s.fallback for s in segs):
        segs = [s for s in segs if not s.fallback]
    text = _guard(notes, "text", lambda: _join_text([s.as_text() for s in segs]), "")
    if len(text) > MAX_TEXT_CHARS:
        flags.text_truncated = True
        notes.append("text-truncated")
        ctx.parts.append(
            Part("message.txt", "text/plain; charset=utf-8", None, False, text.encode("utf-8"))
        )
        text = (
            text[:MAX_TEXT_CHARS].rstrip()
            + f"\n\n[The text goes on: {len(text):,} characters in all, attached whole as"
            " message.txt.]"
        )
    html = ""
    if any(s.html is not None for s in segs):
        raw_html = "".join(
            s.html if s.html is not None else _text_to_html(s.plain or "") for s in segs
        )
        if len(raw_html) > MAX_HTML_CHARS:
            flags.html_truncated = True
            notes.append("html-truncated")
        html = sanitize_html(raw_html)

    mailer_daemon = bool(from_ and from_.address.split("@", 1)[0].lower() == "mailer-daemon")
    bounce = ctx.bounce or mailer_daemon
    auto_submitted = _guard(notes, "auto-submitted", lambda: _is_auto_submitted(items), False)
    py_defects: list[str] = []
    for node in [msg, *ctx.visited]:
        py_defects.extend(type(d).__name__ for d in getattr(node, "defects", []))
    return ReadMessage(
        message_id=message_id,
        in_reply_to=in_reply_to,
        references=references,
        from_=from_,
        to=to,
        cc=cc,
        reply_to=reply_to,
        subject=subject,
        date=date,
        text=text,
        html=html,
        parts=ctx.parts,
        auto_submitted=auto_submitted,
        bounce=bounce,
        defects=_dedupe(py_defects + notes),
        headers=headers,
        flags=flags,
    )
