"""DKIM signing (RFC 6376) with dkimpy, for the mailboxes' domains that have a key.

Keys come from a directory of ``<domain>.<selector>.key`` PEM files and/or the ``dkim_keys``
setting; all are loaded (and checked) at start, so a bad key stops the service instead of
silently sending unsigned mail. A mailbox ``support@eu.example.com`` is signed with the key of
``eu.example.com`` or, failing that, of a parent domain (``example.com``: relaxed DMARC alignment).

dkimpy does the DKIM work: canonicalization (relaxed/relaxed, which survives relays that refold
headers or touch trailing whitespace), header selection with oversigning of the singleton
headers (so nobody can add a second From/Subject/To after us), the tag list and folding. Its RSA
is pure Python (~8 ms per 2048-bit signature, most of a message's CPU), so by default the one
private-key operation runs in OpenSSL instead (``dkim_rsa = "openssl"``). RSASSA-PKCS1-v1_5 is
deterministic: both give the same signature bytes for the same input, which a test checks.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from services.sender.settings import DkimKeySetting

_SELECTOR_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_DOMAIN_RE = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}")
# Singletons (RFC 5322 3.6) we write, signed once more than they occur: an added copy breaks it.
_OVERSIGN = (
    b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"in-reply-to", b"references",
    b"reply-to", b"sender",
)  # fmt: skip
MIN_BITS = 1024
# dkimpy parses the PEM key (in pure Python) on every sign() call; the key of a domain never
# changes while we run, so the parse is done once per key. A pure function: same result.
if not hasattr(dkim.parse_pem_private_key, "cache_info"):
    dkim.parse_pem_private_key = functools.lru_cache(maxsize=64)(dkim.parse_pem_private_key)

# dkimpy's relaxed canonicalization and its message parser are regular expressions over the whole
# message: ~20 ``re.sub`` calls a message (two per header, three over the body) and a split of
# every body line, most of a signature's CPU after the RSA operation, though a message we composed
# has no whitespace for them to change and only CRLF line ends. The replacements below give the
# same result for *any* input (a test checks them against the originals): they only skip the
# regular expression when the bytes it would match are not there at all.
_canon = dkim.canonicalization
# The originals (kept on our functions, so a second import does not wrap them twice); the test
# compares against these.
ORIGINALS: dict[str, Any] = {
    name: getattr(getattr(mod, name), "chatflow_original", getattr(mod, name))
    for mod, name in (
        (_canon, "strip_trailing_whitespace"),
        (_canon, "compress_whitespace"),
        (_canon, "unfold_header_value"),
        (dkim, "rfc822_parse"),
    )
}
_TRAILING_WSP = re.compile(b"[\t ]+\r\n")
_WSP_RUN = re.compile(b"[\t ]+")


def strip_trailing_whitespace(content: bytes) -> bytes:
    """``re.sub(b"[\\t ]+\\r\\n", b"\\r\\n", content)``, without the regex when nothing matches."""
    if b" \r\n" not in content and b"\t\r\n" not in content:
        return content
    return _TRAILING_WSP.sub(b"\r\n", content)


def compress_whitespace(content: bytes) -> bytes:
    """``re.sub(b"[\\t ]+", b" ", content)``: only runs of blanks or a tab change anything."""
    if b"  " not in content and b"\t" not in content:
        return content
    return _WSP_RUN.sub(b" ", content)


def unfold_header_value(content: bytes) -> bytes:
    """``re.sub(b"\\r?\\n", b"", content)``: every LF goes, and the CR just before one."""
    if b"\n" not in content:
        return content
    return content.replace(b"\r\n", b"\n").replace(b"\n", b"")


def rfc822_parse(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """dkimpy's ``rfc822_parse``, splitting only the header block into lines.

    The original splits the whole message on ``\\r?\\n`` and joins the body's lines again with
    CRLF: when every LF follows a CR, that body is the message after its first blank line, byte
    for byte. Anything else (bare LFs, no header block) goes to the original as a whole.
    """
    end = message.find(b"\r\n\r\n")
    if end <= 0 or message.startswith(b"\r\n") or message.count(b"\n") != message.count(b"\r\n"):
        return ORIGINALS["rfc822_parse"](message)
    headers, _ = ORIGINALS["rfc822_parse"](message[: end + 2])
    return headers, message[end + 4 :]


_fast: Any
for _mod, _fast in (
    (_canon, strip_trailing_whitespace),
    (_canon, compress_whitespace),
    (_canon, unfold_header_value),
    (dkim, rfc822_parse),
):
    _fast.chatflow_original = ORIGINALS[_fast.__name__]
    setattr(_mod, _fast.__name__, _fast)


class DkimKeyError(ValueError):
    """A configured key cannot be used (unreadable, not RSA, too short, bad name)."""


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    pem: bytes


def _check(domain: str, selector: str, pem: bytes, where: str) -> DkimKey:
    domain = domain.lower().rstrip(".")
    if not _DOMAIN_RE.fullmatch(domain):
        raise DkimKeyError(f"{where}: {domain!r} is not a domain name")
    if not _SELECTOR_RE.fullmatch(selector):
        raise DkimKeyError(f"{where}: {selector!r} is not a selector (one DNS label)")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise DkimKeyError(f"{where}: not a PEM private key without password ({exc})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise DkimKeyError(f"{where}: only RSA keys are supported")
    if key.key_size < MIN_BITS:
        raise DkimKeyError(f"{where}: {key.key_size}-bit key, at least {MIN_BITS} needed")
    # dkimpy reads PKCS#1 PEM ("RSA" in its header line); accept PKCS#8 files by converting.
    pkcs1 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return DkimKey(domain, selector, pkcs1)


def load_keys(keys_dir: Path | None, configured: dict[str, DkimKeySetting]) -> dict[str, DkimKey]:
    """Every configured key by domain; the ``dkim_keys`` setting wins over a file for a domain."""
    keys: dict[str, DkimKey] = {}
    if keys_dir is not None:
        if not keys_dir.is_dir():
            raise DkimKeyError(f"dkim_keys_dir {keys_dir} is not a directory")
        for path in sorted(keys_dir.glob("*.key")):
            domain, dot, selector = path.name[: -len(".key")].rpartition(".")
            if not dot:
                raise DkimKeyError(f"{path}: name must be <domain>.<selector>.key")
            k = _check(domain, selector, path.read_bytes(), str(path))
            if k.domain in keys:
                raise DkimKeyError(f"{path}: a second key for {k.domain}")
            keys[k.domain] = k
    for domain, spec in configured.items():
        where = f"dkim_keys[{domain!r}]"
        if spec.key_file is not None:
            pem = spec.key_file.read_bytes()
        elif spec.key:
            pem = spec.key.encode()
        else:
            raise DkimKeyError(f"{where}: needs key_file or key")
        k = _check(domain, spec.selector, pem, where)
        keys[k.domain] = k
    return keys


def public_record(pem: bytes) -> bytes:
    """The DNS TXT record to publish for a key: ``v=DKIM1; k=rsa; p=...``."""
    key = serialization.load_pem_private_key(pem, password=None)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


class _OpenSSLDKIM(dkim.DKIM):
    """dkimpy with its one RSA private-key operation done by OpenSSL.

    ``gen_header`` is dkimpy 1.1's, RSA branch only, with ``RSASSA_PKCS1_v1_5_sign(h, pk)``
    replaced by the same PKCS#1 v1.5 signature over the same digest from ``cryptography``.
    """

    openssl_key: rsa.RSAPrivateKey

    def gen_header(
        self,
        fields: list[tuple[bytes, bytes]],
        include_headers: list[bytes],
        canon_policy: Any,
        header_name: bytes,
        pk: Any,
        standardize: bool = False,
    ) -> bytes:
        if self.signature_algorithm != b"rsa-sha256" or standardize:
            return bytes(
                super().gen_header(
                    fields, include_headers, canon_policy, header_name, pk, standardize
                )
            )
        header_value = b"; ".join(b"=".join(x) for x in fields)
        header_value = dkim.fold(header_value, namelen=len(header_name), linesep=b"\r\n")
        header_value = dkim.RE_BTAG.sub(b"\\1", header_value)
        header = (header_name, b" " + header_value)
        h = dkim.HashThrough(self.hasher(), self.debug_content)
        sig = dict(fields)
        headers = canon_policy.canonicalize_headers(self.headers)
        self.signed_headers = dkim.hash_headers(
            h, canon_policy, headers, include_headers, header, sig
        )
        signature = self.openssl_key.sign(
            h.digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256())
        )
        idx = next(i for i in range(len(fields)) if fields[i][0] == b"b")
        fields[idx] = (b"b", base64.b64encode(signature))
        header_value = b"; ".join(b"=".join(x) for x in fields) + self.linesep
        return bytes(dkim.fold(header_value, namelen=len(header_name), linesep=self.linesep))


_NAME_CHARS = bytes(range(0x21, 0x7F))  # a header field name's characters (dkimpy's parser)
_SIG_NAME = b"DKIM-Signature"
_PROTO = dkim.DKIM()
_PROTO.add_frozen(_OVERSIGN)
_SIGNED = frozenset(_PROTO.should_sign | _PROTO.frozen_sign)  # what dkimpy signs by default
_TWICE = frozenset(_PROTO.frozen_sign)  # ...and once more


def _header_fields(message: bytes) -> tuple[list[list[bytes]], bytes] | None:
    """dkimpy's ``rfc822_parse`` for a message as we compose it (CRLF only, names of printable
    characters, no continuation first); None for anything else (dkimpy parses it then)."""
    end = message.find(b"\r\n\r\n")
    if end <= 0 or message.startswith(b"\r\n") or message.count(b"\n") != message.count(b"\r\n"):
        return None
    headers: list[list[bytes]] = []
    for line in message[:end].split(b"\r\n"):
        if line[:1] in (b"\t", b" "):
            if not headers:
                return None
            headers[-1][1] += line + b"\r\n"
            continue
        colon = line.find(b":")
        if colon <= 0 or line[:colon].translate(None, _NAME_CHARS):
            return None
        headers.append([line[:colon], line[colon + 1 :] + b"\r\n"])
    return headers, message[end + 4 :]


def _sign_openssl(message: bytes, k: DkimKey, key: rsa.RSAPrivateKey) -> bytes | None:
    """The DKIM-Signature dkimpy's ``DKIM.sign`` makes (rsa-sha256, relaxed/relaxed, its
    default headers with ours oversigned, ``i=@domain``, ``t=`` now), byte for byte (a test
    compares them), with the RSA in OpenSSL; None when the message is not one we composed.

    dkimpy spent ~155 µs of Python per 5 KB message around its 250 µs of RSA (a DKIM object, a
    canonicalization policy, a regular expression per header line); this spends ~90.
    """
    parsed = _header_fields(message)
    if parsed is None:
        return None
    headers, body = parsed
    names = [name for name, _ in headers if name.lower() in _SIGNED]
    names += [name for name in names if name.lower() in _TWICE]
    include = tuple(name.lower() for name in names)
    if b"from" not in include:
        return None  # dkimpy refuses it, with its own error
    relaxed = dkim.canonicalization.Relaxed
    body_hash = base64.b64encode(hashlib.sha256(relaxed.canonicalize_body(body)).digest())
    domain = k.domain.encode()
    fields = [
        (b"v", b"1"),
        (b"a", b"rsa-sha256"),
        (b"c", b"relaxed/relaxed"),
        (b"d", domain),
        (b"i", b"@" + domain),
        (b"q", b"dns/txt"),
        (b"s", k.selector.encode()),
        (b"t", str(int(time.time())).encode("ascii")),
        (b"h", b" : ".join(include)),
        (b"bh", body_hash),
        (b"b", b"0" * 60),  # as dkimpy: b= folds onto its own line
    ]
    value = dkim.fold(b"; ".join(b"=".join(f) for f in fields), len(_SIG_NAME), b"\r\n")
    value = dkim.RE_BTAG.sub(b"\\1", value)
    h = hashlib.sha256()
    canonical = relaxed.canonicalize_headers(headers)
    dkim.hash_headers(h, relaxed, canonical, include, (_SIG_NAME, b" " + value), dict(fields))
    signature = key.sign(h.digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    fields[-1] = (b"b", base64.b64encode(signature))
    value = b"; ".join(b"=".join(f) for f in fields) + b"\r\n"
    return _SIG_NAME + b": " + dkim.fold(value, len(_SIG_NAME), b"\r\n")


class Signer:
    """Signs outgoing messages for the domains it has keys for; passes the others through."""

    def __init__(self, keys: dict[str, DkimKey], rsa_backend: str = "openssl") -> None:
        self.keys = dict(keys)
        self.rsa_backend = rsa_backend
        self._openssl: dict[str, rsa.RSAPrivateKey] = {}
        if rsa_backend == "openssl":
            for domain, k in self.keys.items():
                loaded = serialization.load_pem_private_key(k.pem, password=None)
                assert isinstance(loaded, rsa.RSAPrivateKey)
                self._openssl[domain] = loaded

    def key_for(self, domain: str) -> DkimKey | None:
        """The key of ``domain`` or of its nearest parent with one (never a bare TLD)."""
        labels = domain.lower().rstrip(".").split(".")
        for i in range(len(labels) - 1):
            k = self.keys.get(".".join(labels[i:]))
            if k is not None:
                return k
        return None

    def sign(self, message: bytes, from_domain: str) -> tuple[bytes, str | None]:
        """``(message with a DKIM-Signature on top, d=)``, or the message as is and ``None``."""
        k = self.key_for(from_domain)
        if k is None:
            return message, None
        d: Any
        if k.domain in self._openssl:
            fast = _sign_openssl(message, k, self._openssl[k.domain])
            if fast is not None:
                return fast + message, k.domain
            d = _OpenSSLDKIM(message, linesep=b"\r\n")
            d.openssl_key = self._openssl[k.domain]
        else:
            d = dkim.DKIM(message, linesep=b"\r\n")
        d.add_frozen(_OVERSIGN)
        header = d.sign(
            k.selector.encode(),
            k.domain.encode(),
            k.pem,
            canonicalize=(b"relaxed", b"relaxed"),
        )
        return bytes(header) + message, k.domain
