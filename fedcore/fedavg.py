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
advances the counter by 3, as centralized training would. Unsigned deltas are
differences modulo 2**bits (see `ParameterSet.subtract`) and are read as
signed, so a uint8 delta of 255 counts as -1; boolean tensors are integers
modulo 2, so a flag flips where the weighted majority of clients flipped it.

Folding is cache-blocked: `WeightedMean.add_many` widens the same block of up
to 16 updates to float64 and folds it into the accumulator block in one
multiply-accumulate, so the accumulator is read and written once per batch
instead of once per update (`bench/aggregate.py` measures it against the
memory-read floor).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from fedcore.parameters import Array, ParameterSet, TensorSpec

__all__ = ["FedAvg", "WeightedMean"]

# Updates folded per pass over the accumulator by `add_many`: each float64
# accumulator block is then loaded and stored once per batch, not once per update.
_MAX_BATCH = 16
# Elements of each update widened to float64 per step. Smaller blocks spend
# more time in numpy call overhead than in arithmetic; with 16 updates a step
# stages 8 MiB, which stays in the last-level cache (bench/aggregate.py).
_ROW = 1 << 16
# Elements per step when `finish` combines the model with the mean.
_CHUNK = 1 << 16


class WeightedMean:
    """A streaming weighted mean of parameter deltas, accumulated in float64."""

    __slots__ = ("_acc", "_count", "_out", "_spec", "_stage", "_total")

    def __init__(self, spec: Mapping[str, TensorSpec]) -> None:
        self._spec = dict(spec)
        self._acc = {name: np.zeros(s.size, dtype=np.float64) for name, s in self._spec.items()}
        # Scratch for widened inputs, at most a quarter of the accumulator's
        # size, so that folding needs at most 2.5x the float32 model in memory.
        size = sum(s.size for s in self._spec.values())
        self._stage = np.empty(min(_MAX_BATCH * _ROW, max(size // 4, _ROW)), dtype=np.float64)
        self._out = np.empty(_ROW, dtype=np.float64)
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
                have the tensors (names and shapes) of the model.
        """
        self.add_many([(delta, weight)])

    def add_many(self, items: Iterable[tuple[Mapping[str, Array], float]]) -> None:
        """Fold several `(delta, weight)` pairs, several times faster than `add` each.

        The result equals one `add` per pair up to float64 rounding. Up to 16
        updates are folded per pass over the accumulator, so a server that
        holds its pending updates memory-mapped should hand them over together.
        Every pair is checked before any is folded: if one is invalid, none is.

        Raises:
            ValueError: a weight is negative or not finite, or a delta does not
                have the tensors (names and shapes) of the model.
        """
        batch = [(delta, _checked_weight(weight)) for delta, weight in items]
        for delta, _ in batch:
            self._check_tensors(delta)
        live = [(delta, weight) for delta, weight in batch if weight > 0]
        for first in range(0, len(live), _MAX_BATCH):
            self._fold(live[first : first + _MAX_BATCH])
        for _, weight in batch:
            self._total += weight
        self._count += len(batch)

    def mean(self) -> dict[str, Array]:
        """Return the weighted mean per tensor as float64 (zeros if no weight)."""
        # Divide rather than multiply by 1 / total: a subnormal total weight
        # has no finite reciprocal.
        total = self._total if self._total > 0 else 1.0
        return {
            name: (acc / total).reshape(self._spec[name].shape) for name, acc in self._acc.items()
        }

    def _check_tensors(self, delta: Mapping[str, Array]) -> None:
        if set(delta) != set(self._spec):
            missing = sorted(set(self._spec) - set(delta))
            extra = sorted(set(delta) - set(self._spec))
            raise ValueError(
                f"update tensors differ from the model's (missing {missing}, unexpected "
                f"{extra}); check updates with wire.conform"
            )
        for name, spec in self._spec.items():
            if tuple(delta[name].shape) != spec.shape:
                raise ValueError(
                    f"update tensor {name!r} has shape {tuple(delta[name].shape)}, "
                    f"expected {spec.shape}; check updates with wire.conform"
                )

    def _fold(self, group: list[tuple[Mapping[str, Array], float]]) -> None:
        weights = np.array([weight for _, weight in group], dtype=np.float64)
        for name, acc in self._acc.items():
            flats = [_signed_flat(delta[name]) for delta, _ in group]
            _fold_tensor(acc, flats, weights, scratch=(self._stage, self._out))


def _checked_weight(weight: float) -> float:
    if not np.isfinite(weight) or weight < 0:
        raise ValueError(f"update weight must be finite and >= 0, got {weight!r}")
    return float(weight)


def _signed_flat(delta: Array) -> Array:
    """Return `delta` as a (1, size) view, unsigned integers read as signed."""
    # asarray drops the np.memmap subclass of memory-mapped updates: slicing a
    # memmap runs Python code, ten times the cost of slicing a plain view.
    flat = np.asarray(delta).reshape(1, -1)
    if flat.dtype.kind == "u":
        # A difference modulo 2**bits read as signed: 255 (uint8) is -1.
        return flat.view(np.dtype(f"i{flat.dtype.itemsize}"))
    return flat


def _fold_tensor(
    acc: Array, flats: list[Array], weights: Array, *, scratch: tuple[Array, Array]
) -> None:
    """Add `weights @ flats` to `acc`, one cache-sized block of every input at a time."""
    stage, out = scratch
    chunk = max(1, min(_ROW, stage.size // len(flats), acc.size))
    block = stage[: len(flats) * chunk].reshape(len(flats), chunk)
    for lo in range(0, acc.size, chunk):
        hi = min(lo + chunk, acc.size)
        rows, folded = block[:, : hi - lo], out[: hi - lo]
        # Widen every input's block to float64 in one call (float32, float16,
        # bfloat16 and integers all convert exactly); products and sums are then
        # exact to float64 rounding.
        np.concatenate([flat[:, lo:hi] for flat in flats], axis=0, out=rows)
        # einsum, not `weights @ rows`: matmul hands this to a multithreaded
        # BLAS, whose threads stall for whole time slices on a busy machine.
        np.einsum("i,ij->j", weights, rows, out=folded)
        acc[lo:hi] += folded


@dataclass(frozen=True, slots=True)
class FedAvg:
    """Federated averaging weighted by example counts, with a server learning rate.

    The next model is `model + server_lr * mean(delta)`; `server_lr = 1`
    is plain FedAvg. A round whose updates all have weight 0 leaves the model
    unchanged (a bit-exact copy).
    """

    server_lr: float = 1.0

    def begin(self, model: ParameterSet) -> WeightedMean:
        """Return an empty streaming aggregate for deltas of `model`."""
        return WeightedMean(model.spec())

    def finish(self, model: ParameterSet, aggregate: WeightedMean) -> ParameterSet:
        """Return the next model from `model` and the round's folded deltas."""
        if aggregate.total_weight <= 0:
            return model.copy()
        # The accumulators belong to this module; reading them chunk by chunk
        # avoids materializing the float64 mean next to them.
        sums = aggregate._acc
        total, lr = aggregate.total_weight, self.server_lr
        return ParameterSet(
            {name: _advance(a, sums[name], total=total, lr=lr) for name, a in model.items()}
        )


def _advance(current: Array, sums: Array, *, total: float, lr: float) -> Array:
    """Return `current + lr * sums / total` in `current`'s dtype, in bounded memory."""
    out = np.empty(current.shape, dtype=current.dtype)
    src, dst = np.asarray(current).reshape(-1), out.reshape(-1)
    integer = current.dtype.kind in "iub"
    for lo in range(0, sums.size, _CHUNK):
        hi = min(lo + _CHUNK, sums.size)
        # Divide by the total rather than multiply by its reciprocal: a
        # subnormal total has no finite reciprocal.
        neg_step = sums[lo:hi] / -total
        neg_step *= lr
        # x - s equals x + (-s) except at zero: x - (+0.0) keeps the sign of
        # x = -0.0 where x + (+0.0) loses it. Adding +0.0 makes every zero step
        # +0.0, so a round of all-zero deltas returns the model bit for bit.
        neg_step += 0.0
        if integer:
            dst[lo:hi] = _advance_integer(src[lo:hi], neg_step)
        else:
            dst[lo:hi] = np.subtract(src[lo:hi], neg_step, dtype=np.float64)
    return out


def _advance_integer(current: Array, neg_step: Array) -> Array:
    # Wrapping int64 arithmetic, then a wrapping cast back: unsigned tensors
    # advance modulo 2**bits, booleans modulo 2.
    advanced = current.astype(np.int64) - np.rint(neg_step).astype(np.int64)
    if current.dtype == np.bool_:
        return (advanced & 1).astype(np.bool_)
    return advanced.astype(current.dtype)
