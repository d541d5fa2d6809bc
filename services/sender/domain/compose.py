"""Compose outbound helpdesk replies as RFC 5322 / MIME messages.

Pure domain code: no I/O, no clock, no randomness except the MIME boundaries.
Everything that ends up in a header is validated *before* it is written,
because the Python 3.11.7 ``email`` package decodes RFC 2047 encoded-words
while parsing header values and re-emits decoded CR/LF verbatim on
serialization (CVE-2024-6923).  Subject and address headers are folded here
(see "header encoding": the 3.11 folder loses spaces between encoded-words).
A message without files is written by this module alone and its header block
checked field by field; one with files goes through ``EmailMessage`` (which
encodes the file names) and, as a second line of defence, is parsed back and
its headers compared with what we meant to write.
"""

from __future__ import annotations

import base64
import functools
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email import policy as email_policy
from email import quoprimime
from email.errors import MessageError
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import format_datetime
from html.parser import HTMLParser
from typing import NamedTuple

import nh3

from libs.common.addresses import AddressError, check_address

__all__ = [
    "Addr",
    "Attachment",
    "Composed",
    "Draft",
    "HeaderInjection",
    "InvalidDraft",
    "ThreadContext",
    "build_references",
    "compose",
    "compose_message",
    "envelope_address",
    "header_text",
    "html_to_text",
    "reply_subject",
    "sanitize",
    "thread_subject",
]


# --------------------------------------------------------------------------- model


@dataclass
class Addr:
    """A mailbox: display name (may be empty) and a bare addr-spec."""

    name: str
    address: str


@dataclass
class Attachment:
    """A file; ``content_id`` set means an inline image referenced as ``cid:`` in the html."""

    filename: str
    content_type: str
    data: bytes
    content_id: str | None = None


@dataclass
class ThreadContext:
    """What we know about the conversation we are writing into."""

    subject: str
    last_message_id: str | None
    references: list[str]
    token: str


@dataclass
class Draft:
    """An agent's (or automation's) message, ready to be turned into bytes."""

    mailbox: Addr
    to: list[Addr]
    cc: list[Addr]
    html: str
    attachments: list[Attachment]
    message_id: str
    reply_to: Addr | None
    date: datetime
    auto_generated: bool = False


class HeaderInjection(ValueError):
    """A header value would contain a line break or NUL (or would grow extra headers)."""


class InvalidDraft(ValueError):
    """The draft cannot be turned into a valid message; the message says why."""


# ------------------------------------------------------------------ header hygiene

# CR, LF and NUL are what header injection is made of: always refused.
_INJECTION = frozenset("\r\n\x00")
# The rest of what ``str.splitlines`` (and so parts of the stdlib) treats as a
# line break.  Refused in structural values (addresses, ids, tokens); in free
# text they are replaced by spaces with the other controls, because a customer
# subject with a stray U+0085 (cp1252 "…" decoded as latin-1) must still be
# repliable.
_OTHER_BREAKS = frozenset("\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
# The same sets as one regular expression search each (a Python loop over every character of
# every header value was ~10% of composing a reply).
_INJECTION_RE = re.compile("[" + "".join(sorted(_INJECTION)) + "]")
_OTHER_BREAKS_RE = re.compile("[" + "".join(sorted(_OTHER_BREAKS)) + "]")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

# SMTP policy (CRLF, 78-column folding, RFC 2047 for non-ASCII) restricted to
# 7bit transfer encodings so the message is deliverable without 8BITMIME.
_POLICY = email_policy.SMTP.clone(cte_type="7bit")
_MAX_LINE = 998
_MAX_ID_LEN = 250  # keeps a lone msg-id well inside the 998-octet line limit

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
# Lenient msg-id: printable ASCII without whitespace, angle brackets, quotes,
# backslashes, parens, commas or semicolons.  Foreign MUAs produce odd ids; what
# matters here is that the id is one unfoldable token that cannot change meaning.
_MSGID_RE = re.compile(r"<[A-Za-z0-9!#$%&'*+/=?^_`{|}~.@\[\]:-]+>")
_TOKEN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MIME_NAME = r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}"
_CONTENT_TYPE_RE = re.compile(rf"({_MIME_NAME})/({_MIME_NAME})")


def _reject_raw(value: str, field: str, *, free_text: bool = False) -> None:
    """Refuse CR/LF/NUL (injection); outside free text also other breaks and controls.

    Lone surrogates are refused everywhere: they cannot be encoded at all.
    """
    if not isinstance(value, str):
        raise InvalidDraft(f"{field}: expected str, got {type(value).__name__}")
    if _INJECTION_RE.search(value):
        raise HeaderInjection(f"{field}: CR, LF or NUL in header value")
    if not free_text and _OTHER_BREAKS_RE.search(value):
        raise HeaderInjection(f"{field}: line break in header value")
    if not free_text and _CONTROL_RE.search(value.replace("\t", "")):
        raise InvalidDraft(f"{field}: control character in header value")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidDraft(f"{field}: not encodable as UTF-8 ({exc.reason})") from None


