"""Identity keys, per-round key pairs, signatures, key agreement and key derivation.

Each client has a long-lived Ed25519 identity key whose public half the
aggregator registers at enrollment. In every round it draws two fresh X25519
key pairs, as in Bonawitz et al. (CCS 2017, §4): the *cipher* pair encrypts
the Shamir shares it exchanges with its neighbours, the *mask* pair agrees the
pairwise mask seeds. They must differ: when a client drops out, the server
reconstructs its mask key to remove its pairwise masks, and with a single key
it could then also decrypt every share that client sent or received.

The advertised pair is signed with the identity key over the federation, the
round, the client id and both public keys, so that the server can neither
substitute keys nor replay them from another round.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privacy.secagg.errors import ProtocolViolation
from privacy.secagg.transcript import extend, frame, prefix

__all__ = [
    "PUBLIC_KEY_BYTES",
    "SECRET_BYTES",
    "SIGNATURE_BYTES",
    "ClientIdentity",
    "Entropy",
    "KeyPurpose",
    "RoundKeys",
    "advertisement_payload",
    "agree",
    "check_public_key",
    "derive_key",
    "hkdf_sha256",
    "load_public_key",
    "verify_signature",
]

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
# Seeds, mask keys and derived keys are all 256 bits: the full strength of
# X25519 (about 128-bit security) with no truncation anywhere.
SECRET_BYTES = 32

# A source of uniformly random bytes. Always `os.urandom` in production; tests
# pass a seeded generator so that statistical checks are reproducible.
Entropy = Callable[[int], bytes]

# HKDF salt (RFC 5869 §3.1: a non-secret, application-specific value).
_SALT = frame("hkdf-salt")


class KeyPurpose(StrEnum):
    """What a key derived from an X25519 shared secret is used for."""

    SHARE_CIPHER = "share-cipher"
    PAIRWISE_MASK = "pairwise-mask"


@dataclass(frozen=True, slots=True, repr=False)
class ClientIdentity:
    """A client's id and its long-lived Ed25519 signing key."""

    client_id: str
    signing_key: Ed25519PrivateKey

    @classmethod
    def generate(cls, client_id: str) -> ClientIdentity:
        """Create an identity with a fresh signing key (done once, at enrollment)."""
        return cls(client_id, Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key that the aggregator registers."""
        return self.signing_key.public_key().public_bytes_raw()

    def sign(self, payload: bytes) -> bytes:
        """Sign `payload` with the identity key."""
        return self.signing_key.sign(payload)

    def __repr__(self) -> str:
        return f"ClientIdentity(client_id={self.client_id!r})"


@dataclass(frozen=True, slots=True, repr=False)
class RoundKeys:
    """A client's two X25519 key pairs for one round (see the module docstring)."""

    cipher: X25519PrivateKey
    mask: X25519PrivateKey

    @classmethod
    def generate(cls, entropy: Entropy = os.urandom) -> RoundKeys:
        """Draw both private keys from `entropy` (X25519 clamps any 32 bytes)."""
        cipher = X25519PrivateKey.from_private_bytes(entropy(SECRET_BYTES))
        mask = X25519PrivateKey.from_private_bytes(entropy(SECRET_BYTES))
        return cls(cipher, mask)

    @property
    def cipher_public(self) -> bytes:
        """The raw public cipher key."""
        return self.cipher.public_key().public_bytes_raw()

    @property
    def mask_public(self) -> bytes:
        """The raw public mask key."""
        return self.mask.public_key().public_bytes_raw()

    @property
    def mask_secret(self) -> bytes:
        """The raw private mask key: the secret that is Shamir-shared."""
        return self.mask.private_bytes_raw()

    def __repr__(self) -> str:
        return "RoundKeys(<secret>)"


def advertisement_payload(
    *, federation_id: str, round: int, client_id: str, cipher_key: bytes, mask_key: bytes
) -> bytes:
    """Return the bytes a client signs when it advertises its round keys."""
    start = prefix("advertise-keys", federation_id, round)
    return extend(start, client_id, cipher_key, mask_key)


def verify_signature(public_key: bytes, payload: bytes, signature: bytes) -> bool:
    """Check an Ed25519 `signature` on `payload`; False for any malformed input."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, payload)
    except (InvalidSignature, ValueError):
        return False
    return True


def load_public_key(public_key: bytes) -> X25519PublicKey:
    """Load a raw X25519 public key, for a party that agrees with it many times.

    Raises:
        ProtocolViolation: the key does not have 32 bytes, or is refused.
    """
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ProtocolViolation(f"an X25519 public key has {len(public_key)} bytes, not 32")
    try:
        return X25519PublicKey.from_public_bytes(public_key)
    except ValueError as exc:
        raise ProtocolViolation("an X25519 public key is not a valid point encoding") from exc


def agree(private: X25519PrivateKey, peer_public: bytes | X25519PublicKey) -> bytes:
    """Return the X25519 shared secret with `peer_public` (raw, or `load_public_key`'s).

    Raises:
        ProtocolViolation: the peer key has the wrong length or is a low-order
            point (the shared secret would be all zeros, RFC 7748 §6.1).
    """
    peer = load_public_key(peer_public) if isinstance(peer_public, bytes) else peer_public
    try:
        return private.exchange(peer)
    except ValueError as exc:
        raise ProtocolViolation("an X25519 public key is a low-order point") from exc


# A fixed key used only to probe whether an advertised public key is usable.
_PROBE = X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def check_public_key(public_key: bytes) -> str | None:
    """Return why `public_key` is not a usable X25519 key, or None if it is."""
    try:
        agree(_PROBE, public_key)
    except ProtocolViolation as exc:
        return str(exc)
    return None


def hkdf_sha256(
    ikm: bytes, *, salt: bytes | None, info: bytes, length: int = SECRET_BYTES
) -> bytes:
    """Derive `length` bytes with HKDF-SHA256 (RFC 5869)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def derive_key(
    shared_secret: bytes,
    *,
    purpose: KeyPurpose,
    federation_id: str,
    round: int,
    pair: tuple[str, str],
) -> bytes:
    """Derive a 256-bit key for `purpose` from an X25519 shared secret.

    The pair of client ids is sorted, so both ends derive the same key, and
    the federation and round are bound, so no key is ever reused elsewhere.
    """
    first, second = sorted(pair)
    info = extend(prefix(purpose.value, federation_id, round), first, second)
    return hkdf_sha256(shared_secret, salt=_SALT, info=info)
