"""Distributed DP over HTTP: clients add the noise under secure aggregation.

Real SDK clients (`clients.Client` over `HttpTransport`) enroll with identity
keys and send zero deltas, so the model moves by the unmasked noise alone:
its spread is the noise the round really added, measured against z·C. One
enrolled client never shows up: it is sampled (q = 1) and drops out, and the
round still releases with `min_survivors` survivors and the ε accounted for
exactly that many noise shares.
"""

from __future__ import annotations

import threading

import numpy as np
from liveapi import World, config

from clients import Client, HttpTransport, enroll_identity
from fedcore import ParameterSet, TrainConfig, UpdateMeta, wire
from privacy.dp import DpConfig, RdpAccountant, distributed_params, epsilon

CLIENTS = 5  # the survivors, and min_survivors
ENROLLED = CLIENTS + 1
SIZE = 8192
Z, C, DELTA = 1.5, 0.5, 1e-3


class Unchanged:
    """A trainer that returns the model it was given: every delta is zero."""

    def fit(
        self, params: ParameterSet, config: TrainConfig, *, round_number: int = 0
    ) -> tuple[ParameterSet, UpdateMeta]:
        return params, UpdateMeta(num_examples=10)


def model() -> ParameterSet:
    return ParameterSet({"w": np.zeros(SIZE, np.float32), "steps": np.array([3], np.int64)})


def dp_section() -> dict[str, object]:
    return {
        "mode": "distributed",
        "epsilon": 100.0,
        "delta": DELTA,
        "clip_norm": C,
        "noise_multiplier": Z,
        "sampling_rate": 1.0,
        "min_survivors": CLIENTS,
    }


def test_the_noise_in_the_unmasked_sum_has_the_target_std(world: World) -> None:
    cfg = config(
        "distributed-dp",
        rounds=1,
        clients_per_round=CLIENTS,
        min_clients=3,
        round_timeout_s=60,
        secure_aggregation=True,
        secagg={"stage_timeout_s": 3, "dropout_fraction": 0.3, "corrupt_fraction": 0.0},
        dp=dp_section(),
    )
    fid = world.create_federation(cfg, model())["id"]
    clients, transports = [], []
    silent, *tokens = world.tokens(fid, ENROLLED)
    enroll_identity(world.live.url, silent)  # enrolled, sampled, never answers
    for token in tokens:
        enrollment, identity = enroll_identity(world.live.url, token)
        transport = HttpTransport(world.live.url, enrollment.token, wait_s=2)
        clients.append(Client(transport, Unchanged(), fid, identity=identity))
        transports.append(transport)
    world.start(fid)
    threads = [threading.Thread(target=c.run, kwargs={"max_sleep_s": 0.2}) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for transport in transports:
        transport.close()
    assert not any(t.is_alive() for t in threads), "clients did not finish"

    fed = world.admin.get(f"/admin/federations/{fid}").json()
    assert fed["status"] == "finished", fed
    (rnd,) = world.admin.get(f"/admin/federations/{fid}/rounds").json()
    assert rnd["status"] == "closed", rnd
    assert rnd["metrics"]["clients"] == CLIENTS
    assert rnd["metrics"]["dropped"] == 1
    blob = world.admin.get(f"/admin/federations/{fid}/models/{fed['model_version']}").content
    new, _ = wire.decode(blob)
    # The model moved by (sum of noise) / (q·N): scale back to the sum.
    noise_sum = np.asarray(new["w"], np.float64) * ENROLLED
    assert abs(noise_sum.std() / (Z * C) - 1) < 0.05, noise_sum.std()
    assert new["steps"].tolist() == [3]

    report = world.admin.get(f"/admin/federations/{fid}/privacy").json()
    params = distributed_params(
        DpConfig.model_validate(dp_section()),
        num_clients=ENROLLED,
        num_parameters=SIZE,
        rotation_seed=0,
    )
    expected = epsilon([params.event(1.0)], DELTA, RdpAccountant())
    assert abs(report["epsilon_spent"] - expected) <= 1e-9 * expected
