"""Development certificates for TLS and mutual TLS, made with the `cryptography` package.

Two separate CAs, so a public client certificate can never pass as a service:
- the public CA signs the gateway's server certificate (and a client certificate for deployments
  that require client certificates on the public port);
- the internal CA signs the one certificate the services present to each other, valid for both
  server and client authentication, named `internal_tls_server_name`.
Private keys are written readable by their owner only. For production, bring your own PKI.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from moe_serve.runtime.security import DEFAULT_INTERNAL_SERVER_NAME, new_cluster_secret, write_secret_file

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Issued:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "moe-serve (development)"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _subject_alternative_names(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _builder(
    subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def make_ca(common_name: str, days: int) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        _builder(common_name, _name(common_name), key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Issued(certificate, key)


def issue(ca: Issued, common_name: str, hosts: list[str], usages: list[x509.ObjectIdentifier], days: int) -> Issued:
    """A leaf certificate signed by `ca`, valid for `hosts` (DNS names or IP addresses)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(common_name, ca.certificate.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if hosts:
        builder = builder.add_extension(_subject_alternative_names(hosts), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def _write(directory: Path, stem: str, issued: Issued) -> None:
    (directory / f"{stem}.pem").write_bytes(issued.certificate.public_bytes(serialization.Encoding.PEM))
    key_path = directory / f"{stem}.key"
    key_bytes = issued.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # created owner-only from the start: the key never exists with wider permissions
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(key_bytes)


def write_dev_certificates(
    directory: Path,
    hosts: list[str],
    internal_server_name: str = DEFAULT_INTERNAL_SERVER_NAME,
    days: int = 365,
) -> dict[str, Path]:
    """Write the public and internal CA, the gateway, client and internal certificates, a token file and a
    cluster secret."""
    directory.mkdir(parents=True, exist_ok=True)
    public_ca, internal_ca = make_ca("moe-serve public CA", days), make_ca("moe-serve internal CA", days)
    server_hosts = [*DEFAULT_HOSTS, *hosts]
    _write(directory, "ca", public_ca)
    _write(
        directory,
        "gateway",
        issue(public_ca, "moe-serve gateway", server_hosts, [ExtendedKeyUsageOID.SERVER_AUTH], days),
    )
    _write(directory, "client", issue(public_ca, "moe-serve client", [], [ExtendedKeyUsageOID.CLIENT_AUTH], days))
    _write(directory, "internal-ca", internal_ca)
    internal_usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    _write(
        directory, "internal", issue(internal_ca, internal_server_name, [internal_server_name], internal_usages, days)
    )
    secret = directory / "cluster.secret"
    if not secret.exists():  # like tokens: a running stack may use it
        write_secret_file(secret, new_cluster_secret())
    tokens = directory / "tokens.json"
    if not tokens.exists():  # keep tokens already handed out
        document = {"tokens": [{"name": "dev", "token": secrets.token_urlsafe(32), "models": ["*"]}]}
        descriptor = os.open(tokens, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump(document, file, indent=2)
    return {
        "public CA": directory / "ca.pem",
        "gateway certificate": directory / "gateway.pem",
        "client certificate": directory / "client.pem",
        "internal CA": directory / "internal-ca.pem",
        "internal certificate": directory / "internal.pem",
        "bearer tokens": tokens,
        "cluster secret": secret,
    }
