"""Mask expansion against a slow reference: AES-256 of each counter block, seeked and threaded."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from privacy.secagg.prg import CHUNK_ELEMENTS, Mask, apply_masks, expand_mask, ring_dtype


def seed(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def reference_words(key: bytes, first: int, count: int, ring_bits: int) -> np.ndarray:
    """Elements first..first+count of a mask: AES-256 of each counter block, one by one in ECB."""
    itemsize = ring_dtype(ring_bits).itemsize
    start, end = first * itemsize, (first + count) * itemsize
    first_block, last_block = start // 16, -(-end // 16)
    counters = b"".join(j.to_bytes(16, "big") for j in range(first_block, last_block))
    ecb = Cipher(algorithms.AES(key), modes.ECB())  # noqa: S305 -- the block cipher alone, by design
    stream = ecb.encryptor().update(counters)
    skip = start - 16 * first_block
    return np.frombuffer(stream[skip : skip + end - start], dtype=f"<u{itemsize}")


def reference_sum(
    masks: list[Mask], first: int, count: int, ring_bits: int, start: np.ndarray | None = None
) -> np.ndarray:
    """`start` plus the signed masks in Python integers, reduced mod 2^ring_bits."""
    modulus = 1 << ring_bits
    total = [0] * count if start is None else start.tolist()
    for mask in masks:
        words = reference_words(mask.seed, first, count, ring_bits).tolist()
        total = [(t + mask.sign * w) % modulus for t, w in zip(total, words, strict=True)]
    return np.array(total, dtype=ring_dtype(ring_bits))


def some_masks(count: int, label: str) -> list[Mask]:
    return [Mask(seed(f"{label}/{i}"), 1 if i % 3 else -1) for i in range(count)]


@pytest.mark.parametrize(
    ("size", "offset", "ring_bits"),
    [
        (1, 0, 32),
        (5, 3, 20),
        (8195, 0, 24),  # long enough for threads (8192), one ragged chunk
        (24_581, 7, 32),  # an offset inside an AES block
        (100_003, 4096, 40),  # several chunks, the last ragged; 64-bit words
    ],
)
def test_masks_on_one_two_and_three_threads_match_the_reference(
    size: int, offset: int, ring_bits: int
) -> None:
    masks = some_masks(7, f"{size}/{offset}")
    rng = np.random.default_rng(size)
    start = rng.integers(0, 1 << ring_bits, size, dtype=np.uint64).astype(ring_dtype(ring_bits))
    expected = reference_sum(masks, offset, size, ring_bits, start)
    for threads in (1, 2, 3):
        vector = start.copy()
        apply_masks(vector, masks, ring_bits=ring_bits, offset=offset, threads=threads)
        np.testing.assert_array_equal(vector, expected, err_msg=f"threads={threads}")


def test_threads_give_the_same_vector_across_spans_and_ragged_chunks() -> None:
    # Longer than two spans after which threads sum their partial vectors
    # (16 chunks), and not a multiple of a chunk.
    size = 2 * 16 * CHUNK_ELEMENTS + 12_345
    masks = some_masks(5, "spans")
    vectors = []
    for threads in (1, 2, 3):
        vector = np.zeros(size, dtype=np.uint32)
        apply_masks(vector, masks, ring_bits=32, offset=4, threads=threads)
        vectors.append(vector)
    np.testing.assert_array_equal(vectors[1], vectors[0])
    np.testing.assert_array_equal(vectors[2], vectors[0])
    tail = slice(size - 1000, size)
    np.testing.assert_array_equal(vectors[0][tail], reference_sum(masks, 4 + size - 1000, 1000, 32))
    np.testing.assert_array_equal(vectors[0][:1000], reference_sum(masks, 4, 1000, 32))


@pytest.mark.parametrize("ring_bits", [16, 64])
def test_slices_masked_at_their_offsets_make_up_the_masked_vector(ring_bits: int) -> None:
    masks = some_masks(4, f"slices/{ring_bits}")
    whole = np.zeros(70_001, dtype=ring_dtype(ring_bits))
    apply_masks(whole, masks, ring_bits=ring_bits)
    bounds = [0, 1, 7, 40_000, 40_003, 70_001]
    pieces = []
    for a, b in itertools.pairwise(bounds):
        piece = np.zeros(b - a, dtype=ring_dtype(ring_bits))
        apply_masks(piece, masks, ring_bits=ring_bits, offset=a, threads=2)
        pieces.append(piece)
    np.testing.assert_array_equal(np.concatenate(pieces), whole)


def test_expand_mask_is_aes256_ctr_of_zeros_from_counter_zero() -> None:
    key = seed("keystream")
    keystream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(4000))
    np.testing.assert_array_equal(expand_mask(key, 1000, 32), np.frombuffer(keystream, "<u4"))
    np.testing.assert_array_equal(
        expand_mask(key, 499, 64, offset=1), np.frombuffer(keystream[8:], "<u8")
    )


def test_more_threads_than_masks_or_an_empty_vector_are_fine() -> None:
    key = seed("few")
    vector = np.zeros(20_000, dtype=np.uint32)
    apply_masks(vector, [Mask(key, 1)], ring_bits=32, threads=3)
    np.testing.assert_array_equal(vector, expand_mask(key, 20_000, 32))
    empty = np.zeros(0, dtype=np.uint32)
    apply_masks(empty, some_masks(3, "empty"), ring_bits=32, threads=2)
    assert empty.size == 0


def test_a_mask_ends_at_2_to_the_32_blocks() -> None:
    key = seed("last block")
    last = (1 << 32) * 4 - 4  # the four 32-bit words of block 2^32 - 1
    np.testing.assert_array_equal(
        expand_mask(key, 4, 32, offset=last), reference_words(key, last, 4, 32)
    )
    with pytest.raises(ValueError, match="past one keystream"):
        expand_mask(key, 4, 32, offset=last + 1)
    with pytest.raises(ValueError, match="past one keystream"):
        expand_mask(key, 2, 64, offset=(1 << 32) * 2 - 1)


def test_apply_masks_rejects_a_negative_offset_and_no_threads() -> None:
    vector = np.zeros(4, dtype=np.uint32)
    with pytest.raises(ValueError, match="offset is -1"):
        apply_masks(vector, [], ring_bits=32, offset=-1)
    with pytest.raises(ValueError, match="threads is 0"):
        apply_masks(vector, [], ring_bits=32, threads=0)
