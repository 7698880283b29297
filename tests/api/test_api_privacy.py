"""Central differential privacy over HTTP: DP configs, the privacy route, the budget, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dp_accounting as dpa
import numpy as np
import pytest
from liveapi import Client, LiveServer, World, assert_problem, config, encode_update, small_model
from typer.testing import CliRunner

from api.cli import app
from fedcore import wire

Q, Z, DELTA, TARGET = 1.0, 2.0, 1e-3, 4.0


def dp_section(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "mode": "central",
        "epsilon": TARGET,
        "delta": DELTA,
        "clip_norm": 1.0,
        "noise_multiplier": Z,
        "sampling_rate": Q,
    }
    return base | overrides


def library_epsilon(rounds: int, q: float = Q, z: float = Z, delta: float = DELTA) -> float:
    """ε of `rounds` Poisson-sampled Gaussian rounds, composed one by one in dp-accounting."""
    accountant = dpa.rdp.RdpAccountant()
    for _ in range(rounds):
        accountant.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)))
    return float(accountant.get_epsilon(delta))


def rounds_that_fit() -> int:
    return next(k for k in range(1, 100) if library_epsilon(k + 1) > TARGET)


def train_everyone(clients: list[Client], scale: float) -> int:
    trained = 0
    for index, client in enumerate(clients):
        task = client.task()
        if task["action"] == "train":
            update = {
                name: np.full_like(array, scale * (index + 1))
                for name, array in small_model().items()
            }
            assert client.upload(task["round"], encode_update(update)).status_code == 201
            trained += 1
    return trained


def test_invalid_dp_config_is_refused_with_every_problem_and_writes_nothing(
    world: World,
) -> None:
    before = world.live.snapshot()
    bad = config("bad dp", rounds=0, dp=dp_section(epsilon=-1, delta=0, sampling_rate=None))
    response = world.admin.post(
        "/admin/federations",
        data={"config": json.dumps(bad)},
        files={"model": ("m.safetensors", wire.encode(small_model()), "application/octet-stream")},
    )
    body = assert_problem(response, 422, "invalid-config")
    problems = body["problems"]
    for fragment in (
        "rounds:",
        "dp: epsilon must be",
        "dp: delta must be",
        "dp: sampling_rate is required",
    ):
        assert any(p.startswith(fragment) for p in problems), (fragment, problems)
    assert world.live.snapshot() == before


def test_privacy_of_a_federation_without_dp_says_mode_null(world: World) -> None:
    fid = world.create_federation(config("plain"))["id"]
    response = world.admin.get(f"/admin/federations/{fid}/privacy")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "federation_id": fid,
        "status": "created",
        "mode": None,
        "epsilon_target": None,
        "delta": None,
        "epsilon_spent": None,
        "noise_multiplier": None,
        "sampling_rate": None,
        "clip_norm": None,
        "accountant": None,
        "seeded": None,
        "rounds": [],
    }
    assert_problem(world.admin.get("/admin/federations/f_nope/privacy"), 404, "not-found")


def test_start_refuses_a_dp_federation_whose_delta_needs_more_clients(world: World) -> None:
    fid = world.create_federation(config("few", dp=dp_section(delta=0.4)))["id"]
    world.enroll(fid, 3)
    body = assert_problem(
        world.admin.post(f"/admin/federations/{fid}/start"), 422, "invalid-config"
    )
    assert any("1/num_clients (1/3)" in p for p in body["problems"]), body
    assert world.admin.get(f"/admin/federations/{fid}").json()["status"] == "created"


def test_dp_federation_spends_what_dp_accounting_says_and_ends_budget_exhausted(
    world: World,
) -> None:
    fits = rounds_that_fit()
    created = world.create_federation(config("private", rounds=50, dp=dp_section()))
    fid = created["id"]
    assert created["config"]["dp"]["noise_multiplier"] == Z
    clients = world.enroll(fid, 3)
    world.start(fid)
    for _ in range(fits + 2):
        train_everyone(clients, 0.1)

    fed = world.admin.get(f"/admin/federations/{fid}").json()
    assert fed["status"] == "budget_exhausted"
    rounds = world.admin.get(f"/admin/federations/{fid}/rounds").json()
    assert [r["status"] for r in rounds] == ["closed"] * fits
    privacy = world.admin.get(f"/admin/federations/{fid}/privacy").json()
    assert privacy["status"] == "budget_exhausted"
    assert privacy["mode"] == "central"
    assert (privacy["epsilon_target"], privacy["delta"]) == (TARGET, DELTA)
    assert (privacy["noise_multiplier"], privacy["sampling_rate"]) == (Z, Q)
    assert privacy["seeded"] is False
    assert privacy["epsilon_spent"] == pytest.approx(library_epsilon(fits), abs=1e-9)
    assert privacy["epsilon_spent"] <= TARGET
    assert [r["round"] for r in privacy["rounds"]] == list(range(1, fits + 1))
    for number, (row, rnd) in enumerate(zip(privacy["rounds"], rounds, strict=True), start=1):
        assert row["epsilon"] == pytest.approx(library_epsilon(number), abs=1e-9)
        assert rnd["metrics"]["epsilon"] == row["epsilon"]
    assert all(c.task()["action"] == "finished" for c in clients)
    assert_problem(world.admin.post(f"/admin/federations/{fid}/start"), 409, "federation-state")
    scraped = world.http().get("/metrics").text
    gauge = f'fedcore_privacy_epsilon_spent{{federation="{fid}"}} '
    (line,) = [row for row in scraped.splitlines() if row.startswith(gauge)]
    assert float(line.removeprefix(gauge)) == pytest.approx(privacy["epsilon_spent"], abs=1e-9)


def test_cli_shows_a_federations_privacy(world: World, tmp_path: Path) -> None:
    live: LiveServer = world.live
    fid = world.create_federation(config("cli", rounds=1, dp=dp_section(epsilon=50.0)))["id"]
    clients = world.enroll(fid, 2)
    world.start(fid)
    assert train_everyone(clients, 0.2) == 2
    runner = CliRunner()
    argv = ["admin", "--server", live.url, "--token", live.admin_token, "privacy", fid]
    table = runner.invoke(app, argv)
    as_json = runner.invoke(app, [*argv, "--json"])
    assert table.exit_code == 0, table.output
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert data["rounds"][0]["epsilon"] == pytest.approx(library_epsilon(1), abs=1e-9)
    assert "epsilon spent" in table.stdout
    assert f"{data['epsilon_spent']:.6g}" in table.stdout
    assert "after round 1" in table.stdout
    plain = world.create_federation(config("no dp"))["id"]
    shown = runner.invoke(app, [*argv[:-1], plain])
    assert shown.exit_code == 0, shown.output
    assert "no differential privacy" in shown.stdout
