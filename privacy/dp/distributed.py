"""Distributed DP under secure aggregation: the distributed discrete Gaussian.

Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian Mechanism for
Federated Learning with Secure Aggregation" (ICML 2021), Algorithms 1 and 2.
No party ever sees a noise-free update: each client adds its share of the
noise, and secure aggregation reveals only the sum, which holds the noise of
every surviving client.

Client side (`encode`, before secure-aggregation masking):
  1. clip the update to L2 norm C (all float tensors together);
  2. pad to d = 2^k and rotate with the randomized Hadamard transform of the
     round's public seed (`hadamard.rotate`);
  3. scale by 1/gamma, gamma being the granularity;
  4. round each coordinate to an integer at random (up with probability
     equal to its fractional part), and redo it until the rounded vector's
     norm is at most Δ₂ (conditional randomized rounding, Section 4.1), so
     that Δ₂ bounds every client's contribution deterministically;
  5. add discrete Gaussian noise N_Z(0, sigma²/gamma²) to every coordinate;
  6. reduce modulo 2^b, the ring Z_(2^b) secure aggregation sums in.
Server side (`decode`, after unmasking): read the modular sum as signed
integers in [-2^(b-1), 2^(b-1)), multiply by gamma, rotate back, drop the
padding.

Noise. Each client adds sigma = z·C / sqrt(min_survivors), so that the sum over
the FEWEST clients the round accepts (`min_survivors`) has the central
target standard deviation z·C; more survivors only add noise. A round with
fewer survivors than that must not be released (`decode` refuses it), and
the accounting (`event`) assumes exactly `min_survivors` noise shares.

Bits. gamma is chosen as in the paper's Section 4.4 (and its code): so that k
standard deviations of every coordinate of the scaled sum over up to
`max_clients` clients fit in the ring, assuming the rotated coordinates are
sub-Gaussian with variance ||x||²/d and, pessimistically, that all clients'
updates point the same way; k is sized so that no coordinate of the sum
wraps, except with probability `wrap_probability`. Finer gamma means less
rounding error but more bits; the rounding error is at most gamma²/4 per
coordinate and client. A wrap-around harms accuracy only: privacy rests on
the norm bound and the noise, not on the ring.

What can be detected. An honest client's encoding always satisfies the
norm bound (steps 1 and 4 enforce it; `encode` clips whatever it is given).
Under secure aggregation the server sees only the sum: it cannot see or
reject one client's oversized update, since every value of Z_(2^b) is a
valid input. It can only check that the decoded sum is plausible
(`sum_norm_bound`); a client that bypasses the SDK can bias the sum by up to
the ring's range without being identified. Ruling that out needs
zero-knowledge norm proofs, which this protocol does not have.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedcore import Array, TensorSpec
from privacy.dp.discrete import discrete_gaussian
from privacy.dp.events import DistributedGaussianEvent
from privacy.dp.hadamard import padded_size, rotate, unrotate
from privacy.dp.noise import NoiseSource

__all__ = ["DistributedDp", "decode", "encode", "ring_sum", "sum_norm_bound"]

# Kairouz et al. (ICML 2021) use β = exp(-0.5) in their experiments: each
# rounding attempt then meets the norm bound with probability >= 1 - β ≈ 0.39,
# and the bound is much tighter than the unconditional C/gamma + sqrt(d).
DEFAULT_BETA = math.exp(-0.5)
# The chance that ANY coordinate of a round's sum wraps around the ring. The
# paper's code fits k = 4 standard deviations, which wraps about 6e-5 of the
# coordinates, a few per round for a model of 10^5 parameters; this sizes k
# for the whole vector instead: k = sqrt(2 ln(2d / p)) by the Gaussian tail
# and a union bound over the d coordinates (k ≈ 7 for d = 2^15), at the
# price of about 1.5 bits.
DEFAULT_WRAP_PROBABILITY = 1e-6
# Fewer standard deviations than this cannot fit whatever the dimension; the
# configuration check uses it before the model's size is known.
MIN_HEADROOM = 4.0
# Rounding attempts before giving up. Each fails with probability at most β,
# so 1000 attempts all fail with probability below 1e-200.
_MAX_ROUNDING_ATTEMPTS = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class DistributedDp:
    """The parameters of one round of the distributed discrete Gaussian.

    Attributes:
        clip_norm: C, the L2 bound of one client's update.
        noise_multiplier: z, the central noise std over C that the sum of
            `min_survivors` clients' noise reaches.
        min_survivors: the fewest clients whose sum the round may release.
        max_clients: the most clients whose updates may be summed (sets the
            bits needed against overflow).
        bits: b, the ring is Z_(2^b); at most 62.
        num_parameters: the number of float parameters of the model.
        rotation_seed: the round's public seed for the Hadamard rotation.
        beta: β of conditional randomized rounding, in [0, 1).
        wrap_probability: p, the chance that a round's sum wraps around
            the ring anywhere (it sets the headroom k).
    """

    clip_norm: float
    noise_multiplier: float
    min_survivors: int
    max_clients: int
    bits: int
    num_parameters: int
    rotation_seed: int
    beta: float = DEFAULT_BETA
    wrap_probability: float = DEFAULT_WRAP_PROBABILITY

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid distributed DP parameters: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Return every problem with these parameters (empty when valid)."""
        problems = []
        if not math.isfinite(self.clip_norm) or self.clip_norm <= 0:
            problems.append(f"clip_norm must be > 0, got {self.clip_norm!r}")
        if not math.isfinite(self.noise_multiplier) or self.noise_multiplier <= 0:
            problems.append(f"noise_multiplier must be > 0, got {self.noise_multiplier!r}")
        if not 1 <= self.min_survivors <= self.max_clients:
            problems.append(
                f"need 1 <= min_survivors ({self.min_survivors}) <= max_clients "
                f"({self.max_clients})"
            )
        if not 0 < self.wrap_probability < 1:
            problems.append(f"wrap_probability must be in (0, 1), got {self.wrap_probability!r}")
        elif not 2 <= self.bits <= 62:
            problems.append(f"bits must be in [2, 62], got {self.bits}")
        elif self.num_parameters >= 1 and 4.0**self.bits <= self.headroom**2 * self.max_clients:
            problems.append(
                f"{self.bits} bits cannot hold {self.headroom} standard deviations of a sum of "
                f"{self.max_clients} clients; raise bits or lower max_clients"
            )
        if self.num_parameters < 1 or self.rotation_seed < 0 or not 0 <= self.beta < 1:
            problems.append("need num_parameters >= 1, rotation_seed >= 0 and beta in [0, 1)")
        return problems

    @property
    def dimension(self) -> int:
        """d, the encoded vector's length: `num_parameters` padded to a power of two."""
        return padded_size(self.num_parameters)

    @property
    def headroom(self) -> float:
        """k, the standard deviations of a summed coordinate that fit in the ring."""
        return math.sqrt(2 * math.log(2 * self.dimension / self.wrap_probability))

    @property
    def modulus(self) -> int:
        """2^b, the size of the ring secure aggregation sums in."""
        return 1 << self.bits

    @property
    def local_stddev(self) -> float:
        """sigma, each client's noise std in update units: z·C / sqrt(min_survivors)."""
        return self.noise_multiplier * self.clip_norm / math.sqrt(self.min_survivors)

    @property
    def granularity(self) -> float:
        """gamma, the size of one integer step in update units (Kairouz et al., Section 4.4).

        Solves 2^b = 2k·sqrt(n²C²/d + n(sigma² + gamma²/4)) / gamma for gamma, n = max_clients.
        """
        n, d, k = self.max_clients, self.dimension, self.headroom
        signal_and_noise = n * n * self.clip_norm**2 / d + n * self.local_stddev**2
        return 2.0 * k * math.sqrt(signal_and_noise) / math.sqrt(4.0**self.bits - k * k * n)

    @property
    def local_variance(self) -> float:
        """sigma²/gamma², each client's discrete Gaussian variance in integer steps."""
        return (self.local_stddev / self.granularity) ** 2

    @property
    def l2_bound(self) -> float:
        """Δ₂, the L2 bound of a rounded client vector in integer steps.

        Kairouz et al., Theorem 1 / Proposition 22: with c = C/gamma,
        Δ₂ = min(c + sqrt(d), sqrt(c² + d/4 + sqrt(2 ln(1/β))·(c + sqrt(d)/2))).
        """
        c, d = self.clip_norm / self.granularity, self.dimension
        unconditional = c + math.sqrt(d)
        if self.beta == 0:
            return unconditional
        conditional = (
            c * c + d / 4 + math.sqrt(2 * math.log(1 / self.beta)) * (c + math.sqrt(d) / 2)
        )
        return min(unconditional, math.sqrt(conditional))

    @property
    def l1_bound(self) -> float:
        """Δ₁, the L1 bound of a rounded client vector: Δ₂·min(sqrt(d), Δ₂) for integers."""
        return self.l2_bound * min(math.sqrt(self.dimension), self.l2_bound)

    def event(self, sampling_rate: float) -> DistributedGaussianEvent:
        """Return the accounting event of one round at Poisson sampling rate q."""
        return DistributedGaussianEvent(
            sampling_rate=sampling_rate,
            l2_sensitivity=self.l2_bound,
            l1_sensitivity=self.l1_bound,
            local_variance=self.local_variance,
            min_survivors=self.min_survivors,
            dimension=self.dimension,
        )


