"""Run a whole SecAgg+ round in one process: every client and the server.

For research, tests and benchmarks: the messages go through their byte
encoding, exactly as over the network, and the chosen clients go silent at
the chosen stages. CPU time is measured separately for the client calls and
the server calls (`time.thread_time`, the CPU time of the calling thread;
for the server's stage closings, which may unmask on several threads while
no client runs, `time.process_time`), and the critical path adds, stage by
stage, the slowest client and the server, as if the clients ran in parallel
on their own devices.

The clients of a stage are independent, so they may run on a small pool of
threads (`workers`) or of forked processes (`processes`). Threads gain
little: the AES-CTR mask keystream and numpy's additions release the GIL,
but X25519 agreement, Ed25519 verification and the Python around the calls
hold it. Processes scale with the cores. The processes are forked after the
clients are given, so each worker holds its clients' identities, updates
and randomness without copying them over a pipe; it builds their state
machines itself, and their keys never leave it. Only the protocol's
messages, as bytes, travel between the server and the workers, never pickle.
A client always runs in the same worker (clients are dealt out in the
order given), and its randomness is the worker's copy of its `rng` and
`entropy`.

Whatever the pool, the server takes the replies in the order of the client
ids, so a round's outcome does not depend on `workers` or `processes`.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from typing import Any, Protocol, TypeVar

import numpy as np

from fedcore import Array
from fedcore.forked import ForkedWorkers, fork_available, pack, unpack
from privacy.secagg.client import SecAggClient
from privacy.secagg.errors import ProtocolViolation
from privacy.secagg.keys import ClientIdentity, Entropy
from privacy.secagg.messages import KeyRoster, RoundSetup, ShareDelivery, Stage, UnmaskRequest
from privacy.secagg.server import SecAggResult, SecAggServer, StageOutcome

__all__ = ["Dropouts", "SimulatedClient", "SimulationReport", "simulate_round"]

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True, eq=False)
class SimulatedClient:
    """One client of a simulated round: identity, update, weight and randomness."""

    identity: ClientIdentity
    update: Array
    weight: float
    rng: np.random.Generator | None = None
    entropy: Entropy = os.urandom


@dataclass(frozen=True, slots=True)
class Dropouts:
    """The clients that go silent at each stage (and stay silent afterwards)."""

    advertise_keys: frozenset[str] = frozenset()
    share_keys: frozenset[str] = frozenset()
    masked_input: frozenset[str] = frozenset()
    unmask: frozenset[str] = frozenset()

    def at(self, stage: Stage) -> frozenset[str]:
        """Return the clients that go silent at `stage`."""
        return {
            Stage.ADVERTISE_KEYS: self.advertise_keys,
            Stage.SHARE_KEYS: self.share_keys,
            Stage.MASKED_INPUT: self.masked_input,
            Stage.UNMASK: self.unmask,
        }[stage]


@dataclass(frozen=True, slots=True, eq=False)
class SimulationReport:
    """What a simulated round produced and what it cost.

    Attributes:
        result: the unmasked sum, or None when the round failed.
        failure: why the round failed, or None.
        aborted: client id -> why that client refused the server's message.
        excluded: client id -> why the server excluded it.
        client_seconds: CPU time of all client calls together.
        server_seconds: CPU time of all server calls.
        critical_path_seconds: per stage, the slowest client plus the server.
    """

    result: SecAggResult | None
    failure: str | None
    aborted: Mapping[str, str]
    excluded: Mapping[str, str]
    client_seconds: float
    server_seconds: float
    critical_path_seconds: float


@dataclass(slots=True)
class _Clock:
    client: float = 0.0
    server: float = 0.0
    critical: float = 0.0
    stage_clients: dict[str, float] = field(default_factory=dict)

    def on_client(self, client_id: str, spent: float) -> None:
        self.client += spent
        self.stage_clients[client_id] = self.stage_clients.get(client_id, 0.0) + spent

    def on_server(
        self, call: Callable[[], _T], *, clock: Callable[[], float] = time.thread_time
    ) -> _T:
        start = clock()
        try:
            return call()
        finally:
            spent = clock() - start
            self.server += spent
            self.critical += spent

    def end_stage(self) -> None:
        self.critical += max(self.stage_clients.values(), default=0.0)
        self.stage_clients = {}


@dataclass(frozen=True, slots=True)
class _Answer:
    """A client's reply to a stage's message, or why it refused it, and the CPU time."""

    reply: bytes | None
    refusal: str
    seconds: float


def _reply(machine: SecAggClient, spec: SimulatedClient, stage: Stage, data: bytes) -> bytes:
    if stage is Stage.ADVERTISE_KEYS:
        return machine.advertise_keys().to_bytes()
    if stage is Stage.SHARE_KEYS:
        return machine.share_keys(KeyRoster.from_bytes(data)).to_bytes()
    if stage is Stage.MASKED_INPUT:
        delivery = ShareDelivery.from_bytes(data)
        return machine.masked_input(
            delivery, spec.update, weight=spec.weight, rng=spec.rng
        ).to_bytes()
    return machine.unmask(UnmaskRequest.from_bytes(data)).to_bytes()


class _Clients(Protocol):
    """Where a round's client state machines run: here (on threads) or in worker processes."""

    def start(self) -> list[float]:
        """Build every client's state machine; return the CPU seconds of each, in order."""
        ...

    def answer(
        self, stage: Stage, inbox: Mapping[str, bytes], active: Sequence[str]
    ) -> Iterator[_Answer]:
        """Hand each client of `active` its message of `stage`; yield the answers in that order."""
        ...