def _collapse(value: str) -> str:
    """Collapse whitespace runs: header parsers unfold/collapse them anyway."""
    return " ".join(value.split())


@functools.lru_cache(maxsize=4096)
def _decoded_like_stdlib(value: str) -> str:
    """What the stdlib header parser turns ``value`` into (it decodes encoded-words)."""
    return str(_POLICY.header_factory("X-Probe", value))


def _clean_text(value: str, field: str) -> str:
    """Validate free text (subject, display name, filename) and neutralize the rest.

    Raw CR/LF/NUL are refused: they cannot come out of a correctly parsed inbound
    header, so they mean a bug or an attack in our own pipeline.  Other control
    characters become spaces.  Text that merely *looks like* RFC 2047
    (``=?UTF-8?Q?hi=0ABcc:...?=``) is customer-controlled and must not make a
    conversation unrepliable, so it is decoded the way receivers (and the 3.11
    stdlib parser, CVE-2024-6923) would decode it, line breaks become spaces, and
    this repeats until decoding no longer changes the value.  Our own folding
    never re-parses subjects or names, but filenames go through the stdlib and
    the text is also stored and re-used by other services, so nothing that
    decodes to a line break leaves this function.
    """
    _reject_raw(value, field, free_text=True)
    text = _collapse(_CONTROL_RE.sub(" ", value))
    for _ in range(8):
        decoded = _collapse(_CONTROL_RE.sub(" ", _decoded_like_stdlib(text)))
        if decoded == text:
            return text
        text = decoded
    raise HeaderInjection(f"{field}: nested encoded-words do not settle")


def header_text(value: str, field: str) -> str:
    """Free text as it will appear in a header (see :func:`_clean_text`); raises on CR/LF/NUL."""
    return _clean_text(value, field)


def _check_msg_id(value: str, field: str, *, ours: bool = False) -> str:
    """Validate a ``<id>`` token; our own ids must also have ``left@right``."""
    _reject_raw(value, field)
    if not _MSGID_RE.fullmatch(value) or "=?" in value or len(value) > _MAX_ID_LEN:
        raise InvalidDraft(f"{field}: not a valid message id: {value!r}")
    if ours:
        left, _, right = value[1:-1].partition("@")
        if not left or not right or "@" in right:
            raise InvalidDraft(f"{field}: message id must look like <left@right>: {value!r}")
    return value


def _address(addr: Addr, field: str) -> Address:
    """Turn an :class:`Addr` into a validated stdlib ``Address`` (IDN domain → A-labels), by
    the rule the REST API checked already (``libs.common.addresses``)."""
    _reject_raw(addr.address, f"{field} address")
    try:
        local, domain = check_address(addr.address)
    except AddressError as exc:
        raise InvalidDraft(f"{field}: {exc}") from None
    name = _clean_text(addr.name, f"{field} name")
    return Address(display_name=name, username=local, domain=domain)


def envelope_address(addr: Addr, field: str = "address") -> str:
    """The addr-spec for the SMTP envelope (MAIL FROM / RCPT TO): validated, domain as A-labels."""
    return str(_address(addr, field).addr_spec)


def _tag(token: str) -> str:
    """The subject tag for a conversation token, e.g. ``[#1042]``."""
    _reject_raw(token, "token")
    if not _TOKEN_RE.fullmatch(token):
        raise InvalidDraft(f"token: invalid conversation token {token!r}")
    return f"[#{token}]"


# ---------------------------------------------------------------------- subjects

# Reply/forward prefixes seen in the wild (en, de, nl, nordic, fr, it, es/pt, pl,
# tr, zh), optionally counted ("Re[2]:", "Re(2):", "Re^2:"), ASCII or full-width colon.
_PREFIX_RE = re.compile(
    r"^\s*(?:re|aw|antw|sv|vs|fw|fwd|wg|tr|rif|res|odp|ynt|回复|回覆|答复|转发|轉寄)"
    r"\s*(?:\[\d+\]|\(\d+\)|\^\d+)?\s*[:：]\s*",
    re.IGNORECASE,
)


# A marker a gateway or list puts first ("[EXT]", "[acme-support]"); not a ticket tag.
_LEAD_MARK_RE = re.compile(r"^(\[[^\]#\[]{1,40}\])\s*")
# Ticket tags of ours ("[#123]"): another conversation's, carried over by a customer who
# answered the wrong mail, must not travel with this one's.
_ANY_TAG_RE = re.compile(r"\s*\[#\d{1,12}\]")


def _tag_once(subject: str, tag: str) -> str:
    """Keep the first occurrence of ``tag`` where the customer put it, else append it."""
    head, found, tail = subject.partition(tag)
    if not found:
        return _collapse(f"{subject} {tag}")
    return _collapse(f"{head}{tag}{tail.replace(tag, ' ')}")


