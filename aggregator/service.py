"""The aggregator service core: federations, rounds and updates, without HTTP.

`Aggregator` is what the REST API and the in-process transport call. It keeps
all state in a `Store` and a `BlobStore`, so a restarted process (or a second
worker on the same database) picks up exactly where the last one stopped:
every transition of a federation runs in one transaction holding the
federation's lock, and an update is acknowledged only after its blob is
fsynced and its row committed.

The round transitions themselves live in `aggregator.engine`.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

from aggregator.access import Access, client_of
from aggregator.blobs import BlobStore, StagedBlob
from aggregator.config import FederationSettings, resolve_settings
from aggregator.engine import (
    ENDED,
    OPEN_STAGES,
    RoundEngine,
    current_round,
    federation_of,
    locked_federation,
)
from aggregator.privacy import (
    PrivacyReport,
    check_population,
    enrolled_clients,
    privacy_report,
)
from aggregator.records import (
    ClientRecord,
    FederationRecord,
    FederationStatus,
    ModelRecord,
    RoundRecord,
    RoundStatus,
    UpdateRecord,
)
from aggregator.secagg import StageMessage, parse_stage
from aggregator.store import Store, Transaction
from fedcore import (
    UPDATE_META_KEY,
    DpSgdSettings,
    FedcoreError,
    FederationConfig,
    FederationStateError,
    NotFound,
    ParameterSet,
    Receipt,
    RoundStateError,
    Task,
    TaskAction,
    TensorSpec,
    TrainConfig,
    UpdateConflict,
    UpdateMeta,
    WireFormatError,
    wire,
)
from privacy.dp import AccountantKind, DpMode
from privacy.secagg import Stage

__all__ = ["Aggregator", "Submission"]

# Check-ins refresh `last_seen` at most this often, to spare the database.
_TOUCH_EVERY_S = 5.0
# Shared tasks kept, two or three per federation.
_CACHED_TASKS = 256
# Blobs younger than this are never collected as orphans: an upload's row is
# committed within a request's time of its blob.
ORPHAN_GRACE_S = 3600.0

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Submission:
    """What became of a submitted update: its receipt, and whether it was stored before.

    `repeated` is true for an identical re-upload, answered with the
    original receipt (HTTP 200 rather than 201).
    """

    receipt: Receipt
    repeated: bool


class Aggregator:
    """Runs federations: rounds, client check-ins, uploads and aggregation."""

    def __init__(
        self, store: Store, blobs: BlobStore, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.access = Access(store, clock)
        self._clock = clock
        self._changed = threading.Condition()
        self._generation = 0
        self._engine = RoundEngine(blobs)
        self._tasks: dict[tuple[str, TaskAction], Task] = {}

    # ----------------------------------------------------------- federations

    def create_federation(self, config: FederationConfig, model: StagedBlob) -> FederationRecord:
        """Create a federation from its config and a staged initial model.

        A `FederationSettings` with `dp` is checked and its noise multiplier
        calibrated here (see `aggregator.config.resolve_settings`).

        Raises:
            ConfigError: the DP settings are invalid, listing every problem.
            WireFormatError: the model is not valid safetensors.
            NonFiniteUpdate: the model holds NaN or Inf.
        """
        try:
            config = resolve_settings(config)
            params, _ = model.load()
            wire.check_finite(params)
            version = model.commit()
        finally:
            model.discard()
        if config.seed is None:
            config = config.model_copy(update={"seed": secrets.randbits(63)})
        now = self._clock()
        record = FederationRecord(
            id=f"f_{secrets.token_hex(8)}",
            name=config.name,
            config_json=config.model_dump_json(),
            status=FederationStatus.CREATED,
            model_version=version,
            current_round=0,
            created_at=now,
        )
        with self.store.transaction() as tx:
            tx.add_federation(record)
            tx.add_model(ModelRecord(record.id, version, 0, model.size, now))
        return record

    def get_federation(self, federation_id: str) -> FederationRecord:
        """Return a federation.

        Raises:
            NotFound: no federation has this id.
        """
        with self.store.read() as tx:
            return federation_of(tx, federation_id)

    def list_federations(self) -> Sequence[FederationRecord]:
        """Return every federation, oldest first."""
        with self.store.read() as tx:
            return tx.list_federations()

    def config(self, federation_id: str) -> FederationSettings:
        """Return a federation's validated configuration.

        Raises:
            NotFound: unknown federation.
        """
        # Fixed at creation: once parsed, it needs no database read.
        cached = self._engine.cached_config(federation_id)
        if cached is not None:
            return cached
        return self._engine.config_of(self.get_federation(federation_id))

    def start(self, federation_id: str) -> FederationRecord:
        """Start (or resume) a federation's rounds.

        Raises:
            FederationStateError: the federation has already ended.
            ConfigError: a DP federation does not fit its enrolled clients
                (none enrolled, or δ not below 1/N).
        """
        now = self._clock()
        with self._writing(federation_id) as tx:
            fed = locked_federation(tx, federation_id)
            if fed.status in ENDED:
                raise FederationStateError(f"federation {federation_id} has {fed.status}")
            config = self._engine.config_of(fed)
            dp, secure = config.client_level_dp, config.secure_aggregation
            if dp is not None:
                population = len(enrolled_clients(tx, fed.id, secure=secure))
                check_population(dp, population, secure=secure)
            fed = tx.update_federation(federation_id, status=FederationStatus.RUNNING)
            self._restart_deadline(tx, fed, now)
            fed, _ = self._engine.advance(tx, fed, now)
        self._notify()
        return fed

    def pause(self, federation_id: str) -> FederationRecord:
        """Pause a running federation: no new tasks until it is started again."""
        with self.store.transaction() as tx:
            fed = locked_federation(tx, federation_id)
            if fed.status is not FederationStatus.RUNNING:
                raise FederationStateError(f"only a running federation can pause, not {fed.status}")
            fed = tx.update_federation(federation_id, status=FederationStatus.PAUSED)
        self._notify()
        return fed

    def stop(self, federation_id: str) -> FederationRecord:
        """Stop a federation for good; an open round fails."""
        now = self._clock()
        with self.store.transaction() as tx:
            fed = locked_federation(tx, federation_id)
            if fed.status in ENDED:
                return fed
            rnd = current_round(tx, fed)
            if rnd is not None and rnd.status in OPEN_STAGES:
                tx.update_round(
                    fed.id, rnd.number, status=RoundStatus.FAILED, closed_at=now, reason="stopped"
                )
            fed = tx.update_federation(federation_id, status=FederationStatus.STOPPED)
        self._notify()
        return fed

    def list_rounds(self, federation_id: str) -> Sequence[RoundRecord]:
        """Return a federation's rounds in order."""
        with self.store.read() as tx:
            federation_of(tx, federation_id)
            return tx.list_rounds(federation_id)

    def count_rounds(self, federation_id: str, status: RoundStatus) -> int:
        """Return how many of a federation's rounds have `status` (a count, not the rows).

        Raises:
            NotFound: unknown federation.
        """
        with self.store.read() as tx:
            federation_of(tx, federation_id)
            return tx.count_rounds(federation_id, status)

    def get_round(self, federation_id: str, number: int) -> RoundRecord:
        """Return one round.

        Raises:
            NotFound: unknown federation or round.
        """
        with self.store.read() as tx:
            federation_of(tx, federation_id)
            rnd = tx.get_round(federation_id, number)
        if rnd is None:
            raise NotFound(f"federation {federation_id} has no round {number}")
        return rnd

    def privacy(self, federation_id: str) -> PrivacyReport:
        """Return a federation's privacy: settings, ε spent (from the stored events), ε per round.

        Raises:
            NotFound: unknown federation.
        """
        with self.store.read() as tx:
            fed = federation_of(tx, federation_id)
            rounds = tx.list_rounds(federation_id)
        return privacy_report(fed, self._engine.config_of(fed).dp, rounds)

    def list_clients(self, federation_id: str) -> Sequence[ClientRecord]:
        """Return a federation's enrolled clients."""
        with self.store.read() as tx:
            federation_of(tx, federation_id)
            return tx.list_clients(federation_id)

    def list_models(self, federation_id: str) -> Sequence[ModelRecord]:
        """Return a federation's model versions, oldest first."""
        with self.store.read() as tx:
            federation_of(tx, federation_id)
            return tx.list_models(federation_id)

    def open_model(self, federation_id: str, version: str) -> IO[bytes]:
        """Open a model version's safetensors bytes for streaming.

        Raises:
            NotFound: unknown federation or version.
        """
        self._model_record(federation_id, version)
        return self.blobs.open(version)

    def load_model(self, federation_id: str, version: str) -> ParameterSet:
        """Return a model version's parameters (cached, read-only)."""
        self._model_record(federation_id, version)
        return self._engine.model(version)

    # ----------------------------------------------------------- client side

    def next_task(self, client_id: str, federation_id: str) -> Task:
        """Check a client in and tell it what to do next.

        Raises:
            AuthError: the client is unknown or revoked.
            Forbidden: the client belongs to another federation.
            NotFound: unknown federation.
        """
        now = self._clock()
        with self.store.read() as tx:
            client = client_of(tx, client_id, federation_id)
            fed = federation_of(tx, federation_id)
            rnd = current_round(tx, fed)
            submitted: bool | None = _submitted(tx, rnd, client_id)
        self._engine.release(fed.id, rnd)
        if client.last_seen < now - _TOUCH_EVERY_S:
            # Written at most every `_TOUCH_EVERY_S`: most check-ins only read.
            with self.store.transaction() as tx:
                tx.update_client(client_id, last_seen=now)
        if rnd is not None and rnd.status is RoundStatus.SELECTING:
            self._engine.note_present(fed.id, rnd.number, client_id)
        if self._engine.due(fed, rnd, now):
            fed, rnd = self._transition(federation_id, now)
            submitted = None
        return self._task(fed, rnd, client_id, submitted)

    @property
    def generation(self) -> int:
        """A counter that grows at every transition this process applies.

        Async callers (long-polling HTTP routes) watch it instead of blocking a
        thread in `wait_for_change`.
        """
        return self._generation

    def wait_for_change(self, timeout: float) -> None:
        """Block until some round transition happens in this process, or `timeout`."""
        with self._changed:
            self._changed.wait(timeout)

    def submit_update(
        self, client_id: str, federation_id: str, round_number: int, staged: StagedBlob
    ) -> Submission:
        """Validate, persist and fold a client's update, then acknowledge it.

        The same content sent twice returns the original receipt (marked
        `repeated`); different content for a round already answered is refused.

        Raises:
            RoundStateError: the round is closed, failed, not yet open, or the
                client is not in its cohort.
            UpdateConflict: a different update is already stored.
            WireFormatError, TensorMismatch, NonFiniteUpdate: a bad payload.
        """
        return self._submit(client_id, federation_id, round_number, staged, None)

    def submit_decoded(
        self,
        client_id: str,
        federation_id: str,
        round_number: int,
        staged: StagedBlob,
        decoded: tuple[ParameterSet, Mapping[str, str]],
    ) -> Submission:
        """Like `submit_update`, for staged bytes whose content the caller also holds decoded.

        For the in-process transport, which encodes the update itself
        (`fedcore.wire.encode_views`): parsing back the bytes it just wrote
        would only repeat its work. The rest is as for an upload: the
        metadata is parsed, the tensors are checked (names, shapes, dtypes,
        finiteness), the staged bytes are stored under their digest, and the
        tensors are folded.

        Args:
            client_id: the submitting client.
            federation_id: its federation.
            round_number: the round the update is for.
            staged: the update's safetensors bytes, fully written.
            decoded: the tensors and string metadata those bytes encode, as
                `fedcore.wire.decode` would return them; the caller
                guarantees that they are.

        Raises:
            RoundStateError, UpdateConflict: as `submit_update`.
            WireFormatError, TensorMismatch, NonFiniteUpdate: a bad update.
        """
        return self._submit(client_id, federation_id, round_number, staged, decoded)

    def _submit(
        self,
        client_id: str,
        federation_id: str,
        round_number: int,
        staged: StagedBlob,
        decoded: tuple[ParameterSet, Mapping[str, str]] | None,
    ) -> Submission:
        try:
            existing, rnd = self._check_upload(client_id, federation_id, round_number)
            if existing is not None:
                stored = _same_or_conflict(existing, staged.digest)
                return Submission(_receipt(stored), repeated=True)
            params, metadata = staged.load() if decoded is None else decoded
            meta = _update_meta(metadata)
            _check_tensors(params, self._engine.spec(rnd.model_version))
            existed = self.blobs.exists(staged.digest)
            digest = staged.commit()
        finally:
            staged.discard()
        record = UpdateRecord(
            federation_id, round_number, client_id, digest, meta.num_examples, self._clock(),
            dict(meta.metrics),
        )  # fmt: skip
        try:
            stored, repeated = self._record_update(record, params)
        except Exception:
            if not existed:
                self.blobs.delete(digest)
            raise
        return Submission(_receipt(stored), repeated=repeated)

    def fetch_secagg(
        self, client_id: str, federation_id: str, round_number: int, stage: str
    ) -> bytes | None:
        """Return the server message that opens `stage` of a secure round for a client.

        For `advertise-keys`: the round's setup and the cohort's identity keys
        (`fedcore.SecAggSetup` as JSON); for later stages, the encoded
        `privacy.secagg` message. None while the stage is not open yet.

        Raises:
            NotFound: unknown federation, round or stage name.
            RoundStateError: the round is not secure or not running, or the
                client takes no part in the stage (dropped, excluded, or the
                stage is over).
        """
        step = parse_stage(stage)
        with self.store.transaction() as tx:
            rnd = self._secure_round(tx, client_id, federation_id, round_number)
            noise = None
            if step is Stage.ADVERTISE_KEYS:
                fed = tx.get_federation(federation_id)
                noise = None if fed is None else self._engine.round_noise(fed, rnd)
            return self._engine.secure.outbox(tx, rnd, client_id, step, noise)

    def send_secagg(
        self, client_id: str, federation_id: str, round_number: int, stage: str, data: bytes
    ) -> None:
        """Take a client's message for `stage` of a secure round, durably, then acknowledge.

        The same message sent twice is taken once. A message the protocol
        refuses excludes its sender from the round (logged with the reason).

        Raises:
            NotFound: unknown federation, round or stage name.
            RoundStateError: the round is not at `stage`, or the message was
                refused (the reason says why); the refusal itself is durable.
        """
        message = StageMessage(client_id, parse_stage(stage), bytes(data))
        now = self._clock()
        moved = False
        with self._writing(federation_id) as tx:
            fed = locked_federation(tx, federation_id)
            rnd = self._secure_round(tx, client_id, federation_id, round_number)
            verdict = self._engine.secure.receive(tx, rnd, message, now)
            if fed.status is FederationStatus.RUNNING:
                _, moved = self._engine.advance(tx, fed, now)
        if moved:
            # Only a transition changes what a waiting check-in is told;
            # waking all of them for every message would have each of N
            # clients check in again N times per stage.
            self._notify()
        if not verdict.accepted:
            raise RoundStateError(f"the {stage} message was refused: {verdict.reason}")

    def tick(self) -> None:
        """Apply due transitions of every running federation (deadlines)."""
        now = self._clock()
        for fed in self.list_federations():
            if fed.status is FederationStatus.RUNNING:
                with self.store.read() as tx:
                    rnd = current_round(tx, fed)
                if self._engine.due(fed, rnd, now, deadlines_only=True):
                    self._transition(fed.id, now)

    def collect_orphans(self, *, grace_s: float = ORPHAN_GRACE_S) -> list[str]:
        """Delete the blobs no row refers to that are older than `grace_s`; return their digests.

        A blob is written and fsynced before the row that refers to it is
        committed, so a crash between the two leaves a blob nothing refers
        to. The grace period spares the blobs of uploads still in flight in
        another worker (their row follows within a request's time).
        """
        # The digests are listed before the references are read: a blob
        # written after that listing is not a candidate, one committed after
        # it is found among the references.
        candidates = self.blobs.digests(older_than=time.time() - grace_s)
        if not candidates:
            return []
        referenced: set[str] = set()
        with self.store.read() as tx:
            for fed in tx.list_federations():
                referenced.update(m.version for m in tx.list_models(fed.id))
                for rnd in tx.list_rounds(fed.id):
                    referenced.update(u.sha256 for u in tx.list_updates(fed.id, rnd.number))
                    referenced.update(
                        str(m.blob)
                        for m in tx.list_secagg_messages(fed.id, rnd.number)
                        if m.blob is not None
                    )
        orphans = [d for d in candidates if d not in referenced]
        for digest in orphans:
            self.blobs.delete(digest)
        if orphans:
            logger.info("deleted %d blobs that no row refers to", len(orphans))
        return orphans

    # ------------------------------------------------------------- internals

    def _check_upload(
        self, client_id: str, federation_id: str, number: int
    ) -> tuple[UpdateRecord | None, RoundRecord]:
        with self.store.read() as tx:
            client_of(tx, client_id, federation_id)
            fed = federation_of(tx, federation_id)
            rnd = tx.get_round(federation_id, number)
            existing = tx.get_update(federation_id, number, client_id)
        if rnd is None:
            raise RoundStateError(f"round {number} is not open yet (current: {fed.current_round})")
        if existing is None:
            _check_accepting(rnd, client_id)
        return existing, rnd

    def _record_update(
        self, record: UpdateRecord, params: ParameterSet
    ) -> tuple[UpdateRecord, bool]:
        """Store `record` and fold `params`.

        Returns:
            The stored record, and whether it was stored before (an identical
            re-upload that raced this one past `_check_upload`).
        """
        fid, number = record.federation_id, record.round
        now = self._clock()
        with self.store.transaction() as tx:
            fed = locked_federation(tx, fid)
            rnd = tx.get_round(fid, number)
            existing = tx.get_update(fid, number, record.client_id)
            if existing is not None:
                return _same_or_conflict(existing, record.sha256), True
            if rnd is None:
                raise RoundStateError(f"round {number} is not open yet")
            _check_accepting(rnd, record.client_id)
            tx.add_update(record)
            moved = False
            if fed.status is FederationStatus.RUNNING:
                _, moved = self._engine.advance(tx, fed, now)
        self._engine.fold(record, params)
        if moved:
            # The upload closed the round and opened the next one: wake
            # long-polling check-ins now rather than at their next recheck.
            self._notify()
        return record, False

    def _transition(
        self, federation_id: str, now: float
    ) -> tuple[FederationRecord, RoundRecord | None]:
        with self._writing(federation_id) as tx:
            fed, moved = self._engine.advance(tx, locked_federation(tx, federation_id), now)
            rnd = current_round(tx, fed)
        if moved:
            self._notify()
        return fed, rnd

    def _secure_round(
        self, tx: Transaction, client_id: str, federation_id: str, number: int
    ) -> RoundRecord:
        client_of(tx, client_id, federation_id)
        rnd = tx.get_round(federation_id, number)
        if rnd is None:
            raise NotFound(f"federation {federation_id[:80]!r} has no round {number}")
        if rnd.secagg_setup is None:
            raise RoundStateError(f"round {number} does not use secure aggregation")
        if rnd.status is not RoundStatus.TRAINING:
            raise RoundStateError(f"round {number} has {rnd.status}; its stages are over")
        return rnd

    def _restart_deadline(self, tx: Transaction, fed: FederationRecord, now: float) -> None:
        rnd = current_round(tx, fed)
        if rnd is None or rnd.status not in OPEN_STAGES:
            return
        config = self._engine.config_of(fed)
        span = config.checkin_wait_s if rnd.status is RoundStatus.SELECTING else None
        deadline = now + (span if span is not None else config.round_timeout_s)
        tx.update_round(fed.id, rnd.number, deadline=max(rnd.deadline, deadline))

    def _task(
        self,
        fed: FederationRecord,
        rnd: RoundRecord | None,
        client_id: str,
        submitted: bool | None,
    ) -> Task:
        """Return a client's task in `rnd`.

        `submitted` says whether the client's update for a plain `rnd` is
        stored, when the caller read it with `rnd`; None to read it here.
        """
        if fed.status in ENDED:
            return self._shared_task(fed, TaskAction.FINISHED)
        wait = self._shared_task(fed, TaskAction.WAIT)
        if fed.status is not FederationStatus.RUNNING or rnd is None:
            return wait
        if rnd.status is not RoundStatus.TRAINING or client_id not in rnd.cohort:
            return wait
        if rnd.secagg_setup is None:
            if submitted is None:
                with self.store.read() as tx:
                    submitted = _submitted(tx, rnd, client_id)
            return wait if submitted else self._shared_task(fed, TaskAction.TRAIN, rnd)
        with self.store.transaction() as tx:
            stage = self._engine.secure.open_stage(tx, rnd, client_id)
        return wait if stage is None else self._secure_task(fed, rnd, stage)

    def _secure_task(self, fed: FederationRecord, rnd: RoundRecord, stage: Stage) -> Task:
        return Task(
            action=TaskAction.TRAIN,
            federation_id=fed.id,
            round=rnd.number,
            model_version=rnd.model_version,
            train=_train_config(self._engine.config_of(fed)),
            secure=True,
            stage=stage.value,
        )

    def _shared_task(
        self, fed: FederationRecord, action: TaskAction, rnd: RoundRecord | None = None
    ) -> Task:
        """Return the task every asking client of `fed` gets now: finish, wait, or train `rnd`.

        Tasks are immutable, so one object serves every check-in until the
        round moves on: validating two new ones per check-in (the wait task
        was built for training clients too) took about a third of it.
        """
        key = (fed.id, action)
        task = self._tasks.get(key)
        shown = None if rnd is None else (rnd.number, rnd.model_version)
        if task is not None and (shown is None or shown == (task.round, task.model_version)):
            return task
        if rnd is None:
            task = Task(action=action, federation_id=fed.id, retry_after_s=1.0)
        else:
            train = _train_config(self._engine.config_of(fed))
            task = Task(
                action=action,
                federation_id=fed.id,
                round=rnd.number,
                model_version=rnd.model_version,
                train=train,
            )
        if len(self._tasks) >= _CACHED_TASKS:
            self._tasks.clear()
        self._tasks[key] = task
        return task

    def _model_record(self, federation_id: str, version: str) -> ModelRecord:
        with self.store.read() as tx:
            federation_of(tx, federation_id)
            record = tx.get_model(federation_id, version)
        if record is None:
            raise NotFound(f"federation {federation_id} has no model version {version[:80]!r}")
        return record

    @contextmanager
    def _writing(self, federation_id: str) -> Iterator[Transaction]:
        """Open a write transaction that may move `federation_id`'s secure rounds.

        Their servers take messages and close stages in memory as the
        transaction logs them; if it fails, the servers are dropped, to be
        rebuilt from the log as it is. Not for the errors raised on purpose
        (a late or misdirected message, an unknown round): those come before
        any server changed, and a rebuild replays the whole log.
        """
        try:
            with self.store.transaction() as tx:
                yield tx
        except FedcoreError:
            raise
        except BaseException:
            self._engine.secure.forget(federation_id)
            raise

    def _notify(self) -> None:
        with self._changed:
            self._generation += 1
            self._changed.notify_all()


