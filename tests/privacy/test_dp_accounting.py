"""Our ε equals dp-accounting's for the same events, and reproduces a published figure."""

from __future__ import annotations

import dp_accounting as dpa
import numpy as np
import pytest

from privacy.dp import (
    DistributedGaussianEvent,
    GaussianEvent,
    PldAccountant,
    RdpAccountant,
    distributed_gaussian_rdp,
    epsilon,
)

EVENTS = [
    GaussianEvent(sampling_rate=0.01, noise_multiplier=1.1, count=50),
    GaussianEvent(sampling_rate=0.05, noise_multiplier=0.9),
    GaussianEvent(sampling_rate=0.01, noise_multiplier=1.1, count=25),
    GaussianEvent(sampling_rate=1.0, noise_multiplier=8.0, count=3),
]


def by_hand() -> list[dpa.DpEvent]:
    """The same rounds, one dp-accounting event per round, in order."""
    rounds = [(0.01, 1.1)] * 50 + [(0.05, 0.9)] + [(0.01, 1.1)] * 25 + [(1.0, 8.0)] * 3
    return [dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)) for q, z in rounds]


@pytest.mark.parametrize("delta", [1e-5, 1e-7])
def test_rdp_epsilon_equals_the_library_for_the_same_rounds(delta: float) -> None:
    library = dpa.rdp.RdpAccountant()
    for event in by_hand():
        library.compose(event)
    assert epsilon(EVENTS, delta) == pytest.approx(library.get_epsilon(delta), abs=1e-9)


def test_pld_epsilon_equals_the_library_for_the_same_rounds() -> None:
    # PLD discretization makes the order of composition matter to ~1e-6, so the
    # hand-built event groups rounds the way the accountant documents it does.
    library = dpa.pld.PLDAccountant()
    library.compose(
        dpa.ComposedDpEvent(
            [
                dpa.SelfComposedDpEvent(
                    dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(1.1)), 75
                ),
                dpa.SelfComposedDpEvent(
                    dpa.PoissonSampledDpEvent(0.05, dpa.GaussianDpEvent(0.9)), 1
                ),
                dpa.SelfComposedDpEvent(
                    dpa.PoissonSampledDpEvent(1.0, dpa.GaussianDpEvent(8.0)), 3
                ),
            ]
        )
    )
    ours = epsilon(EVENTS, 1e-5, PldAccountant())
    assert ours == pytest.approx(library.get_epsilon(1e-5), abs=1e-9)
    # PLD is tighter than RDP for the same rounds.
    assert ours < epsilon(EVENTS, 1e-5)


def test_abadi_et_al_mnist_setting_gives_the_published_epsilon() -> None:
    """Abadi et al., "Deep Learning with Differential Privacy" (CCS 2016), Section 3.1.

    "if we choose q = 0.01, sigma = 4, δ = 10^-5, and T = 10000, we have ε ≈ 1.26
    using the moments accountant". The moments accountant is RDP at integer
    orders λ + 1 for λ <= 32 with the tail bound ε = min_alpha RDP(alpha) + log(1/δ)/(alpha-1)
    (Mironov 2017, Proposition 3); applied to our RDP curve it reproduces 1.26
    to the published two decimals. Our `epsilon` uses the tighter conversion of
    Canonne, Kamath, Steinke (2020) and must come out lower.
    """
    events = [GaussianEvent(sampling_rate=0.01, noise_multiplier=4.0, count=10_000)]
    orders, rdp = RdpAccountant(orders=tuple(range(2, 34))).curve(events)
    moments = float(np.min(rdp + np.log(1 / 1e-5) / (orders - 1)))
    assert round(moments, 2) == 1.26
    assert epsilon(events, 1e-5) < 1.26


def test_no_events_spend_nothing() -> None:
    assert epsilon([], 1e-5) == 0.0
    assert epsilon([], 1e-5, PldAccountant()) == 0.0


def distributed(q: float, variance: float, count: int = 1) -> DistributedGaussianEvent:
    return DistributedGaussianEvent(
        sampling_rate=q,
        l2_sensitivity=10.0,
        l1_sensitivity=80.0,
        local_variance=variance,
        min_survivors=4,
        dimension=64,
        count=count,
    )


def test_distributed_gaussian_matches_the_gaussian_when_its_gap_vanishes() -> None:
    # 4 clients of variance 100 each: τ = 10 Σ exp(-2π²·100·k/(k+1)) underflows
    # to 0, and Kairouz et al.'s bound is then the Gaussian mechanism's RDP with
    # noise multiplier sqrt(4·100) / 10 = 2.
    ours = epsilon([distributed(1.0, 100.0, count=10)], 1e-5)
    gaussian = dpa.rdp.RdpAccountant()
    gaussian.compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(2.0), 10))
    assert ours == pytest.approx(gaussian.get_epsilon(1e-5), abs=1e-9)


def test_distributed_gaussian_gap_costs_privacy_when_noise_shares_are_small() -> None:
    # Variance 0.1 per client: the sum of 4 discrete Gaussians is far from a
    # discrete Gaussian, τ is large, and ε must exceed the Gaussian's.
    tight = DistributedGaussianEvent(1.0, 1.0, 1.0, 0.1, 4, 64)
    assert epsilon([tight], 1e-5) > epsilon([GaussianEvent(1.0, np.sqrt(0.4))], 1e-5)


def test_subsampled_distributed_bound_lies_within_zhu_wang_gap_of_the_exact_gaussian() -> None:
    # For the Gaussian, Zhu & Wang's Theorem 5 is within log(3)/(alpha-1) of the
    # exact subsampled RDP (their Theorem 6, which dp-accounting computes).
    orders = np.array([2.0, 3.0, 4.0, 8.0, 16.0, 32.0, 64.0])
    exact = dpa.rdp.RdpAccountant(orders=list(orders))
    exact.compose(dpa.PoissonSampledDpEvent(0.1, dpa.GaussianDpEvent(2.0)))
    ours = distributed_gaussian_rdp(distributed(0.1, 100.0), orders)
    assert ours[0] == pytest.approx(exact.rdp[0], rel=1e-9)  # order 2: both exact
    assert np.all(ours >= exact.rdp * (1 - 1e-9))
    assert np.all(ours <= exact.rdp + np.log(3) / (orders - 1) + 1e-12)


def test_subsampling_lowers_distributed_epsilon_and_rounds_compose() -> None:
    one = epsilon([distributed(0.05, 100.0)], 1e-5)
    assert one < epsilon([distributed(1.0, 100.0)], 1e-5)
    assert epsilon([distributed(0.05, 100.0, count=20)], 1e-5) == pytest.approx(
        epsilon([distributed(0.05, 100.0)] * 20, 1e-5), rel=1e-12
    )


def test_pld_refuses_distributed_events_and_bad_delta() -> None:
    with pytest.raises(ValueError, match="Gaussian events only"):
        epsilon([distributed(1.0, 100.0)], 1e-5, PldAccountant())
    with pytest.raises(ValueError, match="delta"):
        epsilon(EVENTS, 1.5)
