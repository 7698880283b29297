"""Central DP-FedAvg: clipped sum plus noise over the expected cohort, as a fedcore Strategy."""

from __future__ import annotations

import numpy as np
import pytest

from fedcore import NonFiniteUpdate, ParameterSet, Strategy, TensorMismatch
from privacy.dp import (
    AdaptiveClipping,
    CappedWeights,
    DpAggregate,
    DpFedAvg,
    FixedClipping,
    GaussianEvent,
    GaussianNoise,
    NoiseSource,
    UniformWeights,
    clip,
    expected_cohort,
    poisson_sample,
)


def model() -> ParameterSet:
    return ParameterSet(
        {
            "w": np.ones((20, 30), dtype=np.float32),
            "b": np.zeros(30, dtype=np.float64),
            "scale": np.array(2.0, dtype=np.float32),
            "bn.num_batches_tracked": np.array(5, dtype=np.int64),
        }
    )


def deltas(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "w": rng.normal(scale=scale, size=(20, 30)).astype(np.float32),
            "b": rng.normal(scale=scale, size=30),
            "scale": np.array(scale, dtype=np.float16),
            "bn.num_batches_tracked": np.array(1000, dtype=np.int64),
        }
        for scale in np.linspace(0.001, 0.2, count)
    ]


def strategy(seed: int, **kwargs: object) -> DpFedAvg:
    options: dict[str, object] = {
        "clipping": FixedClipping(1.0),
        "noise": GaussianNoise(1e-6),
        "sampling_rate": 0.5,
        "num_clients": 20,
        "source": NoiseSource.from_seed(seed),
    }
    options.update(kwargs)
    return DpFedAvg(**options)  # type: ignore[arg-type]


def test_dp_fedavg_is_a_fedcore_strategy_and_divides_by_the_expected_cohort() -> None:
    chosen: Strategy[DpAggregate] = strategy(1)
    updates = deltas(7, seed=2)
    aggregate = chosen.begin(model())
    for delta in updates:
        aggregate.add(delta, weight=123.0)
    following = chosen.finish(model(), aggregate)
    # Almost no noise (z = 1e-6): the step is the clipped sum over q·N = 10,
    # not over the 7 clients that came.
    clipped = [clip(d, 1.0)[0] for d in updates]
    expected_w = 1.0 + sum(c["w"] for c in clipped) / expected_cohort(20, 0.5)
    np.testing.assert_allclose(following["w"], expected_w, atol=1e-5)
    assert following["w"].dtype == np.float32
    assert following["scale"].shape == ()
    assert following["scale"].dtype == np.float32
    expected_scale = 2.0 + sum(float(c["scale"]) for c in clipped) / 10
    assert float(following["scale"]) == pytest.approx(expected_scale, abs=1e-5)
    # Integer tensors are never read from updates: the counter keeps its value.
    assert following["bn.num_batches_tracked"] == 5
    assert aggregate.count == 7
    assert aggregate.total_weight == 7.0


def test_release_reports_the_event_and_the_seeded_flag() -> None:
    dp = strategy(3, noise=GaussianNoise(0.8))
    release = dp.release(model(), dp.begin(model()))
    assert release.event == GaussianEvent(sampling_rate=0.5, noise_multiplier=0.8)
    assert dp.event() == release.event
    assert release.seeded
    assert release.noisy_fraction is None
    assert release.clipping == FixedClipping(1.0)
    assert not strategy(3, source=NoiseSource.secure()).release(model(), dp.begin(model())).seeded


def test_capped_weights_bound_every_contribution_to_the_clip_norm() -> None:
    weighting = CappedWeights(cap=100.0, population_weight=15.0)
    dp = strategy(4, weighting=weighting)
    big = {
        "w": np.full((20, 30), 10.0),
        "b": np.zeros(30),
        "scale": np.array(0.0),
        "bn.num_batches_tracked": np.array(0),
    }
    aggregate = dp.begin(model())
    aggregate.add(big, weight=1e9)  # a client claiming a billion examples
    aggregate.add(big, weight=50.0)
    assert aggregate.total_weight == pytest.approx(1.5)
    step = dp.finish(model(), aggregate)["w"] - 1.0
    # Norm of each contribution <= C = 1, divided by q·W = 7.5.
    assert np.linalg.norm(step) == pytest.approx(1.5 / 7.5, rel=1e-5)
    assert weighting.expected_total(sampling_rate=0.5, num_clients=20) == 7.5
    assert UniformWeights().expected_total(sampling_rate=0.5, num_clients=20) == 10.0


def test_aggregate_refuses_mismatched_and_non_finite_updates() -> None:
    aggregate = strategy(5).begin(model())
    bad = deltas(1, seed=6)[0]
    bad["w"][0, 0] = np.inf
    with pytest.raises(NonFiniteUpdate):
        aggregate.add(bad, weight=1.0)
    with pytest.raises(TensorMismatch):
        aggregate.add({"w": np.zeros((20, 30))}, weight=1.0)
    with pytest.raises(ValueError, match="weight"):
        aggregate.add(deltas(1, seed=6)[0], weight=-1.0)
    assert aggregate.count == 0


def test_adaptive_release_spends_the_target_and_moves_the_norm() -> None:
    policy = AdaptiveClipping(count_noise_std=0.5, clip_norm=1e-4, target_quantile=0.5)
    dp = strategy(8, clipping=policy, noise=GaussianNoise(0.5))
    aggregate = dp.begin(model())
    for delta in deltas(10, seed=9):
        aggregate.add(delta, weight=1.0)
    assert aggregate.centered_count == -5.0  # every update was clipped
    release = dp.release(model(), aggregate)
    # The event carries the target z of sum and count together.
    assert release.event.noise_multiplier == 0.5
    assert release.noisy_fraction is not None
    assert release.noisy_fraction < 0.5
    assert release.clipping.clip_norm > 1e-4


def test_strategy_refuses_a_count_noise_that_would_spend_the_whole_budget() -> None:
    with pytest.raises(ValueError, match="count_noise_std"):
        strategy(10, clipping=AdaptiveClipping(count_noise_std=0.4), noise=GaussianNoise(1.0))


def test_poisson_sample_includes_each_client_with_probability_q() -> None:
    ids = [f"client-{i}" for i in range(20_000)]
    rng = np.random.default_rng(12)
    sizes = [len(poisson_sample(ids, 0.05, rng)) for _ in range(20)]
    assert abs(np.mean(sizes) / 1000 - 1) < 0.01
    cohort = poisson_sample(ids, 0.05, rng)
    assert cohort == sorted(cohort, key=ids.index)
    with pytest.raises(ValueError, match="sampling rate"):
        poisson_sample(ids, 0.0, rng)
    with pytest.raises(ValueError, match="repeat"):
        poisson_sample(["a", "a"], 0.5, rng)
