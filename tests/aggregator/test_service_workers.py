"""Two aggregator workers on one database apply every round transition once."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from aggregator import (
    Aggregator,
    FederationStatus,
    FileBlobStore,
    InProcessTransport,
    RoundStatus,
    SqlStore,
)
from fedcore import FederationConfig, ParameterSet, TaskAction, UpdateMeta, wire

CLIENTS = 6
ROUNDS = 3


def delta(index: int) -> ParameterSet:
    return ParameterSet({"w": np.full(4, 0.01 * (index + 1), np.float32)})


def run_client(workers: list[Aggregator], fid: str, client: str, index: int) -> None:
    """Check in and upload through alternating workers until the federation ends."""
    calls = 0
    while True:
        worker = workers[calls % 2]
        calls += 1
        task = InProcessTransport(worker, client).fetch_task(fid)
        if task.action is TaskAction.FINISHED:
            return
        if task.action is TaskAction.TRAIN:
            assert task.round is not None
            InProcessTransport(worker, client).submit_update(
                fid, task.round, delta(index), UpdateMeta(num_examples=index + 1)
            )
        else:
            worker.wait_for_change(0.02)


def test_two_workers_close_each_round_exactly_once(database_url: str, tmp_path: Path) -> None:
    stores = [SqlStore.open(database_url), SqlStore.open(database_url)]
    workers = [Aggregator(s, FileBlobStore(tmp_path / "blobs")) for s in stores]
    config = FederationConfig(
        name="workers", rounds=ROUNDS, clients_per_round=CLIENTS, min_clients=CLIENTS, seed=1
    )
    data = wire.encode(ParameterSet({"w": np.zeros(4, np.float32)}))
    staged = workers[0].blobs.stage(len(data))
    staged.write(data)
    fid = workers[0].create_federation(config, staged).id
    tokens, _ = workers[0].access.create_enrollment_tokens(fid, CLIENTS, 60)
    clients = [workers[i % 2].access.enroll(t).client_id for i, t in enumerate(tokens)]
    workers[1].start(fid)

    threads = [
        threading.Thread(target=run_client, args=(workers, fid, c, i))
        for i, c in enumerate(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads)

    rounds = workers[0].list_rounds(fid)
    assert [r.number for r in rounds] == [1, 2, 3]
    assert all(r.status is RoundStatus.CLOSED for r in rounds)
    assert all(r.metrics["clients"] == CLIENTS for r in rounds)
    assert len(workers[1].list_models(fid)) == 1 + ROUNDS
    fed = workers[1].get_federation(fid)
    assert fed.status is FederationStatus.FINISHED
    weights = np.arange(1, CLIENTS + 1)
    step = float(np.sum(weights * 0.01 * weights) / weights.sum())
    final = workers[0].load_model(fid, fed.model_version)
    np.testing.assert_allclose(final["w"], np.full(4, ROUNDS * step), rtol=1e-6)
    # Whichever worker closed a round, neither keeps its aggregate once a
    # check-in showed it the round is over.
    for worker in workers:
        assert InProcessTransport(worker, clients[0]).fetch_task(fid).action is (
            TaskAction.FINISHED
        )
    assert [w._engine.aggregating() for w in workers] == [[], []]
    for store in stores:
        store.close()
