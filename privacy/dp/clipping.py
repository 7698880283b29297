"""L2 clipping of whole updates: a fixed norm, or one adapted to a quantile.

An update is clipped as ONE vector, all its floating-point tensors together
(McMahan et al., ICLR 2018): the L2 norm is taken over every float tensor, and
every tensor is scaled by the same factor `min(1, C / norm)`, so the clipped
update has norm at most C and the sensitivity of the sum is C.

Integer tensors (step counters such as BatchNorm's `num_batches_tracked`) are
excluded: they do not count towards the norm, are not clipped, and a DP
strategy never reads them from an update (they count batches, which reveals
the size of a client's data, and cannot carry Gaussian noise). DP strategies
keep them at the model's value.

`AdaptiveClipping` follows Andrew, Thakkar, McMahan, Ramaswamy, "Differentially
Private Learning with Adaptive Clipping" (NeurIPS 2021): every round each
client also reports whether its update was within the clip norm, the server
sums these bits with Gaussian noise, and moves the norm geometrically towards
the target quantile of the update norms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Protocol, Self

import numpy as np

from fedcore import Array
from privacy.dp.noise import GaussianNoise, NoiseSource

__all__ = [
    "AdaptiveClipping",
    "ClippingPolicy",
    "FixedClipping",
    "clip",
    "corrected_noise_multiplier",
    "l2_norm",
]


def _is_float(array: Array) -> bool:
    # bfloat16 (ml_dtypes) has kind "V"; it is a float for every purpose here.
    return array.dtype.kind in "fV"


def l2_norm(delta: Mapping[str, Array]) -> float:
    """Return the L2 norm of an update over all its floating-point tensors.

    Integer tensors are excluded (see the module docstring). The sum of
    squares is taken in float64, so float16 and bfloat16 updates do not
    overflow.
    """
    total = 0.0
    for array in delta.values():
        if _is_float(array):
            flat = np.asarray(array, dtype=np.float64).reshape(-1)
            total += float(np.dot(flat, flat))
    return math.sqrt(total)


def clip(delta: Mapping[str, Array], max_norm: float) -> tuple[dict[str, Array], float]:
    """Scale an update's float tensors to L2 norm at most `max_norm`.

    Returns:
        The clipped float tensors in float64 (integer tensors are left out)
        and the norm before clipping.

    Raises:
        ValueError: `max_norm` is not finite and > 0, or the update holds NaN
            or Inf (its norm is then not finite, and no factor bounds it).
    """
    if not math.isfinite(max_norm) or max_norm <= 0:
        raise ValueError(f"clip norm must be finite and > 0, got {max_norm!r}")
    norm = l2_norm(delta)
    if not math.isfinite(norm):
        raise ValueError("update holds NaN or Inf values; its norm cannot be bounded")
    # Divide (not multiply by the reciprocal) so that a norm just above C
    # scales to at most C after rounding.
    factor = 1.0 if norm <= max_norm else max_norm / norm
    clipped = {
        name: np.asarray(array, dtype=np.float64) * factor
        for name, array in delta.items()
        if _is_float(array)
    }
    return clipped, norm


def corrected_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """Return the sum's noise multiplier z_Δ when the clipped count shares the budget.

    Andrew et al. (NeurIPS 2021), Theorem 1: releasing the noisy sum of
    clipped updates (multiplier z_Δ) together with the noisy sum of centered
    clipped bits b - 1/2 (sensitivity 1/2, noise std sigma_b) is as private as one
    Gaussian mechanism with multiplier z = (z_Δ^-2 + (2·sigma_b)^-2)^-1/2. Solving
    for z_Δ gives z_Δ = (z^-2 - (2·sigma_b)^-2)^-1/2, slightly more noise on the sum.

    Raises:
        ValueError: `2 * count_noise_std <= noise_multiplier`: the count alone
            would spend more than the whole budget.
    """
    if count_noise_std <= 0 or 2.0 * count_noise_std <= noise_multiplier:
        raise ValueError(
            f"count_noise_std ({count_noise_std!r}) must exceed noise_multiplier / 2 "
            f"({noise_multiplier / 2!r}); Andrew et al. suggest expected_clients / 20"
        )
    return float((noise_multiplier**-2 - (2.0 * count_noise_std) ** -2) ** -0.5)


class ClippingPolicy(Protocol):
    """How a round clips updates, and how the clip norm evolves between rounds."""

    @property
    def clip_norm(self) -> float:
        """The L2 norm updates are clipped to this round."""
        ...

    @property
    def count_noise_std(self) -> float | None:
        """Noise std of the clipped-count query, or None when there is none."""
        ...

    def sum_noise(self, noise: GaussianNoise) -> GaussianNoise:
        """Return the noise on the sum that, with the count query, meets `noise`."""
        ...

    def estimate_fraction(
        self, centered_count: float, *, expected_clients: float, source: NoiseSource
    ) -> float | None:
        """Return the noisy fraction of unclipped updates, or None without a count query."""
        ...

    def updated(self, noisy_fraction: float | None) -> Self:
        """Return the policy for the next round."""
        ...


@dataclass(frozen=True, slots=True)
class FixedClipping:
    """Clip every update to the same L2 norm `clip_norm` (McMahan et al., ICLR 2018)."""

    clip_norm: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.clip_norm) or self.clip_norm <= 0:
            raise ValueError(f"clip norm must be finite and > 0, got {self.clip_norm!r}")

    @property
    def count_noise_std(self) -> float | None:
        """None: a fixed norm needs no count query."""
        return None

    def sum_noise(self, noise: GaussianNoise) -> GaussianNoise:
        """Return `noise` unchanged: the sum is the only query."""
        return noise

    def estimate_fraction(
        self, centered_count: float, *, expected_clients: float, source: NoiseSource
    ) -> float | None:
        """Return None: nothing is estimated and no noise is drawn."""
        return None

    def updated(self, noisy_fraction: float | None) -> FixedClipping:
        """Return this policy: the norm never changes."""
        return self


@dataclass(frozen=True, slots=True, kw_only=True)
class AdaptiveClipping:
    """A clip norm that tracks a quantile of the update norms (Andrew et al., NeurIPS 2021).

    After a round with noisy unclipped fraction b~ the norm becomes
    `C * exp(-learning_rate * (b~ - target_quantile))`: it grows while fewer
    than `target_quantile` of the updates fit, and shrinks otherwise. The
    defaults are the paper's: initial norm 0.1, median (0.5), learning rate
    0.2 (Section 3, "geometric update"). The paper suggests
    `count_noise_std = expected_clients / 20`.

    Attributes:
        clip_norm: this round's norm (the initial norm in round one).
        target_quantile: gamma, the fraction of updates that should be unclipped.
        learning_rate: η of the geometric update.
        count_noise_std: sigma_b, noise std of the sum of centered bits b - 1/2.
    """

    count_noise_std: float
    clip_norm: float = 0.1
    target_quantile: float = 0.5
    learning_rate: float = 0.2

    def __post_init__(self) -> None:
        if not math.isfinite(self.clip_norm) or self.clip_norm <= 0:
            raise ValueError(f"clip norm must be finite and > 0, got {self.clip_norm!r}")
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile!r}")
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not math.isfinite(self.count_noise_std) or self.count_noise_std <= 0:
            raise ValueError(f"count_noise_std must be > 0, got {self.count_noise_std!r}")

    def sum_noise(self, noise: GaussianNoise) -> GaussianNoise:
        """Return the sum's noise z_Δ so that sum and count together meet `noise`."""
        return GaussianNoise(corrected_noise_multiplier(noise.multiplier, self.count_noise_std))

    def estimate_fraction(
        self, centered_count: float, *, expected_clients: float, source: NoiseSource
    ) -> float | None:
        """Return b~ = (Σ(b_i - 1/2) + N(0, sigma_b²)) / m + 1/2 for m expected clients.

        Dividing by the expected cohort size m (not the realized one) keeps
        the realized cohort size out of the release, as for the sum.
        """
        noise = source.generator.normal(0.0, self.count_noise_std)
        return float((centered_count + noise) / expected_clients + 0.5)

    def updated(self, noisy_fraction: float | None) -> AdaptiveClipping:
        """Return the policy with the norm moved towards the target quantile."""
        if noisy_fraction is None:
            return self
        step = -self.learning_rate * (noisy_fraction - self.target_quantile)
        return replace(self, clip_norm=self.clip_norm * math.exp(step))
