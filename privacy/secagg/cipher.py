"""Authenticated encryption of the Shamir shares that clients send each other.

ChaCha20-Poly1305 (RFC 8439). The associated data binds the federation, the
round, the sender and the receiver, so the server cannot redirect a share to
another client, reflect it back, or replay it in another round: decryption
fails. Each key is used for at most two messages (one each way) and every
message carries a fresh random 96-bit nonce.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from privacy.secagg.errors import ProtocolViolation
from privacy.secagg.transcript import extend, prefix

__all__ = ["NONCE_BYTES", "TAG_BYTES", "decrypt", "encrypt", "share_context"]

NONCE_BYTES = 12
TAG_BYTES = 16


def share_context(*, federation_id: str, round: int, sender: str, receiver: str) -> bytes:
    """Return the associated data of a share sent from `sender` to `receiver`."""
    return extend(prefix("share-ciphertext", federation_id, round), sender, receiver)


def encrypt(key: bytes, plaintext: bytes, *, associated_data: bytes, nonce: bytes) -> bytes:
    """Encrypt and authenticate; returns nonce || ciphertext || tag."""
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce has {len(nonce)} bytes; ChaCha20-Poly1305 needs 12")
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated_data)


def decrypt(key: bytes, sealed: bytes, *, associated_data: bytes) -> bytes:
    """Check and decrypt nonce || ciphertext || tag.

    Raises:
        ProtocolViolation: too short, or not authentic under `key` and
            `associated_data` (tampered, misaddressed or replayed).
    """
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise ProtocolViolation(f"a sealed share has only {len(sealed)} bytes")
    try:
        return ChaCha20Poly1305(key).decrypt(
            sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated_data
        )
    except InvalidTag as exc:
        raise ProtocolViolation("a share ciphertext failed authentication") from exc
