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

Messages are frames of bytes (`Connection.send_bytes`): a JSON header, then
safetensors bytes for models and updates, never pickle. A worker gets a
round's jobs in one frame. It answers each job with the update as a client
would upload it (the delta in safetensors, its `UpdateMeta` in the
metadata), so the parent hands those bytes to the aggregator as they are,
and it sends its answers in batches, so that the parent, which has the
aggregator's work to do, is woken for every few updates rather than for
each. The parent reads every worker's answers as they come (up to a bound
on what it holds), so a worker that is ahead does not wait for it.
"""

from __future__ import annotations

import json
import select
import struct
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from clients.trainer import Trainer
from fedcore import UPDATE_META_KEY, ParameterSet, TrainConfig, UpdateMeta, wire
from fedcore.forked import ForkedWorkers, fork_available

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
        self._conns = self._workers.conns
        # The model version each worker holds, so each gets a model once.
        self._versions: list[str | None] = [None] * workers
        # Answers read ahead, per worker, in the order the worker sent them.
        self._inbox: list[deque[memoryview]] = [deque() for _ in range(workers)]
        self._held = 0
        self._poller = select.poll()
        self._workers_by_fd: dict[int, int] = {}
        for index, conn in enumerate(self._conns):
            self._poller.register(conn.fileno(), select.POLLIN)
            self._workers_by_fd[conn.fileno()] = index

    def __enter__(self) -> TrainingPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (they finish the job in hand); safe to call twice."""
        for conn in self._conns:
            self._poller.unregister(conn.fileno())
        self._workers.close()
        self._conns = self._workers.conns

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
        if not self._conns:
            raise RuntimeError("the training pool is closed")
        shares: list[list[TrainingJob]] = [[] for _ in self._conns]
        for job in jobs:
            shares[job.client % len(self._conns)].append(job)
        owed = [0] * len(self._conns)
        try:
            for worker, share in enumerate(shares):
                if share:
                    self._send(worker, share, model)
                    owed[worker] = len(share)
            for job in jobs:
                worker = job.client % len(self._conns)
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
        payload = b""
        if self._versions[worker] != version:
            header["model"] = version
            payload = model(version)
            self._versions[worker] = version
        self._conns[worker].send_bytes(_frame(_JOBS, header, payload))

    def _receive(self, worker: int, job: TrainingJob) -> tuple[memoryview, UpdateMeta]:
        inbox = self._inbox[worker]
        self._read_ahead(worker if not inbox else None)
        frame = inbox.popleft()
        self._held -= len(frame)
        kind, header, payload = _unframe(frame)
        if kind == _FAILED:
            error = header["error"]
            raise RuntimeError(f"client {job.client}: training failed in a worker: {error}")
        return payload, UpdateMeta.model_validate(header)

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
        for frame in _split(self._workers.receive(worker, "training worker")):
            self._inbox[worker].append(frame)
            self._held += len(frame)

    def _discard(self, worker: int, count: int) -> None:
        """Drop the next `count` answers of `worker` (read or still to come)."""
        inbox = self._inbox[worker]
        try:
            for _ in range(count):
                if not inbox:
                    self._take(worker)
                self._held -= len(inbox.popleft())
        except RuntimeError:
            self._held -= sum(len(frame) for frame in inbox)
            inbox.clear()


# Message kinds. A message is one frame: its kind (1 byte), the length of
# its JSON header (4 bytes, little-endian), the header, then raw bytes (a
# model or a delta in safetensors), so that each job and each reply costs
# one write and one read.
_JOBS, _TRAINED, _FAILED = b"J", b"T", b"F"
_PREFIX = struct.Struct("<cI")


# A worker's batch of answers is one message: each frame preceded by its
# length (4 bytes, little-endian).
_LENGTH = struct.Struct("<I")


def _frame(kind: bytes, header: Mapping[str, Any], payload: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return b"".join([_PREFIX.pack(kind, len(head)), head, payload])


def _unframe(frame: bytes | memoryview) -> tuple[bytes, dict[str, Any], memoryview]:
    kind, length = _PREFIX.unpack_from(frame)
    end = _PREFIX.size + length
    view = memoryview(frame)
    header: dict[str, Any] = json.loads(bytes(view[_PREFIX.size : end]))
    return kind, header, view[end:]


def _batch(frames: Sequence[bytes]) -> bytes:
    return b"".join(part for frame in frames for part in (_LENGTH.pack(len(frame)), frame))


def _split(message: bytes) -> Iterator[memoryview]:
    view, at = memoryview(message), 0
    while at < len(view):
        (length,) = _LENGTH.unpack_from(view, at)
        at += _LENGTH.size
        yield view[at : at + length]
        at += length


def _serve(conn: Connection, trainers: Sequence[Trainer]) -> None:
    """A worker's loop: train each job received until the parent closes the pipe."""
    torch.set_num_threads(1)
    params: ParameterSet | None = None
    configs: dict[str, TrainConfig] = {}
    while True:
        try:
            _, header, payload = _unframe(conn.recv_bytes())
        except (EOFError, OSError):
            break
        if "model" in header:
            params, _ = wire.decode(payload)
        batch: list[bytes] = []
        size, limit = 0, 1
        jobs = header["jobs"]
        for index, (client, round_number, config_json) in enumerate(jobs):
            config = configs.get(config_json)
            if config is None:
                config = configs[config_json] = TrainConfig.model_validate_json(config_json)
            batch.append(_train_one(trainers[client], params, config, round_number))
            size += len(batch[-1])
            if len(batch) >= limit or size >= _BATCH_BYTES or index == len(jobs) - 1:
                conn.send_bytes(_batch(batch))
                batch, size, limit = [], 0, min(2 * limit, _BATCH_UPDATES)


def _train_one(
    trainer: Trainer, params: ParameterSet | None, config: TrainConfig, round_number: int
) -> bytes:
    """Train one job; return the answer frame (the update and its metadata, or the error)."""
    try:
        if params is None:
            raise RuntimeError("no model was sent before the first job")
        trained, meta = trainer.fit(params, config, round_number=round_number)
        update = wire.encode(trained.subtract(params), {UPDATE_META_KEY: meta.model_dump_json()})
    except Exception as exc:  # noqa: BLE001 -- reported to the parent, which raises it
        return _frame(_FAILED, {"error": repr(exc)})
    return _frame(_TRAINED, meta.model_dump(), update)