def _strip_reply_prefixes(subject: str, tag: str) -> tuple[str, bool]:
    """Strip leading reply prefixes, also those hiding behind a leading tag or marker
    ("[EXT] Re: x" keeps its marker, loses the prefix)."""
    rest = _collapse(subject)
    lead_tag = False
    marks: list[str] = []
    while True:
        before = rest
        rest = _PREFIX_RE.sub("", rest, count=1)
        if rest.startswith(tag):
            lead_tag = True
            rest = rest[len(tag) :].lstrip()
        mark = _LEAD_MARK_RE.match(rest)
        if mark and _PREFIX_RE.match(rest[mark.end() :]):
            marks.append(mark.group(1))
            rest = rest[mark.end() :]
        if rest == before:
            return _collapse(" ".join([*marks, rest])), lead_tag


def reply_subject(subject: str, token: str) -> str:
    """``Re: <subject>`` with exactly one ``Re:`` and exactly one ``[#token]``.

    Mail clients pile up prefixes ("Re: AW: Re:") and some drop or duplicate the
    tag; one canonical form keeps threads readable and the tag matchable.  The
    subject is customer text: raw CR/LF/NUL raise :class:`HeaderInjection`,
    encoded-word look-alikes are neutralized (see :func:`_clean_text`), so the
    result is exactly what :func:`compose` puts in the Subject header.
    """
    tag = _tag(token)
    cleaned = _clean_text(subject, "Subject")
    foreign = [t for t in _ANY_TAG_RE.findall(cleaned) if t.strip() != tag]
    for t in foreign:
        cleaned = cleaned.replace(t.strip(), " ")
    rest, lead_tag = _strip_reply_prefixes(cleaned, tag)
    if lead_tag:
        rest = _collapse(f"{tag} {rest.replace(tag, ' ')}")
    return f"Re: {_tag_once(rest, tag)}"


def _new_subject(subject: str, token: str) -> str:
    """Subject for a new conversation: as written, plus the tag exactly once."""
    tag = _tag(token)
    return _tag_once(_clean_text(subject, "Subject"), tag)


def thread_subject(thread: ThreadContext) -> str:
    """The Subject :func:`compose` writes in ``thread``: a reply's, or a new conversation's."""
    if thread.last_message_id is not None:
        return reply_subject(thread.subject, thread.token)
    return _new_subject(thread.subject, thread.token)


# -------------------------------------------------------------------- references


def build_references(
    parent_id: str | None, parent_refs: list[str], limit: int = 20
) -> tuple[list[str], list[str]]:
    """Threading headers for a reply: ``(in_reply_to, references)``.

    References = parent's References + parent's Message-ID, de-duplicated, parent
    last.  Long chains are trimmed as RFC 5322 §3.6.4 suggests: keep the first id
    (the thread root) and the last ``limit - 1``.  Ancestor ids with bad syntax
    come from foreign MUAs and are only advisory, so they are dropped rather than
    blocking the reply; line breaks anywhere are still refused.
    """
    if limit < 1:
        raise ValueError("limit must be >= 1")
    for ref in parent_refs:
        _reject_raw(ref, "References")
    if parent_id is None:
        return [], []
    parent = _check_msg_id(parent_id, "In-Reply-To")
    refs: list[str] = []
    seen = {parent}
    for ref in parent_refs:
        if ref in seen:
            continue
        try:
            _check_msg_id(ref, "References")
        except InvalidDraft:
            continue
        seen.add(ref)
        refs.append(ref)
    refs.append(parent)
    if len(refs) > limit:
        refs = refs[-1:] if limit == 1 else [refs[0], *refs[-(limit - 1) :]]
    return [parent], refs


# ---------------------------------------------------------------------- sanitize

_ALLOWED_TAGS = frozenset(
    {
        "a", "b", "blockquote", "br", "caption", "code", "col", "colgroup", "div", "em",
        "h1", "h2", "h3", "h4", "hr", "i", "img", "li", "ol", "p", "pre", "s", "span",
        "strong", "sub", "sup", "table", "tbody", "td", "tfoot", "th", "thead", "tr", "u",
        "ul",
    }
)  # fmt: skip
_ALLOWED_ATTRIBUTES = {
    "a": {"href"},
    "img": {"src", "alt", "width", "height"},
    "td": {"colspan", "rowspan"},
    "th": {"colspan", "rowspan"},
}
# Dropped together with their content (a <script>'s text is not message text).
_DROP_CONTENT = frozenset(
    {
        "applet", "audio", "canvas", "embed", "frame", "frameset", "head", "iframe", "math",
        "noembed", "noframes", "noscript", "object", "script", "select", "style", "svg",
        "template", "textarea", "title", "video", "xmp",
    }
)  # fmt: skip
_LINK_SCHEMES = ("http://", "https://", "mailto:")
_DATA_IMAGE_RE = re.compile(r"data:image/(?:png|gif|jpe?g|webp|bmp);base64,")
_SIZE_RE = re.compile(r"\d{1,4}", re.ASCII)