class _LocalClients:
    """The client state machines in this process, stepped here or on a pool of threads."""

    def __init__(
        self,
        setup: RoundSetup,
        registry: Mapping[str, bytes],
        specs: Mapping[str, SimulatedClient],
        executor: ThreadPoolExecutor | None,
    ) -> None:
        self._setup, self._registry, self._specs = setup, registry, specs
        self._executor = executor
        self._machines: dict[str, SecAggClient] = {}

    def _map(self, call: Callable[[str], _T], client_ids: Sequence[str]) -> Iterator[_T]:
        if self._executor is None:
            return map(call, client_ids)
        return self._executor.map(call, client_ids)

    def start(self) -> list[float]:
        ids = list(self._specs)
        started = self._map(lambda c: _start(self._setup, self._registry, self._specs[c]), ids)
        seconds = []
        for client_id, (machine, spent) in zip(ids, started, strict=True):
            self._machines[client_id] = machine
            seconds.append(spent)
        return seconds

    def answer(
        self, stage: Stage, inbox: Mapping[str, bytes], active: Sequence[str]
    ) -> Iterator[_Answer]:
        return self._map(partial(_answer, self._machines, self._specs, stage, inbox), active)


@contextmanager
def _clients(
    setup: RoundSetup,
    registry: Mapping[str, bytes],
    specs: Mapping[str, SimulatedClient],
    workers: int,
    processes: int,
) -> Iterator[_Clients]:
    if workers < 1:
        raise ValueError(f"workers is {workers}; it must be at least 1")
    if processes < 1:
        raise ValueError(f"processes is {processes}; it must be at least 1")
    if workers > 1 and processes > 1:
        raise ValueError("use threads (workers) or processes, not both")
    if processes > 1:
        with _ForkedClients(setup, registry, specs, processes) as forked:
            yield forked
    elif workers == 1:
        yield _LocalClients(setup, registry, specs, None)
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="secagg-client") as executor:
            yield _LocalClients(setup, registry, specs, executor)


