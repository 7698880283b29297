"""Clipping bounds every update's norm; noise has the promised scale; adaptive norms converge."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedcore import ParameterSet
from privacy.dp import (
    AdaptiveClipping,
    DpFedAvg,
    FixedClipping,
    GaussianNoise,
    NoiseSource,
    clip,
    corrected_noise_multiplier,
    l2_norm,
    poisson_sample,
)

PROPERTY = settings(max_examples=80, deadline=None, derandomize=True, database=None)

float_tensors = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=0, max_dims=3, max_side=6),
    elements=st.floats(-1e6, 1e6, width=32),
)


@PROPERTY
@given(
    tensors=st.lists(float_tensors, min_size=1, max_size=4),
    max_norm=st.floats(1e-3, 1e3),
)
def test_clipped_norm_never_exceeds_the_clip_norm(
    tensors: list[np.ndarray], max_norm: float
) -> None:
    delta = {f"t{i}": t for i, t in enumerate(tensors)}
    delta["steps"] = np.array(10**6, dtype=np.int64)
    clipped, norm = clip(delta, max_norm)
    assert "steps" not in clipped
    assert l2_norm(clipped) <= max_norm * (1 + 1e-12)
    if norm <= max_norm:
        for name, tensor in clipped.items():
            np.testing.assert_array_equal(tensor, delta[name].astype(np.float64))
    else:
        # One factor for every tensor: the direction is kept.
        assert l2_norm(clipped) == pytest.approx(max_norm, rel=1e-9)


def test_norm_is_taken_over_all_float_tensors_and_ignores_integers() -> None:
    delta = {
        "a": np.array([3.0], np.float32),
        "b": np.array([4.0], np.float16),
        "n": np.array(7, np.int64),
    }
    assert l2_norm(delta) == 5.0
    clipped, norm = clip(delta, 1.0)
    assert norm == 5.0
    np.testing.assert_allclose(clipped["a"], [0.6])
    np.testing.assert_allclose(clipped["b"], [0.8])


def test_clip_refuses_non_finite_updates_and_bad_norms() -> None:
    with pytest.raises(ValueError, match="NaN or Inf"):
        clip({"a": np.array([np.nan])}, 1.0)
    with pytest.raises(ValueError, match="clip norm"):
        clip({"a": np.array([1.0])}, 0.0)


def test_release_noise_has_std_z_times_c_within_two_percent() -> None:
    size = 200_000
    model = ParameterSet({"w": np.zeros(size, dtype=np.float64)})
    strategy = DpFedAvg(
        clipping=FixedClipping(0.5),
        noise=GaussianNoise(1.3),
        sampling_rate=0.01,
        num_clients=1000,
        source=NoiseSource.from_seed(20240601),
    )
    aggregate = strategy.begin(model)
    aggregate.add({"w": np.zeros(size)}, weight=1.0)
    release = strategy.release(model, aggregate)
    noise = release.model["w"] * (0.01 * 1000)  # undo the division by q·N
    assert release.seeded
    assert abs(noise.std() / (1.3 * 0.5) - 1) < 0.02
    assert abs(noise.mean()) < 0.01


def test_corrected_multiplier_composes_back_to_the_target() -> None:
    z, sigma_b = 1.0, 5.0
    z_delta = corrected_noise_multiplier(z, sigma_b)
    assert z_delta > z
    assert (z_delta**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z, rel=1e-12)
    with pytest.raises(ValueError, match="must exceed noise_multiplier / 2"):
        corrected_noise_multiplier(1.0, 0.5)


@pytest.mark.parametrize("quantile", [0.3, 0.5, 0.8])
def test_adaptive_clipping_converges_to_the_target_quantile(quantile: float) -> None:
    rng = np.random.default_rng(7)
    population = rng.lognormal(mean=0.0, sigma=1.0, size=2000)
    ids = [str(i) for i in range(population.size)]
    q = 0.1
    expected = q * population.size
    policy = AdaptiveClipping(count_noise_std=expected / 20, target_quantile=quantile)
    source = NoiseSource.from_seed(11)
    fractions = []
    for _ in range(400):
        cohort = [int(i) for i in poisson_sample(ids, q, rng)]
        unclipped = population[cohort] <= policy.clip_norm
        centered = float(np.sum(unclipped - 0.5))
        estimate = policy.estimate_fraction(centered, expected_clients=expected, source=source)
        policy = policy.updated(estimate)
        fractions.append(float(np.mean(population <= policy.clip_norm)))
    # Started at 0.1, far below every quantile of interest (about the 1st
    # percentile); averaged over the last 100 rounds to smooth the noise.
    assert abs(np.mean(fractions[-100:]) - quantile) < 0.03
    assert math.isclose(policy.clip_norm, np.quantile(population, quantile), rel_tol=0.25)


def test_fixed_clipping_never_moves_and_adaptive_moves_the_right_way() -> None:
    fixed = FixedClipping(2.0)
    assert fixed.updated(0.0) is fixed
    policy = AdaptiveClipping(count_noise_std=1.0, clip_norm=1.0, target_quantile=0.5)
    assert policy.updated(0.9).clip_norm < 1.0 < policy.updated(0.1).clip_norm
    assert policy.updated(0.1).clip_norm == pytest.approx(math.exp(0.2 * 0.4))
