"""Unambiguous byte strings for everything that is signed, hashed or derived.

Signatures, HKDF inputs, AEAD associated data and commitments all bind the
protocol version, a purpose label and the round's context (federation, round,
parties). Each field is written with a type tag and a length prefix, so that
no two different field lists encode to the same bytes: ("ab", "c") and
("a", "bc") differ, and so do the integer 7 and the string "7".
"""

from __future__ import annotations

import functools
import hashlib
import struct

__all__ = ["PROTOCOL", "commit", "extend", "frame", "prefix"]

# Versioned so that a later, incompatible protocol can never accept (or be
# tricked into producing) a signature or key of this one. v2: masks expand
# from AES-256-CTR; v1 expanded them from ChaCha20, so a v1 client and a v2
# server would agree on every message and still compute a wrong sum.
PROTOCOL = "fedcore/secagg+/v2"

Field = bytes | str | int


_LENGTH = struct.Struct(">I")


@functools.lru_cache(maxsize=1 << 16)
def _encode_text(field: str | int) -> bytes:
    # Ids, labels and round numbers recur in every frame of a round: cached.
    if isinstance(field, str):
        data, tag = field.encode("utf-8"), b"s"
    else:
        data, tag = str(field).encode("ascii"), b"i"
    return tag + _LENGTH.pack(len(data)) + data


def _encode(field: Field) -> bytes:
    if isinstance(field, bytes):
        return b"b" + _LENGTH.pack(len(field)) + field
    if isinstance(field, str) or (isinstance(field, int) and not isinstance(field, bool)):
        return _encode_text(field)
    raise TypeError(f"a transcript field must be bytes, str or int, not {type(field).__name__}")


_HEAD = _encode(PROTOCOL)


def frame(label: str, *fields: Field) -> bytes:
    """Encode the protocol version, a purpose `label` and `fields` as one byte string."""
    return b"".join([_HEAD, _encode(label), *map(_encode, fields)])


def extend(start: bytes, *fields: Field) -> bytes:
    """Append `fields` to a frame: `extend(frame(label, *a), *b) == frame(label, *a, *b)`.

    Each field's encoding is self-delimiting, so a frame is the concatenation
    of its fields' encodings: a caller that frames many messages with the
    same leading fields (label, federation, round) encodes them once.
    """
    return b"".join([start, *map(_encode, fields)])


@functools.lru_cache(maxsize=1024)
def prefix(label: str, *fields: str | int) -> bytes:
    """Return `frame(label, *fields)`, cached: the shared start of a round's frames."""
    return frame(label, *fields)


def commit(label: str, *fields: Field) -> bytes:
    """Return the SHA-256 commitment to `fields` under the purpose `label`.

    The committed values are high-entropy secrets (256-bit seeds, Shamir shares
    of them), so the hash hides them without a separate blinding nonce.
    """
    return hashlib.sha256(frame(label, *fields)).digest()
