"""Distributed discrete Gaussian: samplers, rotation, and encode → ring sum → decode."""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats
from scipy.linalg import hadamard

from fedcore import ParameterSet
from privacy.dp import (
    DistributedDp,
    NoiseSource,
    clip,
    decode,
    discrete_gaussian,
    discrete_gaussian_exact,
    discrete_gaussian_variance,
    encode,
    epsilon,
    fwht,
    padded_size,
    ring_sum,
    rotate,
    sum_norm_bound,
    unrotate,
)


@pytest.mark.parametrize("size", [1, 2, 64, 1024])
def test_fast_walsh_hadamard_matches_the_dense_matrix(size: int) -> None:
    x = np.random.default_rng(size).normal(size=size)
    reference = hadamard(size) @ x / np.sqrt(size)
    np.testing.assert_allclose(fwht(x), reference, atol=1e-12)


def test_hadamard_is_orthonormal_and_the_rotation_inverts() -> None:
    d = 128
    h = np.stack([fwht(column) for column in np.eye(d)], axis=1)
    np.testing.assert_allclose(h @ h.T, np.eye(d), atol=1e-12)
    x = np.random.default_rng(1).normal(size=1000)
    rotated = rotate(x, seed=99)
    assert rotated.size == padded_size(1000) == 1024
    assert np.linalg.norm(rotated) == pytest.approx(np.linalg.norm(x), rel=1e-12)
    np.testing.assert_allclose(unrotate(rotated, 99, 1000), x, atol=1e-12)
    assert not np.allclose(unrotate(rotated, 98, 1000), x)  # the seed matters


def test_rotation_flattens_a_spiky_vector() -> None:
    spike = np.zeros(4096)
    spike[7] = 1.0
    assert np.max(np.abs(rotate(spike, seed=3))) == pytest.approx(1 / 64)


@pytest.mark.parametrize("variance", [0.5, 3.0, 50.0, 1e4])
def test_discrete_gaussian_variance_matches_theory(variance: float) -> None:
    draws = discrete_gaussian(variance, 400_000, np.random.default_rng(17))
    assert draws.dtype == np.int64
    theory = discrete_gaussian_variance(variance)
    assert abs(draws.var() / theory - 1) < 0.015
    assert abs(draws.mean()) < 4 * np.sqrt(theory / draws.size)


def test_fast_and_exact_samplers_follow_the_discrete_gaussian_mass_function() -> None:
    variance = 2.0
    support = np.arange(-6, 7)
    mass = np.exp(-(support**2) / (2 * variance))
    mass /= np.exp(-(np.arange(-40, 41) ** 2) / (2 * variance)).sum()
    source = random.Random(5)
    exact = [discrete_gaussian_exact(Fraction(2), source.randrange) for _ in range(4000)]
    fast = discrete_gaussian(variance, 4000, np.random.default_rng(5))
    for draws in (np.array(exact), fast):
        observed = np.array([np.sum(draws == y) for y in support])
        expected = mass * draws.size
        keep = expected > 5
        tail = draws.size - observed[keep].sum()
        chi2 = np.sum((observed[keep] - expected[keep]) ** 2 / expected[keep])
        chi2 += (tail - (draws.size - expected[keep].sum())) ** 2 / (
            draws.size - expected[keep].sum()
        )
        assert stats.chi2.sf(chi2, df=int(keep.sum())) > 1e-3


def params(**overrides: int | float) -> DistributedDp:
    values: dict[str, int | float] = {
        "clip_norm": 1.0,
        "noise_multiplier": 0.8,
        "min_survivors": 5,
        "max_clients": 8,
        "bits": 16,
        "num_parameters": 3 * 10_000 + 700,
        "rotation_seed": 2024,
    }
    values.update(overrides)
    return DistributedDp(**values)  # type: ignore[arg-type]


def model() -> ParameterSet:
    return ParameterSet(
        {
            "w": np.zeros((3, 10_000), dtype=np.float32),
            "steps": np.array(0, dtype=np.int64),
            "b": np.zeros(700, dtype=np.float32),
        }
    )


