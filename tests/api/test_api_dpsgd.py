"""Local DP (DP-SGD on each client) end to end: over HTTP, in simulation, and on the CLI."""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from liveapi import World, config
from opacus.accountants import RDPAccountant
from typer.testing import CliRunner

from api.cli import app
from api.simulation import SimulationConfig, simulate
from clients import (
    Client,
    HttpTransport,
    RoundResult,
    TensorData,
    TorchTrainer,
    enroll,
    to_parameters,
)
from clients.digits import load_digits_split, make_mlp
from fedcore import TaskAction

pytestmark = pytest.mark.slow

CLIENTS, ROUNDS, EXAMPLES, BUDGET, DELTA = 3, 3, 120, 4.0, 1e-3


def shards() -> list[TensorData]:
    split = load_digits_split()
    x, y = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
    return [
        (x[i * EXAMPLES : (i + 1) * EXAMPLES], y[i * EXAMPLES : (i + 1) * EXAMPLES])
        for i in range(CLIENTS)
    ]


def local_federation(
    world: World, name: str, rounds: int, clients: int = CLIENTS, **dp: Any
) -> str:
    torch.manual_seed(0)
    model = to_parameters(make_mlp(seed=0).state_dict(), copy=True)
    section = {"mode": "local", "epsilon": BUDGET, "delta": DELTA, "clip_norm": 1.0} | dp
    cfg = config(
        name,
        rounds=rounds,
        checkin_wait_s=30,
        round_timeout_s=30,
        train={"local_epochs": 1, "batch_size": 12, "lr": 0.2},
        dp=section,
    )
    cfg |= {"clients_per_round": clients, "min_clients": 1}
    return str(world.create_federation(cfg, model)["id"])


def sdk_client(world: World, fid: str, data: TensorData, seed: int) -> tuple[Client, HttpTransport]:
    enrollment = enroll(world.live.url, world.tokens(fid, 1)[0])
    transport = HttpTransport(world.live.url, enrollment.token, wait_s=2)
    trainer = TorchTrainer(make_mlp(seed=0), data, device="cpu", seed=seed)
    return Client(transport, trainer, fid), transport


def test_digits_federation_with_local_dp_finishes_and_every_update_reports_epsilon(
    world: World,
) -> None:
    fid = local_federation(world, "local-dp", ROUNDS)
    clients = [sdk_client(world, fid, data, 10 + i) for i, data in enumerate(shards())]
    results: list[list[RoundResult]] = [[] for _ in clients]
    world.start(fid)
    threads = [
        threading.Thread(
            target=client.run, kwargs={"on_round": results[i].append, "max_sleep_s": 0.2}
        )
        for i, (client, _) in enumerate(clients)
    ]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        torch.set_num_threads(previous)
        for _, transport in clients:
            transport.close()
    assert not any(t.is_alive() for t in threads), "clients did not finish"
    assert world.admin.get(f"/admin/federations/{fid}").json()["status"] == "finished"
    rounds = world.admin.get(f"/admin/federations/{fid}/rounds").json()
    assert [r["status"] for r in rounds] == ["closed"] * ROUNDS
    for rnd in rounds:
        assert rnd["metrics"]["clients"] == CLIENTS
        assert 0 < rnd["metrics"]["epsilon"] <= BUDGET
    for per_client in results:
        assert [r.round for r in per_client] == list(range(1, ROUNDS + 1))
        assert all(r.receipt is not None for r in per_client)
        epsilons = [r.metrics["epsilon"] for r in per_client]
        assert all(0 < e <= BUDGET for e in epsilons), epsilons
        assert epsilons == sorted(epsilons)
        # Secure noise: no fixed seed was configured, so no update is flagged.
        assert all("dp_seeded" not in r.metrics for r in per_client)
        # z was calibrated for the federation's rounds: the last one nearly fills the budget.
        assert epsilons[-1] > BUDGET - 0.05
    # A round shows the largest client ε, and the privacy route the largest of all.
    for number, rnd in enumerate(rounds, start=1):
        reported = [r.metrics["epsilon"] for per_client in results for r in per_client]
        largest = max(
            r.metrics["epsilon"] for per_client in results for r in per_client if r.round == number
        )
        assert rnd["metrics"]["epsilon"] == largest
    privacy = world.admin.get(f"/admin/federations/{fid}/privacy").json()
    assert privacy["mode"] == "local"
    assert privacy["epsilon_spent"] == max(reported)
    assert [r["epsilon"] for r in privacy["rounds"]] == [r["metrics"]["epsilon"] for r in rounds]


def test_a_client_whose_budget_is_spent_stops_cleanly(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    # 120 examples in batches of 12: 10 steps at q = 0.1 a round.
    accountant = RDPAccountant()
    accountant.history = [(1.0, 0.1, 10)]
    one = accountant.get_epsilon(DELTA)
    accountant.history = [(1.0, 0.1, 20)]
    two = accountant.get_epsilon(DELTA)
    fid = local_federation(
        world, "short budget", 3, clients=1, noise_multiplier=1.0, epsilon=(one + two) / 2
    )
    client, transport = sdk_client(world, fid, shards()[0], 1)
    world.start(fid)
    with caplog.at_level(logging.WARNING, logger="clients.client"), transport:
        trained = client.run(max_sleep_s=0.2)
        assert client.finished
        assert client.step() is TaskAction.FINISHED  # without checking in again
    assert trained == 1
    assert client.last_result is not None
    assert client.last_result.metrics["epsilon"] == pytest.approx(one, rel=1e-9)
    assert any("past its budget" in r.getMessage() for r in caplog.records)
    fed = world.admin.get(f"/admin/federations/{fid}").json()
    assert fed["status"] == "running"  # the aggregator still waits for round 2
    world.admin.post(f"/admin/federations/{fid}/stop")


def test_simulation_with_local_dp_reports_the_largest_client_epsilon() -> None:
    config = SimulationConfig(
        clients=3, rounds=2, dp_epsilon=3.0, dp_delta=1e-4, dp_mode="local", lr=0.1, seed=2
    )
    result = simulate(config)
    epsilons = [r.epsilon for r in result.reports]
    assert len(epsilons) == 2
    assert all(math.isfinite(e) and 0 < e <= 3.0 for e in epsilons), epsilons
    assert epsilons[0] < epsilons[1]
    assert result.privacy.dp is not None
    assert result.privacy.dp.noise_seed == 2  # seeded: reproducible, flagged as not private
    assert math.isfinite(result.accuracy)


def test_simulate_command_runs_local_dp(tmp_path: Path) -> None:
    argv = ["simulate", "--clients", "2", "--rounds", "1", "--dp-epsilon", "5"]
    argv += ["--dp-mode", "local", "--dp-delta", "1e-4", "--plot", str(tmp_path / "sim.png")]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "epsilon" in result.stdout
    assert "local DP-SGD" in result.stdout
    assert "NOT private" in result.stdout
