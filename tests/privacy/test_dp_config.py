"""DP configuration: every problem listed at once; valid settings build the round's objects."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from fedcore import ConfigError
from privacy.dp import (
    AdaptiveClipping,
    DpConfig,
    DpFedAvg,
    FixedClipping,
    GaussianEvent,
    PldAccountant,
    central_strategy,
    distributed_params,
    epsilon,
    validate,
)


def problems_of(data: dict[str, Any], *, num_clients: int | None, secagg: bool) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        validate(DpConfig.model_validate(data), num_clients=num_clients, secure_aggregation=secagg)
    return caught.value.problems


def test_validation_lists_every_problem_at_once() -> None:
    problems = problems_of(
        {
            "mode": "distributed",
            "epsilon": -1.0,
            "delta": 0.05,
            "clip_norm": 0.0,
            "noise_multiplier": -2.0,
            "sampling_rate": 1.5,
            "clipping": "adaptive",
            "count_noise_std": 0.0,
            "weighting": "capped",
            "bits": 70,
            "accountant": "pld",
        },
        num_clients=50,
        secagg=False,
    )
    expected = [
        "epsilon must be finite and > 0",
        "delta (0.05) must be below 1/num_clients (1/50)",
        "clip_norm must be finite and > 0",
        "noise_multiplier must be > 0",
        "accountant 'pld' cannot account distributed mode",
        "sampling_rate must be in (0, 1]",
        "adaptive clipping needs central mode",
        "adaptive clipping needs count_noise_std > 0",
        "weighting 'capped' needs central mode",
        "weighting 'capped' needs weight_cap > 0",
        "weighting 'capped' needs population_weight > 0",
        "distributed mode needs secure aggregation",
        "distributed mode needs min_survivors >= 1",
        "bits must be in [2, 62]",
    ]
    for fragment in expected:
        assert any(fragment in p for p in problems), (fragment, problems)
    assert len(problems) == len(expected)


def test_validation_checks_combinations_that_only_the_context_reveals() -> None:
    problems = problems_of(
        {
            "mode": "central",
            "epsilon": 3.0,
            "delta": 1e-6,
            "clip_norm": 1.0,
            "noise_multiplier": 1.0,
            "clipping": "adaptive",
            "count_noise_std": 0.4,
            "weight_cap": 10.0,
        },
        num_clients=None,
        secagg=False,
    )
    assert problems == [
        "sampling_rate is required in central mode (Poisson rate q)",
        "count_noise_std (0.4) must exceed noise_multiplier / 2 (0.5), or the count query "
        "alone spends the whole budget",
        "weight_cap and population_weight apply to weighting 'capped' only",
    ]
    more = problems_of(
        {
            "mode": "distributed",
            "epsilon": 3.0,
            "delta": 1e-6,
            "clip_norm": 1.0,
            "sampling_rate": 0.01,
            "min_survivors": 50,
            "bits": 4,
        },
        num_clients=1000,
        secagg=True,
    )
    assert more == [
        "give noise_multiplier, or rounds to calibrate it from the budget",
        "min_survivors (50) exceeds the expected cohort q·N (10); most rounds would fail",
        "4 bits overflow for 1000 clients; raise bits",
    ]


def test_unknown_fields_and_modes_are_refused_by_the_model() -> None:
    with pytest.raises(ValueError, match="mode"):
        DpConfig.model_validate({"mode": "magic", "epsilon": 1, "delta": 1e-6, "clip_norm": 1})
    with pytest.raises(ValueError, match="extra"):
        DpConfig.model_validate(
            {"mode": "local", "epsilon": 1, "delta": 1e-6, "clip_norm": 1, "sigma": 2}
        )


def test_central_config_builds_a_strategy_that_fits_the_budget() -> None:
    config = DpConfig(
        mode="central",
        epsilon=4.0,
        delta=1e-6,
        clip_norm=0.5,
        rounds=40,
        sampling_rate=0.02,
        noise_seed=9,
    )
    validate(config, num_clients=10_000, secure_aggregation=False)
    strategy = central_strategy(config, num_clients=10_000)
    assert isinstance(strategy, DpFedAvg)
    assert strategy.clipping == FixedClipping(0.5)
    assert strategy.source.seeded
    event = strategy.event()
    assert event == GaussianEvent(0.02, config.resolved_noise_multiplier())
    assert epsilon([event] * 40, 1e-6) <= 4.0
    assert config.budget().epsilon == 4.0


def test_adaptive_config_resumes_from_the_persisted_clipping_policy() -> None:
    config = DpConfig(
        mode="central",
        epsilon=4.0,
        delta=1e-6,
        clip_norm=0.1,
        noise_multiplier=1.0,
        sampling_rate=0.1,
        clipping="adaptive",
        count_noise_std=5.0,
        accountant="pld",
    )
    validate(config, num_clients=1000, secure_aggregation=False)
    assert isinstance(config.make_accountant(), PldAccountant)
    first = central_strategy(config, num_clients=1000)
    assert first.clipping == AdaptiveClipping(count_noise_std=5.0, clip_norm=0.1)
    later = AdaptiveClipping(count_noise_std=5.0, clip_norm=0.37)
    assert central_strategy(config, num_clients=1000, clipping=later).clipping == later
    assert not first.source.seeded


def test_distributed_config_builds_round_parameters() -> None:
    config = DpConfig(
        mode="distributed",
        epsilon=8.0,
        delta=1e-6,
        clip_norm=1.0,
        noise_multiplier=0.9,
        sampling_rate=0.05,
        min_survivors=40,
        bits=20,
    )
    validate(config, num_clients=2000, secure_aggregation=True)
    params = distributed_params(config, num_clients=2000, num_parameters=5000, rotation_seed=7)
    assert params.min_survivors == 40
    # q·N = 100 plus six standard deviations of the cohort size.
    assert params.max_clients == 159
    assert params.local_stddev == pytest.approx(0.9 / 40**0.5)


def test_local_config_needs_no_sampling_rate_nor_population_bound_on_delta() -> None:
    config = DpConfig(mode="local", epsilon=5.0, delta=1e-3, clip_norm=1.0, noise_multiplier=1.0)
    validate(config, num_clients=10, secure_aggregation=False)


def test_importing_privacy_dp_loads_neither_torch_nor_the_accounting_library() -> None:
    code = (
        "import sys, privacy, privacy.dp; "
        "print(sorted(m for m in ('torch', 'opacus', 'dp_accounting') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
