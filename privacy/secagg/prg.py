"""Mask expansion: a 256-bit seed to a vector that is exactly uniform in Z_(2^b).

The keystream is AES-256 in counter mode (NIST SP 800-38A §6.5) keyed with
the full 32-byte seed, the initial counter block zero and the whole 128-bit
block incremented as a big-endian integer, so that block j of the keystream
is AES_seed(j) and a keystream can start at any block: a slice of a vector
is masked on its own (`apply_masks(..., offset=...)`). Google's SecAgg
implementation expands its masks with AES-256-CTR too (federated-compute,
`fcp/secagg/shared/aes_ctr_prng.cc`: zero IV, at most 2^32 - 1 blocks per
key, the key a SHA-256 digest of the mask seed, the session and the
vector's name). AES-CTR rather than ChaCha20 because it is twice as fast
where the CPU has AES instructions (5.4 against 2.7 GB/s on one core with
AES-NI and VAES; without them ChaCha20 is the faster), and mask expansion is
most of a client's and of the server's time.

Every seed is used for one keystream only: self-mask seeds are fresh per
round and pairwise seeds are derived with HKDF from a per-round X25519
secret bound to the federation, round and pair. Nothing is folded to a
shorter seed (a numpy generator seeded from 32 bits of the key gives two
different keys the same mask with probability about 2^-16 per pair of a
large federation, and is not a cryptographic generator anyway). The blocks
of one keystream are a pseudorandom permutation's images of distinct
counters, so no 16-byte block repeats; by the PRP/PRF switching lemma this
is distinguishable from uniform with advantage at most q^2 / 2^129 for q
blocks, which the cap of 2^32 blocks (64 GiB) per keystream keeps below
2^-65, as in Google's implementation.

Uniformity in the ring: the keystream is read as little-endian 32-bit words
(64-bit words for b > 32), uniform in Z_(2^32). Reducing a uniform word mod
2^b, i.e. keeping its low b bits, is exactly uniform, because 2^b divides
2^32: each residue has exactly 2^(32-b) preimages, so no rejection sampling
is needed (rejection is only needed for a modulus that is not a power of two,
as in `shamir`). Reduction mod 2^b is also a ring homomorphism from Z_(2^32),
so masks are added with wrapping 32-bit arithmetic and the sum is reduced
once at the end, which saves a pass over the vector per mask.

Masks are generated and added in chunks (`CHUNK_ELEMENTS` words, 256 KiB
for uint32), chunk-major: for each chunk of the vector every keystream
advances by one chunk, so that the chunk of the output, the keystream buffer
and the zeros it encrypts (768 KiB in all) stay in cache, and peak memory is
the output vector plus a chunk per thread and, on several threads, a partial
sum of 16 chunks per extra thread, whatever the model size.
768 KiB fits a 1 MiB L2 but not a 512 KiB one; on a 512 KiB-L2 core (AMD
EPYC with VAES) 2^16 words per chunk were still 3 to 7 % faster than 2^15
words, which fit (P = 1e5 to 1e7), because every chunk of every mask costs
two calls and the Python around them with the GIL held, and 2^16 halves
them; 2^17 was no faster than 2^16.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from fedcore import Array
from privacy.secagg.keys import SECRET_BYTES

__all__ = ["CHUNK_ELEMENTS", "Mask", "apply_masks", "expand_mask", "pairwise_sign", "ring_dtype"]

CHUNK_ELEMENTS = 1 << 16
_BLOCK_BYTES = 16
# At most 2^32 AES blocks per keystream: the switching-lemma distance from
# uniform, q^2 / 2^129, stays below 2^-65 (Google's AesCtrPrng: 2^32 - 1).
_MAX_KEYSTREAM_BYTES = (1 << 32) * _BLOCK_BYTES
# cryptography asks for len(data) + block size - 1 bytes in update_into's buffer.
_SLACK_BYTES = _BLOCK_BYTES
# Threads only from 8192 elements on: near there a mask's GIL-held work (its
# cipher context and calls, 10 to 18 us) is as long as its GIL-free keystream
# and addition, and at P = 1e4 two threads were no faster than one (24 to
# 31 us per mask, against 26).
_MIN_THREADED_ELEMENTS = 1 << 13
# Threads sum their partial vectors every span of this many chunks (4 MiB of
# uint32), which bounds each partial vector to one span.
_CHUNKS_PER_SPAN = 16

_Stream = tuple[CipherContext, int]


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


def _keystream(seed: bytes, byte_offset: int) -> CipherContext:
    """Return the AES-256-CTR keystream of `seed` from byte `byte_offset` on."""
    block, skip = divmod(byte_offset, _BLOCK_BYTES)
    counter = block.to_bytes(_BLOCK_BYTES, "big")
    stream = Cipher(algorithms.AES(seed), modes.CTR(counter)).encryptor()
    if skip:
        stream.update(bytes(skip))
    return stream


def apply_masks(
    vector: Array,
    masks: Sequence[Mask],
    *,
    ring_bits: int,
    offset: int = 0,
    threads: int = 1,
) -> None:
    """Add every mask (with its sign) to `vector` in place, then reduce mod 2^ring_bits.

    Args:
        vector: The vector to mask or unmask, or a slice of one.
        masks: The masks to add or subtract.
        ring_bits: b of the ring Z_(2^b).
        offset: The index within the masks of `vector[0]`: a slice that starts
            at element `offset` of a vector gets the masks' elements from there.
        threads: How many threads share the work; the result does not depend on it.

    Raises:
        ValueError: `vector` is not a contiguous 1-D array of `ring_dtype(ring_bits)`,
            `offset` is negative, `threads` is below 1, or the masks would run
            past one keystream.
    """
    dtype = ring_dtype(ring_bits)
    if vector.dtype != dtype or vector.ndim != 1 or not vector.flags.c_contiguous:
        raise ValueError(f"the vector must be a contiguous 1-D {dtype} array")
    if offset < 0:
        raise ValueError(f"offset is {offset}; it must be at least 0")
    if threads < 1:
        raise ValueError(f"threads is {threads}; it must be at least 1")
    if (offset + vector.size) * dtype.itemsize > _MAX_KEYSTREAM_BYTES:
        raise ValueError(
            f"elements {offset} to {offset + vector.size} of a mask run past one keystream "
            f"({_MAX_KEYSTREAM_BYTES} bytes); split the vector under several seeds"
        )
    streams = [(_keystream(mask.seed, offset * dtype.itemsize), mask.sign) for mask in masks]
    if vector.size < _MIN_THREADED_ELEMENTS:
        threads = 1
    threads = min(threads, len(streams))
    if threads <= 1:
        _add_streams(vector, streams, CHUNK_ELEMENTS)
    else:
        _add_streams_threaded(vector, streams, CHUNK_ELEMENTS, threads)
    if ring_bits < 8 * dtype.itemsize:
        np.bitwise_and(vector, dtype.type((1 << ring_bits) - 1), out=vector)


def _add_streams(
    part: Array, streams: Sequence[_Stream], chunk: int, *, fresh: bool = False
) -> None:
    """Add the next `part.size` words of every stream to `part`, chunk-major.

    With `fresh`, `part` is zeroed first (a thread's partial vector).
    """
    if fresh:
        part.fill(0)
    itemsize = part.dtype.itemsize
    chunk = max(1, min(chunk, part.size))
    zeros = memoryview(bytes(chunk * itemsize))
    buffer = bytearray(chunk * itemsize + _SLACK_BYTES)
    words = np.frombuffer(buffer, dtype=part.dtype, count=chunk)
    for start in range(0, part.size, chunk):
        piece = part[start : start + chunk]
        size = piece.size
        for stream, sign in streams:
            stream.update_into(zeros[: size * itemsize], buffer)
            if sign > 0:
                np.add(piece, words[:size], out=piece)
            else:
                np.subtract(piece, words[:size], out=piece)


def _add_streams_threaded(
    vector: Array, streams: Sequence[_Stream], chunk: int, threads: int
) -> None:
    # Each thread adds a subset of the masks, the first into the vector and
    # the others into partial vectors that are summed into it with the same
    # wrapping arithmetic, so the result is bit for bit that of one thread.
    # The other split, slices of the vector with every keystream seeked to
    # each slice's start, costs every thread a cipher context and two calls
    # per mask with the GIL held: at P = 1e5 about 30 us of GIL per mask on
    # two threads and 35 to 65 on four, against 10 to 18 for mask subsets
    # whatever the threads. Median per mask on two cores (two runs), two
    # threads: P = 1e5 and 1000 masks (the server's case) 72 to 87 us with
    # mask subsets, 86 to 115 with slices, 114 to 120 on one thread;
    # P = 1e4 and 5000 masks 24 to 31, 57 to 63 and 26; P = 1e6 and 400
    # masks 0.58 ms either way, 0.97 on one. Slices win only on long
    # vectors with few masks (P = 1e7, 16 masks: 6.1 ms against 7.4, 9.5 on
    # one thread), which the server, the one caller with threads, never has.
    groups = [streams[i::threads] for i in range(threads)]
    span = chunk * _CHUNKS_PER_SPAN
    partials = [np.empty(min(span, vector.size), vector.dtype) for _ in range(threads - 1)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, vector.size, span):
            part = vector[start : start + span]
            outs = [part] + [partial[: part.size] for partial in partials]
            tasks = [
                pool.submit(_add_streams, out, group, chunk, fresh=index > 0)
                for index, (out, group) in enumerate(zip(outs, groups, strict=True))
            ]
            for task in tasks:
                task.result()
            for other in outs[1:]:
                np.add(part, other, out=part)


def expand_mask(seed: bytes, length: int, ring_bits: int, *, offset: int = 0) -> Array:
    """Expand a 32-byte `seed` to `length` elements uniform in Z_(2^ring_bits).

    The elements are those from index `offset` on of the seed's whole mask.
    """
    vector = np.zeros(length, dtype=ring_dtype(ring_bits))
    apply_masks(vector, [Mask(seed, 1)], ring_bits=ring_bits, offset=offset)
    return vector


def pairwise_sign(client_id: str, neighbour: str) -> int:
    """Return +1 if `client_id` adds the pairwise mask it shares with `neighbour`, else -1.

    The smaller id adds and the larger subtracts, so each pair's masks cancel.
    """
    return 1 if client_id < neighbour else -1
