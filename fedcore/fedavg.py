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

Folding is batched and shared between threads. `WeightedMean.add_many`
takes up to 16 updates at a time and cuts each tensor into pieces that the
calling thread and one helper thread per further CPU (at most 8 in all) take
in turn. A piece is folded by one of two loops:

- the compiled loop of `fedcore.kernels` (numba, an optional dependency) for
  float32 updates of tensors of 65,536 elements or more: it widens, weighs
  and sums the batch in one pass over the inputs, in float64, and reads and
  writes the accumulator once per batch. It is bound by memory: besides the
  inputs it moves only the accumulator (16 bytes per parameter per batch of
  16 updates, against 64 bytes of inputs), and on one thread folds of 100 or
  400 memory-mapped updates took 1.08 to 1.19x the time of reading the
  inputs (bench/aggregate.py);
- numpy for everything else (other dtypes, small tensors, and every tensor
  where numba is not installed): for each block of the accumulator it widens
  the same block of up to 8 updates to float64 into a staging array (one
  `np.concatenate`) and reduces the stage with the weights in one stack of
  small matrix-vector products (one `np.matmul`), so the accumulator block is
  loaded and stored once per 8 updates instead of once per update (per fewer
  for smaller models, whose staging arrays are kept to a quarter of the
  model's size). numpy's float32 -> float64 cast takes about 0.13 ns per
  value even within L1 cache on the machine this was tuned on, where one core
  reads memory at about 0.11 ns per float32 value: widening memory-mapped
  inputs alone takes 1.5x the time of reading them and the weighted sum about
  0.8x more, which is why the compiled loop exists. numpy releases the GIL
  inside every call that matters here, so its threads share the work too.

The accumulator's memory is kept from one round to the next. A fresh
float64 block is mapped lazily: its first write page-faults and the kernel
zeroes every page, which at 10 updates took a third of the fold
(bench/RESULTS.md). A server folds round after round into a model of the same
size, so `FedAvg.finish` gives the block back to a small pool once the next
model is computed, and the next round's `WeightedMean` takes it, written
pages and all. A reused block holds the last round's sums: every tensor's
first fold writes its accumulator rather than adding to it, and a tensor
nothing was folded into reads as zeros. The price is memory between rounds:
where it used to give the block back to the system, a server now keeps one
accumulator's worth (8·P bytes for a model of P parameters) for each model
size it has finished a round of, at most `_FREE_BYTES` in all (see
`_FreeBlocks`). During a round the block is the aggregate's, as before, so
the fold's peak does not grow.

`bench/aggregate.py` measures the fold against a one-thread read of the
inputs and against a read shared by as many threads as the fold uses, into a
fresh accumulator and into one a previous round gave back.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from fedcore import kernels
from fedcore.parameters import Array, ParameterSet, TensorSpec

__all__ = ["FedAvg", "WeightedMean"]

# Updates folded per batch by `add_many`.
_MAX_BATCH = 16
# Updates widened per step, and the most elements of each widened per step:
# a stage of 8 x 65536 float64 values (4 MiB) per thread. Every step starts a
# new stream from each input (the hardware prefetcher has to find it again)
# and costs about 3 us of Python and numpy calls, so long rows pay: with 8k or
# 16k-element rows the fold took 1.6x or 1.25x as long as with 64k. 16 rows
# (two 8 MiB stages competing with the streaming inputs for the 32 MiB L3)
# and 4 rows (twice the accumulator passes) were both about 10% slower than
# 8 (bench/aggregate.py, 2 cores, 1 MiB of L2 each).
_MAX_DEPTH = 8
_ROW = 1 << 16
# Where the model is too small for full stages (see _STAGE_SHARE), rows
# shrink until the stage holds this many: at P=1e6 with two threads, 4 rows
# of 31k elements took 2.0x a one-thread read of the inputs, against 2.6x for
# 8 rows of 16k and 3.2 to 4x for 16 rows of 8k.
_MIN_DEPTH = 4
# The stages of all threads together hold at most 1 / _STAGE_SHARE of the
# model's size in float64 (2 bytes per parameter), so that folding needs at
# most about 2.6x the float32 model in memory (accumulator 2x, scratch 0.6x).
_STAGE_SHARE = 4
# Values per matrix-vector product: 8 updates x 512 columns, 4 x 1024. That
# is under OpenBLAS's threshold for threading a gemv (2304 *
# GEMM_MULTITHREAD_THRESHOLD = 9216 values), so BLAS never starts its own
# threads next to ours: on a busy machine they spin and stall (a fold with
# large products took 10 to 35x longer). numpy's matmul runs a stack of small
# products in one call, 1.7x as fast per value as `np.einsum("i,ij->j")`.
_GEMV = 4096
# Rows are a multiple of this many elements, so that the stack of products
# has no ragged end for 2, 4 or 8 updates.
_SUB = 2048
# Folding threads at most, one per CPU below that. Each holds its own stage,
# and a few streaming cores saturate a socket's memory bandwidth (only 2
# cores were measured).
_MAX_LANES = 8
# Values per batch (updates x parameters) below which the calling thread folds
# alone: handing work to another thread costs tens of microseconds.
_PARALLEL_MIN = 1 << 20
# Elements per step when `finish` combines the model with the mean.
_CHUNK = 1 << 16
# Tensors of at least this many elements are folded by the compiled loop:
# loading it costs about a second once per process (see `fedcore.kernels`),
# which small models, such as those of most simulations, never pay.
_COMPILED_MIN = 1 << 16
# Free accumulator blocks kept between rounds, at most, in bytes in all (see
# `_FreeBlocks`): 4 GiB holds the accumulator of a model of up to 5e8
# parameters, or those of several smaller ones.
_FREE_BYTES = 1 << 32
# Elements per piece folded by the compiled loop. Each call costs about 3 us
# (numba's dispatch), under 1% of a piece of 16 updates; smaller pieces
# share the work more evenly between threads that other processes delay.
_SPAN = 1 << 17


@dataclass(frozen=True, slots=True)
class _Lane:
    """The scratch space of one folding thread."""

    stage: Array  # (depth, row) float64: a block of up to `depth` inputs, widened
    out: Array  # (row,) float64: their weighted sum


@dataclass(frozen=True, slots=True)
class _Part:
    """One tensor's share of a batch: its accumulator and inputs, split by loop."""

    acc: Array
    flats: list[Array]  # (1, size) views, folded with numpy
    weights: Array  # float64, one per flat
    compiled: kernels.WeightedSum | None
    packed: tuple[Array, ...]  # float32 vectors for `compiled`, padded to _MAX_BATCH
    packed_weights: Array  # float64, one per vector of `packed` to fold
    overwrite: bool  # `compiled` writes `acc` rather than adds to it: nothing was folded yet


@dataclass(frozen=True, slots=True)
class _Piece:
    """A range of one tensor's accumulator and the matching inputs."""

    part: _Part
    lo: int
    hi: int


class _Pieces:
    """The pieces of one batch, taken in turn by the folding threads."""

    __slots__ = ("_items", "_lock")

    def __init__(self, items: list[_Piece]) -> None:
        self._items: Iterator[_Piece] = iter(items)
        self._lock = threading.Lock()

    def take(self) -> _Piece | None:
        """Return the next piece nobody took yet, or None once all are taken."""
        with self._lock:
            return next(self._items, None)


class _FreeBlocks:
    """Float64 accumulator blocks that finished rounds gave back, for the next rounds to fold into.

    One block per element count, the one given back last, and at most
    `_FREE_BYTES` in all, the least recently given back dropped first. One
    per size is what a federation needs: its rounds run one after another,
    and the next round's aggregate begins from the model that `finish`
    computed, after the block came back, so a single block serves every
    round. Keeping more would only help several rounds of the same size in
    flight at once (federations training the same network), and would hold
    an idle 8 bytes per parameter for each between rounds; those take a fresh
    block, as every round did before. The cap bounds what a server that
    hosted models of many sizes keeps.
    """

    __slots__ = ("_blocks", "_lock")

    def __init__(self) -> None:
        self._blocks: dict[int, Array] = {}  # by element count, least recently given first
        self._lock = threading.Lock()

    def take(self, size: int) -> Array | None:
        """Remove and return a free block of `size` float64 values, or None if none is free."""
        with self._lock:
            return self._blocks.pop(size, None)

    def give(self, block: Array) -> None:
        """Keep `block` for a later `take`; nobody may use it after this call."""
        with self._lock:
            self._blocks.pop(block.size, None)
            if block.nbytes > _FREE_BYTES:
                return
            self._blocks[block.size] = block
            while sum(b.nbytes for b in self._blocks.values()) > _FREE_BYTES:
                del self._blocks[next(iter(self._blocks))]

    def sizes(self) -> list[int]:
        """Return the element counts of the free blocks, least recently given back first."""
        with self._lock:
            return list(self._blocks)

    def clear(self) -> None:
        """Drop every free block (their memory goes back to the system)."""
        with self._lock:
            self._blocks.clear()


_FREE = _FreeBlocks()


class WeightedMean:
    """A streaming weighted mean of parameter deltas, accumulated in float64.

    Large batches are folded by the calling thread and up to 7 helper threads
    (one per CPU the process may use), which end when the aggregate is
    released or collected. One aggregate takes one fold at a time.

    `FedAvg.finish` releases the aggregate once the next model is computed:
    its accumulator goes to the next round's aggregate, and any later use of
    this one raises. An aggregate that is never finished (a failed round) is
    simply collected.
    """

    __slots__ = (
        "_acc",
        "_block",
        "_count",
        "_fresh",
        "_lanes",
        "_lock",
        "_pool",
        "_spec",
        "_total",
    )

    def __init__(self, spec: Mapping[str, TensorSpec]) -> None:
        self._spec = dict(spec)
        self._block: Array | None = _take_block(sum(s.size for s in self._spec.values()))
        self._acc = _views(self._block, self._spec)
        # Tensors nothing was folded into. Their accumulators hold whatever
        # the block held (zeros, or a previous round's sums): the first batch
        # writes them instead of adding to them, which also saves a pass over
        # the accumulator (at P=1e7 and K=10 the compiled fold took 1.6x a
        # one-thread read of the inputs instead of 2.1x), and `mean` reads
        # them as zeros.
        self._fresh = set(self._acc)
        self._lanes = _lanes(sum(s.size for s in self._spec.values()))
        # Created on the first batch large enough to share; its threads end
        # when this aggregate is released or collected.
        self._pool: ThreadPoolExecutor | None = None
        # Held by every fold, `mean`, `finish` and `release`: once the block
        # is given back, nothing of this aggregate can write or read it.
        self._lock = threading.Lock()
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
            ValueError: `weight` is negative or not finite, `delta` does not
                have the tensors (names and shapes) of the model, or the
                aggregate was released.
        """
        self.add_many([(delta, weight)])

    def add_many(self, items: Iterable[tuple[Mapping[str, Array], float]]) -> None:
        """Fold several `(delta, weight)` pairs, several times faster than `add` each.

        The result equals one `add` per pair up to float64 rounding. Updates
        are folded 16 at a time, and the accumulator is read and written once
        per batch (once per 8 updates where numpy folds), so a server that
        holds its pending updates memory-mapped should hand them over together.
        Every pair is checked before any is folded: if one is invalid, none is.

        Raises:
            ValueError: a weight is negative or not finite, a delta does not
                have the tensors (names and shapes) of the model, or the
                aggregate was released.
        """
        batch = [(delta, _checked_weight(weight)) for delta, weight in items]
        for delta, _ in batch:
            self._check_tensors(delta)
        live = [(delta, weight) for delta, weight in batch if weight > 0]
        with self._lock:
            acc = self._sums()
            for first in range(0, len(live), _MAX_BATCH):
                self._fold(acc, live[first : first + _MAX_BATCH])
            for _, weight in batch:
                self._total += weight
            self._count += len(batch)

    def mean(self) -> dict[str, Array]:
        """Return the weighted mean per tensor as float64 (zeros if no weight).

        Raises:
            ValueError: the aggregate was released.
        """
        # Divide rather than multiply by 1 / total: a subnormal total weight
        # has no finite reciprocal.
        total = self._total if self._total > 0 else 1.0
        with self._lock:
            return {
                name: (_folded(acc, name in self._fresh) / total).reshape(self._spec[name].shape)
                for name, acc in self._sums().items()
            }

    def release(self) -> None:
        """Give the accumulator back for a later aggregate to fold into; refuse any use after.

        `FedAvg.finish` calls it. Releasing twice does nothing.
        """
        with self._lock:
            block, self._block, self._acc = self._block, None, {}
            self._lanes = []
            if self._pool is not None:
                self._pool.shutdown(wait=False)
                self._pool = None
        if block is not None:
            _FREE.give(block)

    def _sums(self) -> dict[str, Array]:
        """Return the accumulators; call with `_lock` held."""
        if self._block is None:
            raise ValueError(
                "this WeightedMean was released (FedAvg.finish gave its accumulator to the "
                "next round); begin a new aggregate with FedAvg.begin"
            )
        return self._acc

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

    def _fold(self, sums: dict[str, Array], group: list[tuple[Mapping[str, Array], float]]) -> None:
        weights = [weight for _, weight in group]
        # One step of one tensor per piece: threads that the scheduler delays
        # then take fewer pieces, and taking one costs next to nothing.
        row = self._lanes[0].out.size
        pieces = []
        for name, acc in sums.items():
            deltas = [delta[name] for delta, _ in group]
            part = _split(acc, deltas, weights, fresh=name in self._fresh)
            step = row if part.flats else _SPAN
            pieces += [
                _Piece(part, lo, min(lo + step, acc.size)) for lo in range(0, acc.size, step)
            ]
        work = _Pieces(pieces)
        helpers = self._lanes[1:] if len(group) * _size(sums) >= _PARALLEL_MIN else []
        helpers = helpers[: len(pieces) - 1]
        futures = [self._executor().submit(_drain, work, lane) for lane in helpers]
        try:
            _drain(work, self._lanes[0])
        finally:
            # The helpers write into the accumulators: never return before them.
            wait(futures)
        for future in futures:
            future.result()
        # Only now: a batch that failed before every piece was written leaves
        # the tensors fresh, so the next batch writes them whole rather than
        # adding to a previous round's sums.
        self._fresh.clear()

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=len(self._lanes) - 1, thread_name_prefix="fedcore-fold"
            )
        return self._pool


def _checked_weight(weight: float) -> float:
    if not np.isfinite(weight) or weight < 0:
        raise ValueError(f"update weight must be finite and >= 0, got {weight!r}")
    return float(weight)


def _size(acc: Mapping[str, Array]) -> int:
    return sum(a.size for a in acc.values())


def _take_block(size: int) -> Array:
    """Return a float64 block of `size` values to accumulate into: a free one, else a new one.

    A free block holds a previous round's sums, a new one zeros: callers
    write every value before they read it.
    """
    block = _FREE.take(size)
    if block is not None:
        return block
    # np.zeros maps the pages lazily: the first batch writes them. One block
    # rather than one per tensor: at P=1e6, faulting in four arrays took
    # 1.6 ms where one took 0.7 (malloc returns smaller blocks to the system
    # and takes them back, page by page, on every round).
    return np.zeros(size)


def _views(block: Array, spec: Mapping[str, TensorSpec]) -> dict[str, Array]:
    """Return one float64 vector per tensor of `spec`, consecutive views of `block`."""
    ends = np.cumsum([s.size for s in spec.values()]).tolist()
    return {
        name: block[end - s.size : end] for (name, s), end in zip(spec.items(), ends, strict=True)
    }


def _folded(acc: Array, fresh: bool) -> Array:
    """Return `acc`, or zeros like it where nothing was folded into it (`fresh`)."""
    return np.zeros_like(acc) if fresh else acc


def _lanes(size: int) -> list[_Lane]:
    """Return the scratch of each folding thread for a model of `size` elements."""
    lanes = _thread_count()
    # Within the budget of _STAGE_SHARE, long rows come first (see _MIN_DEPTH).
    stage = size // (_STAGE_SHARE * lanes)
    if stage < _MAX_DEPTH * _SUB:
        # A small model: the budget would allow less than one row, and a
        # stage of one row folds each update alone (about 2x the time per
        # update at P = 4810, where every numpy call counts). A full stage
        # of the shortest rows is 128 KiB per thread.
        row, depth = _SUB, _MAX_DEPTH
    else:
        row = min(_ROW, stage // _MIN_DEPTH)
        row = max(_SUB, row - row % _SUB)
        depth = max(1, min(_MAX_DEPTH, stage // row))
    return [
        _Lane(stage=np.empty((depth, row), dtype=np.float64), out=np.empty(row, dtype=np.float64))
        for _ in range(lanes)
    ]


def _thread_count() -> int:
    """Return how many threads fold: the CPUs this process may use, capped."""
    # The CPUs the process may run on, not the machine's: containers often get fewer.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cpus or 1, _MAX_LANES))


def _split(acc: Array, deltas: list[Array], weights: list[float], *, fresh: bool) -> _Part:
    """Return one tensor's share of a batch, its inputs split by the loop that folds them.

    `fresh`: nothing was folded into `acc` yet: it holds zeros whose pages
    are not mapped yet, or a previous round's sums.
    """
    compiled = kernels.load() if acc.size >= _COMPILED_MIN else None
    flats, packed, flat_weights, packed_weights = [], [], [], []
    for delta, weight in zip(deltas, weights, strict=True):
        flat = _signed_flat(delta)
        if compiled is not None and flat.dtype == np.float32 and flat.flags.aligned:
            packed.append(_read_only(flat[0]))
            packed_weights.append(weight)
        else:
            flats.append(flat)
            flat_weights.append(weight)
    if fresh and not packed:
        # numpy adds to the accumulator: clear a previous round's sums. On a
        # new block this maps the pages here: numpy's threads faulting them
        # in together took 20 ms for P=1e7, where one thread writing them
        # takes 7. (With `packed`, the compiled loop writes every value of
        # its range first, and numpy adds after it in the same piece.)
        acc.fill(0.0)
    # A tuple of one length and one element type: numba compiles the loop once.
    padding = [packed[0]] * (_MAX_BATCH - len(packed)) if packed else []
    return _Part(
        acc=acc,
        flats=flats,
        weights=np.array(flat_weights, dtype=np.float64),
        compiled=compiled,
        packed=tuple(packed + padding),
        packed_weights=np.array(packed_weights, dtype=np.float64),
        overwrite=fresh,
    )


def _signed_flat(delta: Array) -> Array:
    """Return `delta` as a (1, size) view, unsigned integers read as signed."""
    # asarray drops the np.memmap subclass of memory-mapped updates: slicing a
    # memmap runs Python code, ten times the cost of slicing a plain view.
    flat = np.asarray(delta).reshape(1, -1)
    if flat.dtype.kind == "u":
        # A difference modulo 2**bits read as signed: 255 (uint8) is -1.
        return flat.view(np.dtype(f"i{flat.dtype.itemsize}"))
    return flat


def _read_only(vector: Array) -> Array:
    """Return a read-only view of `vector`."""
    # numba types writeable and read-only arrays apart, and memory-mapped
    # updates are read-only: all inputs are, so the tuple has one type.
    view = vector.view()
    view.flags.writeable = False
    return view


def _drain(work: _Pieces, lane: _Lane) -> None:
    """Fold pieces of `work` with `lane`'s scratch until none is left."""
    while (piece := work.take()) is not None:
        part, lo, hi = piece.part, piece.lo, piece.hi
        if part.compiled is not None and part.packed_weights.size:
            acc = part.acc[lo:hi]
            part.compiled(acc, part.packed, part.packed_weights, lo, part.overwrite)
        if part.flats:
            _fold_staged(part, lo, hi, lane)


def _fold_staged(part: _Part, lo: int, hi: int, lane: _Lane) -> None:
    """Add `part.weights @ part.flats[lo:hi]` to `part.acc[lo:hi]`, a stage of inputs at a time."""
    acc, folded = part.acc[lo:hi], lane.out[: hi - lo]
    blocks = [flat[:, lo:hi] for flat in part.flats]
    depth = len(lane.stage)
    for first in range(0, len(blocks), depth):
        rows = lane.stage[: len(blocks) - first, : hi - lo]
        # Widen every input's block to float64 in one call (float32, float16,
        # bfloat16 and integers all convert exactly); products and sums are
        # then exact to float64 rounding.
        np.concatenate(blocks[first : first + depth], axis=0, out=rows)
        _weigh(part.weights[first : first + depth], rows, out=folded)
        acc += folded


def _weigh(weights: Array, rows: Array, *, out: Array) -> None:
    """Write `weights @ rows` to `out`."""
    count, size = rows.shape
    if count == 1:
        # A one-row matmul costs ten times as much as this multiply.
        np.multiply(rows[0], weights[0], out=out)
        return
    # A stack of small matrix-vector products, run by matmul in one call:
    # views, no copies, (count, full) -> (full / width, count, width).
    width = _GEMV // count
    full = size - size % width
    if full:
        stack = rows[:, :full].reshape(count, full // width, width).transpose(1, 0, 2)
        np.matmul(weights, stack, out=out[:full].reshape(-1, width))
    if full < size:
        np.matmul(weights, rows[:, full:], out=out[full:])


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
        """Return the next model from `model` and the round's folded deltas.

        The aggregate is then released: its accumulator's memory goes to the
        next round's aggregate, and the aggregate cannot be used again.

        Raises:
            ValueError: the aggregate was already released (finished).
        """
        with aggregate._lock:
            # The accumulators belong to this module; reading them chunk by
            # chunk avoids materializing the float64 mean next to them.
            sums = aggregate._sums()
            total, lr = aggregate.total_weight, self.server_lr
            if total <= 0:
                new = model.copy()
            else:
                # A positive total took a batch that wrote every accumulator
                # whole: none holds a previous round's sums.
                new = ParameterSet(
                    {name: _advance(a, sums[name], total=total, lr=lr) for name, a in model.items()}
                )
        # Only once the next model exists: were `_advance` to fail, the
        # aggregate would still hold its sums.
        aggregate.release()
        return new


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