def updates(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    # Norms from about 0.1 to 3: some are clipped, some are not.
    return [
        {
            "w": rng.normal(scale=s, size=(3, 10_000)).astype(np.float32),
            "steps": np.array(4, dtype=np.int64),
            "b": rng.normal(scale=s, size=700).astype(np.float32),
        }
        for s in np.linspace(0.0006, 0.017, count)
    ]


def test_pipeline_recovers_the_clipped_sum_with_the_target_noise() -> None:
    p = params()
    clients = updates(p.min_survivors, seed=1)
    sources = [NoiseSource.from_seed(100 + i) for i in range(len(clients))]
    encoded = [encode(delta, p, source) for delta, source in zip(clients, sources, strict=True)]
    assert all(e.dtype == np.uint64 and e.max() < p.modulus for e in encoded)
    decoded = decode(ring_sum(encoded, p), p, model().spec(), survivors=len(clients))
    assert set(decoded) == {"w", "b"}
    clipped = [clip(delta, p.clip_norm)[0] for delta in clients]
    noise = np.concatenate(
        [(decoded[name] - sum(c[name] for c in clipped)).ravel() for name in ("w", "b")]
    )
    # min_survivors clients sum to the central std z·C; rounding adds at most
    # gamma²/4 per client and coordinate, which the chosen gamma keeps below 1%.
    assert p.granularity**2 / 4 * p.min_survivors < 0.01 * (0.8 * 1.0) ** 2
    assert abs(noise.std() / (0.8 * 1.0) - 1) < 0.05
    assert abs(noise.mean()) < 0.02
    assert np.linalg.norm(decoded["w"]) <= sum_norm_bound(p, len(clients))


def test_ring_sum_does_not_wrap_for_the_planned_clients() -> None:
    p = params(bits=14, max_clients=8)
    clients = updates(p.max_clients, seed=2)
    encoded = [encode(d, p, NoiseSource.from_seed(i)) for i, d in enumerate(clients)]
    # Each client's own value read as signed, then summed exactly in int64.
    signed = [e.astype(np.int64) - p.modulus * (e >= p.modulus // 2) for e in encoded]
    exact = np.sum(signed, axis=0)
    assert np.max(np.abs(exact)) < p.modulus // 2
    total = ring_sum(encoded, p)
    np.testing.assert_array_equal(np.mod(exact, p.modulus).astype(np.uint64), total)


def test_more_clients_than_planned_wrap_around_and_corrupt_the_sum() -> None:
    p = params(bits=8, max_clients=2, min_survivors=1)
    clients = updates(1, seed=3) * 60  # the same large update 60 times
    encoded = [encode(d, p, NoiseSource.from_seed(i)) for i, d in enumerate(clients)]
    signed = [e.astype(np.int64) - p.modulus * (e >= p.modulus // 2) for e in encoded]
    assert np.max(np.abs(np.sum(signed, axis=0))) >= p.modulus // 2
    decoded = decode(ring_sum(encoded, p), p, model().spec(), survivors=60)
    true = 60 * clip(clients[0], 1.0)[0]["w"]
    assert not np.allclose(decoded["w"], true, atol=1.0)


def test_norm_check_flags_a_sum_with_a_client_that_bypassed_the_encoder() -> None:
    p = params()
    honest = [
        encode(d, p, NoiseSource.from_seed(i))
        for i, d in enumerate(updates(p.min_survivors, seed=7))
    ]
    spec = model().spec()
    total = decode(ring_sum(honest, p), p, spec, survivors=len(honest))
    assert np.linalg.norm(np.concatenate([t.ravel() for t in total.values()])) <= sum_norm_bound(
        p, len(honest)
    )
    # Every element of the ring is a valid input: secure aggregation cannot
    # reject this one, and the server only sees an implausible sum.
    rogue = np.random.default_rng(8).integers(0, p.modulus, p.dimension).astype(np.uint64)
    tampered = decode(ring_sum([*honest, rogue], p), p, spec, survivors=len(honest) + 1)
    flat = np.concatenate([t.ravel() for t in tampered.values()])
    assert np.linalg.norm(flat) > sum_norm_bound(p, len(honest) + 1)


def test_decode_refuses_a_sum_with_fewer_survivors_than_accounted() -> None:
    p = params()
    total = ring_sum([encode(updates(1, 4)[0], p, NoiseSource.from_seed(0))], p)
    with pytest.raises(ValueError, match="survivors"):
        decode(total, p, model().spec(), survivors=p.min_survivors - 1)


def test_parameters_refuse_too_few_bits_and_list_every_problem() -> None:
    with pytest.raises(ValueError, match="cannot hold") as caught:
        params(bits=3, max_clients=100, min_survivors=200, clip_norm=-1.0)
    message = str(caught.value)
    assert "min_survivors" in message
    assert "clip_norm" in message


def test_encode_checks_the_update_before_encoding() -> None:
    p = params()
    with pytest.raises(ValueError, match="float parameters"):
        encode({"w": np.zeros(5, dtype=np.float32)}, p, NoiseSource.from_seed(0))
    bad = updates(1, seed=5)[0]
    bad["b"][3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        encode(bad, p, NoiseSource.from_seed(0))


def test_distributed_event_accounts_min_survivors_and_rounding() -> None:
    p = params()
    event = p.event(sampling_rate=0.1)
    assert event.min_survivors == p.min_survivors
    assert event.dimension == p.dimension == 32_768
    # Rounding inflates the sensitivity a little above C/gamma.
    assert p.clip_norm / p.granularity < event.l2_sensitivity < 1.01 * p.clip_norm / p.granularity
    # Fewer bits mean a coarser grid, whose rounding inflates the sensitivity
    # further: the same noise then buys less privacy.
    assert epsilon([event], 1e-5) < epsilon([params(bits=10).event(0.1)], 1e-5)
