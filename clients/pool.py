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
safetensors bytes for models and deltas, never pickle. A worker gets a
round's jobs in one frame and answers each job in one frame.
"""

from __future__ import annotations

import json
import multiprocessing
import signal
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from clients.trainer import Trainer
from fedcore import ParameterSet, TrainConfig, UpdateMeta, wire

__all__ = ["TrainingJob", "TrainingPool", "fork_available"]

_JOIN_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class TrainingJob:
    """One client's training for one round: the client's index in the fleet and the task."""

    client: int
    round: int
    model_version: str
    config: TrainConfig


def fork_available() -> bool:
    """Whether worker processes can be forked on this platform."""
    return "fork" in multiprocessing.get_all_start_methods()


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
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not fork_available():
            raise ValueError("worker processes need the 'fork' start method; use workers=1 here")
        context = multiprocessing.get_context("fork")
        self._conns: list[Connection] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []
        for index in range(workers):
            parent, child = context.Pipe(duplex=True)
            # The child inherits the parent's ends of its own pipe and of the
            # earlier workers' pipes; it closes them, or closing them in the
            # parent would never reach a worker as end of file.
            inherited = [*self._conns, parent]
            proc = context.Process(
                target=_serve,
                args=(child, inherited, trainers),
                name=f"fedcore-trainer-{index}",
                daemon=True,
            )
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        # The model version each worker holds, so each gets a model once.
        self._versions: list[str | None] = [None] * workers

    def __enter__(self) -> TrainingPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (they finish the job in hand); safe to call twice."""
        for conn in self._conns:
            conn.close()
        for proc in self._procs:
            proc.join(_JOIN_TIMEOUT_S)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        self._conns, self._procs = [], []

    def train(
        self, jobs: Sequence[TrainingJob], model: Callable[[str], bytes]
    ) -> Iterator[tuple[TrainingJob, ParameterSet, UpdateMeta]]:
        """Train every job; yield each with its delta and metadata, in the order of `jobs`.

        Each worker gets its share of the jobs in one message and answers
        each job as soon as it is trained, so the workers train while the
        caller submits what they sent before.

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
                delta, meta = self._receive(worker, job)
                yield job, delta, meta
        finally:
            # Stopped early (the caller raised, or a worker failed): take the
            # replies still owed, so the next round starts from a clean pipe.
            for worker, count in enumerate(owed):
                for _ in range(count):
                    try:
                        self._conns[worker].recv_bytes()
                    except (EOFError, OSError):
                        break

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

    def _receive(self, worker: int, job: TrainingJob) -> tuple[ParameterSet, UpdateMeta]:
        try:
            kind, header, payload = _unframe(self._conns[worker].recv_bytes())
        except (EOFError, OSError) as exc:
            code = self._procs[worker].exitcode
            raise RuntimeError(f"training worker {worker} died (exit code {code})") from exc
        if kind == _FAILED:
            error = header["error"]
            raise RuntimeError(f"client {job.client}: training failed in a worker: {error}")
        delta, _ = wire.decode(payload)
        return delta, UpdateMeta.model_validate(header)


# Message kinds. A message is one frame: its kind (1 byte), the length of
# its JSON header (4 bytes, little-endian), the header, then raw bytes (a
# model or a delta in safetensors), so that each job and each reply costs
# one write and one read.
_JOBS, _TRAINED, _FAILED = b"J", b"T", b"F"
_PREFIX = struct.Struct("<cI")


def _frame(kind: bytes, header: Mapping[str, Any], payload: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return b"".join([_PREFIX.pack(kind, len(head)), head, payload])


def _unframe(frame: bytes) -> tuple[bytes, dict[str, Any], memoryview]:
    kind, length = _PREFIX.unpack_from(frame)
    end = _PREFIX.size + length
    header: dict[str, Any] = json.loads(frame[_PREFIX.size : end])
    return kind, header, memoryview(frame)[end:]


def _serve(conn: Connection, inherited: Sequence[Connection], trainers: Sequence[Trainer]) -> None:
    """A worker's loop: train each job received until the parent closes the pipe."""
    for other in inherited:
        other.close()
    # Ctrl-C reaches the whole process group; the parent handles it and
    # closes the pool, which ends this loop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
        for client, round_number, config_json in header["jobs"]:
            config = configs.get(config_json)
            if config is None:
                config = configs[config_json] = TrainConfig.model_validate_json(config_json)
            conn.send_bytes(_train_one(trainers[client], params, config, round_number))
    conn.close()


def _train_one(
    trainer: Trainer, params: ParameterSet | None, config: TrainConfig, round_number: int
) -> bytes:
    """Train one job; return the reply frame (the delta and its metadata, or the error)."""
    try:
        if params is None:
            raise RuntimeError("no model was sent before the first job")
        trained, meta = trainer.fit(params, config, round_number=round_number)
        delta = wire.encode(trained.subtract(params))
    except Exception as exc:  # noqa: BLE001 -- reported to the parent, which raises it
        return _frame(_FAILED, {"error": repr(exc)})
    return _frame(_TRAINED, meta.model_dump(), delta)
