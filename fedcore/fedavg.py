"""FedAvg (McMahan et al., AISTATS 2017) as a streaming weighted mean.

The aggregate holds one float64 accumulator per tensor and folds each update
into it as it arrives, so memory is O(P) whatever the number of clients.
Float64 keeps the sum exact to ~1e-16 relative for any realistic number of
updates, and makes the result independent of arrival order up to rounding;
float16 and bfloat16 inputs are widened before they are multiplied.

Integer tensors (step counters such as BatchNorm's `num_batches_tracked`) are
never zeroed and never turned into floats: the next value is the current one
plus the weighted mean of the clients' integer deltas, rounded to the nearest
integer (half to even). A round where every client trained 3 batches thus
advances the counter by 3, as centralized training would.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedcore.parameters import Array, ParameterSet, TensorSpec, as_dtype

__all__ = ["FedAvg", "WeightedMean"]

# Elements folded per step: large enough that numpy's per-call overhead is
# negligible, small enough that the float64 scratch stays in the L2 cache.
_CHUNK = 1 << 15


class WeightedMean:
    """A streaming weighted mean of parameter deltas, accumulated in float64."""

    __slots__ = ("_acc", "_count", "_scratch", "_spec", "_total")

    def __init__(self, spec: Mapping[str, TensorSpec]) -> None:
        self._spec = dict(spec)
        self._acc = {name: np.zeros(s.size, dtype=np.float64) for name, s in self._spec.items()}
        self._scratch = np.empty(_CHUNK, dtype=np.float64)
        self._count = 0
        self._total = 0.0

    @property
    def count(self) -> int:
        """Number of updates folded so far."""
        return self._count

    @property
    def total_weight(self) -> float:
        """Sum of the weights folded so far."""
        return self._total

    def add(self, delta: Mapping[str, Array], weight: float) -> None:
        """Fold `delta` with `weight` into the running sum.

        Raises:
            ValueError: `weight` is negative or not finite, or `delta` does not
                have the tensors of the model.
        """
        if not np.isfinite(weight) or weight < 0:
            raise ValueError(f"update weight must be finite and >= 0, got {weight!r}")
        if list(delta) != list(self._spec):
            raise ValueError("update tensors differ from the model's; check it with wire.conform")
        if weight > 0:
            for name, acc in self._acc.items():
                self._fold(acc, delta[name].reshape(-1), float(weight))
        self._count += 1
        self._total += float(weight)

    def mean(self) -> dict[str, Array]:
        """Return the weighted mean per tensor as float64 (zeros if no weight)."""
        scale = 1.0 / self._total if self._total > 0 else 0.0
        return {
            name: (acc * scale).reshape(self._spec[name].shape) for name, acc in self._acc.items()
        }

    def _fold(self, acc: Array, flat: Array, weight: float) -> None:
        scratch = self._scratch
        for start in range(0, flat.size, _CHUNK):
            stop = min(start + _CHUNK, flat.size)
            tmp = scratch[: stop - start]
            np.multiply(flat[start:stop], weight, out=tmp, dtype=np.float64)
            np.add(acc[start:stop], tmp, out=acc[start:stop])


@dataclass(frozen=True, slots=True)
class FedAvg:
    """Federated averaging weighted by example counts, with a server learning rate.

    The next model is `model + server_lr * mean(delta)`; `server_lr = 1`
    is plain FedAvg. A round whose updates all have weight 0 leaves the model
    unchanged.
    """

    server_lr: float = 1.0

    def begin(self, model: ParameterSet) -> WeightedMean:
        """Return an empty streaming aggregate for deltas of `model`."""
        return WeightedMean(model.spec())

    def finish(self, model: ParameterSet, aggregate: WeightedMean) -> ParameterSet:
        """Return the next model from `model` and the round's folded deltas."""
        mean = aggregate.mean()
        out: dict[str, Array] = {}
        for name, current in model.items():
            step = mean[name] * self.server_lr
            dtype = as_dtype(str(current.dtype))
            if dtype.kind in "iub":
                out[name] = np.asarray(current + np.rint(step).astype(np.int64)).astype(dtype)
            else:
                out[name] = np.asarray(current.astype(np.float64) + step).astype(dtype)
        return ParameterSet(out)
