"""Central DP-FedAvg for a trusted aggregator (McMahan et al., ICLR 2018).

Each client's delta is clipped to L2 norm C (all float tensors together,
see `clipping`), the clipped deltas are summed, Gaussian noise of std z·C is
added to the sum, and the noisy sum is divided by the EXPECTED total weight
of a Poisson-sampled cohort (q·N with uniform weights), never by the
realized one: the realized cohort size depends on who took part, and
dividing by it would change the sensitivity and leak participation.

Weighting. A client's weight multiplies its clipped delta, so it must be
bounded for the sensitivity to stay C:
- `UniformWeights` (the default): every client weighs 1; the sum's
  sensitivity is C and the divisor is q·N.
- `CappedWeights(cap, population_weight)`: the estimator f̃_f of McMahan et
  al., Section 2: a client with n examples weighs min(n, cap) / cap ≤ 1, so
  the sensitivity is still C, and the divisor is q·W where W, the sum of the
  capped weights over all N clients, is a public constant set in the
  federation's configuration. Weights a client reports are trusted only up
  to the cap.

Integer tensors (step counters) are never read from updates and keep the
model's value (see `clipping`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedcore import Array, NonFiniteUpdate, ParameterSet, TensorMismatch, TensorSpec
from privacy.dp.clipping import AdaptiveClipping, FixedClipping, clip
from privacy.dp.events import GaussianEvent
from privacy.dp.noise import GaussianNoise, NoiseSource

__all__ = ["CappedWeights", "DpAggregate", "DpFedAvg", "DpRelease", "UniformWeights"]


@dataclass(frozen=True, slots=True)
class UniformWeights:
    """Every client weighs 1, whatever its number of examples."""

    def weight(self, examples: float) -> float:
        """Return 1."""
        return 1.0

    def expected_total(self, *, sampling_rate: float, num_clients: int) -> float:
        """Return q·N, the expected number of clients in a cohort."""
        return sampling_rate * num_clients


@dataclass(frozen=True, slots=True)
class CappedWeights:
    """Weights min(examples, cap) / cap, normalized by the expected total q·W.

    Attributes:
        cap: w_max, the number of examples at which a client's weight is 1.
        population_weight: W, the sum of min(n_k, cap) / cap over all N
            clients (public, fixed for the federation).
    """

    cap: float
    population_weight: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.cap) or self.cap <= 0:
            raise ValueError(f"weight cap must be finite and > 0, got {self.cap!r}")
        if not math.isfinite(self.population_weight) or self.population_weight <= 0:
            raise ValueError(f"population_weight must be > 0, got {self.population_weight!r}")

    def weight(self, examples: float) -> float:
        """Return min(examples, cap) / cap, in [0, 1]."""
        return min(max(examples, 0.0), self.cap) / self.cap

    def expected_total(self, *, sampling_rate: float, num_clients: int) -> float:
        """Return q·W, the expected total weight of a cohort."""
        return sampling_rate * self.population_weight


Weighting = UniformWeights | CappedWeights


class DpAggregate:
    """The running sum of a round's clipped, weighted deltas (float64, no noise yet).

    It keeps no per-client norm or delta: only the sum and, for adaptive
    clipping, the sum of the centered "was not clipped" bits.
    """

    __slots__ = ("_acc", "_centered", "_clip_norm", "_count", "_spec", "_total", "_weighting")

    def __init__(
        self, spec: Mapping[str, TensorSpec], *, clip_norm: float, weighting: Weighting
    ) -> None:
        self._spec = dict(spec)
        self._acc = {
            name: np.zeros(s.shape, dtype=np.float64)
            for name, s in self._spec.items()
            if not s.is_integer
        }
        self._clip_norm = clip_norm
        self._weighting = weighting
        self._count = 0
        self._total = 0.0
        self._centered = 0.0

    @property
    def count(self) -> int:
        """Number of updates folded so far."""
        return self._count

    @property
    def total_weight(self) -> float:
        """Sum of the (bounded) weights folded so far; not what the sum is divided by."""
        return self._total

    @property
    def centered_count(self) -> float:
        """Σ(b_i - 1/2), b_i = 1 when update i was within the clip norm."""
        return self._centered

    def add(self, delta: Mapping[str, Array], weight: float) -> None:
        """Clip `delta`, weigh it and fold it into the sum.

        Args:
            delta: the client's update; its integer tensors are ignored.
            weight: the client's number of examples (ignored by uniform weights).

        Raises:
            TensorMismatch: names or shapes differ from the model's.
            NonFiniteUpdate: the update holds NaN or Inf.
            ValueError: `weight` is negative or not finite.
        """
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"update weight must be finite and >= 0, got {weight!r}")
        self._check_tensors(delta)
        # Widened first: a float tensor sent with another dtype still counts.
        floats = {name: np.asarray(delta[name], dtype=np.float64) for name in self._acc}
        try:
            clipped, norm = clip(floats, self._clip_norm)
        except ValueError as exc:
            raise NonFiniteUpdate(str(exc)) from None
        scale = self._weighting.weight(weight)
        for name, acc in self._acc.items():
            acc += scale * clipped[name]
        self._count += 1
        self._total += scale
        self._centered += (1.0 if norm <= self._clip_norm else 0.0) - 0.5

    def _check_tensors(self, delta: Mapping[str, Array]) -> None:
        if set(delta) != set(self._spec):
            raise TensorMismatch(
                f"update tensors differ from the model's (missing "
                f"{sorted(set(self._spec) - set(delta))}, unexpected "
                f"{sorted(set(delta) - set(self._spec))})"
            )
        for name, spec in self._spec.items():
            if tuple(delta[name].shape) != spec.shape:
                raise TensorMismatch(
                    f"update tensor {name!r} has shape {tuple(delta[name].shape)}, "
                    f"expected {spec.shape}"
                )


@dataclass(frozen=True, slots=True)
class DpRelease:
    """What a DP round releases and what the federation must persist.

    Attributes:
        model: the next model version.
        event: the accounting event of the round (persist it).
        clipping: the clipping policy for the next round (adaptive norms move).
        noisy_fraction: the noisy fraction of unclipped updates (adaptive
            clipping), else None; it is DP, so it may be published.
        seeded: whether the noise came from a fixed seed (record it: such a
            run gives no privacy).
    """

    model: ParameterSet
    event: GaussianEvent
    clipping: FixedClipping | AdaptiveClipping
    noisy_fraction: float | None
    seeded: bool


@dataclass(frozen=True, slots=True)
class DpFedAvg:
    """DP-FedAvg: clip, sum, add Gaussian noise, divide by the expected total weight.

    A `fedcore.Strategy`: `begin` opens a `DpAggregate`, `finish` returns the
    next model. Use `release` instead of `finish` to also get the round's
    event and next clipping policy, which the federation must persist.
    Build a new `DpFedAvg` each round with the persisted clipping policy.

    Attributes:
        clipping: `FixedClipping` or `AdaptiveClipping`.
        noise: the target Gaussian noise (z of the whole round).
        sampling_rate: q, the Poisson rate the cohort was drawn with.
        num_clients: N, the population the cohort was drawn from.
        source: the noise generator (`NoiseSource.secure()` outside tests).
        weighting: uniform (default) or capped weights.
        server_lr: the server learning rate applied to the noisy mean.
    """

    clipping: FixedClipping | AdaptiveClipping
    noise: GaussianNoise
    sampling_rate: float
    num_clients: int
    source: NoiseSource
    weighting: Weighting = field(default_factory=UniformWeights)
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.sampling_rate <= 1 or self.num_clients < 1:
            raise ValueError(
                f"need q in (0, 1] and num_clients >= 1, got q={self.sampling_rate!r}, "
                f"N={self.num_clients}"
            )
        # Fails early, not after a whole round, when sigma_b is too small for z.
        self.clipping.sum_noise(self.noise)

    def event(self) -> GaussianEvent:
        """Return the round's accounting event, known before the round starts."""
        return GaussianEvent(self.sampling_rate, self.noise.multiplier)

    def begin(self, model: ParameterSet) -> DpAggregate:
        """Return an empty aggregate for deltas of `model`."""
        return DpAggregate(
            model.spec(), clip_norm=self.clipping.clip_norm, weighting=self.weighting
        )

    def finish(self, model: ParameterSet, aggregate: DpAggregate) -> ParameterSet:
        """Return the next model (see `release` for everything the round releases)."""
        return self.release(model, aggregate).model

    def release(self, model: ParameterSet, aggregate: DpAggregate) -> DpRelease:
        """Add the noise, divide by the expected total weight, and step the model."""
        expected = self.weighting.expected_total(
            sampling_rate=self.sampling_rate, num_clients=self.num_clients
        )
        sum_noise = self.clipping.sum_noise(self.noise)
        arrays: dict[str, Array] = {}
        for name, current in model.items():
            if name not in aggregate._acc:
                arrays[name] = np.array(current, copy=True)
                continue
            noisy = aggregate._acc[name] + sum_noise.draw(
                current.shape, clip_norm=self.clipping.clip_norm, source=self.source
            )
            step = noisy / expected * self.server_lr
            # asarray: 0-d tensors would otherwise come back as numpy scalars.
            arrays[name] = np.asarray(np.asarray(current, dtype=np.float64) + step).astype(
                current.dtype
            )
        fraction = self.clipping.estimate_fraction(
            aggregate.centered_count,
            expected_clients=self.sampling_rate * self.num_clients,
            source=self.source,
        )
        return DpRelease(
            model=ParameterSet(arrays),
            event=self.event(),
            clipping=self.clipping.updated(fraction),
            noisy_fraction=fraction,
            seeded=self.source.seeded,
        )
