"""A simulated digits federation with central DP runs to the end and reports ε per round."""

from __future__ import annotations

import math
from pathlib import Path

import dp_accounting as dpa
import pytest
from typer.testing import CliRunner

from aggregator import FederationStatus, RoundStatus
from api.cli import app
from api.plots import plot_history
from api.simulation import SimulationConfig, simulate

pytestmark = pytest.mark.slow


def test_dp_simulation_runs_to_the_end_with_finite_growing_epsilon(tmp_path: Path) -> None:
    config = SimulationConfig(
        clients=12, rounds=3, fraction=0.5, dp_epsilon=4.0, dp_clip=0.5, seed=1
    )
    result = simulate(config)

    assert [r.status for r in result.reports] == [RoundStatus.CLOSED] * 3
    epsilons = [r.epsilon for r in result.reports]
    assert all(math.isfinite(e) for e in epsilons), epsilons
    assert epsilons == sorted(epsilons)
    report = result.privacy
    assert report.status is FederationStatus.FINISHED
    assert report.dp is not None
    assert report.dp.noise_seed == 1  # seeded: reproducible, flagged as not private
    z = report.dp.noise_multiplier
    assert z is not None
    accountant = dpa.rdp.RdpAccountant()
    for _ in range(3):
        accountant.compose(dpa.PoissonSampledDpEvent(0.5, dpa.GaussianDpEvent(z)))
    assert report.epsilon_spent == pytest.approx(accountant.get_epsilon(1e-5), abs=1e-9)
    assert report.epsilon_spent == epsilons[-1]
    assert epsilons[-1] <= 4.0
    assert math.isfinite(result.accuracy)
    plot = plot_history(result.reports, tmp_path / "dp.png", title="dp")
    assert plot.stat().st_size > 0


def test_simulate_command_shows_epsilon_per_round(tmp_path: Path) -> None:
    argv = ["simulate", "--clients", "6", "--rounds", "2", "--fraction", "1.0"]
    argv += ["--dp-epsilon", "8", "--dp-clip", "1.0", "--plot", str(tmp_path / "sim.png")]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "epsilon" in result.stdout
    assert "NOT private" in result.stdout
    assert (tmp_path / "sim.png").stat().st_size > 0


def test_distributed_dp_simulation_runs_secure_rounds_and_accounts_them() -> None:
    config = SimulationConfig(
        clients=10,
        rounds=3,
        dp_epsilon=8.0,
        dp_delta=1e-3,
        dp_mode="distributed",
        secure_aggregation=True,
        lr=0.1,
        seed=1,
    )
    result = simulate(config)

    assert [r.status for r in result.reports] == [RoundStatus.CLOSED] * 3
    assert all(r.clients == 10 for r in result.reports)
    epsilons = [r.epsilon for r in result.reports]
    assert all(math.isfinite(e) for e in epsilons), epsilons
    assert epsilons == sorted(epsilons)
    report = result.privacy
    assert report.dp is not None
    assert report.dp.mode.value == "distributed"
    assert report.dp.min_survivors == 8  # 80% of the expected cohort
    assert report.epsilon_spent == epsilons[-1] <= 8.0


def test_distributed_dp_simulation_needs_secure_aggregation() -> None:
    config = SimulationConfig(clients=10, rounds=1, dp_epsilon=8.0, dp_mode="distributed")
    assert "dp_mode 'distributed' needs secure_aggregation" in config.problems()
