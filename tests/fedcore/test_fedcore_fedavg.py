"""FedAvg and the streaming weighted mean, checked against a slow float64 reference."""

from __future__ import annotations

import gc
import sys
import threading

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedcore import FedAvg, ParameterSet, WeightedMean, fedavg, kernels
from fedcore.parameters import Array

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None)
BF16 = np.dtype(ml_dtypes.bfloat16)

SHAPES = {"layer.weight": (3, 4), "layer.bias": (4,), "scale": ()}
weights = st.one_of(st.integers(0, 10_000).map(float), st.floats(0.0, 1e4))


def reference_mean(deltas: list[dict[str, Array]], ws: list[float]) -> dict[str, Array]:
    """Weighted mean the obvious slow way: Python loops over float64 copies."""
    total = sum(ws)
    out = {}
    for name in deltas[0]:
        acc = np.zeros(deltas[0][name].shape, dtype=np.float64)
        for delta, w in zip(deltas, ws, strict=True):
            acc = acc + w * delta[name].astype(np.float64)
        out[name] = acc / total if total > 0 else acc * 0.0
    return out


@st.composite
def rounds(draw: st.DrawFn) -> tuple[list[dict[str, Array]], list[float]]:
    count = draw(st.integers(1, 24))
    deltas = []
    for _ in range(count):
        delta = {}
        for name, shape in SHAPES.items():
            delta[name] = draw(
                hnp.arrays(np.float32, shape, elements=st.floats(-1e6, 1e6, width=32))
            )
        deltas.append(delta)
    ws = [draw(weights) for _ in range(count)]
    return deltas, ws


def assert_close_to_reference(got: dict[str, Array], want: dict[str, Array]) -> None:
    for name in want:
        # Inputs are bounded by 1e6: float64 rounding of the sums stays far below 1e-6.
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6)


NO_NUMBA = "numba is not installed: numpy folds every tensor"


