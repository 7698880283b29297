"""Samplers of the discrete Gaussian N_Z(0, sigma²) on the integers.

Canonne, Kamath, Steinke, "The Discrete Gaussian for Differential Privacy"
(NeurIPS 2020), Algorithm 3: draw Y from the discrete Laplace with scale
t = ⌊sigma⌋ + 1 and accept it with probability exp(-(|Y| - sigma²/t)² / (2·sigma²)); the
accepted values are exactly N_Z(0, sigma²), with fewer than two tries expected.

Two implementations of that algorithm:

- `discrete_gaussian`, used by the encoder: vectorized with numpy, in
  float64. The discrete Laplace is the difference of two geometric
  variables, and the acceptance test compares a uniform draw with the float
  acceptance probability. Its distribution is correct up to float64
  rounding of those probabilities (about 1e-16 relative), which is NOT the
  paper's bit-exact guarantee: floating-point samplers can leak through the
  low-order bits of their outputs (Mironov, CCS 2012), a concern the
  rational-arithmetic sampler below avoids.
- `discrete_gaussian_exact`: the paper's exact algorithm in rational
  arithmetic (Algorithms 1 and 2 for Bernoulli(exp(-gamma)) and the discrete
  Laplace), drawing only uniform integers. One sample at a time in pure
  Python (tens of microseconds), so it is the reference the fast sampler is
  tested against, and a choice for small vectors.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from fractions import Fraction

import numpy as np

from fedcore import Array

__all__ = ["discrete_gaussian", "discrete_gaussian_exact", "discrete_gaussian_variance"]

RandBelow = Callable[[int], int]
"""A source of uniform integers in [0, n), e.g. `secrets.randbelow`."""


def discrete_gaussian(variance: float, size: int, rng: np.random.Generator) -> Array:
    """Return `size` int64 draws of N_Z(0, variance) (CKS 2020, Algorithm 3, vectorized).

    Raises:
        ValueError: `variance` is not finite and > 0.
    """
    if not math.isfinite(variance) or variance <= 0:
        raise ValueError(f"variance must be finite and > 0, got {variance!r}")
    sigma = math.sqrt(variance)
    t = math.floor(sigma) + 1
    # P(G = k) = (1 - p)^k p for k >= 0 with 1 - p = exp(-1/t); G1 - G2 is
    # then the discrete Laplace P(Y = y) ∝ exp(-|y| / t).
    p = -math.expm1(-1.0 / t)
    out = np.empty(size, dtype=np.int64)
    filled = 0
    while filled < size:
        # Acceptance is above 1/2 for every sigma (CKS 2020, Section 5.3); drawing
        # twice what is missing fills the vector in one or two passes.
        batch = 2 * (size - filled) + 16
        y = rng.geometric(p, batch) - rng.geometric(p, batch)
        accept = np.exp(-((np.abs(y) - variance / t) ** 2) / (2.0 * variance))
        kept = y[rng.random(batch) < accept][: size - filled]
        out[filled : filled + kept.size] = kept
        filled += kept.size
    return out


def discrete_gaussian_variance(variance: float) -> float:
    """Return the exact variance of N_Z(0, variance), which is slightly below `variance`.

    Sums the mass function over ±(12·sigma + 12), beyond which the tail is below
    float64 precision.
    """
    sigma = math.sqrt(variance)
    ys = np.arange(-(12 * math.ceil(sigma) + 12), 12 * math.ceil(sigma) + 13, dtype=np.float64)
    weights = np.exp(-(ys**2) / (2.0 * variance))
    return float(np.sum(ys**2 * weights) / np.sum(weights))


def _bernoulli(p: Fraction, randbelow: RandBelow) -> bool:
    return randbelow(p.denominator) < p.numerator


def _bernoulli_exp_small(gamma: Fraction, randbelow: RandBelow) -> bool:
    """Bernoulli(exp(-gamma)) for gamma in [0, 1] (CKS 2020, Algorithm 1, first part)."""
    k = 1
    while _bernoulli(gamma / k, randbelow):
        k += 1
    return k % 2 == 1


def _bernoulli_exp(gamma: Fraction, randbelow: RandBelow) -> bool:
    """Bernoulli(exp(-gamma)) for gamma >= 0 (CKS 2020, Algorithm 1)."""
    for _ in range(math.floor(gamma)):
        if not _bernoulli_exp_small(Fraction(1), randbelow):
            return False
    return _bernoulli_exp_small(gamma - math.floor(gamma), randbelow)


def _discrete_laplace(t: int, randbelow: RandBelow) -> int:
    """One draw with P(Y = y) ∝ exp(-|y| / t) (CKS 2020, Algorithm 2, s = 1)."""
    while True:
        u = randbelow(t)
        if not _bernoulli_exp(Fraction(u, t), randbelow):
            continue
        v = 0
        while _bernoulli_exp(Fraction(1), randbelow):
            v += 1
        x = u + t * v
        negative = randbelow(2) == 1
        if negative and x == 0:
            continue
        return -x if negative else x


def discrete_gaussian_exact(
    variance: Fraction | int, randbelow: RandBelow = secrets.randbelow
) -> int:
    """Return one exact draw of N_Z(0, variance) (CKS 2020, Algorithm 3).

    Args:
        variance: sigma² as an exact rational.
        randbelow: the uniform integer source; the OS CSPRNG by default.

    Raises:
        ValueError: `variance` <= 0.
    """
    sigma2 = Fraction(variance)
    if sigma2 <= 0:
        raise ValueError(f"variance must be > 0, got {variance!r}")
    # t = ⌊sigma⌋ + 1 with ⌊sqrt(n/d)⌋ = ⌊isqrt(n·d) / d⌋, all in integers.
    t = math.isqrt(sigma2.numerator * sigma2.denominator) // sigma2.denominator + 1
    while True:
        y = _discrete_laplace(t, randbelow)
        gamma = (abs(y) - sigma2 / t) ** 2 / (2 * sigma2)
        if _bernoulli_exp(gamma, randbelow):
            return y
