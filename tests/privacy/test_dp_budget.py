"""The budget refuses the first round that would overshoot; ε is a pure function of events."""

from __future__ import annotations

import json

import pytest

from fedcore import ConfigError
from privacy.dp import (
    DistributedGaussianEvent,
    GaussianEvent,
    PldAccountant,
    PrivacyBudget,
    calibrate_noise_multiplier,
    check_budget,
    dump_events,
    epsilon,
    load_events,
)

ROUND = GaussianEvent(sampling_rate=0.1, noise_multiplier=1.0)


# PLD takes about 0.3 s per ε here, so its case is kept short.
@pytest.mark.parametrize(("accountant", "k"), [(None, 12), (PldAccountant(), 3)])
def test_budget_allows_exactly_k_rounds_and_refuses_round_k_plus_one(
    accountant: PldAccountant | None, k: int
) -> None:
    eps_k = epsilon([ROUND] * k, 1e-5, accountant)
    eps_next = epsilon([ROUND] * (k + 1), 1e-5, accountant)
    budget = PrivacyBudget(epsilon=(eps_k + eps_next) / 2, delta=1e-5)
    spent: list[GaussianEvent] = []
    decisions = []
    for _ in range(k + 2):
        decision = check_budget(spent, ROUND, budget, accountant)
        decisions.append(decision.allowed)
        if decision.allowed:
            spent.append(ROUND)
    assert decisions == [True] * k + [False] * 2
    refused = check_budget(spent, ROUND, budget, accountant)
    assert refused.epsilon_spent == pytest.approx(eps_k, abs=1e-12)
    assert refused.epsilon_if_run == pytest.approx(eps_next, abs=1e-12)
    assert refused.epsilon_spent <= budget.epsilon < refused.epsilon_if_run


def test_epsilon_is_a_pure_function_that_survives_a_json_round_trip() -> None:
    events = [
        ROUND,
        GaussianEvent(0.05, 0.7, count=4),
        DistributedGaussianEvent(0.1, 1234.5, 98765.4, 2.5e5, 5, 4096),
        ROUND,
    ]
    first = epsilon(events, 1e-6)
    assert epsilon(events, 1e-6) == first
    stored = json.dumps(dump_events(events))
    restored = load_events(json.loads(stored))
    assert restored == events
    assert epsilon(restored, 1e-6) == first


def test_load_events_lists_every_malformed_event() -> None:
    with pytest.raises(ConfigError) as caught:
        load_events(
            [
                {"kind": "gaussian", "sampling_rate": 1.5, "noise_multiplier": 1.0},
                {"kind": "gaussian", "sampling_rate": 0.1},
                {"kind": "laplace"},
            ]
        )
    assert len(caught.value.problems) == 3


def test_calibrated_multiplier_fits_the_rounds_and_barely() -> None:
    budget = PrivacyBudget(epsilon=2.0, delta=1e-5)
    z = calibrate_noise_multiplier(budget, sampling_rate=0.05, rounds=100)
    assert epsilon([GaussianEvent(0.05, z, 100)], 1e-5) <= 2.0
    assert epsilon([GaussianEvent(0.05, z * 0.99, 100)], 1e-5) > 2.0


def test_budget_and_events_refuse_invalid_values() -> None:
    with pytest.raises(ValueError, match="epsilon"):
        PrivacyBudget(0.0, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        PrivacyBudget(1.0, 1.0)
    with pytest.raises(ValueError, match="sampling_rate"):
        GaussianEvent(0.0, 1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        GaussianEvent(0.1, -1.0)
