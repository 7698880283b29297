"""Training in forked worker processes: `clients.TrainingPool` and `Fleet(workers=...)`."""

from __future__ import annotations

import os

import numpy as np
import pytest

from aggregator import RoundStatus
from api.simulation import SimulationConfig, simulate
from clients import Fleet, digits
from clients import pool as pool_module
from clients.pool import TrainingJob, TrainingPool, fork_available
from fedcore import UPDATE_META_KEY, ParameterSet, TrainConfig, UpdateMeta, wire

pytestmark = pytest.mark.skipif(not fork_available(), reason="needs the 'fork' start method")

MODEL = ParameterSet({"w": np.arange(6, dtype=np.float32).reshape(2, 3)})


class _Trainer:
    """Adds its index to every weight; reports the process and round it trained in."""

    def __init__(self, index: int, *, fail: bool = False, exit_code: int | None = None) -> None:
        self.index = index
        self.fail = fail
        self.exit_code = exit_code

    def fit(
        self, params: ParameterSet, config: TrainConfig, *, round_number: int = 0
    ) -> tuple[ParameterSet, UpdateMeta]:
        if self.exit_code is not None:
            os._exit(self.exit_code)
        if self.fail:
            raise ArithmeticError(f"trainer {self.index} cannot train")
        trained = ParameterSet({k: v + self.index * config.lr for k, v in params.items()})
        metrics = {"pid": float(os.getpid()), "round": float(round_number)}
        return trained, UpdateMeta(num_examples=self.index, metrics=metrics)


def _jobs(clients: range, round_number: int = 1, version: str = "v1") -> list[TrainingJob]:
    return [TrainingJob(c, round_number, version, TrainConfig(lr=1.0)) for c in clients]


def _model(version: str) -> bytes:
    return wire.encode(MODEL)


def test_results_come_back_in_job_order_from_pinned_workers() -> None:
    trainers = [_Trainer(i) for i in range(7)]
    with TrainingPool(trainers, workers=3) as pool:
        first = list(pool.train(_jobs(range(7)), _model))
        second = list(pool.train(_jobs(range(6, -1, -1), round_number=2, version="v2"), _model))
    assert [job.client for job, _, _ in first] == list(range(7))
    assert [job.client for job, _, _ in second] == list(range(6, -1, -1))
    for job, update, meta in first + second:
        delta, metadata = wire.decode(update)
        np.testing.assert_array_equal(delta["w"], np.full((2, 3), job.client, np.float32))
        assert meta.num_examples == job.client
        assert meta.metrics["round"] == job.round
        # The update is the client's upload: the metadata travels inside it.
        assert UpdateMeta.model_validate_json(metadata[UPDATE_META_KEY]) == meta
    pids = {job.client: meta.metrics["pid"] for job, _, meta in first}
    # Each client trains in the same worker every round; three workers in all.
    assert {job.client: meta.metrics["pid"] for job, _, meta in second} == pids
    assert len(set(pids.values())) == 3
    assert os.getpid() not in pids.values()


@pytest.mark.parametrize("read_ahead", [pool_module._READ_AHEAD_BYTES, 1])
def test_batched_answers_come_back_in_order_with_and_without_reading_ahead(
    monkeypatch: pytest.MonkeyPatch, read_ahead: int
) -> None:
    # 60 jobs: each worker answers in batches of 1, 2, 4, ... 16 updates. A
    # bound of 1 byte makes the parent read a worker only when it has
    # nothing held from it.
    monkeypatch.setattr(pool_module, "_READ_AHEAD_BYTES", read_ahead)
    trainers = [_Trainer(i) for i in range(60)]
    with TrainingPool(trainers, workers=2) as pool:
        for round_number in (1, 2):
            order = list(range(60)) if round_number == 1 else list(range(59, -1, -1))
            results = list(pool.train(_jobs(order, round_number, f"v{round_number}"), _model))
            assert [job.client for job, _, _ in results] == order
            for job, update, meta in results:
                delta, _ = wire.decode(update)
                np.testing.assert_array_equal(delta["w"], np.full((2, 3), job.client, np.float32))
                assert (meta.num_examples, meta.metrics["round"]) == (job.client, round_number)
            assert pool._held == 0


def test_a_failing_trainer_raises_with_its_client_and_the_pool_goes_on() -> None:
    trainers = [_Trainer(i, fail=i == 9) for i in range(40)]
    with TrainingPool(trainers, workers=2) as pool:
        with pytest.raises(RuntimeError, match=r"client 9: .*ArithmeticError.*cannot train"):
            list(pool.train(_jobs(range(40)), _model))
        # The answers still owed were drained: the next call starts clean.
        results = list(pool.train(_jobs(range(2)), _model))
        assert pool._held == 0
    assert [meta.num_examples for _, _, meta in results] == [0, 1]


def test_a_dead_worker_is_reported() -> None:
    trainers = [_Trainer(0), _Trainer(1, exit_code=3)]
    pool = TrainingPool(trainers, workers=2)
    try:
        with pytest.raises(RuntimeError, match=r"worker 1 died \(exit code 3\)"):
            list(pool.train(_jobs(range(2)), _model))
    finally:
        pool.close()


def test_close_stops_every_worker_and_refuses_more_work() -> None:
    pool = TrainingPool([_Trainer(0)], workers=2)
    processes = list(pool._workers.procs)
    pool.close()
    assert all(not p.is_alive() for p in processes)
    assert all(p.exitcode == 0 for p in processes)
    with pytest.raises(RuntimeError, match="closed"):
        list(pool.train(_jobs(range(1)), _model))
    pool.close()


def test_invalid_worker_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="workers must be >= 1"):
        TrainingPool([], workers=0)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        Fleet([], workers=0)
    assert any("workers" in p for p in SimulationConfig(workers=0).problems())


def test_a_simulation_on_two_workers_equals_one_bit_for_bit() -> None:
    split = digits.load_digits_split()
    config = SimulationConfig(clients=12, rounds=3, seed=3)
    one = simulate(config, split=split)
    two = simulate(SimulationConfig(clients=12, rounds=3, seed=3, workers=2), split=split)
    assert [r.status for r in two.reports] == [RoundStatus.CLOSED] * 3
    assert [(r.clients, r.train_loss, r.accuracy) for r in two.reports] == [
        (r.clients, r.train_loss, r.accuracy) for r in one.reports
    ]
    assert wire.encode(two.model) == wire.encode(one.model)


def test_sampled_and_secure_simulations_run_with_workers() -> None:
    split = digits.load_digits_split()
    sampled = simulate(SimulationConfig(clients=30, rounds=3, fraction=0.3, workers=2), split=split)
    assert [r.status for r in sampled.reports] == [RoundStatus.CLOSED] * 3
    assert all(r.clients == 9 for r in sampled.reports)
    # One process checks in, trains and submits in the same phases.
    alone = simulate(SimulationConfig(clients=30, rounds=3, fraction=0.3), split=split)
    assert wire.encode(alone.model) == wire.encode(sampled.model)
    # Secure rounds train in the parent (their keys live there).
    secure = simulate(
        SimulationConfig(clients=4, rounds=2, secure_aggregation=True, workers=2), split=split
    )
    assert [r.status for r in secure.reports] == [RoundStatus.CLOSED] * 2
