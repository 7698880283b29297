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
threads (`workers`). Threads, not processes: the calls that dominate a
client's time, Ed25519 verification and the AES-CTR mask keystream of
`cryptography` and numpy's additions of the masks, release the GIL (X25519
agreement and the Python around the calls do not), and the client state
machines, whose keys cannot leave the process, stay where they are. The
server takes the replies in the order of the client ids, whatever the pool,
so a round's outcome does not depend on `workers`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import numpy as np

from fedcore import Array
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


class _Pool:
    """Maps over client ids on `workers` threads, yielding in the ids' order."""

    __slots__ = ("_executor",)

    def __init__(self, executor: ThreadPoolExecutor | None) -> None:
        self._executor = executor

    def map(self, call: Callable[[str], _T], client_ids: Sequence[str]) -> Iterator[_T]:
        if self._executor is None:
            return map(call, client_ids)
        return self._executor.map(call, client_ids)


@contextmanager
def _pool(workers: int) -> Iterator[_Pool]:
    if workers < 1:
        raise ValueError(f"workers is {workers}; it must be at least 1")
    if workers == 1:
        yield _Pool(None)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="secagg-client") as executor:
        yield _Pool(executor)


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
) -> SimulationReport:
    """Run one round of `setup` with `clients`, silencing `dropouts` stage by stage.

    Args:
        setup: the round's public parameters.
        clients: the cohort's clients.
        dropouts: who goes silent at which stage; nobody if None.
        workers: the threads that run the clients of a stage (see the module
            docstring); 1 runs everything on the calling thread.

    Raises:
        ValueError: workers is below 1.
    """
    dropouts = dropouts or Dropouts()
    registry = {c.identity.client_id: c.identity.public_key for c in clients}
    specs = {c.identity.client_id: c for c in clients}
    clock = _Clock()
    silent: set[str] = set()
    aborted: dict[str, str] = {}
    with _pool(workers) as pool:
        machines: dict[str, SecAggClient] = {}
        started = pool.map(lambda client_id: _start(setup, registry, specs[client_id]), list(specs))
        for client_id, (machine, seconds) in zip(specs, started, strict=True):
            clock.on_client(client_id, seconds)
            machines[client_id] = machine
        clock.end_stage()
        server = clock.on_server(partial(SecAggServer, setup, registry))
        inbox: dict[str, bytes] = dict.fromkeys(machines, b"")
        for stage in Stage:
            silent |= dropouts.at(stage)
            active = sorted(set(inbox) - silent - set(aborted))
            answers = pool.map(partial(_answer, machines, specs, stage, inbox), active)
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
