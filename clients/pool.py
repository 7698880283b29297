"""`TrainingPool`: worker processes that train a simulated fleet's clients in parallel.

A simulation's clients train one after another on one core; the pool forks
worker processes from the fleet, so each worker already holds every client's
trainer and data shard (copy-on-write) without importing torch again or
copying the data, and trains its share of each round's clients on another
core. The aggregator stays in the parent: the parent checks the clients in,
sends each worker the round's model and its jobs, and submits the deltas
that come back in the clients' order, so the fold, and hence the model, is
the same as with one process.

Jobs are pinned: client `i` always trains in worker `i % workers`, so a
trainer that keeps state between rounds sees all of its rounds. Only plain
training is sent to workers (`Fleet` keeps secure rounds and DP-SGD, whose
state lives in the parent's client, in the parent).

Why processes and not threads: a virtual client's step is a few small torch
calls with Python between them, so threads would queue for the GIL. Why
`fork`: a fresh interpreter would import torch and rebuild every shard
(seconds each on a small machine), longer than a typical simulation. Forking
a process that holds CUDA state breaks the child, so the pool is for CPU
training only, on platforms that have `fork`.

Messages are `fedcore.forked` messages: a JSON header, then safetensors
bytes for models and updates, never pickle. A worker gets a round's jobs in
one message. It answers each job with the update as a client
would upload it (the delta in safetensors, its `UpdateMeta` in the
metadata), so the parent hands those bytes to the aggregator as they are,
and it sends its answers in batches, so that the parent, which has the
aggregator's work to do, is woken for every few updates rather than for
each. The parent reads every worker's answers as they come (up to a bound
on what it holds), so a worker that is ahead does not wait for it.
"""

from __future__ import annotations

import select
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from clients.trainer import Trainer
from fedcore import UPDATE_META_KEY, ParameterSet, TrainConfig, UpdateMeta, wire
from fedcore.forked import ForkedWorkers, fork_available, pack, unpack

__all__ = ["TrainingJob", "TrainingPool", "fork_available"]

# A worker's batch of answers: the first batch of a round holds one update,
# so the parent can start submitting at once; each next batch doubles, up
# to this many updates or these many bytes.
_BATCH_UPDATES = 16
_BATCH_BYTES = 1 << 17
# The parent reads ahead from the workers until it holds this many bytes of
# answers it cannot submit yet; past that a worker that is ahead waits.
_READ_AHEAD_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class TrainingJob:
    """One client's training for one round: the client's index in the fleet and the task."""

    client: int
    round: int
    model_version: str
    config: TrainConfig


