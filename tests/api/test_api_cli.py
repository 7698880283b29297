"""`fedcore admin ...` against a live server, through Typer's runner and the real entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from liveapi import LiveServer, small_model
from typer.testing import CliRunner

from api.cli import app
from fedcore import wire

pytestmark = pytest.mark.parametrize("live", ["sqlite"], indirect=True)

CONFIG_TOML = """
name = "from the cli"
rounds = 2
clients_per_round = 2

[train]
local_epochs = 2
"""


def admin(live: LiveServer, *args: str) -> Any:
    result = CliRunner().invoke(
        app, ["admin", "--server", live.url, "--token", live.admin_token, *args]
    )
    assert result.exit_code == 0, result.output
    return result


def created(live: LiveServer, tmp_path: Path) -> dict[str, Any]:
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(CONFIG_TOML)
    model = tmp_path / "init.safetensors"
    model.write_bytes(wire.encode(small_model()))
    out = admin(
        live, "federations", "create", "--config", str(cfg), "--model", str(model), "--json"
    )
    fed: dict[str, Any] = json.loads(out.stdout)
    return fed


def test_cli_creates_lists_and_shows_federations(live: LiveServer, tmp_path: Path) -> None:
    fed = created(live, tmp_path)
    assert fed["name"] == "from the cli"
    assert fed["config"]["train"]["local_epochs"] == 2

    listed = json.loads(admin(live, "federations", "list", "--json").stdout)
    table = admin(live, "federations", "list").stdout
    shown = admin(live, "federations", "show", fed["id"]).stdout

    assert fed["id"] in [f["id"] for f in listed]
    assert fed["id"] in table
    assert "config.rounds" in shown


def test_cli_runs_a_federation_lifecycle(live: LiveServer, tmp_path: Path) -> None:
    fid = created(live, tmp_path)["id"]

    tokens = admin(live, "tokens", fid, "--count", "2", "--ttl", "60").stdout.split()
    started = json.loads(admin(live, "start", fid, "--json").stdout)
    rounds = json.loads(admin(live, "rounds", fid, "--json").stdout)
    clients = json.loads(admin(live, "clients", fid, "--json").stdout)
    paused = json.loads(admin(live, "pause", fid, "--json").stdout)
    stopped = json.loads(admin(live, "stop", fid, "--json").stdout)

    assert len(tokens) == 2
    assert all(t.startswith("fce_") for t in tokens)
    assert started["status"] == "running"
    assert [r["number"] for r in rounds] == [1]
    assert clients == []
    assert (paused["status"], stopped["status"]) == ("paused", "stopped")


def test_cli_downloads_a_model_version(live: LiveServer, tmp_path: Path) -> None:
    fed = created(live, tmp_path)
    versions = json.loads(admin(live, "models", fed["id"], "--json").stdout)
    out = tmp_path / "downloaded.safetensors"

    admin(live, "download", fed["id"], versions[0]["version"], "-o", str(out))

    assert out.read_bytes() == (tmp_path / "init.safetensors").read_bytes()


def test_cli_downloads_by_version_prefix_and_latest(live: LiveServer, tmp_path: Path) -> None:
    fed = created(live, tmp_path)
    version = json.loads(admin(live, "models", fed["id"], "--json").stdout)[0]["version"]
    table = admin(live, "models", fed["id"]).stdout
    by_prefix, latest = tmp_path / "prefix.safetensors", tmp_path / "latest.safetensors"

    admin(live, "download", fed["id"], version[:12], "-o", str(by_prefix))
    admin(live, "download", fed["id"], "latest", "-o", str(latest))
    unknown = CliRunner().invoke(
        app,
        ["admin", "--server", live.url, "--token", live.admin_token,
         "download", fed["id"], "zz", "-o", str(tmp_path / "x")],
    )  # fmt: skip

    initial = (tmp_path / "init.safetensors").read_bytes()
    assert version[:12] in table
    assert by_prefix.read_bytes() == initial
    assert latest.read_bytes() == initial
    assert unknown.exit_code == 1
    assert "no model version" in unknown.stderr
    assert not (tmp_path / "x").exists()


def test_cli_reports_problems_and_exits_nonzero(live: LiveServer, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "", "rounds": 0, "clients_per_round": 1}))
    model = tmp_path / "m.safetensors"
    model.write_bytes(wire.encode(small_model()))
    runner = CliRunner()
    base = ["admin", "--server", live.url, "--token", live.admin_token]

    missing = runner.invoke(app, [*base, "federations", "show", "f_nope"])
    invalid = runner.invoke(
        app, [*base, "federations", "create", "--config", str(bad), "--model", str(model)]
    )

    assert missing.exit_code == 1
    assert "Not found (HTTP 404)" in missing.stderr
    assert invalid.exit_code == 1
    assert "Invalid federation configuration (HTTP 422)" in invalid.stderr
    assert "name:" in invalid.stderr
    assert "rounds:" in invalid.stderr


def test_cli_reads_the_token_from_the_data_dir(live: LiveServer, tmp_path: Path) -> None:
    (tmp_path / "admin-token").write_text(live.admin_token + "\n")
    runner = CliRunner()

    found = runner.invoke(
        app, ["admin", "--server", live.url, "--data-dir", str(tmp_path), "federations", "list"]
    )
    absent = runner.invoke(
        app,
        ["admin", "--server", live.url, "--data-dir", str(tmp_path / "x"), "federations", "list"],
        env={"FEDCORE_ADMIN_TOKEN": ""},
    )

    assert found.exit_code == 0, found.output
    assert absent.exit_code == 1
    assert "no admin token" in absent.stderr


def test_cli_says_when_the_server_is_unreachable(live: LiveServer) -> None:
    result = CliRunner().invoke(
        app, ["admin", "--server", "http://127.0.0.1:9", "--token", live.admin_token,
              "federations", "list"],
    )  # fmt: skip

    assert result.exit_code == 1
    assert "cannot reach http://127.0.0.1:9" in result.stderr


def test_fedcore_entry_point_lists_federations_as_json(live: LiveServer, tmp_path: Path) -> None:
    fid = created(live, tmp_path)["id"]
    fedcore = Path(sys.executable).with_name("fedcore")

    done = subprocess.run(
        [str(fedcore), "admin", "--server", live.url, "federations", "list", "--json"],
        env={"FEDCORE_ADMIN_TOKEN": live.admin_token, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )

    assert done.returncode == 0, done.stderr
    assert fid in [f["id"] for f in json.loads(done.stdout)]
    assert live.admin_token not in done.stdout + done.stderr


def test_cli_client_trains_until_the_federation_finishes(live: LiveServer) -> None:
    from clients import digits, to_parameters

    model = to_parameters(digits.make_mlp(seed=0).state_dict(), copy=True)
    cfg = {"name": "cli client", "rounds": 1, "clients_per_round": 1, "checkin_wait_s": 5}
    headers = {"Authorization": f"Bearer {live.admin_token}"}
    with httpx.Client(base_url=live.url, headers=headers) as http:
        fid = http.post(
            "/admin/federations",
            data={"config": json.dumps(cfg)},
            files={"model": ("m", wire.encode(model))},
        ).json()["id"]
        (token,) = http.post(
            f"/admin/federations/{fid}/enrollment-tokens", json={"count": 1, "ttl_s": 60}
        ).json()["tokens"]
        http.post(f"/admin/federations/{fid}/start")

        result = CliRunner().invoke(
            app, ["client", "--server", live.url, "--enrollment-token", token, "--device", "cpu",
                  "--wait", "2"],
        )  # fmt: skip

        assert result.exit_code == 0, result.output
        assert "round 1: trained on" in result.stdout
        assert http.get(f"/admin/federations/{fid}").json()["status"] == "finished"
