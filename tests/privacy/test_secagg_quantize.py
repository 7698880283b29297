"""Fixed-point encoding: clipping, unbiased stochastic rounding, overflow-free ring sizes."""

from __future__ import annotations

import numpy as np
import pytest

from fedcore import NonFiniteUpdate, ParameterSet
from privacy.secagg import LOSS_VALUES, Quantization, flatten, loss_of, unflatten, with_loss


def test_ring_is_just_large_enough_for_the_sum_of_all_clients() -> None:
    q = Quantization(clip=1.0, value_bits=16)
    assert q.ring_bits(1) == 16
    assert q.ring_bits(100) == 23
    assert q.ring_bits(128) == 23  # 128 * 2^16 = 2^23 exactly
    assert q.ring_bits(129) == 24
    for clients in (1, 2, 100, 128, 129, 1000):
        bits = q.ring_bits(clients)
        assert clients * q.levels < 1 << bits  # the largest possible sum fits
        q.check_ring(bits, clients)
        with pytest.raises(ValueError, match="exceed a ring"):
            q.check_ring(bits - 1, clients)


def test_rings_over_64_bits_are_refused() -> None:
    with pytest.raises(ValueError, match="exceed a ring"):
        Quantization(clip=1.0, value_bits=32).check_ring(65, 1 << 33)


def test_codes_are_uint32_clipped_and_carry_the_weight() -> None:
    q = Quantization(clip=0.5, value_bits=8, max_weight=4.0)
    codes = q.encode(np.array([-3.0, -0.5, 0.5, 7.0]), weight=4.0, rng=np.random.default_rng(0))
    assert codes.dtype == np.uint32
    np.testing.assert_array_equal(codes, [0, 0, 255, 255, 255])
    half = q.encode(np.array([7.0]), weight=2.0, rng=np.random.default_rng(0))
    # w / W = 1/2 scales the clipped value to 0.25: code 0.75 * 255 = 191.25.
    assert half[0] in (191, 192)
    assert half[1] in (127, 128)


def test_stochastic_rounding_is_unbiased() -> None:
    q = Quantization(clip=1.0, value_bits=4)
    value = np.full(200_000, 0.123)
    codes = q.encode(value, weight=1.0, rng=np.random.default_rng(1))[:-1]
    decoded, _ = q.decode(np.append(codes.sum(dtype=np.int64), 0), clients=codes.size)
    # 15 levels over [-1, 1]: step 2/15; the error of the mean is about
    # step / sqrt(12 n), here 7e-5; five of those as tolerance.
    assert abs(decoded[0] / codes.size - 0.123) < 5 * (2 / 15) / np.sqrt(12 * codes.size)
    assert set(np.unique(codes)) == {8, 9}  # (0.123 + 1) * 15 / 2 = 8.42


def test_decoded_sum_is_the_weighted_sum_within_one_step_per_client() -> None:
    q = Quantization(clip=2.0, value_bits=16, max_weight=10.0)
    rng = np.random.default_rng(2)
    updates = [rng.normal(0, 1.5, 1000) for _ in range(7)]
    weights = [1.0, 2.5, 10.0, 0.0, 3.0, 7.0, 9.5]
    total = sum(
        q.encode(u, weight=w, rng=rng).astype(np.int64)
        for u, w in zip(updates, weights, strict=True)
    )
    weighted, weight = q.decode(total, clients=7)
    plain = sum(w * np.clip(u, -2, 2) for u, w in zip(updates, weights, strict=True))
    step = 2 * 2.0 / q.levels * q.max_weight
    assert np.abs(weighted - plain).max() <= 7 * step
    assert abs(weight - sum(weights)) <= 7 * q.max_weight / q.levels


