"""Secure aggregation over HTTP: enrollment with an identity key, and secure rounds."""

from __future__ import annotations

import base64
import json
import threading

import numpy as np
import torch
from liveapi import World, assert_problem, config

from clients import (
    Client,
    HttpTransport,
    TensorData,
    TorchTrainer,
    enroll_identity,
    to_parameters,
)
from clients.digits import (
    Evaluator,
    client_data,
    dirichlet_partition,
    load_digits_split,
    make_mlp,
)
from fedcore import ParameterSet, wire
from privacy.secagg import ClientIdentity

SECURE = {"secure_aggregation": True, "min_clients": 3, "clients_per_round": 3}


def test_enroll_registers_an_identity_key_given_as_hex_or_base64(world: World) -> None:
    fid = world.create_federation(config("secure-enroll", **SECURE))["id"]
    first, second, third = world.tokens(fid, 3)
    key = ClientIdentity.generate("x").public_key
    as_hex = world.http().post(
        "/v1/enroll", json={"enrollment_token": first, "identity_key": key.hex()}
    )
    assert as_hex.status_code == 201, as_hex.text
    assert as_hex.json()["identity_key"] == key.hex()
    other = ClientIdentity.generate("y").public_key
    as_b64 = world.http().post(
        "/v1/enroll",
        json={"enrollment_token": second, "identity_key": base64.b64encode(other).decode()},
    )
    assert as_b64.status_code == 201, as_b64.text
    assert as_b64.json()["identity_key"] == other.hex()
    missing = world.http().post("/v1/enroll", json={"enrollment_token": third})
    assert "identity_key" in assert_problem(missing, 403, "forbidden")["detail"]
    short = world.http().post(
        "/v1/enroll", json={"enrollment_token": third, "identity_key": "ab" * 31}
    )
    assert_problem(short, 422, "invalid-request")
    clients = world.admin.get(f"/admin/federations/{fid}/clients").json()
    assert len(clients) == 2


CLIENTS = 10
ROUNDS = 5


def digits_federation(world: World, name: str, secure: bool) -> str:
    torch.manual_seed(0)
    model = to_parameters(make_mlp(seed=0).state_dict(), copy=True)
    cfg = config(
        name,
        rounds=ROUNDS,
        clients_per_round=CLIENTS,
        min_clients=CLIENTS,
        seed=3,
        checkin_wait_s=60,
        round_timeout_s=60,
        train={"local_epochs": 1, "batch_size": 16, "lr": 0.1},
    )
    if secure:
        # |delta| of one local epoch stays well below 1: clipping is a no-op, and
        # 20-bit codes of w/W * delta (W = 512) keep the error below 1e-5.
        cfg |= {"secure_aggregation": True, "secagg": {"clip": 1.0, "max_weight": 512}}
    return str(world.create_federation(cfg, model)["id"])


def run_federation(world: World, fid: str, shards: list[TensorData]) -> ParameterSet:
    clients = []
    for index, token in enumerate(world.tokens(fid, CLIENTS)):
        enrollment, identity = enroll_identity(world.live.url, token)
        transport = HttpTransport(world.live.url, enrollment.token, wait_s=2)
        trainer = TorchTrainer(make_mlp(seed=0), shards[index], device="cpu", seed=100 + index)
        clients.append((Client(transport, trainer, fid, identity=identity), transport))
    world.start(fid)
    threads = [threading.Thread(target=c.run, kwargs={"max_sleep_s": 0.2}) for c, _ in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for _, transport in clients:
        transport.close()
    assert not any(t.is_alive() for t in threads), "clients did not finish"
    fed = world.admin.get(f"/admin/federations/{fid}").json()
    assert fed["status"] == "finished"
    blob = world.admin.get(f"/admin/federations/{fid}/models/{fed['model_version']}").content
    params, _ = wire.decode(blob)
    return params


def test_secure_digits_federation_matches_the_plain_one_over_http(world: World) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        split = load_digits_split()
        shards = client_data(split, dirichlet_partition(split.y_train, CLIENTS, 0.5, 0))
        plain = run_federation(world, digits_federation(world, "plain", False), shards)
        secure_fid = digits_federation(world, "secure", True)
        secure = run_federation(world, secure_fid, shards)
    finally:
        torch.set_num_threads(previous)
    rounds = world.admin.get(f"/admin/federations/{secure_fid}/rounds").json()
    assert [r["status"] for r in rounds] == ["closed"] * ROUNDS
    assert all(r["metrics"]["clients"] == CLIENTS for r in rounds)
    evaluator = Evaluator(split)
    plain_accuracy, _ = evaluator.evaluate(plain)
    secure_accuracy, _ = evaluator.evaluate(secure)
    assert plain_accuracy > 0.7
    assert abs(secure_accuracy - plain_accuracy) <= 0.01
    for name in plain:
        np.testing.assert_allclose(secure[name], plain[name], atol=1e-3)


def test_secagg_routes_check_stage_round_and_membership(world: World) -> None:
    fid = world.create_federation(config("secure-routes", **SECURE))["id"]
    (plain_client,) = world.enroll(world.create_federation(config("plain-routes"))["id"], 1)
    tokens = world.tokens(fid, 3)
    enrolled = [enroll_identity(world.live.url, token)[0] for token in tokens]
    http = world.http(enrolled[0].token)
    base = f"/v1/federations/{fid}/rounds/1/secagg"
    assert_problem(http.get(f"{base}/advertise-keys"), 404, "not-found")  # no round yet
    assert_problem(http.get(f"{base}/sideways"), 422, "invalid-request")
    assert_problem(plain_client.http.get(f"{base}/advertise-keys"), 403, "forbidden")
    world.start(fid)
    for enrollment in enrolled:
        world.http(enrollment.token).get(f"/v1/federations/{fid}/task")
    task = http.get(f"/v1/federations/{fid}/task").json()
    assert (task["action"], task["secure"], task["stage"]) == ("train", True, "advertise-keys")
    opening = http.get(f"{base}/advertise-keys")
    assert opening.status_code == 200
    assert set(json.loads(opening.content)["registry"]) == {e.client_id for e in enrolled}
    assert http.get(f"{base}/share-keys").status_code == 204  # not open yet
    early = http.post(f"{base}/share-keys", content=b"x")
    assert "advertise-keys stage" in assert_problem(early, 409, "round-state")["detail"]
    bad = http.post(f"{base}/advertise-keys", content=b"\x00not a message")
    assert "refused" in assert_problem(bad, 409, "round-state")["detail"]
