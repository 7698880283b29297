"""A simulated digits federation with secure aggregation matches the plain one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from aggregator import RoundStatus
from api.cli import app
from api.simulation import SimulationConfig, simulate
from clients import Client, TorchTrainer, digits
from fedcore import ConfigError, Task, TaskAction


def test_secure_simulation_reaches_the_plain_accuracy_with_the_same_seeds() -> None:
    split = digits.load_digits_split()
    plain = simulate(SimulationConfig(clients=10, rounds=5, seed=1), split=split)
    secure = simulate(
        SimulationConfig(clients=10, rounds=5, seed=1, secure_aggregation=True), split=split
    )
    assert [r.status for r in secure.reports] == [RoundStatus.CLOSED] * 5
    assert all(r.clients == 10 for r in secure.reports)
    assert abs(secure.accuracy - plain.accuracy) <= 0.01
    for name in plain.model:
        np.testing.assert_allclose(secure.model[name], plain.model[name], atol=1e-3)
    # The training loss travels masked too: the aggregator learns its
    # weighted mean, which round 1 (trained from the same model) shows equal.
    assert secure.reports[0].train_loss == pytest.approx(plain.reports[0].train_loss, abs=1e-3)
    assert all(np.isfinite(r.train_loss) for r in secure.reports)


def test_secure_simulation_refuses_cohorts_below_three() -> None:
    config = SimulationConfig(clients=2, rounds=1, secure_aggregation=True)
    assert any("at least 3" in problem for problem in config.problems())
    with pytest.raises(ValueError, match="at least 3"):
        simulate(config)


def test_simulate_command_runs_secure_aggregation(tmp_path: Path) -> None:
    argv = ["simulate", "--clients", "4", "--rounds", "2", "--secure-aggregation"]
    argv += ["--plot", str(tmp_path / "sim.png")]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "final test accuracy" in result.stdout
    # Secure rounds carry no client metrics: the loss column says so, not "nan".
    assert "nan" not in result.stdout


class SecureTaskTransport:
    """A transport whose every check-in asks for a secure stage."""

    def fetch_task(self, federation_id: str) -> Task:
        return Task(
            action=TaskAction.TRAIN,
            federation_id=federation_id,
            round=1,
            model_version="m",
            secure=True,
            stage="advertise-keys",
        )


def test_a_client_without_identity_refuses_a_secure_task_with_the_fix() -> None:
    model = digits.make_mlp()
    data = digits.client_data(digits.load_digits_split(), [np.arange(4)])[0]
    client = Client(SecureTaskTransport(), TorchTrainer(model, data), "f")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="identity"):
        client.step()