def test_bad_updates_and_weights_are_refused() -> None:
    q = Quantization(clip=1.0, max_weight=2.0)
    rng = np.random.default_rng(0)
    with pytest.raises(NonFiniteUpdate):
        q.encode(np.array([0.0, np.nan]), weight=1.0, rng=rng)
    with pytest.raises(ValueError, match="outside"):
        q.encode(np.zeros(3), weight=2.5, rng=rng)
    with pytest.raises(ValueError, match="flat"):
        q.encode(np.zeros((2, 2)), weight=1.0, rng=rng)
    with pytest.raises(ValueError, match="value_bits"):
        Quantization(clip=1.0, value_bits=33)
    with pytest.raises(ValueError, match="clip"):
        Quantization(clip=0.0)


def test_flatten_and_unflatten_round_trip_a_parameter_set() -> None:
    params = ParameterSet(
        {
            "w": np.arange(6, dtype=np.float32).reshape(2, 3),
            "b": np.array([0.5, -0.5], dtype=np.float64),
        }
    )
    vector = flatten(params)
    assert vector.shape == (8,)
    back = unflatten(vector, params.spec())
    assert list(back) == ["w", "b"]
    assert back["w"].dtype == np.float32
    np.testing.assert_array_equal(back["w"], params["w"])
    with pytest.raises(ValueError, match="does not hold"):
        unflatten(vector[:-1], params.spec())


def test_32_bit_codes_stay_in_range_at_both_ends_of_the_clip() -> None:
    q = Quantization(clip=1.0, value_bits=32)
    codes = q.encode(np.array([-5.0, -1.0, 1.0, 5.0]), weight=1.0, rng=np.random.default_rng(3))
    assert codes.dtype == np.uint32
    np.testing.assert_array_equal(codes, [0, 0, q.levels, q.levels, q.levels])


def test_rounding_up_happens_with_the_fractional_part_as_probability() -> None:
    q = Quantization(clip=1.0, value_bits=2)  # levels 0..3 over [-1, 1]
    # -0.5 maps to 0.75 levels: code 1 with probability 3/4, else 0.
    codes = q.encode(np.full(100_000, -0.5), weight=1.0, rng=np.random.default_rng(4))[:-1]
    assert set(np.unique(codes)) == {0, 1}
    # Binomial(1e5, 3/4): standard deviation 137; five of them as tolerance.
    assert abs(int(codes.sum()) - 75_000) < 5 * 137


def _mean_loss(q: Quantization, losses: list[float | None], weights: list[float]) -> float:
    rng = np.random.default_rng(5)
    update = np.zeros(10)
    total = sum(
        q.encode(with_loss(update, loss, q.clip), weight=w, rng=rng).astype(np.int64)
        for loss, w in zip(losses, weights, strict=True)
    )
    weighted, weight = q.decode(total, clients=len(losses))
    return loss_of(weighted / weight, q.clip)


def test_the_training_loss_sums_to_its_weighted_mean_over_the_clients_that_report_it() -> None:
    q = Quantization(clip=0.5, value_bits=20, max_weight=100.0)
    weights = [10.0, 30.0, 60.0, 45.0]
    # Client 3 has no loss (None): it weighs in neither sum; a loss over the
    # ceiling of 100 counts as 100.
    losses: list[float | None] = [2.0, 1.0, 0.5, None]
    expected = (10 * 2.0 + 30 * 1.0 + 60 * 0.5) / 100
    assert _mean_loss(q, losses, weights) == pytest.approx(expected, abs=1e-3)
    assert _mean_loss(q, [250.0, 50.0], [1.0, 1.0]) == pytest.approx(75.0, abs=1e-2)
    assert np.isnan(_mean_loss(q, [None, float("nan")], [5.0, 5.0]))


def test_with_loss_appends_the_values_after_the_update() -> None:
    update = np.arange(3, dtype=np.float32)
    vector = with_loss(update, 25.0, clip=2.0)
    assert vector.shape == (3 + LOSS_VALUES,)
    np.testing.assert_array_equal(vector, [0.0, 1.0, 2.0, 2.0, 0.5])
    np.testing.assert_array_equal(with_loss(update, None, clip=2.0)[3:], [0.0, 0.0])