def _train_config(config: FederationSettings) -> TrainConfig:
    """Return the clients' training settings, with DP-SGD's in local DP mode."""
    dp = config.dp
    if dp is None or dp.mode is not DpMode.LOCAL:
        return config.train
    dpsgd = DpSgdSettings(
        max_grad_norm=dp.clip_norm,
        noise_multiplier=dp.noise_multiplier,
        target_epsilon=dp.epsilon,
        delta=dp.delta,
        rounds=dp.rounds,
        # Opacus has no PLD accountant; its PRV one (Gopi et al. 2021) is the
        # same kind of tight numerical composition.
        accountant="prv" if dp.accountant is AccountantKind.PLD else "rdp",
        seed=dp.noise_seed,
    )
    return config.train.model_copy(update={"dpsgd": dpsgd})


def _check_accepting(rnd: RoundRecord, client_id: str) -> None:
    if rnd.status in (RoundStatus.CLOSED, RoundStatus.FAILED):
        raise RoundStateError(f"round {rnd.number} has {rnd.status}; no more updates")
    if rnd.status is not RoundStatus.TRAINING:
        raise RoundStateError(f"round {rnd.number} is still selecting its cohort")
    if client_id not in rnd.cohort:
        raise RoundStateError(f"this client was not selected for round {rnd.number}")
    if rnd.secagg_setup is not None:
        raise RoundStateError(
            f"round {rnd.number} uses secure aggregation: send the masked input, "
            "not the update (Transport.send_secagg)"
        )


