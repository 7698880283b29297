"""A SIGKILLed aggregator keeps the ε it spent and the budget it enforces.

`fedcore serve` runs as a subprocess. A DP federation whose budget fits two
rounds is killed with SIGKILL in the middle of round 2 (one of two updates
acknowledged), restarted on the same database and blobs, and run until its
budget is exhausted; then it is killed and restarted once more. The ε spent,
read back after each restart, is recomputed from the stored events and must
be exactly what it was, and no round may start beyond the budget.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dp_accounting as dpa
import httpx
import numpy as np
import pytest

from aggregator import TokenKind
from aggregator.tokens import new_token
from api.launch import LocalServer, local_server
from fedcore import UPDATE_META_KEY, ParameterSet, UpdateMeta, wire

pytestmark = pytest.mark.slow

ADMIN = new_token(TokenKind.ADMIN)
Q, Z, DELTA, TARGET = 1.0, 2.0, 1e-3, 2.5


def library_epsilon(rounds: int) -> float:
    accountant = dpa.rdp.RdpAccountant()
    for _ in range(rounds):
        accountant.compose(dpa.PoissonSampledDpEvent(Q, dpa.GaussianDpEvent(Z)))
    return float(accountant.get_epsilon(DELTA))


def model() -> ParameterSet:
    return ParameterSet({"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)})


def update(scale: float) -> bytes:
    meta = UpdateMeta(num_examples=5)
    delta = {"w": np.full((3, 4), scale, dtype=np.float32)}
    return wire.encode(delta, {UPDATE_META_KEY: meta.model_dump_json()})


@contextlib.contextmanager
def server(data_dir: Path, database_url: str) -> Iterator[tuple[LocalServer, httpx.Client]]:
    with local_server(data_dir, ADMIN, database_url=database_url) as running:
        headers = {"Authorization": f"Bearer {ADMIN}"}
        with httpx.Client(base_url=running.url, headers=headers, timeout=30) as admin:
            yield running, admin


def kill(running: LocalServer) -> None:
    running.process.send_signal(signal.SIGKILL)
    assert running.process.wait(timeout=30) == -signal.SIGKILL


def create(admin: httpx.Client) -> tuple[str, list[str]]:
    dp = {"mode": "central", "epsilon": TARGET, "delta": DELTA, "clip_norm": 1.0,
          "noise_multiplier": Z, "sampling_rate": Q}  # fmt: skip
    cfg = {"name": "crash-dp", "rounds": 20, "clients_per_round": 2, "dp": dp}
    files = {
        "config": (None, json.dumps(cfg), "application/json"),
        "model": ("m.safetensors", wire.encode(model()), wire.MEDIA_TYPE),
    }
    created = admin.post("/admin/federations", files=files)
    assert created.status_code == 201, created.text
    fid: str = created.json()["id"]
    body = {"count": 2, "ttl_s": 600}
    tokens = admin.post(f"/admin/federations/{fid}/enrollment-tokens", json=body).json()["tokens"]
    credentials = []
    for token in tokens:
        enrolled = httpx.post(f"{admin.base_url}/v1/enroll", json={"enrollment_token": token})
        credentials.append(enrolled.json()["token"])
    assert admin.post(f"/admin/federations/{fid}/start").status_code == 200
    return fid, credentials


def task(admin: httpx.Client, fid: str, token: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    response = httpx.get(f"{admin.base_url}/v1/federations/{fid}/task", headers=headers)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def upload(admin: httpx.Client, fid: str, token: str, number: int, body: bytes) -> int:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": wire.MEDIA_TYPE}
    url = f"{admin.base_url}/v1/federations/{fid}/rounds/{number}/update"
    return httpx.put(url, content=body, headers=headers).status_code


def privacy(admin: httpx.Client, fid: str) -> dict[str, Any]:
    answer: dict[str, Any] = admin.get(f"/admin/federations/{fid}/privacy").json()
    return answer


def test_sigkill_and_restart_keep_the_epsilon_spent_and_the_budget(
    database_url: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    with server(data_dir, database_url) as (running, admin):
        fid, tokens = create(admin)
        for index, token in enumerate(tokens):
            assert task(admin, fid, token)["round"] == 1
            assert upload(admin, fid, tokens[index], 1, update(0.1)) == 201
        assert task(admin, fid, tokens[0])["round"] == 2
        assert upload(admin, fid, tokens[0], 2, update(0.2)) == 201
        after_one = privacy(admin, fid)["epsilon_spent"]
        kill(running)

    with server(data_dir, database_url) as (running, admin):
        assert privacy(admin, fid)["epsilon_spent"] == after_one
        assert after_one == pytest.approx(library_epsilon(1), abs=1e-9)
        assert upload(admin, fid, tokens[0], 2, update(0.2)) == 200  # kept across the kill
        assert upload(admin, fid, tokens[1], 2, update(0.3)) == 201
        spent = privacy(admin, fid)
        assert spent["status"] == "budget_exhausted"
        assert spent["epsilon_spent"] == pytest.approx(library_epsilon(2), abs=1e-9)
        kill(running)

    with server(data_dir, database_url) as (running, admin):
        time.sleep(0.6)  # a few ticks of the restarted server
        again = privacy(admin, fid)
        assert again == spent
        assert [r["round"] for r in again["rounds"]] == [1, 2]
        rounds = admin.get(f"/admin/federations/{fid}/rounds").json()
        assert [r["status"] for r in rounds] == ["closed", "closed"]
        assert all(task(admin, fid, t)["action"] == "finished" for t in tokens)
        assert admin.post(f"/admin/federations/{fid}/start").status_code == 409
