"""A federation runs over real HTTP: enroll, long-poll, download, upload, aggregate."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import numpy as np
import safetensors.numpy
from liveapi import Client, World, config, encode_update, small_model

from fedcore import UPDATE_META_KEY, ParameterSet, UpdateMeta, wire


def poll_in_background(client: Client, wait: float) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        out["task"] = client.task(wait=wait)
        out["at"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def deltas(seed: int, steps: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "b": rng.standard_normal(4).astype(np.float32),
        "steps": np.array([steps], np.int64),
    }


def fedavg(
    model: ParameterSet, updates: list[tuple[dict[str, np.ndarray], int]]
) -> dict[str, np.ndarray]:
    """The reference: model + example-weighted mean of the deltas (ints rounded half to even)."""
    total = sum(n for _, n in updates)
    out = {}
    for name, current in model.items():
        mean = sum(d[name].astype(np.float64) * n for d, n in updates) / total
        if current.dtype.kind == "i":
            out[name] = current + np.rint(mean).astype(current.dtype)
        else:
            out[name] = (current.astype(np.float64) + mean).astype(current.dtype)
    return out


def test_federation_trains_two_rounds_over_http(world: World) -> None:
    model = small_model()
    cfg = config("happy", rounds=2, min_clients=2, checkin_wait_s=30, round_timeout_s=60)
    fed = world.create_federation(cfg, model)
    fid = fed["id"]
    assert fed["status"] == "created"
    assert fed["config"]["clients_per_round"] == 2
    alice, bob = world.enroll(fid, 2)
    world.start(fid)

    task = check_in_together(alice, bob)
    assert task["round"] == 1
    assert task["model_version"] == fed["model_version"]
    download_with_etag(alice, fid, task["model_version"], model)
    d_alice, d_bob = deltas(1, steps=1), deltas(2, steps=3)
    new_version = run_round_one(world, alice, bob, (encode_update(d_alice, 10),
                                                    encode_update(d_bob, 30)))  # fmt: skip

    versions = world.admin.get(f"/admin/federations/{fid}/models").json()
    assert [(m["version"], m["round"]) for m in versions] == [
        (fed["model_version"], 0),
        (new_version, 1),
    ]
    fed_now = world.admin.get(f"/admin/federations/{fid}").json()
    assert fed_now["model_version"] == new_version != fed["model_version"]
    new, _ = wire.decode(alice.http.get(f"/v1/federations/{fid}/models/{new_version}").content)
    expected = fedavg(model, [(d_alice, 10), (d_bob, 30)])
    np.testing.assert_allclose(new["w"], expected["w"], rtol=1e-6)
    np.testing.assert_allclose(new["b"], expected["b"], rtol=1e-6)
    assert new["steps"].dtype == np.int64
    assert new["steps"].tolist() == [7]  # 5 + rint(2.5): half to even
    admin_copy = world.admin.get(f"/admin/federations/{fid}/models/{new_version}").content
    assert wire.decode(admin_copy)[0]["w"].tolist() == new["w"].tolist()

    run_round_two(world, alice, bob)


def check_in_together(alice: Client, bob: Client) -> dict[str, Any]:
    """Alice is held until Bob's check-in completes the cohort, then told at once."""
    thread, held = poll_in_background(alice, wait=10)
    time.sleep(0.2)
    assert bob.task(wait=10)["action"] == "train"
    checked_in = time.monotonic()
    thread.join(15)
    assert held["task"]["action"] == "train"
    assert held["at"] - checked_in < 0.5
    task: dict[str, Any] = held["task"]
    return task


def download_with_etag(client: Client, fid: str, version: str, model: ParameterSet) -> None:
    path = f"/v1/federations/{fid}/models/{version}"
    got = client.http.get(path)
    assert got.status_code == 200
    assert got.headers["content-type"] == wire.MEDIA_TYPE
    assert got.headers["etag"] == f'"{version}"'
    downloaded, _ = wire.decode(got.content)
    assert list(downloaded) == ["w", "b", "steps"]
    for name in model:
        np.testing.assert_array_equal(downloaded[name], model[name])
    for tag in (f'"{version}"', f'W/"{version}"', f'"other", "{version}"', "*"):
        cached = client.http.get(path, headers={"If-None-Match": tag})
        assert cached.status_code == 304
        assert cached.headers["etag"] == f'"{version}"'
        assert cached.content == b""
    assert client.http.get(path, headers={"If-None-Match": '"stale"'}).status_code == 200


def run_round_one(world: World, alice: Client, bob: Client, bodies: tuple[bytes, bytes]) -> str:
    """Alice uploads and waits; Bob's upload closes the round; Alice learns of round 2 at once."""
    fid = alice.federation_id
    first = alice.upload(1, bodies[0])
    assert first.status_code == 201
    assert first.json()["num_examples"] == 10
    assert alice.task()["action"] == "wait"
    thread, held = poll_in_background(alice, wait=10)
    time.sleep(0.2)
    second = bob.upload(1, bodies[1])
    uploaded = time.monotonic()
    assert second.status_code == 201
    thread.join(15)
    assert held["task"]["action"] == "train"
    assert held["task"]["round"] == 2
    assert held["at"] - uploaded < 0.5

    rnd = world.admin.get(f"/admin/federations/{fid}/rounds/1").json()
    assert rnd["status"] == "closed"
    assert sorted(rnd["cohort"]) == sorted([alice.id, bob.id])
    assert rnd["metrics"]["examples"] == 40.0
    assert held["task"]["model_version"] == rnd["result_version"]
    version: str = rnd["result_version"]
    return version


def run_round_two(world: World, alice: Client, bob: Client) -> None:
    """Bob's update is written by plain safetensors, its tensors in another order."""
    fid = alice.federation_id
    assert bob.task()["round"] == 2
    assert alice.upload(2, encode_update(deltas(3, 0), 5)).status_code == 201
    plain = safetensors.numpy.save(
        deltas(4, 0), metadata={UPDATE_META_KEY: UpdateMeta(num_examples=5).model_dump_json()}
    )
    assert list(wire.decode(plain)[0]) != ["w", "b", "steps"]
    assert bob.upload(2, plain).status_code == 201

    assert alice.task()["action"] == "finished"
    assert world.admin.get(f"/admin/federations/{fid}").json()["status"] == "finished"
    rounds = world.admin.get(f"/admin/federations/{fid}/rounds").json()
    assert [r["status"] for r in rounds] == ["closed", "closed"]
    clients = world.admin.get(f"/admin/federations/{fid}/clients").json()
    assert {c["id"] for c in clients} == {alice.id, bob.id}
    assert all("token" not in key for c in clients for key in c)
    assert "fcc_" not in json.dumps(clients)