def _same_or_conflict(existing: UpdateRecord, digest: str) -> UpdateRecord:
    if existing.sha256 != digest:
        raise UpdateConflict(
            f"a different update for round {existing.round} is already stored; "
            "an update cannot be replaced"
        )
    return existing


def _update_meta(metadata: Mapping[str, str]) -> UpdateMeta:
    """Parse the `UpdateMeta` an update's safetensors metadata carries."""
    raw = metadata.get(UPDATE_META_KEY)
    if raw is None:
        raise WireFormatError(f"update metadata lacks the {UPDATE_META_KEY!r} entry")
    try:
        meta = UpdateMeta.model_validate_json(raw)
    except ValueError as exc:
        raise WireFormatError(f"update metadata {UPDATE_META_KEY!r} is invalid: {exc}") from None
    return meta


def _check_tensors(params: ParameterSet, spec: dict[str, TensorSpec]) -> None:
    """Check an update's names, shapes and dtypes against the model, and that it is finite."""
    wire.conform(params, spec)
    wire.check_finite(params)


def _submitted(tx: Transaction, rnd: RoundRecord | None, client_id: str) -> bool:
    """Whether `client_id` has an update stored for a plain `rnd` it trains in."""
    if rnd is None or rnd.secagg_setup is not None or rnd.status is not RoundStatus.TRAINING:
        return False
    if client_id not in rnd.cohort:
        return False
    return tx.get_update(rnd.federation_id, rnd.number, client_id) is not None


def _receipt(record: UpdateRecord) -> Receipt:
    return Receipt(
        federation_id=record.federation_id,
        round=record.round,
        client_id=record.client_id,
        sha256=record.sha256,
        num_examples=record.num_examples,
    )
