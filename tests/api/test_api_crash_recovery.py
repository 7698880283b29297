"""A SIGKILLed aggregator loses nothing it acknowledged, and ends where an uninterrupted run ends.

The server runs as a subprocess (`python -m api serve`); real SDK clients
train the digits MLP with torch over HTTP. One run goes uninterrupted; the
other is killed with SIGKILL in the middle of round 2, after two updates of
that round were acknowledged, and restarted on the same database and blob
directory. Both must produce the same final model.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from aggregator import TokenKind
from aggregator.tokens import new_token
from api.launch import local_server
from clients import Client, HttpTransport, RoundResult, TorchTrainer, enroll, to_parameters
from clients.digits import client_data, dirichlet_partition, load_digits_split, make_mlp
from fedcore import ParameterSet, TrainConfig, UpdateMeta, wire

pytestmark = pytest.mark.slow

CLIENTS = 4
ROUNDS = 3
ADMIN = new_token(TokenKind.ADMIN)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def admin(port: int) -> httpx.Client:
    return httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=30,
    )


def create_federation(port: int) -> tuple[str, list[str]]:
    torch.manual_seed(0)
    model = to_parameters(make_mlp(seed=0).state_dict(), copy=True)
    config = {
        "name": "crash",
        "rounds": ROUNDS,
        "clients_per_round": CLIENTS,
        "min_clients": CLIENTS,
        "seed": 3,
        "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.1},
    }
    with admin(port) as http:
        files = {
            "config": (None, json.dumps(config), "application/json"),
            "model": ("m.safetensors", wire.encode(model), wire.MEDIA_TYPE),
        }
        created = http.post("/admin/federations", files=files)
        assert created.status_code == 201, created.text
        fid = created.json()["id"]
        tokens = http.post(
            f"/admin/federations/{fid}/enrollment-tokens", json={"count": CLIENTS, "ttl_s": 600}
        ).json()["tokens"]
        assert http.post(f"/admin/federations/{fid}/start").status_code == 200
    return fid, [enroll(f"http://127.0.0.1:{port}", t).token for t in tokens]


def make_clients(
    port: int, fid: str, tokens: list[str], stack: contextlib.ExitStack
) -> list[Client]:
    split = load_digits_split()
    parts = dirichlet_partition(split.y_train, CLIENTS, 0.5, 0)
    shards = client_data(split, parts)
    return [
        Client(
            stack.enter_context(HttpTransport(f"http://127.0.0.1:{port}", token, wait_s=0.3)),
            TorchTrainer(make_mlp(seed=0), shards[i], device="cpu", seed=100 + i),
            fid,
        )
        for i, token in enumerate(tokens)
    ]


def step_until_trained(clients: list[Client], round_number: int) -> list[RoundResult]:
    pending = list(clients)
    results: list[RoundResult] = []
    deadline = time.monotonic() + 120
    while pending:
        assert time.monotonic() < deadline, "clients did not get their round"
        for client in list(pending):
            client.step()
            result = client.last_result
            if result is not None and result.round == round_number:
                results.append(result)
                pending.remove(client)
    return results


def run_to_end(clients: list[Client]) -> None:
    threads = [threading.Thread(target=c.run, kwargs={"max_sleep_s": 0.2}) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "clients did not finish"


def final_model(port: int, fid: str) -> tuple[ParameterSet, list[dict[str, object]]]:
    with admin(port) as http:
        fed = http.get(f"/admin/federations/{fid}").json()
        assert fed["status"] == "finished"
        rounds = http.get(f"/admin/federations/{fid}/rounds").json()
        blob = http.get(f"/admin/federations/{fid}/models/{fed['model_version']}").content
    params, _ = wire.decode(blob)
    return params, rounds


def test_sigkill_mid_round_then_restart_gives_the_uninterrupted_result(
    database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    torch.set_num_threads(1)
    stack = contextlib.ExitStack()
    request.addfinalizer(stack.close)
    reference = f"sqlite:///{tmp_path / 'reference.db'}"
    with local_server(tmp_path / "reference", ADMIN, database_url=reference) as server:
        port = port_of(server.url)
        fid, tokens = create_federation(port)
        run_to_end(make_clients(port, fid, tokens, stack))
        expected, _ = final_model(port, fid)

    data_dir = tmp_path / "crashed"
    with local_server(data_dir, ADMIN, database_url=database_url) as server:
        port = port_of(server.url)
        fid, tokens = create_federation(port)
        clients = make_clients(port, fid, tokens, stack)
        step_until_trained(clients, 1)
        acknowledged = step_until_trained(clients[:2], 2)
        assert all(r.receipt is not None for r in acknowledged)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=30)

    with local_server(data_dir, ADMIN, database_url=database_url, port=port):
        first = acknowledged[0]
        assert first.receipt is not None
        # The SDK's retry of an acknowledged upload gets the original receipt.
        delta_repeat = clients[0].transport.submit_update(
            fid, 2, _delta_of(clients[0], first), _meta_of(first)
        )
        assert delta_repeat == first.receipt
        run_to_end(clients)
        actual, rounds = final_model(port, fid)

    assert [r["status"] for r in rounds] == ["closed"] * ROUNDS
    assert all(r["metrics"]["clients"] == CLIENTS for r in rounds)
    assert list(actual) == list(expected)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-6, atol=1e-7)


def _delta_of(client: Client, result: RoundResult) -> ParameterSet:
    model = client.transport.fetch_model(client.federation_id, result.model_version)
    config = TrainConfig(local_epochs=1, batch_size=16, lr=0.1)
    trained, _ = client.trainer.fit(model, config, round_number=result.round)
    return trained.subtract(model)


def _meta_of(result: RoundResult) -> UpdateMeta:
    return UpdateMeta(num_examples=result.num_examples, metrics=dict(result.metrics))