def _flatten(delta: Mapping[str, Array]) -> Array:
    parts = [
        np.asarray(a, dtype=np.float64).reshape(-1) for a in delta.values() if a.dtype.kind in "fV"
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


def _clip_flat(flat: Array, clip_norm: float) -> Array:
    norm = float(np.linalg.norm(flat))
    if not math.isfinite(norm):
        raise ValueError("update holds NaN or Inf values; its norm cannot be bounded")
    return flat if norm <= clip_norm else flat * (clip_norm / norm)


def _conditional_round(x: Array, bound: float, rng: np.random.Generator) -> Array:
    """Round to integers at random, unbiased, until the L2 norm is at most `bound`."""
    low = np.floor(x)
    up_probability = x - low
    for _ in range(_MAX_ROUNDING_ATTEMPTS):
        rounded = low + (rng.random(x.size) < up_probability)
        if float(np.dot(rounded, rounded)) <= bound * bound:
            return rounded.astype(np.int64)
    raise ArithmeticError(
        f"randomized rounding missed the norm bound {_MAX_ROUNDING_ATTEMPTS} times; "
        "the input was not clipped to the clip norm"
    )


def encode(delta: Mapping[str, Array], params: DistributedDp, source: NoiseSource) -> Array:
    """Encode a client's update for secure aggregation, noise included (client side).

    Run it on the delta BEFORE secure-aggregation masking; the masked input
    is this vector. Integer tensors are left out (see `clipping`).

    Args:
        delta: the update, float tensors in the model's tensor order.
        params: the round's parameters (the same on every client and server).
        source: the client's noise generator (`NoiseSource.secure()`).

    Returns:
        A uint64 vector of length `params.dimension`, values in [0, 2^b).

    Raises:
        ValueError: the float tensors do not hold `params.num_parameters`
            values, or hold NaN or Inf.
    """
    flat = _flatten(delta)
    if flat.size != params.num_parameters:
        raise ValueError(
            f"update has {flat.size} float parameters, the round expects {params.num_parameters}"
        )
    clipped = _clip_flat(flat, params.clip_norm)
    scaled = rotate(clipped, params.rotation_seed) / params.granularity
    rounded = _conditional_round(scaled, params.l2_bound, source.generator)
    noisy = rounded + discrete_gaussian(params.local_variance, rounded.size, source.generator)
    encoded: Array = np.mod(noisy, params.modulus).astype(np.uint64)
    return encoded


def ring_sum(encoded: Sequence[Array], params: DistributedDp) -> Array:
    """Return the sum of encoded vectors in Z_(2^b), what secure aggregation reveals.

    For simulation and tests; under secure aggregation the protocol computes
    it. uint64 addition wraps modulo 2^64, a multiple of 2^b.
    """
    total = np.zeros(params.dimension, dtype=np.uint64)
    for vector in encoded:
        total += np.asarray(vector, dtype=np.uint64)
    return total & np.uint64(params.modulus - 1)


def decode(
    total: Array, params: DistributedDp, spec: Mapping[str, TensorSpec], *, survivors: int
) -> dict[str, Array]:
    """Decode the modular sum of `survivors` clients' encodings into float64 tensors.

    Returns the noisy SUM of the clipped updates, one float64 array per float
    tensor of `spec` (integer tensors are left out). DP-FedAvg divides it by
    the expected cohort size q·N, not by `survivors`.

    Raises:
        ValueError: fewer than `params.min_survivors` survivors (the sum would
            hold less noise than accounted for), or `total` has the wrong length.
    """
    if survivors < params.min_survivors:
        raise ValueError(
            f"only {survivors} survivors, the round's privacy needs at least "
            f"{params.min_survivors}; do not release this sum"
        )
    if np.shape(total) != (params.dimension,):
        raise ValueError(f"sum has shape {np.shape(total)}, expected ({params.dimension},)")
    ring = np.asarray(total).astype(np.uint64) & np.uint64(params.modulus - 1)
    signed = ring.astype(np.int64)
    signed[signed >= params.modulus // 2] -= params.modulus
    flat = unrotate(signed * params.granularity, params.rotation_seed, params.num_parameters)
    return _split(flat, spec)


def _split(flat: Array, spec: Mapping[str, TensorSpec]) -> dict[str, Array]:
    out: dict[str, Array] = {}
    offset = 0
    for name, tensor in spec.items():
        if tensor.is_integer:
            continue
        out[name] = flat[offset : offset + tensor.size].reshape(tensor.shape)
        offset += tensor.size
    if offset != flat.size:
        raise ValueError(f"spec has {offset} float parameters, the round has {flat.size}")
    return out


def sum_norm_bound(
    params: DistributedDp, survivors: int, *, failure_probability: float = 1e-9
) -> float:
    """Return a bound that the decoded sum's L2 norm exceeds with tiny probability.

    An honest round's decoded sum is a sum of `survivors` vectors of norm at
    most gamma·Δ₂ plus Gaussian-like noise of std sqrt(survivors)·sigma per
    coordinate, whose norm concentrates below std·(sqrt(d) + sqrt(2 ln(1/p)))
    (Gaussian concentration of Lipschitz functions). A larger norm means a
    client bypassed the encoder or the sum wrapped around the ring; secure
    aggregation does not say which client.
    """
    signal = survivors * params.granularity * params.l2_bound
    std = math.sqrt(survivors * (params.local_stddev**2 + params.granularity**2 / 4))
    tail = math.sqrt(params.dimension) + math.sqrt(2 * math.log(1 / failure_probability))
    return signal + std * tail
