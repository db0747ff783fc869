"""The operator's TLS material: a CA and the SuperLink's certificate.

    fedfraud certs  ->  certs/ca.crt          the CA certificate: public, every bank gets it
                        certs/ca.key          the CA's key (keep offline; never leaves)
                        certs/server/ca.crt, server.pem, server.key   the SuperLink's

The CA signs the SuperLink's certificate, whose SAN covers every name the banks may
dial (localhost, 127.0.0.1 and the compose service name). Banks make their own key
pairs (``fedfraud-bank init``, client/identity.py); the operator only ever sees their
public keys. Private keys are created 0600 from the first byte; the folder is
git-ignored.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.files import write_private

SERVER_NAMES = ("localhost", "127.0.0.1", "superlink")  # superlink: the compose service
VALID_DAYS = 365
CA_CERT, SERVER_CERT, SERVER_KEY = "ca.crt", "server/server.pem", "server/server.key"
SERVER_CA = "server/ca.crt"


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:
        write_private(path, data)
    else:
        path.write_bytes(data)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedfraud"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certificates(out_dir: Path,
                      server_names: tuple[str, ...] = SERVER_NAMES) -> Path:
    """Write a CA and the SuperLink's certificate and key."""
    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    expires = now + dt.timedelta(days=VALID_DAYS)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(_name("fedfraud CA"))
        .issuer_name(_name("fedfraud CA")).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now)
        .not_valid_after(expires)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder().subject_name(_name(server_names[0]))
        .issuer_name(ca_cert.subject).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now)
        .not_valid_after(expires)
        .add_extension(_san(server_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    ca_pem = ca_cert.public_bytes(pem)
    _write(out_dir / CA_CERT, ca_pem)
    _write(out_dir / SERVER_CA, ca_pem)
    _write(out_dir / "ca.key", _pem_key(ca_key), private=True)
    _write(out_dir / SERVER_CERT, server_cert.public_bytes(pem))
    _write(out_dir / SERVER_KEY, _pem_key(server_key), private=True)

    return out_dir
