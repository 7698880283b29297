"""Fixed-point encoding of weighted updates for exact sums in Z_(2^b).

Secure aggregation adds integers, so each client turns its float update into
integers first:

1. clip every value to [-c, c] (this also bounds each client's influence);
2. multiply by w / W, its weight w (e.g. its number of examples) over the
   configured maximum W, so the vector holds w * delta / W, still in [-c, c];
3. map [-c, c] onto the integer levels 0 .. L, L = 2^bits - 1, with
   stochastic rounding: round up with probability equal to the fractional
   part, so that the code is an unbiased estimate of the value (Suresh et al.
   2017; the explicit `numpy.random.Generator` makes it reproducible in tests
   and is seeded from OS randomness by default);
4. append the weight itself, mapped from [0, W] onto 0 .. L the same way.

The server only learns the sums: sum(w * delta) and sum(w), which is exactly
what weighted FedAvg needs (`decode`).

Overflow: a sum of K codes is at most K * (2^bits - 1) < K * 2^bits, so a
ring of b bits holds it exactly when K * 2^bits <= 2^b, i.e. b >= bits +
ceil(log2 K). `ring_bits` returns that smallest b and `check_ring` raises
when a configured ring is smaller: a wrapped sum would decode to garbage
silently. With b <= 32 the masked vectors travel as uint32, 4 bytes per value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedcore import Array, NonFiniteUpdate, ParameterSet, TensorSpec, as_dtype

__all__ = ["LOSS_VALUES", "Quantization", "flatten", "loss_of", "unflatten", "with_loss"]

# Encoding runs over this many values at a time to bound float64 temporaries.
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Quantization:
    """How updates are clipped, weighted and rounded to integers.

    Attributes:
        clip: c; every update value is clipped to [-c, c].
        value_bits: bits per encoded value; L = 2^value_bits - 1 levels.
        max_weight: W; a client's weight must lie in [0, W].
    """

    clip: float
    value_bits: int = 16
    max_weight: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.clip) and self.clip > 0):
            problems.append(f"clip is {self.clip}; it must be positive and finite")
        if not 1 <= self.value_bits <= 32:
            problems.append(f"value_bits is {self.value_bits}; it must be in 1..32")
        if not (math.isfinite(self.max_weight) and self.max_weight > 0):
            problems.append(f"max_weight is {self.max_weight}; it must be positive and finite")
        if problems:
            raise ValueError("invalid quantization: " + "; ".join(problems))

    @property
    def levels(self) -> int:
        """L, the largest code."""
        return (1 << self.value_bits) - 1

    def ring_bits(self, clients: int) -> int:
        """Return the smallest ring size b in which `clients` codes sum without overflow."""
        if clients < 1:
            raise ValueError(f"clients is {clients}; it must be at least 1")
        return self.value_bits + (clients - 1).bit_length()

    def check_ring(self, ring_bits: int, clients: int) -> None:
        """Raise ValueError if the sum of `clients` codes could overflow Z_(2^ring_bits)."""
        if ring_bits > 64 or clients << self.value_bits > 1 << ring_bits:
            raise ValueError(
                f"{clients} clients x 2^{self.value_bits} levels exceed a ring of "
                f"{ring_bits} bits; use ring_bits={self.ring_bits(clients)} "
                "(at most 64) or fewer value_bits"
            )

    def _round(self, scaled: Array, rng: np.random.Generator) -> Array:
        """Stochastically round values in [0, L] (modified in place).

        floor(z + U) with U uniform in [0, 1) is floor(z) + 1 with probability
        frac(z), so its expectation is z. U is a uniform 32-bit word over 2^32,
        so that one 64-bit draw of the generator serves two values (half the
        draws of `rng.random`, which spends 64 bits on each); the rounding
        probability is then exact to 2^-32, far below the quantization step.
        Casting to uint32 truncates, i.e. floors the non-negative z + U (and
        maps a rounding error just below 0 to 0); the minimum guards against
        z + U landing a rounding error above L.
        """
        words = rng.bit_generator.random_raw((scaled.size + 1) // 2).view(np.uint32)
        scaled += words[: scaled.size] * 2.0**-32
        np.minimum(scaled, float(self.levels), out=scaled)
        codes: Array = scaled.astype(np.uint32)
        return codes

    def encode(self, update: Array, *, weight: float, rng: np.random.Generator) -> Array:
        """Encode a flat float update and its weight as P + 1 uint32 codes.

        Raises:
            NonFiniteUpdate: the update holds NaN or Inf.
            ValueError: the update is not 1-D, or the weight is outside [0, W].
        """
        values = np.asarray(update)
        if values.ndim != 1:
            raise ValueError(f"the update must be a flat vector, not shape {values.shape}")
        if not (math.isfinite(weight) and 0 <= weight <= self.max_weight):
            raise ValueError(f"weight {weight} is outside [0, {self.max_weight}]; raise max_weight")
        if not np.isfinite(values).all():
            raise NonFiniteUpdate("the update holds NaN or Inf values")
        share = weight / self.max_weight
        step = self.levels / (2 * self.clip)
        codes = np.empty(values.size + 1, dtype=np.uint32)
        for start in range(0, values.size, _CHUNK):
            scaled = np.clip(
                values[start : start + _CHUNK], -self.clip, self.clip, dtype=np.float64
            )
            scaled *= share * step
            scaled += self.clip * step
            codes[start : start + scaled.size] = self._round(scaled, rng)
        codes[-1] = self._round(np.array([share * self.levels]), rng)[0]
        return codes

    def decode(self, total: Array, *, clients: int) -> tuple[Array, float]:
        """Turn the exact sum of `clients` encodings into (sum of w * delta, sum of w)."""
        sums = np.asarray(total).astype(np.float64)
        unit = 2 * self.clip / self.levels
        weighted = (sums[:-1] * unit - clients * self.clip) * self.max_weight
        weight = float(sums[-1]) * self.max_weight / self.levels
        return weighted, weight


def flatten(parameters: ParameterSet) -> Array:
    """Concatenate every tensor, in order, into one float64 vector."""
    if not len(parameters):
        return np.zeros(0)
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in parameters.values()])


def unflatten(vector: Array, spec: Mapping[str, TensorSpec]) -> ParameterSet:
    """Cut a flat vector back into tensors of `spec`'s names, shapes and dtypes.

    Raises:
        ValueError: the vector's length is not the total size of `spec`.
    """
    total = sum(s.size for s in spec.values())
    if vector.shape != (total,):
        raise ValueError(f"a vector of shape {vector.shape} does not hold {total} parameters")
    arrays, start = {}, 0
    for name, s in spec.items():
        part = vector[start : start + s.size].reshape(s.shape)
        arrays[name] = part.astype(as_dtype(s.dtype))
        start += s.size
    return ParameterSet(arrays)


# A secure round carries each client's training loss in two more values
# after its update, so that the server learns their weighted mean and
# nothing else, as it learns only the mean update: whether the client
# reported a loss (c for yes, 0 for no) and the loss mapped from
# [0, _LOSS_CEILING] onto [0, c]. Both are weighted and summed like the
# update. Losses above the ceiling count as the ceiling.
LOSS_VALUES = 2
_LOSS_CEILING = 100.0


def with_loss(update: Array, loss: float | None, clip: float) -> Array:
    """Return the flat `update` followed by the `LOSS_VALUES` that carry `loss` (None: none).

    Args:
        update: the flat update (`flatten`).
        loss: the client's training loss; None or NaN when it has none.
        clip: c, the round's clipping bound.
    """
    if loss is None or not math.isfinite(loss):
        tail = [0.0, 0.0]
    else:
        tail = [clip, min(max(loss, 0.0), _LOSS_CEILING) / _LOSS_CEILING * clip]
    return np.concatenate([np.asarray(update, dtype=np.float64), tail])


def loss_of(mean: Array, clip: float) -> float:
    """Return the weighted mean training loss that the mean vector's last values carry.

    NaN when (nearly) no weight reported a loss: the "reported" value is then
    within the rounding noise of zero.
    """
    reported, scaled = float(mean[-2]), float(mean[-1])
    if reported <= clip * 1e-6:
        return math.nan
    return scaled / reported * _LOSS_CEILING