@pytest.fixture(params=["compiled", "numpy"])
def fold_loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Fold every tensor with the compiled loop, or every tensor with numpy."""
    if request.param == "compiled":
        if kernels.load() is None:
            pytest.skip(NO_NUMBA)
        monkeypatch.setattr(fedavg, "_COMPILED_MIN", 0)
    else:
        monkeypatch.setattr(fedavg, "_COMPILED_MIN", sys.maxsize)
    return str(request.param)


@PROPERTY
@given(rounds())
def test_streaming_mean_equals_float64_reference(
    case: tuple[list[dict[str, Array]], list[float]],
) -> None:
    deltas, ws = case
    agg = WeightedMean(ParameterSet(deltas[0]).spec())
    for delta, w in zip(deltas, ws, strict=True):
        agg.add(delta, w)
    assert agg.count == len(deltas)
    assert agg.total_weight == pytest.approx(sum(ws))
    assert_close_to_reference(agg.mean(), reference_mean(deltas, ws))


@PROPERTY
@given(rounds(), st.randoms(use_true_random=False))
def test_streaming_mean_is_independent_of_arrival_order(
    case: tuple[list[dict[str, Array]], list[float]], rng: object
) -> None:
    deltas, ws = case
    order = list(range(len(deltas)))
    rng.shuffle(order)  # type: ignore[attr-defined]
    forward = WeightedMean(ParameterSet(deltas[0]).spec())
    for delta, w in zip(deltas, ws, strict=True):
        forward.add(delta, w)
    shuffled = WeightedMean(ParameterSet(deltas[0]).spec())
    for i in order:
        shuffled.add(deltas[i], ws[i])
    want = reference_mean(deltas, ws)
    assert_close_to_reference(forward.mean(), want)
    assert_close_to_reference(shuffled.mean(), want)


@PROPERTY
@given(rounds(), st.randoms(use_true_random=False))
def test_compiled_fold_equals_float64_reference_in_any_order(
    case: tuple[list[dict[str, Array]], list[float]], rng: object
) -> None:
    if kernels.load() is None:
        pytest.skip(NO_NUMBA)
    deltas, ws = case
    order = list(range(len(deltas)))
    rng.shuffle(order)  # type: ignore[attr-defined]
    with pytest.MonkeyPatch.context() as patch:
        # Every tensor, however small, through the compiled loop.
        patch.setattr(fedavg, "_COMPILED_MIN", 0)
        one = WeightedMean(ParameterSet(deltas[0]).spec())
        for i in order:
            one.add(deltas[i], ws[i])
        many = WeightedMean(ParameterSet(deltas[0]).spec())
        many.add_many((deltas[i], ws[i]) for i in order)
    want = reference_mean(deltas, ws)
    assert_close_to_reference(one.mean(), want)
    assert_close_to_reference(many.mean(), want)


@PROPERTY
@given(rounds(), st.integers(1, 7))
def test_add_many_equals_one_add_per_update(
    case: tuple[list[dict[str, Array]], list[float]], batch: int
) -> None:
    deltas, ws = case
    one = WeightedMean(ParameterSet(deltas[0]).spec())
    for delta, w in zip(deltas, ws, strict=True):
        one.add(delta, w)
    many = WeightedMean(ParameterSet(deltas[0]).spec())
    pairs = list(zip(deltas, ws, strict=True))
    for first in range(0, len(pairs), batch):
        many.add_many(pairs[first : first + batch])
    assert many.count == one.count
    assert many.total_weight == pytest.approx(one.total_weight)
    assert_close_to_reference(many.mean(), reference_mean(deltas, ws))


@pytest.mark.parametrize("size", [10, 4810])
def test_small_models_fold_eight_updates_per_step_in_a_small_stage(size: int) -> None:
    # The stage budget of a quarter of the model would allow less than one
    # row: each update would then be folded alone.
    for lane in fedavg._lanes(size):
        assert lane.stage.shape == (8, 2048)
        assert lane.stage.nbytes + lane.out.nbytes <= 160 * 1024


def test_add_many_folds_large_tensors_and_batches_over_the_block_size(fold_loop: str) -> None:
    # 40 updates (three batches of at most 16) of a tensor longer than one
    # staging block, with a ragged tail, plus a small tensor.
    rng = np.random.default_rng(7)
    deltas = [
        {
            "big": rng.standard_normal(70_001).astype(np.float32),
            "small": rng.standard_normal(3).astype(np.float32),
        }
        for _ in range(40)
    ]
    ws = [float(w) for w in rng.integers(1, 500, size=40)]
    agg = WeightedMean(ParameterSet(deltas[0]).spec())
    agg.add_many(zip(deltas, ws, strict=True))
    assert agg.count == 40
    assert_close_to_reference(agg.mean(), reference_mean(deltas, ws))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thousand_float16_updates_average_within_float16_precision(seed: int) -> None:
    rng = np.random.default_rng(seed)
    model = ParameterSet({"w": rng.standard_normal(256).astype(np.float16)})
    deltas = [{"w": rng.standard_normal(256).astype(np.float16)} for _ in range(1000)]
    ws = [float(w) for w in rng.integers(1, 100, size=1000)]
    strategy = FedAvg()
    agg = strategy.begin(model)
    for delta, w in zip(deltas, ws, strict=True):
        agg.add(delta, w)
    mean64 = reference_mean(deltas, ws)["w"]
    # The mean itself is float64: as exact as the float64 reference.
    np.testing.assert_allclose(agg.mean()["w"], mean64, rtol=1e-6, atol=1e-9)
    nxt = strategy.finish(model, agg)["w"]
    assert nxt.dtype == np.float16
    want = model["w"].astype(np.float64) + mean64
    rel = np.abs(nxt.astype(np.float64) - want) / np.maximum(np.abs(want), 1e-2)
    assert rel.max() < 1e-3


def test_float32_model_advances_by_server_lr_times_the_weighted_mean() -> None:
    model = ParameterSet({"w": np.array([1.0, 2.0, -3.0], dtype=np.float32)})
    agg = FedAvg(server_lr=0.5).begin(model)
    agg.add({"w": np.array([2.0, 0.0, 4.0], dtype=np.float32)}, 1.0)
    agg.add({"w": np.array([4.0, 6.0, 0.0], dtype=np.float32)}, 3.0)
    nxt = FedAvg(server_lr=0.5).finish(model, agg)
    # The weighted mean is 3.5, 4.5 and 1.0; half of it is added.
    np.testing.assert_array_equal(nxt["w"], np.array([2.75, 4.25, -2.5], dtype=np.float32))
    assert nxt["w"].dtype == np.float32


def bf16_model(seed: int) -> ParameterSet:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((5, 7)).astype(BF16)
    values[0, :3] = np.array([0.0, -0.0, 3.0e38], dtype=BF16)
    return ParameterSet({"w": values, "b": rng.standard_normal(7).astype(BF16)})


def bits(a: Array) -> Array:
    return a.view(np.uint16)


@pytest.mark.parametrize("weight", [0.0, 5.0])
def test_bfloat16_model_survives_a_round_of_identity_deltas_bit_for_bit(weight: float) -> None:
    model = bf16_model(3)
    strategy = FedAvg()
    agg = strategy.begin(model)
    agg.add({name: np.zeros_like(a) for name, a in model.items()}, weight)
    nxt = strategy.finish(model, agg)
    for name, a in model.items():
        assert nxt[name].dtype == BF16
        np.testing.assert_array_equal(bits(nxt[name]), bits(a))


def test_bfloat16_round_matches_reference_to_bfloat16_rounding() -> None:
    model = bf16_model(4)
    rng = np.random.default_rng(5)
    deltas = [
        {n: rng.standard_normal(a.shape).astype(BF16) for n, a in model.items()} for _ in range(9)
    ]
    ws = [float(w) for w in rng.integers(1, 50, size=9)]
    strategy = FedAvg()
    agg = strategy.begin(model)
    agg.add_many(zip(deltas, ws, strict=True))
    nxt = strategy.finish(model, agg)
    mean = reference_mean(deltas, ws)
    for name, a in model.items():
        want = (a.astype(np.float64) + mean[name]).astype(BF16)
        assert nxt[name].dtype == BF16
        # Both round one float64 value to bfloat16; they may differ by one ulp only at ties.
        np.testing.assert_allclose(
            nxt[name].astype(np.float64), want.astype(np.float64), rtol=2**-7, atol=0
        )


def int_round(current: Array, deltas: list[Array], ws: list[float]) -> Array:
    model = ParameterSet({"n": current})
    strategy = FedAvg()
    agg = strategy.begin(model)
    for delta, w in zip(deltas, ws, strict=True):
        agg.add({"n": delta}, w)
    nxt = strategy.finish(model, agg)["n"]
    assert nxt.dtype == current.dtype
    assert isinstance(nxt, np.ndarray)
    return nxt


def test_int64_counter_is_never_zeroed_by_a_round_of_zero_deltas() -> None:
    step = np.array(1234, dtype=np.int64)
    nxt = int_round(step, [np.array(0, dtype=np.int64)] * 3, [10.0, 20.0, 30.0])
    assert nxt == 1234


def test_int64_counter_advances_by_the_deltas_every_client_agrees_on() -> None:
    step = np.array(1234, dtype=np.int64)
    nxt = int_round(step, [np.array(3, dtype=np.int64)] * 4, [1.0, 7.0, 2.0, 100.0])
    assert nxt == 1237


@pytest.mark.parametrize(
    ("deltas", "ws", "advance"),
    [
        ([2, 4], [1.0, 1.0], 3),  # mean 3
        ([0, 4], [1.0, 3.0], 3),  # weighted mean 3
        ([1, 2], [1.0, 1.0], 2),  # 1.5 rounds half to even: 2
        ([2, 3], [1.0, 1.0], 2),  # 2.5 rounds half to even: 2
        ([5, -5], [1.0, 1.0], 0),
    ],
)
def test_int64_tensor_advances_by_the_rounded_weighted_mean(
    deltas: list[int], ws: list[float], advance: int
) -> None:
    current = np.array([10, -10, 2**40], dtype=np.int64)
    nxt = int_round(current, [np.full(3, d, dtype=np.int64) for d in deltas], ws)
    np.testing.assert_array_equal(nxt, current + advance)


def test_uint8_tensor_survives_zero_deltas_and_advances_by_agreed_deltas() -> None:
    current = np.array([0, 7, 250], dtype=np.uint8)
    unchanged = int_round(current, [np.zeros(3, np.uint8)] * 2, [1.0, 2.0])
    np.testing.assert_array_equal(unchanged, current)
    plus3 = int_round(current, [np.full(3, 3, np.uint8)] * 2, [1.0, 2.0])
    np.testing.assert_array_equal(plus3, np.array([3, 10, 253], dtype=np.uint8))


def test_uint8_deltas_are_differences_modulo_256() -> None:
    # One client went up by one, one went down by one: the mean change is 0,
    # not the mean of 1 and 255 (what reading 255 as unsigned would give).
    model = ParameterSet({"n": np.array([5, 0], dtype=np.uint8)})
    up = ParameterSet({"n": np.array([6, 1], dtype=np.uint8)}).subtract(model)
    down = ParameterSet({"n": np.array([4, 255], dtype=np.uint8)}).subtract(model)
    nxt = int_round(model["n"], [up["n"], down["n"]], [1.0, 1.0])
    np.testing.assert_array_equal(nxt, model["n"])
    both_down = int_round(model["n"], [down["n"], down["n"]], [1.0, 1.0])
    np.testing.assert_array_equal(both_down, np.array([4, 255], dtype=np.uint8))


def test_bool_flags_survive_zero_deltas_and_flip_by_weighted_majority() -> None:
    model = ParameterSet({"n": np.array([True, False, True, False])})
    same = ParameterSet({"n": np.array([True, False, True, False])}).subtract(model)
    flipped = ParameterSet({"n": np.array([False, True, True, False])}).subtract(model)
    assert same["n"].dtype == np.bool_
    np.testing.assert_array_equal(
        int_round(model["n"], [same["n"]] * 3, [1.0, 1.0, 1.0]), model["n"]
    )
    # Weight 3 flipped the first two flags, weight 1 kept them: they flip.
    nxt = int_round(model["n"], [flipped["n"], same["n"]], [3.0, 1.0])
    np.testing.assert_array_equal(nxt, np.array([False, True, True, False]))
    # Weight 1 flipped, weight 3 kept: they stay.
    nxt = int_round(model["n"], [flipped["n"], same["n"]], [1.0, 3.0])
    np.testing.assert_array_equal(nxt, model["n"])


def test_zero_total_weight_leaves_the_model_unchanged_bit_for_bit() -> None:
    model = ParameterSet(
        {
            "w": np.array([1.5, -0.0, np.float32(1e-40)], dtype=np.float32),
            "n": np.array(9, dtype=np.int64),
        }
    )
    strategy = FedAvg(server_lr=2.0)
    agg = strategy.begin(model)
    agg.add({"w": np.full(3, 100.0, np.float32), "n": np.array(5, np.int64)}, 0.0)
    assert agg.count == 1
    assert agg.total_weight == 0.0
    np.testing.assert_array_equal(agg.mean()["w"], np.zeros(3))
    nxt = strategy.finish(model, agg)
    np.testing.assert_array_equal(nxt["w"].view(np.uint32), model["w"].view(np.uint32))
    assert nxt["n"] == 9
    assert not np.shares_memory(nxt["w"], model["w"])


def test_round_without_updates_leaves_the_model_unchanged() -> None:
    model = ParameterSet({"w": np.arange(4, dtype=np.float32)})
    strategy = FedAvg()
    nxt = strategy.finish(model, strategy.begin(model))
    np.testing.assert_array_equal(nxt["w"], model["w"])


@pytest.mark.parametrize("weight", [-1.0, -1e-300, float("nan"), float("inf"), float("-inf")])
def test_negative_or_non_finite_weight_is_refused_and_nothing_is_folded(weight: float) -> None:
    delta = {"w": np.ones(3, dtype=np.float32)}
    agg = WeightedMean(ParameterSet(delta).spec())
    with pytest.raises(ValueError, match="weight"):
        agg.add(delta, weight)
    with pytest.raises(ValueError, match="weight"):
        agg.add_many([(delta, 1.0), (delta, weight)])
    assert agg.count == 0
    assert agg.total_weight == 0.0
    np.testing.assert_array_equal(agg.mean()["w"], np.zeros(3))


def test_delta_with_wrong_tensors_is_refused_before_anything_is_folded() -> None:
    spec = ParameterSet({"a": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)}).spec()
    agg = WeightedMean(spec)
    good = {"a": np.ones(3, np.float32), "b": np.ones(2, np.float32)}
    with pytest.raises(ValueError, match="missing"):
        agg.add_many([(good, 1.0), ({"a": np.ones(3, np.float32)}, 1.0)])
    with pytest.raises(ValueError, match="shape"):
        agg.add({"a": np.ones(3, np.float32), "b": np.ones((2, 1), np.float32)}, 1.0)
    with pytest.raises(ValueError, match="shape"):
        agg.add({"a": np.ones(3, np.float32), "b": np.ones(1, np.float32)}, 1.0)
    assert agg.count == 0
    np.testing.assert_array_equal(agg.mean()["a"], np.zeros(3))


def test_delta_tensors_are_matched_by_name_not_by_order() -> None:
    spec = ParameterSet({"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)}).spec()
    agg = WeightedMean(spec)
    agg.add({"b": np.array([3.0, 4.0], np.float32), "a": np.array([1.0, 2.0], np.float32)}, 1.0)
    np.testing.assert_array_equal(agg.mean()["a"], [1.0, 2.0])
    np.testing.assert_array_equal(agg.mean()["b"], [3.0, 4.0])


def test_finish_keeps_tensor_order_and_shapes_of_the_model() -> None:
    model = ParameterSet(
        {"z": np.zeros((2, 3), np.float32), "a": np.zeros((), np.float32), "m": np.zeros(1)}
    )
    strategy = FedAvg()
    agg = strategy.begin(model)
    agg.add({n: np.ones_like(a) for n, a in model.items()}, 2.0)
    nxt = strategy.finish(model, agg)
    assert list(nxt) == ["z", "a", "m"]
    assert {n: (a.shape, a.dtype) for n, a in nxt.items()} == {
        n: (a.shape, a.dtype) for n, a in model.items()
    }
    np.testing.assert_array_equal(nxt["z"], np.ones((2, 3)))


def fold_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("fedcore-fold")}


def large_round(seed: int) -> tuple[list[dict[str, Array]], list[float]]:
    # 16 updates of 70,001 + 3 elements: more than a million element-updates,
    # so the fold is shared between threads, in pieces that end mid-tensor.
    rng = np.random.default_rng(seed)
    deltas = [
        {
            "big": rng.standard_normal(70_001).astype(np.float32),
            "small": rng.standard_normal(3).astype(np.float32),
        }
        for _ in range(16)
    ]
    return deltas, [float(w) for w in rng.integers(0, 500, size=16)]


def test_fold_shared_between_threads_equals_one_thread_and_the_reference(
    monkeypatch: pytest.MonkeyPatch, fold_loop: str
) -> None:
    deltas, ws = large_round(11)
    spec = ParameterSet(deltas[0]).spec()
    # Pieces of the compiled loop as short as numpy's, so that three threads share them.
    monkeypatch.setattr(fedavg, "_SPAN", 4096)
    monkeypatch.setattr(fedavg, "_thread_count", lambda: 1)
    alone = WeightedMean(spec)
    before = fold_threads()
    alone.add_many(zip(deltas, ws, strict=True))
    # No thread started; those of earlier aggregates may have ended since.
    assert not fold_threads() - before
    # Three threads, whatever this machine has: pieces are shared unevenly.
    monkeypatch.setattr(fedavg, "_thread_count", lambda: 3)
    shared = WeightedMean(spec)
    shared.add_many(zip(deltas, ws, strict=True))
    # Two helpers were submitted; the executor starts a second thread only if
    # the first is still busy, and on a loaded machine the first may drain
    # every piece before the second is submitted.
    assert 1 <= len(fold_threads() - before) <= 2
    want = reference_mean(deltas, ws)
    for name in want:
        np.testing.assert_allclose(shared.mean()[name], alone.mean()[name], rtol=1e-12, atol=0)
        np.testing.assert_allclose(shared.mean()[name], want[name], rtol=1e-6, atol=1e-12)


def test_fold_threads_end_when_the_aggregate_is_collected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    deltas, ws = large_round(12)
    monkeypatch.setattr(fedavg, "_thread_count", lambda: 2)
    before = fold_threads()
    agg = WeightedMean(ParameterSet(deltas[0]).spec())
    agg.add_many(zip(deltas, ws, strict=True))
    started = fold_threads() - before
    assert len(started) == 1
    del agg
    gc.collect()
    for thread in started:
        thread.join(timeout=10)
        assert not thread.is_alive()


@pytest.mark.parametrize("threads", [1, 2])
def test_updates_that_cancel_leave_exactly_the_small_remainder(
    monkeypatch: pytest.MonkeyPatch, threads: int, fold_loop: str
) -> None:
    # Pairs of updates of 1e4 to 1e5 that cancel, and one update of 1 to 2:
    # the weighted sum is about 2e6 times smaller than the sum of the
    # magnitudes of its terms, which a float32 sum would get badly wrong. Every
    # value is a multiple of 2**-23 and every partial sum is below 2**25 in
    # magnitude, so with integer weights float64 folds them exactly in any
    # order: the mean must be the small update's share to the last bit,
    # however the fold is cut.
    monkeypatch.setattr(fedavg, "_thread_count", lambda: threads)
    rng = np.random.default_rng(13)
    n = 70_003

    def signed(low: float, high: float) -> Array:
        signs = np.where(rng.random(n) < 0.5, -1.0, 1.0)
        return (rng.uniform(low, high, n) * signs).astype(np.float32)

    small = {"w": signed(1.0, 2.0)}
    deltas, ws = [small], [5.0]
    for i in range(15):
        big = {"w": signed(1e4, 1e5)}
        deltas.insert(i % 3, big)
        deltas.append({"w": -big["w"]})
        ws.insert(i % 3, float(1 + i))
        ws.append(float(1 + i))
    agg = WeightedMean(ParameterSet(small).spec())
    for first in range(0, len(deltas), 16):
        agg.add_many(zip(deltas[first : first + 16], ws[first : first + 16], strict=True))
    want = small["w"].astype(np.float64) * 5.0 / sum(ws)
    np.testing.assert_array_equal(agg.mean()["w"], want)
    np.testing.assert_allclose(agg.mean()["w"], reference_mean(deltas, ws)["w"], rtol=1e-6, atol=0)


def weighted_sum_case(size: int, count: int, seed: int) -> tuple[tuple[Array, ...], Array, Array]:
    """Return `count` read-only float32 inputs padded to a batch, their weights, and acc."""
    rng = np.random.default_rng(seed)
    inputs = [rng.standard_normal(size).astype(np.float32) for _ in range(count)]
    for x in inputs:
        x.flags.writeable = False
    padded = tuple(inputs + [inputs[0]] * (fedavg._MAX_BATCH - count))
    return padded, rng.uniform(0.0, 100.0, count), rng.standard_normal(size)


def weighted_sum_reference(
    acc: Array, inputs: tuple[Array, ...], weights: Array, offset: int, overwrite: bool
) -> Array:
    stop = offset + acc.size
    total = sum(
        w * x[offset:stop].astype(np.float64) for w, x in zip(weights, inputs, strict=False)
    )
    return np.asarray(total if overwrite else acc + total)


@pytest.mark.parametrize("count", [1, 3, 8, 11, 16])
@pytest.mark.parametrize("overwrite", [False, True])
def test_weighted_sum_loop_as_plain_python_matches_the_reference(
    count: int, overwrite: bool
) -> None:
    # The loop numba compiles, run by the interpreter (no numba needed): two
    # blocks and a ragged third, from an offset, in groups of 8 and singles.
    inputs, weights, start = weighted_sum_case(4500, count, seed=count)
    acc = start[7 : 7 + 2 * 2048 + 9].copy()
    want = weighted_sum_reference(acc, inputs, weights, 7, overwrite)
    kernels._weighted_sum(acc, inputs, weights, 7, overwrite)
    np.testing.assert_allclose(acc, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("count", range(1, 17))
@pytest.mark.parametrize("overwrite", [False, True])
def test_compiled_weighted_sum_matches_the_reference(count: int, overwrite: bool) -> None:
    compiled = kernels.load()
    if compiled is None:
        pytest.skip(NO_NUMBA)
    inputs, weights, start = weighted_sum_case(70_001, count, seed=100 + count)
    for offset, stop in [(0, 70_001), (3, 5), (4099, 66_000)]:
        acc = start[offset:stop].copy()
        want = weighted_sum_reference(acc, inputs, weights, offset, overwrite)
        compiled(acc, inputs, weights, offset, overwrite)
        np.testing.assert_allclose(acc, want, rtol=1e-12, atol=1e-12)
    # Only the range asked for is written.
    whole = start.copy()
    compiled(whole[10:20], inputs, weights, 10, overwrite)
    np.testing.assert_array_equal(whole[:10], start[:10])
    np.testing.assert_array_equal(whole[20:], start[20:])


def test_compiled_and_numpy_folds_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    if kernels.load() is None:
        pytest.skip(NO_NUMBA)
    rng = np.random.default_rng(21)
    deltas = [
        {
            "big": rng.standard_normal(140_001).astype(np.float32),
            "small": rng.standard_normal((2, 3)).astype(np.float32),
            "scalar": np.array(rng.standard_normal(), dtype=np.float32),
        }
        for _ in range(37)
    ]
    ws = [float(w) for w in rng.integers(0, 50, size=37)]
    spec = ParameterSet(deltas[0]).spec()
    means = {}
    for loop, least in [("compiled", 0), ("numpy", sys.maxsize)]:
        monkeypatch.setattr(fedavg, "_COMPILED_MIN", least)
        agg = WeightedMean(spec)
        agg.add(deltas[0], ws[0])
        agg.add_many(zip(deltas[1:], ws[1:], strict=True))
        means[loop] = agg.mean()
    # The compiled loop took every float32 input, numpy none.
    monkeypatch.setattr(fedavg, "_COMPILED_MIN", 0)
    part = fedavg._split(np.zeros(3), [np.ones(3, np.float32)] * 2, [1.0, 2.0], fresh=False)
    assert part.packed_weights.size == 2
    assert not part.flats
    want = reference_mean(deltas, ws)
    for name in want:
        np.testing.assert_allclose(means["compiled"][name], means["numpy"][name], rtol=1e-12)
        np.testing.assert_allclose(means["compiled"][name], want[name], rtol=1e-6, atol=1e-12)


def unaligned(values: Array) -> Array:
    """Return a copy of float32 `values` that starts one byte past an aligned address."""
    data = np.frombuffer(b"\0" + values.tobytes(), dtype=np.uint8)
    out = data[1:].view(np.float32)
    assert not out.flags.aligned
    return out


def test_fold_over_mixed_dtypes_matches_the_reference(fold_loop: str) -> None:
    # One batch mixes float32 (aligned or not), float16, bfloat16 and float64
    # inputs of one tensor; the first batch of "late" has no float32 input,
    # and an integer counter rides along.
    rng = np.random.default_rng(31)
    n = 70_003
    kinds = [np.float32, np.float16, BF16, np.float64, "unaligned"]
    deltas = []
    for i in range(23):
        kind = kinds[i % len(kinds)]
        base = rng.standard_normal(n).astype(np.float32)
        big = unaligned(base) if kind == "unaligned" else base.astype(kind)
        late = rng.standard_normal(n).astype(np.float16 if i < 16 else np.float32)
        deltas.append({"big": big, "late": late, "n": np.array(i % 4, dtype=np.int64)})
    ws = [float(w) for w in rng.integers(1, 50, size=23)]
    model = ParameterSet(
        {"big": np.zeros(n, np.float32), "late": np.zeros(n, np.float32), "n": np.array(7)}
    )
    strategy = FedAvg()
    agg = strategy.begin(model)
    agg.add_many(zip(deltas, ws, strict=True))
    want = reference_mean(deltas, ws)
    for name in ("big", "late"):
        np.testing.assert_allclose(agg.mean()[name], want[name], rtol=1e-12, atol=1e-12)
    nxt = strategy.finish(model, agg)
    assert nxt["big"].dtype == np.float32
    assert nxt["n"] == 7 + np.rint(want["n"])
