"""`Fleet`: many virtual clients in one process, for simulation.

The clients run one after another, never at once, so they share one torch
model object (each loads the round's parameters before it trains) and each
keeps only its data shard. No threads: a simulation steps the fleet and the
aggregator in turn, which makes a run deterministic.

Each step checks every client in, then trains the plain rounds' clients a
chunk at a time and submits each chunk's deltas in the clients' order
(phases rather than client by client; see `Fleet._step`). With `workers` >
1 the training runs in forked worker processes (`clients.pool`), one core
each, and the parent submits. Either way the deltas are submitted in the
clients' order, so the models are bit for bit the same for any `workers`.
Since every client checks in before any of the round's deltas is
submitted, a client of a sampled cohort whose round closes before its
delta is submitted (over-selection) has trained for nothing: its update is
refused as late, as a real straggler's would be.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from clients.client import Client
from clients.pool import TrainingJob, TrainingPool, fork_available
from clients.trainer import Device, TensorData, TorchTrainer
from fedcore import (
    ParameterSet,
    Task,
    TaskAction,
    TrainConfig,
    Transport,
    TransportError,
    UpdateMeta,
    wire,
)
from privacy.secagg import ClientIdentity

__all__ = ["Fleet"]

# Clients trained before their updates are submitted, at most, and the most
# bytes of deltas they may hold (see `Fleet._step`).
_PHASE_CLIENTS = 64
_PHASE_BYTES = 64 << 20


class Fleet:
    """Virtual clients stepped sequentially in a fixed order."""

    def __init__(self, clients: Sequence[Client], *, workers: int = 1) -> None:
        """Step `clients`; with `workers` > 1, train them in that many forked processes.

        Raises:
            ValueError: `workers` < 1, or > 1 where processes cannot be forked.
        """
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if workers > 1 and not fork_available():
            raise ValueError("workers > 1 needs the 'fork' start method; use workers=1 here")
        self._clients = tuple(clients)
        self._workers = workers
        self._pool: TrainingPool | None = None
        # The current round's model as sent to the workers: (version, bytes).
        self._model: tuple[str, bytes] | None = None

    @classmethod
    def build(  # noqa: PLR0913 -- keyword-only options of one construction
        cls,
        model: torch.nn.Module,
        shards: Mapping[str, TensorData],
        connect: Callable[[str], Transport],
        *,
        federation_id: str,
        seed: int = 0,
        identities: Mapping[str, ClientIdentity] | None = None,
        workers: int = 1,
    ) -> Fleet:
        """Build one client per shard, all training the one `model`.

        Training runs on the device `model` is on: move it first, e.g.
        `model.to("cuda")`. Worker processes train on the CPU only.

        Args:
            model: the network every client trains in turn.
            shards: client id → that client's features and labels, in the
                order the clients are stepped. A shard may be empty.
            connect: returns the transport of a client id.
            federation_id: the federation every client joins.
            seed: the base seed; each client's shuffling seed derives from it
                and the client's position.
            identities: client id → its identity registered at enrollment,
                for federations with secure aggregation.
            workers: processes that train (see the module docstring); close
                the fleet to stop them.

        Raises:
            ValueError: the model is on another device than the CPU or CUDA,
                or `workers` > 1 with the model on CUDA (a forked process
                cannot use its parent's CUDA context) or where processes
                cannot be forked.
        """
        device = _device_of(model)
        if workers > 1 and device != "cpu":
            raise ValueError("workers > 1 trains on the CPU; move the model there or use 1 worker")
        clients = [
            Client(
                connect(client_id),
                TorchTrainer(model, data, device=device, seed=_client_seed(seed, index)),
                federation_id,
                identity=None if identities is None else identities[client_id],
            )
            for index, (client_id, data) in enumerate(shards.items())
        ]
        return cls(clients, workers=workers)

    @property
    def clients(self) -> tuple[Client, ...]:
        """The clients, in stepping order."""
        return self._clients

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes, if any were started."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    @property
    def finished(self) -> bool:
        """Whether every client was told the federation finished."""
        return all(_is_finished(c) for c in self._clients)

    def step_all(self, *, torch_threads: int | None = 1) -> int:
        """Step every client not yet finished once, in order; return how many trained.

        Args:
            torch_threads: torch's intra-op threads while stepping (restored
                after), or None to leave torch's setting alone. One thread is
                the default because a virtual client's batches are tiny: a
                thread pool costs more than it saves on them, and many times
                more on a busy machine.
        """
        previous = torch.get_num_threads()
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        try:
            return self._step()
        finally:
            torch.set_num_threads(previous)

    def _step(self) -> int:
        """Check every client in; train the plain tasks, here or in the workers; submit in order.

        Training and submitting run in phases, not client by client: a
        chunk of clients trains, then their updates go to the aggregator in
        the clients' order. Alternating each client's training with its
        submission slowed both: they share no code or data, and each evicted
        the other's from the CPU's caches (one process, the digits task of
        `bench/simulate.py`: 2.2x the bare loop client by client, 1.8x in
        phases).
        """
        trained = 0
        jobs: list[TrainingJob] = []
        tasks: dict[int, Task] = {}
        for index, client in enumerate(self._clients):
            if _is_finished(client):
                continue
            task = client.check_in()
            if _for_workers(task):
                tasks[index] = task
                jobs.append(_job(index, task))
            elif client.act(task) is TaskAction.TRAIN:
                trained += 1
        if not jobs:
            return trained
        if self._workers == 1:
            for job, delta, meta in self._train_here(jobs, tasks):
                self._clients[job.client].submit(tasks[job.client], delta, meta)
                trained += 1
            return trained
        if self._pool is None:
            # Forked now, not at construction: the workers must inherit the
            # trainers with their data, and a fleet that never trains in
            # parallel (secure rounds) never forks.
            self._pool = TrainingPool([c.trainer for c in self._clients], self._workers)
        for job, update, meta in self._pool.train(jobs, self._model_bytes):
            self._clients[job.client].submit_encoded(tasks[job.client], update, meta)
            trained += 1
        return trained

    def _train_here(
        self, jobs: Sequence[TrainingJob], tasks: Mapping[int, Task]
    ) -> Iterator[tuple[TrainingJob, ParameterSet, UpdateMeta]]:
        """Train `jobs` in this process a chunk at a time; yield each result in order.

        A chunk holds at most `_PHASE_CLIENTS` clients and `_PHASE_BYTES` of
        deltas (the first chunk one client, to learn the deltas' size), so a
        large model trains and submits client by client.
        """
        chunk, first = 1, 0
        while first < len(jobs):
            batch = jobs[first : first + chunk]
            results = [self._clients[job.client].train(tasks[job.client]) for job in batch]
            for job, (delta, meta) in zip(batch, results, strict=True):
                yield job, delta, meta
            first += len(batch)
            size = sum(array.nbytes for array in results[0][0].values())
            chunk = max(1, min(_PHASE_CLIENTS, _PHASE_BYTES // max(1, size)))

    def _model_bytes(self, version: str) -> bytes:
        """The safetensors bytes of a model version, fetched once through a client."""
        if self._model is None or self._model[0] != version:
            client = self._clients[0]
            params: ParameterSet = client.transport.fetch_model(client.federation_id, version)
            self._model = (version, wire.encode(params))
        return self._model[1]


def _is_finished(client: Client) -> bool:
    return client.finished


def _for_workers(task: Task) -> bool:
    """Whether a task's training can run in a worker: plain rounds without DP-SGD.

    Secure rounds keep their keys in the parent's client, and DP-SGD its
    accountant in the parent's trainer (whose budget check stops the
    client), so both train in the parent.
    """
    if task.action is not TaskAction.TRAIN or task.secure:
        return False
    return task.train is None or task.train.dpsgd is None


def _job(index: int, task: Task) -> TrainingJob:
    if task.round is None or task.model_version is None:
        raise TransportError("the aggregator sent a train task without round or model version")
    return TrainingJob(index, task.round, task.model_version, task.train or TrainConfig())


def _device_of(model: torch.nn.Module) -> Device:
    tensor = next(iter(model.state_dict().values()), None)
    kind = tensor.device.type if tensor is not None else "cpu"
    if kind == "cuda":
        return "cuda"
    if kind != "cpu":
        raise ValueError(f"the model is on {kind!r}; move it to 'cpu' or 'cuda'")
    return "cpu"


def _client_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