class _ForkedClients:
    """The client state machines in forked worker processes.

    Client `i` (in the order given) lives in worker `i % processes`. Each
    stage, a worker gets one message (`fedcore.forked.pack`) with its
    clients' protocol messages and answers in batches.
    """

    def __init__(
        self,
        setup: RoundSetup,
        registry: Mapping[str, bytes],
        specs: Mapping[str, SimulatedClient],
        processes: int,
    ) -> None:
        if not fork_available():
            raise ValueError("processes > 1 needs the 'fork' start method; use threads here")
        ids = list(specs)
        self._home = {client_id: index % processes for index, client_id in enumerate(ids)}
        self._workers = ForkedWorkers(
            processes,
            _serve_clients,
            lambda index: (setup, registry, [specs[c] for c in ids[index::processes]]),
            name="secagg-clients",
        )

    def __enter__(self) -> _ForkedClients:
        return self

    def __exit__(self, *exc: object) -> None:
        self._workers.close()

    def start(self) -> list[float]:
        return [answer.seconds for answer in self._exchange("start", {}, list(self._home))]

    def answer(
        self, stage: Stage, inbox: Mapping[str, bytes], active: Sequence[str]
    ) -> Iterator[_Answer]:
        return self._exchange(stage.value, inbox, active)

    def _exchange(
        self, op: str, inbox: Mapping[str, bytes], active: Sequence[str]
    ) -> Iterator[_Answer]:
        """Send every worker its clients' messages; yield the answers in the order of `active`.

        The workers answer in batches as they go, so the caller's server
        takes the first answers while the workers compute the next.
        """
        count = len(self._workers.conns)
        shares: list[list[str]] = [[] for _ in range(count)]
        for client_id in active:
            shares[self._home[client_id]].append(client_id)
        for worker, share in enumerate(shares):
            if share:  # a worker is sent nothing it must answer
                messages = [inbox.get(client_id, b"") for client_id in share]
                self._workers.send(worker, {"op": op, "clients": share}, messages)
        received: list[deque[tuple[str, _Answer]]] = [deque() for _ in range(count)]
        for client_id in active:
            worker = self._home[client_id]
            while not received[worker]:
                received[worker].extend(self._receive(worker))
            answered, answer = received[worker].popleft()
            if answered != client_id:
                raise RuntimeError(f"secagg client worker {worker} answered out of order")
            yield answer

    def _receive(self, worker: int) -> Iterator[tuple[str, _Answer]]:
        """Read one batch of answers from `worker`."""
        header, replies = self._workers.receive(worker, "secagg client worker")
        if "error" in header:
            raise RuntimeError(f"secagg client worker {worker} failed: {header['error']}")
        for (client_id, seconds, refusal), reply in zip(header["answers"], replies, strict=True):
            yield (
                client_id,
                _Answer(None if refusal is not None else bytes(reply), refusal or "", seconds),
            )


# A worker answers a stage's first client at once, then in batches that
# double up to this many answers.
_BATCH = 8


def _serve_clients(
    conn: Connection,
    setup: RoundSetup,
    registry: Mapping[str, bytes],
    specs: Sequence[SimulatedClient],
) -> None:
    """A worker's loop: step its clients through each stage the parent sends."""
    worker = _Worker(setup, registry, {spec.identity.client_id: spec for spec in specs})
    while True:
        try:
            header, messages = unpack(conn.recv_bytes())
        except (EOFError, OSError):
            break
        batch: list[tuple[str, _Answer]] = []
        limit = 1
        try:
            for answered in worker.handle(header, messages):
                batch.append(answered)
                if len(batch) >= limit:
                    conn.send_bytes(_answers(batch))
                    # The first answer goes at once, the next in doubling batches.
                    batch, limit = [], min(2 * limit, _BATCH)
        except Exception as exc:  # noqa: BLE001 -- reported to the parent, which raises it
            conn.send_bytes(pack({"error": repr(exc)}))
            continue
        if batch:
            conn.send_bytes(_answers(batch))


def _answers(batch: Sequence[tuple[str, _Answer]]) -> bytes:
    rows = [[c, a.seconds, None if a.reply is not None else a.refusal] for c, a in batch]
    replies = [a.reply or b"" for _, a in batch]
    return pack({"answers": rows}, replies)


