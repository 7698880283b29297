"""Mask expansion: a 256-bit seed to a vector that is exactly uniform in Z_(2^b).

The keystream is ChaCha20 (RFC 8439) keyed with the full 32-byte seed, block
counter and nonce zero. Every seed is used for one keystream only: self-mask
seeds are fresh per round and pairwise seeds are derived with HKDF from a
per-round X25519 secret bound to the federation, round and pair. Nothing is
folded to a shorter seed (a numpy generator seeded from 32 bits of the key
gives two different keys the same mask with probability about 2^-16 per
pair of a large federation, and is not a cryptographic generator anyway).

Uniformity in the ring: the keystream is read as little-endian 32-bit words
(64-bit words for b > 32), uniform in Z_(2^32). Reducing a uniform word mod
2^b, i.e. keeping its low b bits, is exactly uniform, because 2^b divides
2^32: each residue has exactly 2^(32-b) preimages, so no rejection sampling
is needed (rejection is only needed for a modulus that is not a power of two,
as in `shamir`). Reduction mod 2^b is also a ring homomorphism from Z_(2^32),
so masks are added with wrapping 32-bit arithmetic and the sum is reduced
once at the end, which saves a pass over the vector per mask.

Masks are generated and added in chunks (`CHUNK_ELEMENTS` words, 128 KiB for uint32),
chunk-major: for each chunk of the vector every keystream advances by one
chunk, so that the chunk of the output and the keystream buffer stay in the
L2 cache and peak memory is the output vector plus one chunk, whatever the
model size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms

from fedcore import Array
from privacy.secagg.keys import SECRET_BYTES

__all__ = ["CHUNK_ELEMENTS", "Mask", "apply_masks", "expand_mask", "pairwise_sign", "ring_dtype"]

CHUNK_ELEMENTS = 1 << 15
# ChaCha20's block counter is 32 bits (RFC 8439 §2.3): one keystream holds at
# most 2^32 blocks of 64 bytes.
_MAX_KEYSTREAM_BYTES = (1 << 32) * 64
# OpenSSL may need up to one block of slack in the output buffer.
_SLACK_BYTES = 64


@dataclass(frozen=True, slots=True, repr=False)
class Mask:
    """One mask term: the seed it expands from, added (+1) or subtracted (-1)."""

    seed: bytes
    sign: int

    def __post_init__(self) -> None:
        if len(self.seed) != SECRET_BYTES:
            raise ValueError(f"a mask seed has {len(self.seed)} bytes; it must have 32")
        if self.sign not in (1, -1):
            raise ValueError(f"a mask sign is {self.sign}; it must be 1 or -1")

    def __repr__(self) -> str:
        return f"Mask(sign={self.sign:+d})"


def ring_dtype(ring_bits: int) -> np.dtype[Any]:
    """Return the unsigned dtype that holds Z_(2^ring_bits): uint32 up to 32 bits."""
    if not 1 <= ring_bits <= 64:
        raise ValueError(f"ring_bits is {ring_bits}; it must be in 1..64")
    return np.dtype(np.uint32) if ring_bits <= 32 else np.dtype(np.uint64)


def _keystream(seed: bytes) -> CipherContext:
    nonce = bytes(16)
    return Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()


def apply_masks(
    vector: Array,
    masks: Sequence[Mask],
    *,
    ring_bits: int,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> None:
    """Add every mask (with its sign) to `vector` in place, then reduce mod 2^ring_bits.

    Raises:
        ValueError: `vector` is not a contiguous 1-D array of `ring_dtype(ring_bits)`,
            or is longer than one keystream.
    """
    dtype = ring_dtype(ring_bits)
    if vector.dtype != dtype or vector.ndim != 1 or not vector.flags.c_contiguous:
        raise ValueError(f"the vector must be a contiguous 1-D {dtype} array")
    if vector.size * dtype.itemsize > _MAX_KEYSTREAM_BYTES:
        raise ValueError(f"a vector of {vector.size} elements exceeds one ChaCha20 keystream")
    streams = [(_keystream(mask.seed), mask.sign) for mask in masks]
    chunk = max(1, min(chunk_elements, vector.size))
    zeros = memoryview(bytes(chunk * dtype.itemsize))
    buffer = bytearray(chunk * dtype.itemsize + _SLACK_BYTES)
    words = np.frombuffer(buffer, dtype=dtype, count=chunk)
    for start in range(0, vector.size, chunk):
        part = vector[start : start + chunk]
        size = part.size
        for stream, sign in streams:
            stream.update_into(zeros[: size * dtype.itemsize], buffer)
            if sign > 0:
                np.add(part, words[:size], out=part)
            else:
                np.subtract(part, words[:size], out=part)
    if ring_bits < 8 * dtype.itemsize:
        np.bitwise_and(vector, dtype.type((1 << ring_bits) - 1), out=vector)


def expand_mask(seed: bytes, length: int, ring_bits: int) -> Array:
    """Expand a 32-byte `seed` to `length` elements uniform in Z_(2^ring_bits)."""
    vector = np.zeros(length, dtype=ring_dtype(ring_bits))
    apply_masks(vector, [Mask(seed, 1)], ring_bits=ring_bits)
    return vector


def pairwise_sign(client_id: str, neighbour: str) -> int:
    """Return +1 if `client_id` adds the pairwise mask it shares with `neighbour`, else -1.

    The smaller id adds and the larger subtracts, so each pair's masks cancel.
    """
    return 1 if client_id < neighbour else -1
