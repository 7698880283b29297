"""Uploads and credentials that the round's or client's state refuses, changing nothing."""

from __future__ import annotations

import time

import numpy as np
from liveapi import LiveServer, World, assert_problem, config, encode_update


def delta(value: float, examples: int = 10) -> bytes:
    return encode_update(
        {
            "w": np.full((3, 4), value, np.float32),
            "b": np.full(4, value, np.float32),
            "steps": np.ones(1, np.int64),
        },
        examples,
    )


def test_upload_for_a_closed_round_is_refused(world: World, live: LiveServer) -> None:
    fid = world.create_federation(config("closed", over_selection=0.5))["id"]
    alice, bob, carol = world.training(fid, 3)
    assert alice.upload(1, delta(0.1)).status_code == 201
    assert bob.upload(1, delta(0.2)).status_code == 201
    assert world.admin.get(f"/admin/federations/{fid}/rounds/1").json()["status"] == "closed"
    before = live.snapshot()

    response = carol.upload(1, delta(0.3))

    body = assert_problem(response, 409, "round-state")
    assert "closed" in body["detail"]
    assert live.snapshot() == before


def test_upload_for_a_failed_round_is_refused(world: World, live: LiveServer) -> None:
    fid = world.create_federation(config("failed"))["id"]
    alice, _ = world.training(fid, 2)
    world.admin.post(f"/admin/federations/{fid}/stop")
    assert world.admin.get(f"/admin/federations/{fid}/rounds/1").json()["status"] == "failed"
    before = live.snapshot()

    response = alice.upload(1, delta(0.1))

    body = assert_problem(response, 409, "round-state")
    assert "failed" in body["detail"]
    assert live.snapshot() == before


def test_round_that_misses_its_deadline_fails_and_refuses_late_uploads(
    world: World, live: LiveServer
) -> None:
    fid = world.create_federation(config("late", round_timeout_s=1.0, min_clients=2))["id"]
    alice, _ = world.training(fid, 2)
    deadline = time.monotonic() + 10
    while world.admin.get(f"/admin/federations/{fid}/rounds/1").json()["status"] != "failed":
        assert time.monotonic() < deadline, "the ticker did not fail the round"
        time.sleep(0.05)
    world.admin.post(f"/admin/federations/{fid}/stop")
    before = live.snapshot()

    response = alice.upload(1, delta(0.1))

    assert_problem(response, 409, "round-state")
    assert live.snapshot() == before


def test_same_update_again_gets_200_and_the_identical_receipt(
    world: World, live: LiveServer
) -> None:
    fid = world.create_federation(config("repeat"))["id"]
    alice, _ = world.training(fid, 2)
    first = alice.upload(1, delta(0.5))
    assert first.status_code == 201
    before = live.snapshot()

    again = alice.upload(1, delta(0.5))

    assert again.status_code == 200
    assert again.json() == first.json()
    assert live.snapshot() == before


def test_different_second_update_is_a_conflict(world: World, live: LiveServer) -> None:
    fid = world.create_federation(config("conflict"))["id"]
    alice, _ = world.training(fid, 2)
    assert alice.upload(1, delta(0.5)).status_code == 201
    before = live.snapshot()

    response = alice.upload(1, delta(0.25))

    assert_problem(response, 409, "update-conflict")
    assert live.snapshot() == before


def test_revoked_client_gets_401_everywhere(world: World, live: LiveServer) -> None:
    fid = world.create_federation(config("revoked"))["id"]
    alice, bob = world.training(fid, 2)
    revoked = world.admin.post(f"/admin/federations/{fid}/clients/{alice.id}/revoke")
    assert revoked.status_code == 200
    assert revoked.json()["revoked"] is True
    assert "token_hash" not in revoked.text
    before = live.snapshot()

    responses = [
        alice.http.get(f"/v1/federations/{fid}/task"),
        alice.upload(1, delta(0.1)),
        alice.http.get(f"/v1/federations/{fid}/models/{'0' * 64}"),
        alice.http.get(f"/v1/federations/{fid}/rounds/1/secagg/advertise-keys"),
        alice.http.post(f"/v1/federations/{fid}/rounds/1/secagg/share-keys", content=b"x" * 64),
    ]

    for response in responses:
        assert_problem(response, 401, "unauthorized")
    assert live.snapshot() == before
    assert bob.task()["action"] == "train"


def test_revoking_twice_returns_the_revoked_client(world: World) -> None:
    fid = world.create_federation(config("revoke-twice"))["id"]
    (alice,) = world.enroll(fid, 1)
    path = f"/admin/federations/{fid}/clients/{alice.id}/revoke"

    first, second = world.admin.post(path), world.admin.post(path)

    assert first.status_code == second.status_code == 200
    assert second.json() == first.json()


def test_expired_enrollment_token_is_refused(world: World, live: LiveServer) -> None:
    fid = world.create_federation(config("expired"))["id"]
    (token,) = world.tokens(fid, 1, ttl_s=0.05)
    time.sleep(0.1)
    before = live.snapshot()

    response = world.http().post("/v1/enroll", json={"enrollment_token": token})

    body = assert_problem(response, 401, "unauthorized")
    assert "expired" in body["detail"]
    assert live.snapshot() == before


def test_enrollment_token_works_once(world: World, live: LiveServer) -> None:
    fid = world.create_federation(config("once"))["id"]
    (token,) = world.tokens(fid, 1)
    assert world.http().post("/v1/enroll", json={"enrollment_token": token}).status_code == 201
    before = live.snapshot()

    response = world.http().post("/v1/enroll", json={"enrollment_token": token})

    assert_problem(response, 401, "unauthorized")
    assert live.snapshot() == before


def test_starting_a_stopped_federation_is_a_state_conflict(world: World, live: LiveServer) -> None:
    fid = world.create_federation(config("stopped"))["id"]
    world.admin.post(f"/admin/federations/{fid}/stop")
    before = live.snapshot()

    response = world.admin.post(f"/admin/federations/{fid}/start")

    assert_problem(response, 409, "federation-state")
    assert live.snapshot() == before


def test_stopped_federation_tells_clients_to_finish(world: World) -> None:
    fid = world.create_federation(config("finish"))["id"]
    (alice,) = world.enroll(fid, 1)
    world.admin.post(f"/admin/federations/{fid}/stop")

    assert alice.task()["action"] == "finished"