@dataclass(slots=True)
class _Worker:
    """A worker process's clients and their state machines."""

    setup: RoundSetup
    registry: Mapping[str, bytes]
    specs: Mapping[str, SimulatedClient]
    machines: dict[str, SecAggClient] = field(default_factory=dict)

    def handle(
        self, header: Mapping[str, Any], messages: Sequence[memoryview]
    ) -> Iterator[tuple[str, _Answer]]:
        """Run one request of the parent: build the clients, or answer a stage, client by client."""
        ids: list[str] = header["clients"]
        if header["op"] == "start":
            for client_id in ids:
                machine, seconds = _start(self.setup, self.registry, self.specs[client_id])
                self.machines[client_id] = machine
                yield client_id, _Answer(b"", "", seconds)
            return
        stage = Stage(header["op"])
        inbox = {c: bytes(message) for c, message in zip(ids, messages, strict=True)}
        for client_id in ids:
            yield client_id, _answer(self.machines, self.specs, stage, inbox, client_id)


def _start(
    setup: RoundSetup, registry: Mapping[str, bytes], spec: SimulatedClient
) -> tuple[SecAggClient, float]:
    start = time.thread_time()
    machine = SecAggClient(spec.identity, setup=setup, registry=registry, entropy=spec.entropy)
    return machine, time.thread_time() - start


def _answer(
    machines: Mapping[str, SecAggClient],
    specs: Mapping[str, SimulatedClient],
    stage: Stage,
    inbox: Mapping[str, bytes],
    client_id: str,
) -> _Answer:
    start = time.thread_time()
    try:
        reply = _reply(machines[client_id], specs[client_id], stage, inbox[client_id])
    except ProtocolViolation as exc:
        return _Answer(None, str(exc), time.thread_time() - start)
    return _Answer(reply, "", time.thread_time() - start)


def _encode(outcome: StageOutcome) -> dict[str, bytes]:
    return {client: message.to_bytes() for client, message in outcome.outbox.items()}


def simulate_round(
    setup: RoundSetup,
    clients: Sequence[SimulatedClient],
    *,
    dropouts: Dropouts | None = None,
    workers: int = 1,
    processes: int = 1,
) -> SimulationReport:
    """Run one round of `setup` with `clients`, silencing `dropouts` stage by stage.

    Args:
        setup: the round's public parameters.
        clients: the cohort's clients.
        dropouts: who goes silent at which stage; nobody if None.
        workers: the threads that run the clients of a stage (see the module
            docstring); 1 runs everything on the calling thread.
        processes: the forked processes that run the clients instead
            (platforms with `fork` only); 1: none.

    Raises:
        ValueError: workers or processes below 1, both above 1, or
            processes above 1 where processes cannot be forked.
        RuntimeError: a worker process died or failed outside the protocol.
    """
    dropouts = dropouts or Dropouts()
    registry = {c.identity.client_id: c.identity.public_key for c in clients}
    specs = {c.identity.client_id: c for c in clients}
    clock = _Clock()
    silent: set[str] = set()
    aborted: dict[str, str] = {}
    with _clients(setup, registry, specs, workers, processes) as pool:
        for client_id, seconds in zip(specs, pool.start(), strict=True):
            clock.on_client(client_id, seconds)
        clock.end_stage()
        server = clock.on_server(partial(SecAggServer, setup, registry))
        inbox: dict[str, bytes] = dict.fromkeys(specs, b"")
        for stage in Stage:
            silent |= dropouts.at(stage)
            active = sorted(set(inbox) - silent - set(aborted))
            answers = pool.answer(stage, inbox, active)
            for client_id, answer in zip(active, answers, strict=True):
                clock.on_client(client_id, answer.seconds)
                if answer.reply is None:
                    aborted[client_id] = answer.refusal
                    continue
                clock.on_server(partial(server.receive, client_id, answer.reply))
            clock.end_stage()
            # Closing the unmask stage removes the masks on several threads
            # (`SecAggServer`) while no client runs: the process's CPU time is
            # the server's. The critical path counts it whole, as if on one
            # thread: an upper bound on the server's latency.
            outcome = clock.on_server(server.close_stage, clock=time.process_time)
            inbox = clock.on_server(partial(_encode, outcome))
            if outcome.failure is not None:
                break
    return SimulationReport(
        result=server.result() if server.failure is None else None,
        failure=server.failure,
        aborted=aborted,
        excluded=server.excluded,
        client_seconds=clock.client,
        server_seconds=clock.server,
        critical_path_seconds=clock.critical,
    )
