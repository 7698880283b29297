"""Accumulators reused from one round to the next: a fold into a stale block equals a fresh one.

Every test that reuses a block fills it with a sentinel first (NaN, or a
large finite value that integer and boolean tensors cannot round away), so
that any value read before it was written shows in the result.
"""

from __future__ import annotations

import gc
import sys
import threading
from collections.abc import Callable, Iterator

import ml_dtypes
import numpy as np
import pytest

from fedcore import FedAvg, ParameterSet, WeightedMean, fedavg, kernels
from fedcore.parameters import Array

BF16 = np.dtype(ml_dtypes.bfloat16)
NO_NUMBA = "numba is not installed: numpy folds every tensor"
Round = tuple[ParameterSet, list[dict[str, Array]], list[float]]


@pytest.fixture(autouse=True)
def empty_pool() -> Iterator[None]:
    """Start and end every test with no free block, whatever other tests left."""
    fedavg._FREE.clear()
    yield
    fedavg._FREE.clear()


@pytest.fixture(params=["compiled", "numpy", "numba hidden"])
def fold_loop(request: pytest.FixtureRequest) -> Iterator[str]:
    """Fold with the compiled loop where it applies, with numpy only, or without numba at all."""
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "compiled":
            if kernels.load() is None:
                pytest.skip(NO_NUMBA)
        elif request.param == "numpy":
            patch.setattr(fedavg, "_COMPILED_MIN", sys.maxsize)
        else:
            # As if numba were not installed: `import numba` fails.
            kernels.load.cache_clear()
            patch.setitem(sys.modules, "numba", None)
            assert kernels.load() is None
        yield str(request.param)
    kernels.load.cache_clear()


