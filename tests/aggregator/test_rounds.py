"""Round decisions: sampling, selection target and closing, as pure functions."""

from __future__ import annotations

from collections import Counter

import pytest

from aggregator.rounds import (
    Closing,
    RoundProgress,
    close_decision,
    sample_cohort,
    selection_target,
)
from fedcore import FederationConfig


def config(**fields: object) -> FederationConfig:
    base: dict[str, object] = {"name": "r", "rounds": 1, "clients_per_round": 10, "min_clients": 4}
    return FederationConfig.model_validate(base | fields)


def test_sample_is_reproducible_per_seed_and_round_and_distinct() -> None:
    pool = [f"c{i}" for i in range(50)]
    first = sample_cohort(pool, 10, seed=3, round_number=1)
    assert first == sample_cohort(pool, 10, seed=3, round_number=1)
    assert first != sample_cohort(pool, 10, seed=3, round_number=2)
    assert first != sample_cohort(pool, 10, seed=4, round_number=1)
    assert len(set(first)) == 10
    assert set(first) <= set(pool)
    assert len(sample_cohort(pool[:3], 10, seed=3, round_number=1)) == 3


def test_sample_is_uniform_over_candidates() -> None:
    pool = [f"c{i}" for i in range(20)]
    counts = Counter(c for r in range(2000) for c in sample_cohort(pool, 5, seed=1, round_number=r))
    expected = 2000 * 5 / 20
    # Binomial(2000, 0.25): std ~19.4; 5 std is a bound no fair sampler exceeds here.
    assert all(abs(counts[c] - expected) < 5 * 19.4 for c in pool)


def test_selection_target_adds_over_selection_and_caps_at_active_clients() -> None:
    assert selection_target(config(), 100) == 10
    assert selection_target(config(over_selection=0.3), 100) == 13
    assert selection_target(config(over_selection=0.3), 11) == 11
    assert selection_target(config(), 0) == 1


@pytest.mark.parametrize(
    ("received", "cohort", "expired", "decision"),
    [
        (10, 13, False, Closing.CLOSE),
        (9, 13, False, Closing.KEEP_OPEN),
        (6, 6, False, Closing.CLOSE),
        (4, 13, True, Closing.CLOSE),
        (3, 13, True, Closing.FAIL),
        (0, 13, True, Closing.FAIL),
    ],
)
def test_close_decision(received: int, cohort: int, expired: bool, decision: Closing) -> None:
    assert close_decision(config(), RoundProgress(received, cohort, expired)) is decision
