"""The randomized Hadamard rotation that flattens a vector before rounding.

Kairouz, Liu, Steinke (ICML 2021), Section 4.1: multiplying by H·D, where D
is a diagonal of random signs and H the normalized Walsh-Hadamard matrix,
spreads a vector's energy evenly over its coordinates, so every coordinate
of the rotated vector is small (about ||x|| / sqrt(d)) and few bits per
coordinate suffice. The rotation is orthonormal, so norms (and the L2
sensitivity) are unchanged and isotropic noise stays isotropic. The signs
come from a PUBLIC seed shared by all clients and the server of a round:
every client must apply the same rotation for the rotated sum to be the
rotation of the sum.
"""

from __future__ import annotations

import numpy as np

from fedcore import Array

__all__ = ["fwht", "padded_size", "rotate", "unrotate"]


def padded_size(size: int) -> int:
    """Return the smallest power of two >= `size` (the transform's length).

    Raises:
        ValueError: `size` < 1.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return 1 << (size - 1).bit_length()


def fwht(x: Array) -> Array:
    """Return H x for the orthonormal Walsh-Hadamard matrix H (Sylvester order), in float64.

    The fast transform: log2(d) butterfly stages, each one vectorized numpy
    pass over the whole vector, O(d log d) operations. H is symmetric and
    orthonormal, so `fwht` is its own inverse.

    Raises:
        ValueError: `x` is not one-dimensional with a power-of-two length.
    """
    d = x.shape[0] if x.ndim == 1 else 0
    if d == 0 or d & (d - 1):
        raise ValueError(f"fwht needs a 1-D vector of power-of-two length, got shape {x.shape}")
    y = np.array(x, dtype=np.float64)
    half = 1
    while half < d:
        # Blocks of 2*half: the first half becomes a + b, the second a - b.
        blocks = y.reshape(-1, 2, half)
        top = blocks[:, 0, :].copy()
        blocks[:, 0, :] += blocks[:, 1, :]
        blocks[:, 1, :] = top - blocks[:, 1, :]
        half *= 2
    y /= np.sqrt(d)
    return y


def _signs(d: int, seed: int) -> Array:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy=seed)))
    return rng.integers(0, 2, size=d, dtype=np.int8) * 2.0 - 1.0


def rotate(x: Array, seed: int) -> Array:
    """Pad `x` with zeros to a power of two and return H·D·x (float64).

    Args:
        x: a flat vector.
        seed: the round's public rotation seed (>= 0).
    """
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    padded = np.zeros(padded_size(flat.size), dtype=np.float64)
    padded[: flat.size] = flat
    return fwht(padded * _signs(padded.size, seed))


def unrotate(y: Array, seed: int, size: int) -> Array:
    """Return the first `size` coordinates of D·H·y, the inverse of `rotate`."""
    return (fwht(y) * _signs(y.shape[0], seed))[:size]
