"""Secure aggregation rounds (SecAgg+): stages, their durable log, and recovery.

A secure round runs the four SecAgg+ stages of `privacy.secagg` after its
cohort is chosen: advertise-keys, share-keys, masked-input and unmask. The
pure `SecAggServer` decides everything; this module adds what the service
needs around it:

- Persistence. The server has no randomness, so replaying the same calls
  rebuilds it. Every message whose verdict changed the server (accepted for
  the first time, or excluding its sender) is appended to the round's stage
  log (`secagg_messages`) in the same transaction as the verdict, before the
  client hears back, and so is each close of a stage. Masked inputs go to
  the blob store (P+1 ring elements each), the rest inline. Nothing stored
  is an update in the clear: masked inputs are uniform in the ring, shares
  are encrypted, and only the unmasked sum is ever computed.
- A cache. The server of each open round lives in memory; a process that
  lacks it, or lags behind another worker's log, replays the log's missing
  tail under the federation lock.
- Stage closing. A stage closes when every pending client answered or its
  deadline passed; a failure of the protocol fails the round cleanly.

The cohort's registry (client id -> Ed25519 identity key) comes from the
keys registered at enrollment, so the server and the clients check the same
signatures.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

import numpy as np

from aggregator.blobs import BlobStore
from aggregator.records import RoundRecord, SecAggEntry, SecAggMessageRecord
from aggregator.store import Transaction
from fedcore import (
    Array,
    DistributedNoise,
    NotFound,
    ParameterSet,
    RoundStateError,
    SecAggSetup,
    as_dtype,
)
from privacy.secagg import (
    RoundSetup,
    SecAggConfig,
    SecAggResult,
    SecAggServer,
    Stage,
    StageOutcome,
    Verdict,
    plan_round,
)

__all__ = ["SecureRounds", "Settling", "StageMessage", "parse_stage", "secure_model"]

_log = logging.getLogger(__name__)

_ORDER = tuple(Stage)


class Settling(Enum):
    """What `SecureRounds.settle` did with a secure round's open stage."""

    KEEP_OPEN = "keep_open"
    NEXT_STAGE = "next_stage"
    FAILED = "failed"
    DONE = "done"


@dataclass(frozen=True, slots=True, eq=False)
class StageMessage:
    """A client's message for one stage, with the sender its transport authenticated."""

    sender: str
    stage: Stage
    data: bytes


@dataclass(slots=True)
class _Machine:
    """A round's server, how many log entries it has applied, and its last close."""

    server: SecAggServer
    applied: int = 0
    outcome: StageOutcome | None = None


def parse_stage(name: str) -> Stage:
    """Return the SecAgg+ stage called `name`.

    Raises:
        NotFound: no stage has that name.
    """
    try:
        return Stage(name)
    except ValueError:
        names = ", ".join(s.value for s in Stage)
        raise NotFound(f"no secure aggregation stage {name[:40]!r}; stages: {names}") from None


def secure_model(model: ParameterSet, mean: Array, server_lr: float) -> ParameterSet:
    """Return model + server_lr * mean, cut back into the model's tensors.

    Integer tensors take the rounded step (half to even), as in FedAvg.
    """
    arrays, start = {}, 0
    for name, current in model.items():
        size = int(np.size(current))
        step = mean[start : start + size].reshape(np.shape(current)) * server_lr
        value = np.asarray(current, dtype=np.float64) + step
        dtype = as_dtype(str(current.dtype))
        arrays[name] = (np.rint(value) if dtype.kind in "iu" else value).astype(dtype)
        start += size
    return ParameterSet(arrays)


