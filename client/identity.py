"""The bank's own key pair, made at the bank: only the public key ever leaves.

ECDSA P-384 in OpenSSH format, what ``flower-supernode --auth-supernode-private-key``
and ``flwr supernode register`` expect. The private key is created 0600 from its first
byte; the operator registers the ``.pub`` and can never act as the bank.
"""

from __future__ import annotations

from pathlib import Path

from common.files import write_private

PRIVATE_KEY, PUBLIC_KEY = "bank.key", "bank.key.pub"


def ensure_key_pair(key_dir: Path, bank: int) -> Path:
    """The bank's key pair in ``key_dir`` (made once); returns the public key's path."""
    private, public = key_dir / PRIVATE_KEY, key_dir / PUBLIC_KEY
    if private.exists() and public.exists():
        return public
    # Only here: ``fedfraud-bank run`` stays up for the bank's life, importing little.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP384R1())
    write_private(private, key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.OpenSSH,
                                             serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + f" bank-{bank}\n".encode())
    return public