class TrainingPool:
    """Forked worker processes that train jobs for a fixed list of trainers.

    Create it after the trainers hold their data: the workers inherit them
    as they are at that moment. Close it (or use it as a context manager)
    to stop the workers.
    """

    def __init__(self, trainers: Sequence[Trainer], workers: int) -> None:
        """Fork `workers` processes, each holding `trainers`.

        Raises:
            ValueError: `workers` < 1, or this platform cannot fork.
        """
        self._workers = ForkedWorkers(
            workers, _serve, lambda _: (trainers,), name="fedcore-trainer"
        )
        # The model version each worker holds, so each gets a model once.
        self._versions: list[str | None] = [None] * workers
        # Answers read ahead, per worker, in the order the worker sent them:
        # (its row: the metadata or the error, the update's bytes).
        self._inbox: list[deque[tuple[dict[str, Any], memoryview]]] = [
            deque() for _ in range(workers)
        ]
        self._held = 0
        self._poller = select.poll()
        self._workers_by_fd: dict[int, int] = {}
        for index, conn in enumerate(self._workers.conns):
            self._poller.register(conn.fileno(), select.POLLIN)
            self._workers_by_fd[conn.fileno()] = index

    def __enter__(self) -> TrainingPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (they finish the job in hand); safe to call twice."""
        for conn in self._workers.conns:
            self._poller.unregister(conn.fileno())
        self._workers.close()

    def train(
        self, jobs: Sequence[TrainingJob], model: Callable[[str], bytes]
    ) -> Iterator[tuple[TrainingJob, memoryview, UpdateMeta]]:
        """Train every job; yield each with its update and metadata, in the order of `jobs`.

        The update is the client's upload: the delta in the safetensors wire
        format, with the metadata under `fedcore.UPDATE_META_KEY`, as a
        read-only view.

        Each worker gets its share of the jobs in one message and answers
        as it trains, so the workers train while the caller submits what
        they sent before.

        Args:
            jobs: the clients to train, each pinned to worker `client % workers`.
            model: returns the safetensors bytes of a model version.

        Raises:
            RuntimeError: a worker's training raised (its message is quoted)
                or a worker died.
        """
        count = len(self._workers.conns)
        if not count:
            raise RuntimeError("the training pool is closed")
        shares: list[list[TrainingJob]] = [[] for _ in range(count)]
        for job in jobs:
            shares[job.client % count].append(job)
        owed = [0] * count
        try:
            for worker, share in enumerate(shares):
                if share:
                    self._send(worker, share, model)
                    owed[worker] = len(share)
            for job in jobs:
                worker = job.client % count
                owed[worker] -= 1
                update, meta = self._receive(worker, job)
                yield job, update, meta
        finally:
            # Stopped early (the caller raised, or a worker failed): take the
            # answers still owed, so the next round starts from a clean pipe.
            for worker, count in enumerate(owed):
                self._discard(worker, count)

    def _send(self, worker: int, share: list[TrainingJob], model: Callable[[str], bytes]) -> None:
        version = share[0].model_version
        if any(job.model_version != version for job in share):
            raise ValueError("the jobs of one call must train one model version")
        header: dict[str, Any] = {
            "jobs": [[job.client, job.round, job.config.model_dump_json()] for job in share]
        }
        parts = []
        if self._versions[worker] != version:
            header["model"] = version
            parts.append(model(version))
            self._versions[worker] = version
        self._workers.send(worker, header, parts)

    def _receive(self, worker: int, job: TrainingJob) -> tuple[memoryview, UpdateMeta]:
        inbox = self._inbox[worker]
        self._read_ahead(worker if not inbox else None)
        row, update = inbox.popleft()
        self._held -= len(update)
        if "error" in row:
            raise RuntimeError(f"client {job.client}: training failed in a worker: {row['error']}")
        return update, UpdateMeta.model_validate(row["meta"])

    def _read_ahead(self, needed: int | None) -> None:
        """Take the batches the workers have sent; with `needed`, wait until that worker's comes.

        Past `_READ_AHEAD_BYTES` held, only the workers with nothing held
        are read, so the parent holds at most that plus one batch per worker.
        """
        while True:
            # One poll(2) call: cheaper than `multiprocessing.connection.wait`,
            # which builds a selector each time, at one call per update.
            for fd, _ in self._poller.poll(None if needed is not None else 0):
                worker = self._workers_by_fd[fd]
                if not self._inbox[worker] or self._held < _READ_AHEAD_BYTES:
                    self._take(worker)
            if needed is None or self._inbox[needed]:
                return
            if self._held >= _READ_AHEAD_BYTES:
                # Only workers over the bound may be ready: wait for the one needed.
                self._take(needed)
                return

    def _take(self, worker: int) -> None:
        """Read one batch of `worker` (waiting for it) into its inbox.

        Raises:
            RuntimeError: the worker died.
        """
        header, updates = self._workers.receive(worker, "training worker")
        for row, update in zip(header["answers"], updates, strict=True):
            self._inbox[worker].append((row, update))
            self._held += len(update)

    def _discard(self, worker: int, count: int) -> None:
        """Drop the next `count` answers of `worker` (read or still to come)."""
        inbox = self._inbox[worker]
        try:
            for _ in range(count):
                if not inbox:
                    self._take(worker)
                self._held -= len(inbox.popleft()[1])
        except RuntimeError:
            self._held -= sum(len(update) for _, update in inbox)
            inbox.clear()


def _serve(conn: Connection, trainers: Sequence[Trainer]) -> None:
    """A worker's loop: train each job received until the parent closes the pipe."""
    torch.set_num_threads(1)
    params: ParameterSet | None = None
    configs: dict[str, TrainConfig] = {}
    while True:
        try:
            header, parts = unpack(conn.recv_bytes())
        except (EOFError, OSError):
            break
        if "model" in header:
            params, _ = wire.decode(parts[0])
        rows: list[dict[str, Any]] = []
        updates: list[bytes] = []
        size, limit = 0, 1
        jobs = header["jobs"]
        for index, (client, round_number, config_json) in enumerate(jobs):
            config = configs.get(config_json)
            if config is None:
                config = configs[config_json] = TrainConfig.model_validate_json(config_json)
            row, update = _train_one(trainers[client], params, config, round_number)
            rows.append(row)
            updates.append(update)
            size += len(update)
            if len(rows) >= limit or size >= _BATCH_BYTES or index == len(jobs) - 1:
                conn.send_bytes(pack({"answers": rows}, updates))
                rows, updates, size, limit = [], [], 0, min(2 * limit, _BATCH_UPDATES)


def _train_one(
    trainer: Trainer, params: ParameterSet | None, config: TrainConfig, round_number: int
) -> tuple[dict[str, Any], bytes]:
    """Train one job; return its answer: the metadata (or the error) and the update."""
    try:
        if params is None:
            raise RuntimeError("no model was sent before the first job")
        trained, meta = trainer.fit(params, config, round_number=round_number)
        update = wire.encode(trained.subtract(params), {UPDATE_META_KEY: meta.model_dump_json()})
    except Exception as exc:  # noqa: BLE001 -- reported to the parent, which raises it
        return {"error": repr(exc)}, b""
    return {"meta": meta.model_dump()}, update