def _attribute_filter(tag: str, attr: str, value: str) -> str | None:
    """Per-tag URL rules nh3's global scheme list cannot express.

    Links may only be http(s)/mailto; images only cid: (our inline parts) or
    base64 raster data: -- no remote images (tracking pixels), no SVG (scripts).
    """
    if attr in ("href", "src"):
        probe = re.sub(r"[\x00-\x20]", "", value).lower()
        if tag == "a" and attr == "href":
            return value if probe.startswith(_LINK_SCHEMES) else None
        if tag == "img" and attr == "src":
            ok = probe.startswith("cid:") or _DATA_IMAGE_RE.match(probe)
            return value if ok else None
        return None
    if attr in ("width", "height", "colspan", "rowspan"):
        return value.strip() if _SIZE_RE.fullmatch(value.strip()) else None
    return value


def sanitize(html: str) -> str:
    """Allow-list sanitize agent HTML for email: formatting only, no script/on*/javascript:.

    The agent UI sanitizes too, but the send command crosses a trust boundary.
    """
    return nh3.clean(
        html,
        tags=set(_ALLOWED_TAGS),
        clean_content_tags=set(_DROP_CONTENT),
        attributes={tag: set(attrs) for tag, attrs in _ALLOWED_ATTRIBUTES.items()},
        attribute_filter=_attribute_filter,
        url_schemes={"http", "https", "mailto", "cid", "data"},
        url_relative="deny",
        link_rel="noopener noreferrer",
        strip_comments=True,
    )


# ------------------------------------------------------------------ html → text

_PARAGRAPH_TAGS = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "table"})
_LINE_TAGS = frozenset(
    {"div", "tr", "caption", "section", "article", "header", "footer", "address", "dl", "dt", "dd"}
)
_HTML_WS_RE = re.compile(r"[ \t\n\r\f]+")


