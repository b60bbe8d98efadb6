"""A development PKI for mutual TLS between the services, made with ``cryptography``.

``tail-service certs init`` (and ``tail-service up`` on first run) creates a CA and one
certificate per identity: ``tail`` (the HTTP service, a client of both gRPC services),
``auth`` and ``secrets`` (the gRPC servers) and ``admin`` (the CLI). The identity is the
certificate's common name and also a DNS subject-alternative name; the gRPC servers
authorize each call by it. Every certificate is valid for ``localhost``, ``127.0.0.1``
and ``::1`` too, so services on loopback verify each other's host names normally.

Private keys are written with mode 0600. This is for laptops and tests: production
issues certificates from its own CA and points the config at them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: the identities of the stack, in the order they are issued
IDENTITIES = ("tail", "auth", "secrets", "admin")
_LOOPBACK_NAMES = ("localhost",)
_LOOPBACK_IPS = ("127.0.0.1", "::1")


@dataclass(frozen=True, slots=True)
class CertFiles:
    """Where one identity's PEM files live (``ca`` verifies the peer)."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class Authority:
    """A CA's certificate and private key, able to issue leaf certificates."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tail Service (development)"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(common_name: str = "Tail Service dev CA", *, days: int = 3650) -> Authority:
    """A new self-signed CA (P-256)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key)


def issue(
    ca: Authority,
    identity: str,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    days: int = 825,
    extra_dns: tuple[str, ...] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate for ``identity`` (CN and DNS SAN), usable as server and client."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    start = not_before or now - dt.timedelta(minutes=5)
    end = not_after or now + dt.timedelta(days=days)
    sans: list[x509.GeneralName] = [x509.DNSName(identity)]
    sans += [x509.DNSName(n) for n in (*_LOOPBACK_NAMES, *extra_dns) if n != identity]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in _LOOPBACK_IPS]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(identity))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return cert, key


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by the owner only, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def files_for(directory: Path, identity: str) -> CertFiles:
    """The file layout of :func:`init_dev_pki` for ``identity``."""
    return CertFiles(directory / "ca.pem", directory / f"{identity}.pem", directory / f"{identity}.key")


def load_authority(directory: Path) -> Authority:
    cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an EC key")
    return Authority(cert, key)


def init_dev_pki(
    directory: Path, *, identities: tuple[str, ...] = IDENTITIES, force: bool = False
) -> dict[str, CertFiles]:
    """Create (or complete) the development PKI in ``directory``.

    Existing files are kept unless ``force``: a second run issues only what is missing,
    from the same CA. Returns each identity's files.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if force or not (directory / "ca.pem").exists() or not (directory / "ca.key").exists():
        ca = make_ca()
        write_private(directory / "ca.key", key_pem(ca.key))
        write_public(directory / "ca.pem", cert_pem(ca.cert))
        force = True
    else:
        ca = load_authority(directory)
    out = {}
    for identity in identities:
        files = files_for(directory, identity)
        if force or not files.cert.exists() or not files.key.exists():
            cert, key = issue(ca, identity)
            write_private(files.key, key_pem(key))
            write_public(files.cert, cert_pem(cert))
        out[identity] = files
    return out
