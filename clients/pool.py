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

Messages are length-framed bytes (`Connection.send_bytes`): a JSON header,
then safetensors bytes for models and deltas, never pickle.
"""

from __future__ import annotations

import json
import multiprocessing
import signal
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from clients.trainer import Trainer
from fedcore import ParameterSet, TrainConfig, UpdateMeta, wire

__all__ = ["TrainingJob", "TrainingPool", "fork_available"]

# Jobs in flight per worker: one training, one queued behind it, so a worker
# never waits for the parent to submit the previous delta before starting
# the next client.
_IN_FLIGHT = 32
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

    @property
    def workers(self) -> int:
        """The number of worker processes."""
        return len(self._conns)

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

        Args:
            jobs: the clients to train, each pinned to worker `client % workers`.
            model: returns the safetensors bytes of a model version.

        Raises:
            RuntimeError: a worker's training raised (its message is quoted)
                or a worker died.
        """
        if not self._conns:
            raise RuntimeError("the training pool is closed")
        queues: list[deque[int]] = [deque() for _ in self._conns]
        for position, job in enumerate(jobs):
            queues[job.client % len(self._conns)].append(position)
        in_flight = [0] * len(self._conns)
        done: dict[int, tuple[ParameterSet, UpdateMeta]] = {}
        try:
            for worker in range(len(self._conns)):
                for _ in range(_IN_FLIGHT):
                    self._send_next(worker, queues, in_flight, jobs, model)
            for position, job in enumerate(jobs):
                while position not in done:
                    self._collect(queues, in_flight, done, jobs, model)
                delta, meta = done.pop(position)
                yield job, delta, meta
        finally:
            # Stopped early (the caller raised, or a worker failed): take the
            # replies still owed, so the next round starts from a clean pipe.
            for worker, count in enumerate(in_flight):
                for _ in range(count):
                    try:
                        self._receive(worker, jobs)
                    except (RuntimeError, OSError):
                        break

    def _collect(
        self,
        queues: list[deque[int]],
        in_flight: list[int],
        done: dict[int, tuple[ParameterSet, UpdateMeta]],
        jobs: Sequence[TrainingJob],
        model: Callable[[str], bytes],
    ) -> None:
        """Wait for replies; store them in `done` and send each replying worker its next job."""
        busy = [conn for conn, count in zip(self._conns, in_flight, strict=True) if count]
        for conn in wait(busy):
            worker = self._conns.index(conn)  # type: ignore[arg-type]
            in_flight[worker] -= 1
            position, result = self._receive(worker, jobs)
            done[position] = result
            self._send_next(worker, queues, in_flight, jobs, model)

    def _send_next(
        self,
        worker: int,
        queues: list[deque[int]],
        in_flight: list[int],
        jobs: Sequence[TrainingJob],
        model: Callable[[str], bytes],
    ) -> None:
        if queues[worker]:
            self._send(worker, queues[worker].popleft(), jobs, model)
            in_flight[worker] += 1

    def _send(
        self, worker: int, position: int, jobs: Sequence[TrainingJob], model: Callable[[str], bytes]
    ) -> None:
        job = jobs[position]
        header: dict[str, Any] = {
            "position": position,
            "client": job.client,
            "round": job.round,
            "config": job.config.model_dump_json(),
        }
        fresh = self._versions[worker] != job.model_version
        if fresh:
            header["model"] = job.model_version
        conn = self._conns[worker]
        conn.send_bytes(json.dumps(header).encode())
        if fresh:
            conn.send_bytes(model(job.model_version))
            self._versions[worker] = job.model_version

    def _receive(
        self, worker: int, jobs: Sequence[TrainingJob]
    ) -> tuple[int, tuple[ParameterSet, UpdateMeta]]:
        conn = self._conns[worker]
        try:
            header = json.loads(conn.recv_bytes())
            if "error" in header:
                client = jobs[header["position"]].client
                error = header["error"]
                raise RuntimeError(f"client {client}: training failed in a worker: {error}")
            delta, _ = wire.decode(conn.recv_bytes())
        except (EOFError, OSError) as exc:
            code = self._procs[worker].exitcode
            raise RuntimeError(f"training worker {worker} died (exit code {code})") from exc
        return header["position"], (delta, UpdateMeta.model_validate_json(header["meta"]))


def _serve(conn: Connection, inherited: Sequence[Connection], trainers: Sequence[Trainer]) -> None:
    """A worker's loop: train each job received until the parent closes the pipe."""
    for other in inherited:
        other.close()
    # Ctrl-C reaches the whole process group; the parent handles it and
    # closes the pool, which ends this loop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    params: ParameterSet | None = None
    while True:
        try:
            header = json.loads(conn.recv_bytes())
            if "model" in header:
                params, _ = wire.decode(conn.recv_bytes())
        except (EOFError, OSError):
            break
        try:
            if params is None:
                raise RuntimeError("no model was sent before the first job")
            config = TrainConfig.model_validate_json(header["config"])
            trainer = trainers[header["client"]]
            trained, meta = trainer.fit(params, config, round_number=header["round"])
            reply = {"position": header["position"], "meta": meta.model_dump_json()}
            delta = wire.encode(trained.subtract(params))
        except Exception as exc:  # noqa: BLE001 -- reported to the parent, which raises it
            failure = {"position": header["position"], "error": repr(exc)}
            conn.send_bytes(json.dumps(failure).encode())
            continue
        conn.send_bytes(json.dumps(reply).encode())
        conn.send_bytes(delta)
    conn.close()