@pytest.fixture(params=[1, 3])
def threads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Fold on the calling thread alone, or on three threads whatever this machine has."""
    count = int(request.param)
    monkeypatch.setattr(fedavg, "_thread_count", lambda: count)
    # Pieces of the compiled loop as short as numpy's, so that threads share a tensor.
    monkeypatch.setattr(fedavg, "_SPAN", 4096)
    return count


def weights(rng: np.random.Generator, count: int) -> list[float]:
    ws = [float(w) for w in rng.integers(1, 50, size=count)]
    ws[1] = 0.0  # folded as nothing, counted
    return ws


def float32_round(seed: int) -> Round:
    # "big" (>= 65,536 elements) goes to the compiled loop where numba is; the
    # small ones and the scalar to numpy. 20 updates: batches of 16 and 4.
    rng = np.random.default_rng(seed)
    shapes = {"big": (70_001,), "small": (3, 4), "scalar": ()}
    model = ParameterSet({n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()})
    deltas = [
        {n: np.asarray(rng.standard_normal(s), dtype=np.float32) for n, s in shapes.items()}
        for _ in range(20)
    ]
    return model, deltas, weights(rng, 20)


def half_round(seed: int) -> Round:
    # float16 and bfloat16: numpy widens them, a big tensor too.
    rng = np.random.default_rng(seed)
    shapes = {"big16": ((70_003,), np.float16), "b16": ((5, 7), BF16), "h": ((9,), np.float16)}
    model = ParameterSet(
        {n: rng.standard_normal(s).astype(dtype) for n, (s, dtype) in shapes.items()}
    )
    deltas = [
        {n: rng.standard_normal(s).astype(dtype) for n, (s, dtype) in shapes.items()}
        for _ in range(19)
    ]
    return model, deltas, weights(rng, 19)


def integer_round(seed: int) -> Round:
    # Step counters, buffers and flags: the model advances by the rounded mean.
    rng = np.random.default_rng(seed)
    model = ParameterSet(
        {
            "steps": np.array(1234, dtype=np.int64),
            "buffer": rng.integers(-100, 100, size=5).astype(np.int64),
            "bytes": rng.integers(0, 256, size=4).astype(np.uint8),
            "flags": rng.random(6) < 0.5,
        }
    )
    deltas: list[dict[str, Array]] = [
        {
            "steps": np.array(rng.integers(0, 5), dtype=np.int64),
            "buffer": rng.integers(-3, 4, size=5).astype(np.int64),
            "bytes": rng.integers(0, 256, size=4).astype(np.uint8),
            "flags": rng.random(6) < 0.3,
        }
        for _ in range(18)
    ]
    return model, deltas, weights(rng, 18)


def unaligned(values: Array) -> Array:
    """Return a copy of float32 `values` that starts one byte past an aligned address."""
    out = np.frombuffer(b"\0" + values.tobytes(), dtype=np.uint8)[1:].view(np.float32)
    assert not out.flags.aligned
    return out


def mixed_round(seed: int) -> Round:
    # "big": every batch mixes float32 (the compiled loop writes the range)
    # and float16 or unaligned float32 inputs (numpy adds after it, in the
    # same piece). "late": float16 only in the first batch (numpy clears and
    # adds), float32 after. "n" rides along.
    rng = np.random.default_rng(seed)
    n = 70_003
    deltas: list[dict[str, Array]] = []
    for i in range(23):
        base = rng.standard_normal(n).astype(np.float32)
        kinds: list[Array] = [base, base.astype(np.float16), unaligned(base)]
        big = kinds[i % 3]
        late = rng.standard_normal(n).astype(np.float16 if i < 16 else np.float32)
        deltas.append({"big": big, "late": late, "n": np.array(i % 4, dtype=np.int64)})
    model = ParameterSet(
        {"big": np.zeros(n, np.float32), "late": np.ones(n, np.float32), "n": np.array(7)}
    )
    return model, deltas, weights(rng, 23)


def zero_weight_round(seed: int) -> Round:
    # Updates arrive, all of weight 0: nothing is folded into any tensor.
    model, deltas, ws = float32_round(seed)
    integers, _, _ = integer_round(seed)
    model = ParameterSet({**model, **integers})
    deltas = [{**d, **{n: np.zeros_like(a) for n, a in integers.items()}} for d in deltas]
    return model, deltas, [0.0] * len(ws)


def empty_round(seed: int) -> Round:
    model, _, _ = zero_weight_round(seed)
    return model, [], []


ROUNDS: dict[str, Callable[[int], Round]] = {
    "float32": float32_round,
    "float16 and bfloat16": half_round,
    "integers and bools": integer_round,
    "mixed dtypes": mixed_round,
    "zero weights": zero_weight_round,
    "no updates": empty_round,
}
SENTINELS = [float("nan"), 1e6]


def fold(agg: WeightedMean, deltas: list[dict[str, Array]], ws: list[float], mode: str) -> None:
    if mode == "add":
        for delta, w in zip(deltas, ws, strict=True):
            agg.add(delta, w)
    else:
        agg.add_many(zip(deltas, ws, strict=True))


def play(case: Round, mode: str) -> tuple[dict[str, Array], ParameterSet, Array]:
    """Run one round; return its mean, the next model and the block it folded into."""
    model, deltas, ws = case
    strategy = FedAvg(server_lr=0.75)
    agg = strategy.begin(model)
    block = agg._block
    assert block is not None
    fold(agg, deltas, ws, mode)
    mean = agg.mean()
    return mean, strategy.finish(model, agg), block


def same_bits(got: Array, want: Array) -> None:
    """Assert equal dtypes, shapes and bytes (NaN and -0.0 included)."""
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes()


def assert_same_round(
    got: tuple[dict[str, Array], ParameterSet], want: tuple[dict[str, Array], ParameterSet]
) -> None:
    for name in want[0]:
        same_bits(got[0][name], want[0][name])
    assert list(got[1]) == list(want[1])
    for name in want[1]:
        same_bits(got[1][name], want[1][name])


@pytest.mark.parametrize("sentinel", SENTINELS, ids=["nan", "1e6"])
@pytest.mark.parametrize("mode", ["add", "add_many"])
@pytest.mark.parametrize("name", list(ROUNDS))
def test_fold_into_a_reused_block_equals_a_fold_into_a_fresh_one_bit_for_bit(
    name: str, mode: str, sentinel: float, fold_loop: str, threads: int
) -> None:
    case = ROUNDS[name](len(name))
    fresh_mean, fresh_next, block = play(case, mode)
    # finish gave the block back: the next round of this size folds into it.
    assert fedavg._FREE.sizes() == [block.size]
    block.fill(sentinel)
    reused_mean, reused_next, again = play(case, mode)
    assert again is block
    assert_same_round((reused_mean, reused_next), (fresh_mean, fresh_next))
    if name in ("zero weights", "no updates"):
        model = case[0]
        for tensor, values in model.items():
            same_bits(reused_mean[tensor], np.zeros(values.shape))
            same_bits(reused_next[tensor], values)


def test_a_later_round_of_the_same_size_folds_into_the_block_the_last_one_gave_back() -> None:
    model, deltas, ws = float32_round(1)
    first = play((model, deltas, ws), "add_many")
    block = first[2]
    second = play((first[1], deltas, ws), "add_many")
    assert second[2] is block
    # Another size takes a block of its own, and gives it back next to the first.
    other = ParameterSet({"w": np.zeros(10, np.float32)})
    third = play((other, [{"w": np.ones(10, np.float32)}], [1.0]), "add")
    assert third[2] is not block
    assert fedavg._FREE.sizes() == [block.size, 10]


def test_released_aggregate_refuses_every_use() -> None:
    model, deltas, ws = float32_round(2)
    strategy = FedAvg()
    agg = strategy.begin(model)
    agg.add_many(zip(deltas, ws, strict=True))
    strategy.finish(model, agg)
    with pytest.raises(ValueError, match="released"):
        agg.add(deltas[0], 1.0)
    with pytest.raises(ValueError, match="released"):
        agg.add_many([(deltas[0], 1.0)])
    with pytest.raises(ValueError, match="released"):
        agg.mean()
    with pytest.raises(ValueError, match="released"):
        strategy.finish(model, agg)
    agg.release()  # twice: nothing happens
    # What the round folded is still known, and the block is free once only.
    assert agg.count == len(deltas)
    assert agg.total_weight == sum(ws)
    assert fedavg._FREE.sizes() == [sum(a.size for a in model.values())]


def test_zero_weight_round_releases_the_aggregate_too() -> None:
    model, deltas, ws = zero_weight_round(3)
    agg = FedAvg().begin(model)
    agg.add_many(zip(deltas, ws, strict=True))
    FedAvg().finish(model, agg)
    with pytest.raises(ValueError, match="released"):
        agg.mean()
    assert fedavg._FREE.sizes() == [sum(a.size for a in model.values())]


def test_aggregate_never_finished_is_collected_without_giving_its_block_back() -> None:
    model, deltas, ws = float32_round(4)
    agg = FedAvg().begin(model)
    agg.add_many(zip(deltas, ws, strict=True))
    del agg
    gc.collect()
    assert fedavg._FREE.sizes() == []


def test_fold_threads_end_when_the_aggregate_is_released(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fedavg, "_thread_count", lambda: 2)
    model, deltas, ws = float32_round(5)
    before = {t for t in threading.enumerate() if t.name.startswith("fedcore-fold")}
    agg = FedAvg().begin(model)
    agg.add_many(zip(deltas, ws, strict=True))
    started = {t for t in threading.enumerate() if t.name.startswith("fedcore-fold")} - before
    assert len(started) == 1
    FedAvg().finish(model, agg)
    for thread in started:
        thread.join(timeout=10)
        assert not thread.is_alive()


def test_batch_that_fails_midway_leaves_no_stale_value_for_the_next(fold_loop: str) -> None:
    # The first batch fails on "late" (strings cannot be widened to float64)
    # after "big" was written; the next batch must still write "big" whole
    # rather than add to what the failed one left there.
    model, deltas, ws = mixed_round(6)
    want, _, block = play((model, deltas, ws), "add_many")
    block.fill(float("nan"))
    agg = FedAvg().begin(model)
    assert agg._block is block
    bad = {**deltas[0], "late": np.full(deltas[0]["late"].shape, "x")}
    with pytest.raises(TypeError):
        agg.add_many([(deltas[2], 3.0), (bad, 2.0)])
    assert agg.count == 0
    agg.add_many(zip(deltas, ws, strict=True))
    for name in want:
        same_bits(agg.mean()[name], want[name])


def test_pool_keeps_the_last_block_per_size_within_its_byte_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    free = fedavg._FreeBlocks()
    monkeypatch.setattr(fedavg, "_FREE_BYTES", 8 * 100)
    a, b, c, d = np.zeros(50), np.zeros(50), np.zeros(40), np.zeros(30)
    free.give(a)
    free.give(b)  # the same size: the one given back last is kept
    assert free.sizes() == [50]
    free.give(c)
    assert free.sizes() == [50, 40]
    free.give(d)  # 120 values over the cap of 100: the least recent goes
    assert free.sizes() == [40, 30]
    free.give(np.zeros(101))  # alone over the cap: not kept
    assert free.sizes() == [40, 30]
    assert free.take(50) is None
    assert free.take(40) is c
    assert free.take(40) is None
    assert free.sizes() == [30]


def test_rounds_on_several_threads_at_once_match_their_fresh_folds_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Four servers' rounds of one model size at once, each checked bit for
    # bit against its own fold into a fresh block; the free block is filled
    # with NaN before every round begins.
    monkeypatch.setattr(fedavg, "_thread_count", lambda: 2)
    cases = [float32_round(10 + i) for i in range(4)]
    wants = []
    for case in cases:
        fedavg._FREE.clear()
        mean, nxt, _ = play(case, "add_many")
        wants.append((mean, nxt))
    fedavg._FREE.clear()
    size = sum(a.size for a in cases[0][0].values())
    seen: list[Array] = []
    errors: list[BaseException] = []
    start = threading.Barrier(len(cases))

    def server(i: int) -> None:
        try:
            start.wait()
            for _ in range(6):
                free = fedavg._FREE.take(size)
                if free is not None:
                    free.fill(float("nan"))
                    fedavg._FREE.give(free)
                mean, nxt, block = play(cases[i], "add_many")
                seen.append(block)
                assert_same_round((mean, nxt), wants[i])
        except BaseException as exc:
            errors.append(exc)
            raise

    workers = [threading.Thread(target=server, args=(i,)) for i in range(len(cases))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors, errors
    # Blocks were reused (24 rounds, at most 4 in flight at once).
    assert len({id(block) for block in seen}) < len(seen)