class _TextRenderer(HTMLParser):
    """Line-oriented renderer; each output line carries the blockquote depth it started at."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self._cur = ""
        self._open = False
        self._line_quote = 0
        self._quote = 0
        self._pre = 0
        self._skip = 0
        self._lists: list[list[int]] = []  # [ordered?, counter]
        self._links: list[tuple[str | None, list[str]]] = []
        self._cells = 0
        self._blank_at: int | None = None

    # -- line plumbing
    def _start_line(self) -> None:
        if self._open:
            return
        if self._blank_at is not None:
            if self.lines:
                self.lines.append("> " * self._blank_at)
            self._blank_at = None
        self._open = True
        self._line_quote = self._quote
        self._cur = ""

    def _end_line(self, force: bool = False) -> None:
        if self._open:
            self.lines.append("> " * self._line_quote + self._cur)
        elif force:
            self._start_line()
            self.lines.append("> " * self._line_quote)
        self._open = False
        self._cur = ""

    def _blank(self) -> None:
        self._end_line()
        if self._blank_at is None or self._quote < self._blank_at:
            self._blank_at = self._quote

    def _write(self, text: str) -> None:
        self._start_line()
        self._cur += text

    # -- parser callbacks
    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _DROP_CONTENT:
            self._skip += 1
            return
        if tag in _PARAGRAPH_TAGS:
            self._blank()
            self._pre += tag == "pre"
            self._cells = 0
        elif tag in _LINE_TAGS:
            self._end_line()
            self._cells = 0
        elif tag == "blockquote":
            self._blank()
            self._quote += 1
        elif tag in ("ul", "ol"):
            self._blank() if not self._lists else self._end_line()
            self._lists.append([tag == "ol", 0])
        elif tag == "li":
            self._end_line()
            self._start_line()
            depth = max(len(self._lists) - 1, 0)
            marker = "- "
            if self._lists and self._lists[-1][0]:
                self._lists[-1][1] += 1
                marker = f"{self._lists[-1][1]}. "
            self._cur = "  " * depth + marker
        elif tag == "br":
            self._end_line(force=True)
        elif tag == "hr":
            self._blank()
            self._write("----")
            self._blank()
        elif tag in ("td", "th"):
            if self._cells:
                self._write("")
                self._cur = self._cur.rstrip() + " | "
            self._cells += 1
        elif tag == "a":
            self._links.append((dict(attrs).get("href"), []))
        elif tag == "img":
            alt = _collapse(dict(attrs).get("alt") or "")
            if alt:
                self.handle_data(f"[{alt}]")

    def handle_endtag(self, tag: str) -> None:
        if tag in _DROP_CONTENT:
            self._skip = max(self._skip - 1, 0)
            return
        if tag in _PARAGRAPH_TAGS:
            if tag == "pre":
                self._pre = max(self._pre - 1, 0)
            self._blank()
        elif tag in _LINE_TAGS:
            self._end_line()
        elif tag == "blockquote":
            self._end_line()
            self._quote = max(self._quote - 1, 0)
            self._blank()
        elif tag in ("ul", "ol") and self._lists:
            self._lists.pop()
            self._blank() if not self._lists else self._end_line()
        elif tag == "li":
            self._end_line()
        elif tag == "a" and self._links:
            href, parts = self._links.pop()
            text = _collapse("".join(parts))
            if href and href not in (text, f"mailto:{text}"):
                self._write(f" <{href}>" if text else f"<{href}>")

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        for _href, parts in self._links:
            parts.append(data)
        if self._pre:
            for i, chunk in enumerate(data.split("\n")):
                if i:
                    self._end_line(force=True)
                if chunk:
                    self._write(chunk)
            return
        text = _HTML_WS_RE.sub(" ", data).replace("\xa0", " ")
        if not self._open or self._cur.endswith(" "):
            text = text.lstrip(" ")
        if text:
            self._write(text)

    def render(self) -> str:
        self.close()
        self._end_line()
        out: list[str] = []
        for line in (raw.rstrip() for raw in self.lines):
            if out and not line.strip("> ") and not out[-1].strip("> "):
                continue  # collapse runs of (quoted) blank lines
            out.append(line)
        while out and not out[0].strip("> "):
            out.pop(0)
        while out and not out[-1].strip("> "):
            out.pop()
        return "\n".join(out)


def html_to_text(html: str) -> str:
    """Readable text/plain alternative of the (sanitized) HTML.

    Text-only clients, screen readers and spam filters read this part, so it has
    to carry the same content: paragraphs, "- " / "1. " lists, ``text <url>``
    links, ``> `` quotes.
    """
    renderer = _TextRenderer()
    renderer.feed(html)
    return renderer.render()


# ------------------------------------------------------------ header encoding
#
# Subject and the address headers are folded here rather than by the stdlib:
# the 3.11 folder sometimes moves a space that separated two words out of the
# encoded-words into the folding whitespace between them, where RFC 2047 §6.2
# decoders drop it ("Ação Ação" arrives as "AçãoAção", "Zoë :" as "Zoë:").
# Runs of words that need encoding become B encoded-words *including* their
# inner spaces; the only literal spaces are between plain words / encoded runs,
# which decoders keep.  Values reaching this code are validated (_clean_text,
# _address), so it never sees CR, LF or NUL.

_EW_MAX_BYTES = 39  # base64 → 52 chars → 64-char encoded-word: fits a 76-column line
_EW_LINE = 76  # RFC 2047 §2: lines holding encoded-words are limited to 76 characters
_ATOM_RE = re.compile(rf"[{_ATEXT}]+")


def _needs_encoding(word: str) -> bool:
    """Words that cannot go on the wire as-is (or that a decoder might misread)."""
    return not word.isascii() or "=?" in word or "?=" in word or len(word) > 70


def _b_encoded_words(text: str) -> list[str]:
    """RFC 2047 B encoded-words, each holding whole code points (never a split UTF-8)."""
    words: list[str] = []
    chunk = b""
    for ch in text:
        raw = ch.encode("utf-8")
        if chunk and len(chunk) + len(raw) > _EW_MAX_BYTES:
            words.append(f"=?utf-8?b?{base64.b64encode(chunk).decode('ascii')}?=")
            chunk = b""
        chunk += raw
    if chunk:
        words.append(f"=?utf-8?b?{base64.b64encode(chunk).decode('ascii')}?=")
    return words


def _encode_words(text: str, plain: Callable[[str], bool]) -> list[str]:
    """Split on spaces; words ``plain`` accepts stay literal, runs of others are encoded."""
    items: list[str] = []
    run: list[str] = []
    for word in text.split(" ") if text else []:
        if not plain(word):
            run.append(word)
            continue
        if run:
            items += _b_encoded_words(" ".join(run))
            run = []
        items.append(word)
    if run:
        items += _b_encoded_words(" ".join(run))
    return items


def _unstructured_items(text: str) -> list[str]:
    return _encode_words(text, lambda word: not _needs_encoding(word))


def _phrase_items(name: str) -> list[str]:
    """A display name as atoms, one quoted-string (plain ASCII), or encoded-words."""
    if not name:
        return []
    words = name.split(" ")
    if not any(map(_needs_encoding, words)):
        if all(_ATOM_RE.fullmatch(word) for word in words):
            return words
        quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return quoted.split(" ")  # FWS inside a quoted-string unfolds back to the space
    return _encode_words(name, lambda w: not _needs_encoding(w) and bool(_ATOM_RE.fullmatch(w)))


def _address_items(addresses: list[Address]) -> list[str]:
    items: list[str] = []
    for i, addr in enumerate(addresses):
        phrase = _phrase_items(addr.display_name)
        mailbox = [*phrase, f"<{addr.addr_spec}>"] if phrase else [addr.addr_spec]
        if i < len(addresses) - 1:
            mailbox[-1] += ","
        items += mailbox
    return items


def _fold(name: str, items: list[str]) -> str:
    """Join items with single spaces, breaking lines (CRLF SP) before 76 columns."""
    lines: list[str] = []
    cur = f"{name}:"
    for item in items:
        if len(cur) + 1 + len(item) > _EW_LINE and cur != f"{name}:":
            lines.append(cur)
            cur = ""
        cur += f" {item}"
    lines.append(cur)
    return "\r\n".join(lines) + "\r\n"


class _PreFolded:
    """A header object the policy writes verbatim, per the documented EmailPolicy contract.

    ``header_store_parse`` keeps values that carry a matching ``name`` attribute
    and folding calls their ``fold(policy=...)`` -- so these values never pass
    through the stdlib header parser/folder at all.
    """

    def __init__(self, name: str, folded: str, text: str) -> None:
        self.name = name
        self._folded = folded
        self._text = text

    def fold(self, *, policy: email_policy.Policy) -> str:
        return self._folded.replace("\r\n", policy.linesep)

    def __str__(self) -> str:
        return self._text


def _header_value(name: str, value: object) -> object:
    """What to store in the EmailMessage for one of our (validated) header values."""
    if name == "Subject":
        text = str(value)
        return _PreFolded(name, _fold(name, _unstructured_items(text)), text)
    if isinstance(value, list):
        text = ", ".join(str(a) for a in value)
        return _PreFolded(name, _fold(name, _address_items(value)), text)
    if name in _ID_HEADERS:
        # The stdlib folds an id longer than a line (Outlook's are) into RFC 2047 encoded words,
        # which no mail client reads as an id: threading would break. Ids fold only at spaces.
        text = str(value)
        return _PreFolded(name, _plain_line(name, text), text)
    return value


_ID_HEADERS = frozenset({"Message-ID", "In-Reply-To", "References"})


# ----------------------------------------------------------------------- compose

_PART_HEADERS = frozenset(
    {"content-type", "content-transfer-encoding", "content-disposition", "content-id"}
)


def _body_cte(text: str) -> str:
    """7bit when it is, quoted-printable otherwise: readable and needs no 8BITMIME."""
    if text.isascii() and all(len(line) <= 78 for line in text.splitlines()):
        return "7bit"
    return "quoted-printable"


def _content_type(att: Attachment) -> tuple[str, str]:
    """Split and validate ``type/subtype``; composite types are not plain bytes."""
    _reject_raw(att.content_type, "attachment content_type")
    ctype = att.content_type.strip().lower()
    match = _CONTENT_TYPE_RE.fullmatch(ctype)
    if not match:
        raise InvalidDraft(
            f"attachment {att.filename!r}: content_type must be type/subtype "
            f"without parameters, got {att.content_type!r}"
        )
    maintype, subtype = match.groups()
    if maintype in ("multipart", "message"):
        raise InvalidDraft(f"attachment {att.filename!r}: {maintype}/* cannot be sent as bytes")
    return maintype, subtype


def _content_id(raw: str) -> str:
    """Normalize ``id`` / ``<id>`` to ``<id>`` (the html refers to it as ``cid:id``)."""
    _reject_raw(raw, "Content-ID")
    value = raw.strip()
    if not (value.startswith("<") and value.endswith(">")):
        value = f"<{value}>"
    return _check_msg_id(value, "Content-ID")


class _Part(NamedTuple):
    """A validated attachment, ready for the MIME tree."""

    data: bytes
    maintype: str
    subtype: str
    filename: str
    cid: str | None


def _check_attachment(att: Attachment) -> _Part:
    """Validate one attachment (filename is header text, content type a MIME token pair)."""
    filename = _clean_text(att.filename, "attachment filename")
    if not filename:
        raise InvalidDraft("attachment without filename")
    if not isinstance(att.data, bytes | bytearray | memoryview):
        raise InvalidDraft(f"attachment {filename!r}: data must be bytes")
    maintype, subtype = _content_type(att)
    cid = _content_id(att.content_id) if att.content_id is not None else None
    return _Part(bytes(att.data), maintype, subtype, filename, cid)


def _same_address(parsed: object, expected: Address) -> bool:
    """Exact addr-spec; display name compared ignoring whitespace.

    The stdlib folder encodes long names as several adjacent encoded-words
    correctly, but the 3.11 *parser* keeps the folding whitespace between them
    inside phrases (RFC 2047 §6.2 says to drop it), so whitespace is the one
    thing a Python round trip cannot vouch for.
    """
    name = getattr(parsed, "display_name", None)
    return (
        isinstance(name, str)
        and "".join(name.split()) == "".join(expected.display_name.split())
        and getattr(parsed, "addr_spec", None) == expected.addr_spec
    )


def _verify(raw: bytes, expected: list[tuple[str, object]], filenames: list[str]) -> None:
    """Re-parse the output: same headers, values and filenames; CRLF only; lines <= 998.

    This is what catches anything the stdlib might still decode into a line break (the file
    names, which it encodes itself).
    """
    _wire_format(raw)

    parsed = BytesParser(policy=email_policy.default).parsebytes(raw)
    names = [name.lower() for name in parsed if name.lower() not in _PART_HEADERS]
    if names != [name.lower() for name, _ in expected]:
        raise HeaderInjection(f"serialized headers {names} differ from the intended set")
    for name, want in expected:
        got = parsed[name]
        if isinstance(want, list):  # addresses
            addrs = list(getattr(got, "addresses", ()))
            ok = len(addrs) == len(want) and all(map(_same_address, addrs, want))
        elif name in ("References", "In-Reply-To"):
            ok = str(got).split() == str(want).split()
        else:
            ok = str(got) == str(want)
        if not ok:
            raise InvalidDraft(f"{name} does not survive serialization: {want!r} -> {str(got)!r}")
    for part in parsed.walk():
        part_names = [name.lower() for name in part]
        if part is not parsed and set(part_names) - _PART_HEADERS:
            raise HeaderInjection(f"unexpected MIME part headers {part_names}")
        if any(part_names.count(name) > 1 for name in _PART_HEADERS):
            raise HeaderInjection(f"duplicate MIME headers {part_names}")
    got_names = [fn for part in parsed.walk() if (fn := part.get_filename()) is not None]
    if sorted(got_names) != sorted(filenames):
        raise InvalidDraft(f"attachment filenames do not survive serialization: {got_names!r}")


@dataclass
class Composed:
    """The message bytes and what they say (the sender reports it as the sent message)."""

    raw: bytes
    subject: str
    html: str  # sanitized, as sent
    text: str  # the text/plain alternative, as sent
    in_reply_to: list[str]
    references: list[str]


def compose(draft: Draft, thread: ThreadContext) -> bytes:
    """Build the complete message (CRLF line endings) for ``draft`` in ``thread``.

    Structure: multipart/alternative(text/plain, text/html); the html part
    becomes multipart/related when there are inline (cid) images; everything is
    wrapped in multipart/mixed when there are regular attachments.
    """
    return compose_message(draft, thread).raw


def compose_message(draft: Draft, thread: ThreadContext) -> Composed:
    """:func:`compose`, with the sanitized html, text, subject and threading it wrote."""
    # ---- validate everything that becomes a header, before touching EmailMessage
    sender = _address(draft.mailbox, "From")
    to = [_address(a, "To") for a in draft.to]
    cc = [_address(a, "Cc") for a in draft.cc]
    if not to:
        raise InvalidDraft("draft has no To recipient")
    reply_to = _address(draft.reply_to, "Reply-To") if draft.reply_to is not None else None
    message_id = _check_msg_id(draft.message_id, "Message-ID", ours=True)
    if not isinstance(draft.date, datetime) or draft.date.utcoffset() is None:
        raise InvalidDraft("date must be a timezone-aware datetime")
    if not isinstance(draft.html, str):
        raise InvalidDraft("html must be str")

    replying = thread.last_message_id is not None
    subject = thread_subject(thread)
    if replying:
        in_reply_to, references = build_references(thread.last_message_id, thread.references)
    else:
        in_reply_to, references = [], []
    if _clean_text(subject, "Subject") != subject:
        raise HeaderInjection("Subject changes meaning when parsed")

    parts = [_check_attachment(att) for att in draft.attachments]
    cids = [p.cid for p in parts if p.cid is not None]
    if len(set(cids)) != len(cids):
        raise InvalidDraft("duplicate content_id among attachments")

    headers: list[tuple[str, object]] = [("From", [sender]), ("To", to)]
    if cc:
        headers.append(("Cc", cc))
    headers += [
        ("Subject", subject),
        ("Date", format_datetime(draft.date)),
        ("Message-ID", message_id),
    ]
    if replying:
        headers += [("In-Reply-To", " ".join(in_reply_to)), ("References", " ".join(references))]
    if reply_to is not None:
        headers.append(("Reply-To", [reply_to]))
    headers.append(("MIME-Version", "1.0"))
    if draft.auto_generated:
        headers.append(("Auto-Submitted", "auto-generated"))

    html = sanitize(draft.html)
    text = html_to_text(html)
    try:
        if parts:
            raw = _build(headers, html, text, parts)
        else:
            raw = _build_alternative(headers, html, text)
    except (HeaderInjection, InvalidDraft):
        raise
    except (ValueError, TypeError, LookupError, MessageError) as exc:
        # Defensive: validation above should leave nothing for the stdlib to reject.
        raise InvalidDraft(f"cannot serialize draft: {exc}") from exc
    if parts:
        _verify(raw, headers, [p.filename for p in parts])
    else:
        _verify_wire(raw, headers)
    return Composed(raw, subject, html, text, in_reply_to, references)


# The common case -- a reply without files -- is written here rather than by EmailMessage: every
# header value is validated and folded by this module anyway, the two text parts are encoded
# exactly as the stdlib's content manager does it (same CTE choice, same quoted-printable), and
# so the bytes need no parse-back, only the structural check of :func:`_verify_wire`. Composing
# is most of a send's CPU; this is several times faster than building and re-parsing.

_BOUNDARY_DIGITS = len(repr(sys.maxsize - 1))
_QP_LINE = 78  # the SMTP policy's max_line_length, as set_content uses it
_HEADER_LINE_RE = re.compile(rb"([!-9;-~]+):")


def _plain_line(name: str, value: str) -> str:
    """A header of atoms (ids, a date) folded at spaces before 78 columns."""
    lines: list[str] = []
    cur = f"{name}:"
    for word in value.split():
        if len(cur) + 1 + len(word) > 78 and cur != f"{name}:":
            lines.append(cur)
            cur = ""
        cur += f" {word}"
    lines.append(cur)
    return "\r\n".join(lines) + "\r\n"


def _header_lines(headers: list[tuple[str, object]]) -> str:
    out = []
    for name, value in headers:
        stored = _header_value(name, value)
        if isinstance(stored, _PreFolded):
            out.append(stored.fold(policy=_POLICY))
        else:
            out.append(_plain_line(name, str(stored)))
    return "".join(out)


def _text_body(text: str) -> tuple[str, str]:
    """(CTE, encoded body with CRLF), as ``EmailMessage.set_content(text, cte=...)`` writes it."""
    cte = _body_cte(text)
    body = b"\n".join(text.encode("utf-8").splitlines()) + b"\n"
    if cte == "7bit":
        data = body.decode("ascii")
    else:
        data = quoprimime.body_encode(body.decode("latin-1"), _QP_LINE)
    return cte, "\r\n".join(data.splitlines()) + "\r\n"


def _boundary(*texts: str) -> str:
    """A boundary that occurs in none of the bodies (the stdlib generator's way)."""
    while True:
        boundary = "=" * 15 + f"{random.randrange(sys.maxsize):0{_BOUNDARY_DIGITS}d}" + "=="
        if not any(boundary in t for t in texts):
            return boundary


def _build_alternative(headers: list[tuple[str, object]], html: str, text: str) -> bytes:
    plain_cte, plain = _text_body(text)
    html_cte, html_body = _text_body(html)
    b = _boundary(plain, html_body)
    return (
        f"{_header_lines(headers)}"
        f'Content-Type: multipart/alternative;\r\n boundary="{b}"\r\n'
        "\r\n"
        f"--{b}\r\n"
        'Content-Type: text/plain; charset="utf-8"\r\n'
        f"Content-Transfer-Encoding: {plain_cte}\r\n"
        "\r\n"
        f"{plain}"
        f"\r\n--{b}\r\n"
        'Content-Type: text/html; charset="utf-8"\r\n'
        f"Content-Transfer-Encoding: {html_cte}\r\n"
        "\r\n"
        f"{html_body}"
        f"\r\n--{b}--\r\n"
    ).encode("ascii")


def _wire_format(raw: bytes) -> None:
    if not raw.isascii():
        raise InvalidDraft("serialized message is not 7-bit clean")
    if raw.count(b"\n") != raw.count(b"\r\n") or raw.count(b"\r") != raw.count(b"\r\n"):
        raise HeaderInjection("bare CR or LF in serialized message")
    if not raw.endswith(b"\r\n"):
        raise InvalidDraft("serialized message does not end with CRLF")
    if any(len(line) > _MAX_LINE for line in raw.split(b"\r\n")):
        raise InvalidDraft("a line exceeds 998 octets")


def _verify_wire(raw: bytes, expected: list[tuple[str, object]]) -> None:
    """The structural half of :func:`_verify`, for messages this module wrote itself.

    CRLF only, 7-bit, lines <= 998; the header block holds exactly the intended fields in order
    (plus the top Content-Type) and nothing that could be read as another header.
    """
    _wire_format(raw)
    head, sep, _ = raw.partition(b"\r\n\r\n")
    if not sep:
        raise InvalidDraft("serialized message has no body")
    names: list[str] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not names:
                raise HeaderInjection("continuation line before the first header")
            continue
        m = _HEADER_LINE_RE.match(line)
        if m is None:
            raise HeaderInjection(f"not a header line: {line[:40]!r}")
        names.append(m.group(1).decode("ascii").lower())
    want = [name.lower() for name, _ in expected] + ["content-type"]
    if names != want:
        raise HeaderInjection(f"serialized headers {names} differ from the intended set")


def _build(headers: list[tuple[str, object]], html: str, text: str, parts: list[_Part]) -> bytes:
    """Assemble headers and the MIME tree (with files) from already-validated values."""
    msg = EmailMessage(policy=_POLICY)
    for name, value in headers:
        msg[name] = _header_value(name, value)

    msg.set_content(text, cte=_body_cte(text))
    msg.add_alternative(html, subtype="html", cte=_body_cte(html))
    inline = [p for p in parts if p.cid is not None]
    if inline:
        html_part = list(msg.iter_parts())[1]  # multipart/alternative: [plain, html]
        for p in inline:
            html_part.add_related(
                p.data, p.maintype, p.subtype, cid=p.cid, filename=p.filename, disposition="inline"
            )
    for p in parts:
        if p.cid is None:
            msg.add_attachment(p.data, p.maintype, p.subtype, filename=p.filename)

    for part in msg.walk():
        if part is not msg:
            del part["MIME-Version"]  # the stdlib adds one to every sub-part
    return msg.as_bytes()
