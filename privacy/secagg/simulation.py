"""Run a whole SecAgg+ round in one process: every client and the server.

For research, tests and benchmarks: the messages go through their byte
encoding, exactly as over the network, and the chosen clients go silent at
the chosen stages. CPU time is measured separately for the client calls and
the server calls (`time.process_time`), and the critical path adds, stage by
stage, the slowest client and the server, as if the clients ran in parallel
on their own devices.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
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

    def on_client(self, client_id: str, call: Callable[[], _T]) -> _T:
        start = time.process_time()
        try:
            return call()
        finally:
            spent = time.process_time() - start
            self.client += spent
            self.stage_clients[client_id] = self.stage_clients.get(client_id, 0.0) + spent

    def on_server(self, call: Callable[[], _T]) -> _T:
        start = time.process_time()
        try:
            return call()
        finally:
            spent = time.process_time() - start
            self.server += spent
            self.critical += spent

    def end_stage(self) -> None:
        self.critical += max(self.stage_clients.values(), default=0.0)
        self.stage_clients = {}


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


def _encode(outcome: StageOutcome) -> dict[str, bytes]:
    return {client: message.to_bytes() for client, message in outcome.outbox.items()}


def simulate_round(
    setup: RoundSetup, clients: Sequence[SimulatedClient], *, dropouts: Dropouts | None = None
) -> SimulationReport:
    """Run one round of `setup` with `clients`, silencing `dropouts` stage by stage."""
    dropouts = dropouts or Dropouts()
    registry = {c.identity.client_id: c.identity.public_key for c in clients}
    specs = {c.identity.client_id: c for c in clients}
    clock = _Clock()
    machines = {
        cid: clock.on_client(
            cid,
            partial(SecAggClient, c.identity, setup=setup, registry=registry, entropy=c.entropy),
        )
        for cid, c in specs.items()
    }
    clock.end_stage()
    server = clock.on_server(partial(SecAggServer, setup, registry))
    inbox: dict[str, bytes] = dict.fromkeys(machines, b"")
    silent: set[str] = set()
    aborted: dict[str, str] = {}
    for stage in Stage:
        silent |= dropouts.at(stage)
        for cid in sorted(set(inbox) - silent - set(aborted)):
            step = partial(_reply, machines[cid], specs[cid], stage, inbox[cid])
            try:
                reply = clock.on_client(cid, step)
            except ProtocolViolation as exc:
                aborted[cid] = str(exc)
                continue
            clock.on_server(partial(server.receive, cid, reply))
        clock.end_stage()
        outcome = clock.on_server(server.close_stage)
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
