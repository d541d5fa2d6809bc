"""Dev TLS: a local CA and one server certificate for 127.0.0.1/localhost, in an ignored folder.

Run by ``make certs``; does nothing when the files exist and are valid for at least 30 days.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NAMES = [
    "localhost",
    "chatflow.test",
    "*.chatflow.test",
    "gateway",
    "auth",
    "ingest",
    "threader",
    "sender",
    "notifier",
    "postgres",
    "redis",
    "smtp-sink",
]


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _valid(path: Path) -> bool:
    if not path.exists():
        return False
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=30)


def make_secret(path: Path) -> None:
    """A dev HMAC key (conversation tokens); production sets CHATFLOW_THREAD_TOKEN_SECRET."""
    if not path.exists():
        path.write_text(secrets.token_hex(32) + "\n")
        path.chmod(0o600)


def make_vapid(path: Path) -> None:
    """The notifier's VAPID key (Web Push, RFC 8292): a P-256 key; production sets its own."""
    if not path.exists():
        _write_key(path, ec.generate_private_key(ec.SECP256R1()))


def make(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    make_secret(folder / "thread-token.key")
    make_vapid(folder / "vapid.pem")
    ca_pem, srv_pem = folder / "ca.pem", folder / "server.pem"
    if _valid(ca_pem) and _valid(srv_pem) and (folder / "server.key").exists():
        return
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ChatFLOW dev CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in NAMES]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chatflow dev")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=397))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(folder / "ca.key", ca_key)
    _write_key(folder / "server.key", key)
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    srv_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    print(f"dev certificates written to {folder}", file=sys.stderr)


if __name__ == "__main__":
    make(Path(sys.argv[1] if len(sys.argv) > 1 else "var/certs"))
