"""TLS material for the SuperLink and one authentication key pair per bank.

    fedfraud certs  ->  certs/ca.crt, ca.key                    the CA (ca.key: keep offline)
                        certs/server/ca.crt, server.pem, server.key   the SuperLink's
                        certs/bank_00/ca.crt, bank.key, bank.key.pub  each bank's, ...

One folder per party, so each can be given (mounted) only its own files.

The CA signs the SuperLink's certificate, whose SAN covers every name the banks may
dial (localhost, 127.0.0.1 and the compose service name). Bank keys are ECDSA P-384 in
OpenSSH format, what ``flower-supernode --auth-supernode-private-key`` and
``flwr supernode register`` expect. Private keys are written 0600; the folder is
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

SERVER_NAMES = ("localhost", "127.0.0.1", "superlink")  # superlink: the compose service
VALID_DAYS = 365
CA_CERT, SERVER_CERT, SERVER_KEY = "ca.crt", "server/server.pem", "server/server.key"
SERVER_CA = "server/ca.crt"


def bank_key(bank: int) -> str:
    return f"bank_{bank:02d}/bank.key"


def bank_ca(bank: int) -> str:
    return f"bank_{bank:02d}/ca.crt"


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


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


def make_certificates(out_dir: Path, num_banks: int,
                      server_names: tuple[str, ...] = SERVER_NAMES) -> Path:
    """Write a CA, the SuperLink's certificate and key, and each bank's key pair."""
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

    for bank in range(num_banks):
        _write(out_dir / bank_ca(bank), ca_pem)
        key = ec.generate_private_key(ec.SECP384R1())
        _write(out_dir / bank_key(bank),
               key.private_bytes(pem, serialization.PrivateFormat.OpenSSH,
                                 serialization.NoEncryption()), private=True)
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH)
        _write(out_dir / f"{bank_key(bank)}.pub", public + f" bank-{bank}\n".encode())
    return out_dir
