"""Shamir secret sharing over GF(65537), vectorized with numpy.

A secret of 2m bytes is cut into m little-endian 16-bit limbs and each limb
is shared independently with its own random polynomial of degree t-1 over the
prime field GF(p), p = 65537 = 2^16 + 1 (a Fermat prime, so every 16-bit limb
is a field element). Sharing limb by limb is as secure as sharing the whole
secret in a large field: each limb's t-1 shares are independent of it
(Shamir 1979), and the polynomials are independent.

Why this and not a library or a big prime: no Shamir library in the
dependencies (`cryptography` has none) is vectorized; with a 17-bit prime,
products fit in int64 with room to spare (t * p^2 < 2^63 for any t < 2^29),
so splitting is one integer matrix product (Vandermonde x coefficients) and
combining is one vector-matrix product with the Lagrange coefficients at 0.
Those coefficients depend only on the set of share holders, are computed once
per set (cached) and reused for every secret with the same holders, e.g. all
the secrets a round reconstructs from the same survivors. Combining for
n = 101, t = 50 takes well under a millisecond (see `bench/secagg.py`).

Holder x-coordinates are 1..n (the position in the sorted cohort plus one),
distinct and non-zero, n < p.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from fedcore import Array
from privacy.secagg.keys import Entropy

__all__ = [
    "LIMB_BYTES",
    "PRIME",
    "combine",
    "decode_share",
    "decode_shares",
    "encode_share",
    "lagrange_at_zero",
    "split",
]

PRIME = 65537
LIMB_BYTES = 2
# The order of the multiplicative group GF(65537)*.
_ORDER = PRIME - 1
# Uniform field elements from 32-bit words: 2^32 - 1 = 65535 * 65537, so the
# words 0 .. 2^32 - 2 map onto each residue exactly 65535 times; the single
# word 2^32 - 1 is rejected and redrawn (probability 2^-32).
_REJECT = (1 << 32) - 1


def _limbs(secret: bytes) -> Array:
    if not secret or len(secret) % LIMB_BYTES:
        raise ValueError(f"a secret of {len(secret)} bytes; it must be a non-empty even length")
    return np.frombuffer(secret, dtype="<u2").astype(np.int64)


def _field_elements(count: int, entropy: Entropy) -> Array:
    words = np.frombuffer(entropy(4 * count), dtype="<u4")
    kept = words[words != _REJECT]
    while kept.size < count:
        extra = np.frombuffer(entropy(4 * (count - kept.size)), dtype="<u4")
        kept = np.concatenate([kept, extra[extra != _REJECT]])
    elements: Array = (kept[:count] % PRIME).astype(np.int64)
    return elements


def _check_holders(holders: Sequence[int]) -> Array:
    xs = np.asarray(holders, dtype=np.int64)
    if xs.ndim != 1 or xs.size == 0:
        raise ValueError("holders must be a non-empty sequence of x-coordinates")
    if xs.min() < 1 or xs.max() >= PRIME or np.unique(xs).size != xs.size:
        raise ValueError(f"holder x-coordinates must be distinct and in 1..{PRIME - 1}")
    return xs


@functools.cache
def _tables() -> tuple[Array, Array]:
    """Return (exp, log): exp[i] = 3^i mod p for i < 2^16, and log[exp[i]] = i.

    GF(65537)* is cyclic of order 2^16 and 3 generates it (3 is a primitive
    root of every Fermat prime above 3: Pepin's test), so every non-zero x is
    3^log(x), a product of field elements is exp of the sum of their logs
    mod 2^16 (a bit mask), and powers and quotients are vectorized gathers.
    Built once: 3^(256a + b) = (3^256)^a * 3^b.
    """
    low = [1] * 256
    for b in range(1, 256):
        low[b] = low[b - 1] * 3 % PRIME
    step = low[255] * 3 % PRIME
    high = [1] * 256
    for a in range(1, 256):
        high[a] = high[a - 1] * step % PRIME
    exp = (np.outer(np.array(high, dtype=np.int64), np.array(low, dtype=np.int64)) % PRIME).ravel()
    log = np.zeros(PRIME, dtype=np.int64)
    log[exp] = np.arange(_ORDER, dtype=np.int64)
    exp.flags.writeable = False
    log.flags.writeable = False
    return exp, log


def _vandermonde(xs: Array, columns: int) -> Array:
    """Return x_i^j mod p for j < columns: exp(j * log x_i)."""
    exp, log = _tables()
    powers: Array = exp[np.outer(log[xs], np.arange(columns, dtype=np.int64)) & (_ORDER - 1)]
    return powers


def split(secret: bytes, *, holders: Sequence[int], threshold: int, entropy: Entropy) -> Array:
    """Share `secret` so that any `threshold` of `holders` recover it and fewer learn nothing.

    Returns:
        An int64 array of shape (len(holders), len(secret) // 2): row i is the
        share of holder `holders[i]`, one field element per 16-bit limb.
    """
    xs = _check_holders(holders)
    if not 1 <= threshold <= xs.size:
        raise ValueError(f"threshold is {threshold}; it must be in 1..{xs.size} (the holders)")
    limbs = _limbs(secret)
    coefficients = np.empty((threshold, limbs.size), dtype=np.int64)
    coefficients[0] = limbs
    coefficients[1:] = _field_elements((threshold - 1) * limbs.size, entropy).reshape(
        threshold - 1, limbs.size
    )
    shares: Array = _vandermonde(xs, threshold) @ coefficients % PRIME
    return shares


@functools.lru_cache(maxsize=4096)
def _lagrange(holders: tuple[int, ...]) -> Array:
    exp, log = _tables()
    xs = np.asarray(holders, dtype=np.int64)
    # Row i: x_j - x_i mod p for j != i, and 1 (log 0) on the diagonal.
    differences = xs[None, :] - xs[:, None]
    differences[differences < 0] += PRIME
    np.fill_diagonal(differences, 1)
    # log of prod_{j != i} x_j / (x_j - x_i), mod 2^16.
    logs = log[xs]
    exponents = (logs.sum() - logs - log[differences].sum(axis=1)) & (_ORDER - 1)
    coefficients: Array = exp[exponents]
    coefficients.flags.writeable = False
    return coefficients


def lagrange_at_zero(holders: Sequence[int]) -> Array:
    """Return the Lagrange coefficients that evaluate at 0 from shares at `holders`.

    lambda_i = prod_{j != i} x_j / (x_j - x_i) mod p. Cached per holder set
    (read-only result).
    """
    return _lagrange(tuple(int(x) for x in _check_holders(holders)))


def combine(holders: Sequence[int], shares: Array, *, threshold: int) -> bytes:
    """Recover a secret from the shares of at least `threshold` distinct holders.

    The first `threshold` shares are used. With fewer shares no secret can be
    determined, and the call raises instead of guessing.

    Args:
        holders: x-coordinates of the holders, in the order of `shares` rows.
        shares: int64 array (len(holders), limbs), as rows of `split`.
        threshold: the threshold the secret was split with.

    Raises:
        ValueError: fewer than `threshold` shares, or the shares are not of one
            sharing (a limb interpolates to a value above 16 bits).
    """
    if len(holders) < threshold:
        raise ValueError(f"{len(holders)} shares cannot recover a secret of threshold {threshold}")
    weights = lagrange_at_zero(holders[:threshold])
    limbs = weights @ np.asarray(shares[:threshold], dtype=np.int64) % PRIME
    if limbs.max(initial=0) > 0xFFFF:
        raise ValueError(
            "the shares interpolate to a value outside 16 bits: they are not one sharing"
        )
    return limbs.astype("<u2").tobytes()


def encode_share(share: Array) -> bytes:
    """Encode a share row (or rows, one after the other) as little-endian uint32 elements."""
    return np.asarray(share, dtype="<u4").tobytes()


def decode_share(data: bytes, limbs: int) -> Array:
    """Decode one share row of `limbs` field elements.

    Raises:
        ValueError: wrong length or an element outside the field.
    """
    if len(data) != 4 * limbs:
        raise ValueError(f"a share has {len(data)} bytes; it must have {4 * limbs}")
    row: Array = decode_shares(data, limbs)[0]
    return row


def decode_shares(data: bytes, limbs: int) -> Array:
    """Decode share rows of `limbs` field elements each, written one after the other.

    Returns:
        An int64 array of shape (rows, limbs).

    Raises:
        ValueError: not a whole, non-zero number of rows, or an element
            outside the field.
    """
    if not data or len(data) % (4 * limbs):
        raise ValueError(f"{len(data)} bytes are not whole shares of {4 * limbs} bytes")
    rows = np.frombuffer(data, dtype="<u4").reshape(-1, limbs)
    if rows.max() >= PRIME:
        raise ValueError("a share holds a value outside the field")
    decoded: Array = rows.astype(np.int64)
    return decoded