class SecureRounds:
    """The SecAgg+ servers of this process's secure rounds, and their stage logs."""

    def __init__(self, blobs: BlobStore) -> None:
        self._blobs = blobs
        self._machines: dict[tuple[str, int], _Machine] = {}
        # Each round's advertise-keys opening, the same for its whole cohort:
        # built once, not once per client (it lists every cohort member).
        self._openings: dict[tuple[str, int], bytes] = {}
        # One lock for every server: the store's lock serializes writers
        # across processes, this one readers and writers inside this one.
        self._lock = threading.RLock()

    def plan(
        self,
        tx: Transaction,
        rnd: RoundRecord,
        protocol: SecAggConfig,
        *,
        graph_seed: bytes | None = None,
        ring: tuple[int, int] | None = None,
    ) -> RoundSetup:
        """Plan the round for its cohort and return the setup to persist.

        Args:
            tx: the transaction the round is selected in.
            rnd: the round, its cohort chosen.
            protocol: the federation's settings for the round's model
                (`SecAggSettings.protocol`).
            graph_seed: the public seed of the neighbour graph; fresh if None.
            ring: (vector length, ring bits) when clients send vectors they
                encoded in the ring themselves (distributed DP); None to
                quantize the model's values as `protocol` says.
        """
        setup = plan_round(
            protocol,
            federation_id=rnd.federation_id,
            round=rnd.number,
            cohort=rnd.cohort,
            graph_seed=graph_seed,
        )
        if ring is not None:
            length, bits = ring
            setup = dataclasses.replace(
                setup, quantization=None, vector_length=length, ring_bits=bits
            )
        registry = self._registry(tx, rnd.federation_id, rnd.cohort)
        with self._lock:
            server = SecAggServer(setup, registry)
            self._machines[rnd.federation_id, rnd.number] = _Machine(server)
        return setup

    def receive(
        self, tx: Transaction, rnd: RoundRecord, message: StageMessage, now: float
    ) -> Verdict:
        """Give a client's message to the round's server; log it if it changed the server.

        Raises:
            RoundStateError: the round is at another stage.
        """
        sender, stage, data = message.sender, message.stage, message.data
        with self._synced(tx, rnd) as machine:
            if machine.server.stage is not stage:
                raise RoundStateError(
                    f"round {rnd.number} is at the {machine.server.stage or 'end'} stage, "
                    f"not {stage}"
                )
            try:
                verdict = machine.server.receive(sender, data)
                if verdict.excluded or (verdict.accepted and not verdict.reason):
                    big = stage is Stage.MASKED_INPUT
                    record = SecAggMessageRecord(
                        federation_id=rnd.federation_id,
                        round=rnd.number,
                        seq=machine.applied,
                        stage=stage.value,
                        entry=_entry(verdict),
                        received_at=now,
                        sender=sender,
                        payload=None if big else data,
                        blob=self._blobs.put(data) if big else None,
                        reason=verdict.reason if verdict.excluded else "",
                    )
                    _append(tx, machine, record)
            except BaseException:
                # The server may hold what the log does not: rebuild it next time.
                self.forget(rnd.federation_id, rnd.number)
                raise
            return verdict

    def settle(
        self, tx: Transaction, rnd: RoundRecord, *, expired: bool, now: float
    ) -> tuple[Settling, str | SecAggResult | None]:
        """Close the open stage if everyone answered or its deadline passed.

        Returns:
            What happened, with the failure's reason (FAILED) or the
            round's unmasked sum (DONE).
        """
        with self._synced(tx, rnd) as machine:
            server = machine.server
            if server.stage is None:
                return self._ended(server)
            if server.pending and not expired:
                return Settling.KEEP_OPEN, None
            try:
                closing = server.stage
                machine.outcome = server.close_stage()
                record = SecAggMessageRecord(
                    federation_id=rnd.federation_id,
                    round=rnd.number,
                    seq=machine.applied,
                    stage=closing.value,
                    entry=SecAggEntry.CLOSE,
                    received_at=now,
                )
                _append(tx, machine, record)
            except BaseException:
                self.forget(rnd.federation_id, rnd.number)
                raise
            outcome = machine.outcome
            _log.info(
                "secure aggregation %s round %d: closed %s; dropped %d, excluded %d so far",
                rnd.federation_id, rnd.number, closing, len(outcome.dropped),
                len(server.excluded),
            )  # fmt: skip
            if server.stage is None:
                return self._ended(server)
            return Settling.NEXT_STAGE, None

    def open_stage(self, tx: Transaction, rnd: RoundRecord, client_id: str) -> Stage | None:
        """Return the stage `client_id` must answer now, or None (nothing to do)."""
        with self._synced(tx, rnd) as machine:
            server = machine.server
            return server.stage if client_id in server.pending else None

    def outbox(
        self,
        tx: Transaction,
        rnd: RoundRecord,
        client_id: str,
        stage: Stage,
        noise: DistributedNoise | None = None,
    ) -> bytes | None:
        """Return the message that opens `stage` for `client_id`, or None if not yet.

        `noise` goes into the opening (advertise-keys) of a distributed DP round.

        Raises:
            RoundStateError: the stage is over, or the client takes no part in it.
        """
        if client_id not in rnd.cohort:
            raise RoundStateError(f"this client was not selected for round {rnd.number}")
        if stage is Stage.ADVERTISE_KEYS:
            return self._opening(tx, rnd, noise)
        with self._synced(tx, rnd) as machine:
            current = machine.server.stage
            if current is not None and _ORDER.index(current) < _ORDER.index(stage):
                return None
            outcome = machine.outcome
            if current is not stage or outcome is None or client_id not in outcome.outbox:
                raise RoundStateError(
                    f"this client takes no part in the {stage} stage of round {rnd.number}: "
                    f"{_absence(machine.server, client_id)}"
                )
            return outcome.outbox[client_id].to_bytes()

    def forget(self, federation_id: str, number: int | None = None) -> None:
        """Drop a round's server from memory (it ended, or must be rebuilt).

        Without `number`, every round server of the federation: a write
        transaction that failed may have changed any of them, and the next
        call rebuilds them from the log.
        """
        self.release(federation_id, lambda n: number is None or n == number)

    def _ended(self, server: SecAggServer) -> tuple[Settling, str | SecAggResult | None]:
        if server.failure is not None:
            return Settling.FAILED, f"secure aggregation failed: {server.failure}"
        return Settling.DONE, server.result()

    def _opening(self, tx: Transaction, rnd: RoundRecord, noise: DistributedNoise | None) -> bytes:
        if rnd.secagg_setup is None:
            raise RoundStateError(f"round {rnd.number} does not use secure aggregation")
        key = (rnd.federation_id, rnd.number)
        with self._lock:
            cached = self._openings.get(key)
        if cached is not None:
            return cached
        registry = self._registry(tx, rnd.federation_id, rnd.cohort)
        opening = (
            SecAggSetup(
                setup=rnd.secagg_setup,
                registry={c: k.hex() for c, k in registry.items()},
                distributed_dp=noise,
            )
            .model_dump_json()
            .encode()
        )
        with self._lock:
            self._openings[key] = opening
        return opening

    @contextmanager
    def _synced(self, tx: Transaction, rnd: RoundRecord) -> Iterator[_Machine]:
        """Hold the lock on the round's server, with every entry of the log `tx` sees applied.

        Only the entries the server lacks are read: a round's log grows by a
        message per client and stage, and every client polls. They are read
        before the lock is taken, so that a writing transaction holds the
        database's lock first and threads take the two in one order; if the
        server was rebuilt in between, they are read again from its start.
        """
        key = (rnd.federation_id, rnd.number)
        while True:
            known = self._machines.get(key)
            since = 0 if known is None else known.applied
            log = tx.list_secagg_messages(rnd.federation_id, rnd.number, since=since)
            with self._lock:
                machine = self._machines.get(key) or self._new_machine(tx, rnd)
                if machine.applied >= since:
                    for record in log[machine.applied - since :]:
                        self._replay(machine, record)
                    yield machine
                    return

    def _new_machine(self, tx: Transaction, rnd: RoundRecord) -> _Machine:
        if rnd.secagg_setup is None:
            raise RoundStateError(f"round {rnd.number} does not use secure aggregation")
        setup = RoundSetup.from_bytes(rnd.secagg_setup)
        registry = self._registry(tx, rnd.federation_id, setup.cohort)
        machine = self._machines[rnd.federation_id, rnd.number] = _Machine(
            SecAggServer(setup, registry)
        )
        return machine

    def release(self, federation_id: str, ended: Callable[[int], bool]) -> None:
        """Drop the federation's round servers and openings of the rounds that `ended`.

        The worker that ends a round drops them then (`forget`); another
        worker of the same database holds its copies, cohort-sized, until
        its check-ins show the round ended (`RoundEngine.release`).
        """
        with self._lock:
            for cache in (self._machines, self._openings):
                for key in [k for k in cache if k[0] == federation_id and ended(k[1])]:
                    del cache[key]

    def held(self) -> list[tuple[str, int]]:
        """Return the (federation, round) of every round server this process holds."""
        with self._lock:
            return list(self._machines)

    def _replay(self, machine: _Machine, record: SecAggMessageRecord) -> None:
        if record.entry is SecAggEntry.CLOSE:
            machine.outcome = machine.server.close_stage()
        else:
            machine.server.receive(str(record.sender), self._payload(record))
        machine.applied += 1

    def _payload(self, record: SecAggMessageRecord) -> bytes:
        if record.payload is not None:
            return record.payload
        with self._blobs.open(str(record.blob)) as stream:
            return stream.read()

    @staticmethod
    def _registry(tx: Transaction, federation_id: str, cohort: Sequence[str]) -> dict[str, bytes]:
        members = set(cohort)
        return {
            c.id: c.identity_key
            for c in tx.list_clients(federation_id)
            if c.id in members and c.identity_key is not None
        }


def _append(tx: Transaction, machine: _Machine, record: SecAggMessageRecord) -> None:
    tx.add_secagg_message(record)
    machine.applied += 1


def _entry(verdict: Verdict) -> SecAggEntry:
    return SecAggEntry.EXCLUDED if verdict.excluded else SecAggEntry.ACCEPTED


def _absence(server: SecAggServer, client_id: str) -> str:
    if client_id in server.excluded:
        return f"it was excluded: {server.excluded[client_id]}"
    if client_id in server.dropped:
        return f"it sent nothing in the {server.dropped[client_id]} stage"
    if server.failure is not None:
        return f"the round failed: {server.failure}"
    return "the stage is over"
