"""The aggregator service core: federations, rounds and updates, without HTTP.

`Aggregator` is what the REST API and the in-process transport call. It keeps
all state in a `Store` and a `BlobStore`, so a restarted process (or a second
worker on the same database) picks up exactly where the last one stopped:
every transition of a federation runs in one transaction holding the
federation's lock, and an update is acknowledged only after its blob is
fsynced and its row committed.

The running aggregate of a round lives in memory as an optimization only.
When a round closes, whatever the committed rows hold but the memory aggregate
lacks (after a restart: everything) is folded from the blobs, so the result
never depends on which process saw which upload.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO

from aggregator.access import Access, client_of
from aggregator.blobs import BlobStore, StagedBlob
from aggregator.config import FederationSettings, resolve_settings
from aggregator.privacy import (
    PrivacyReport,
    budget_allows,
    check_population,
    close_private,
    enrolled_clients,
    privacy_report,
    release_round,
    select_private,
)
from aggregator.records import (
    ClientRecord,
    FederationRecord,
    FederationStatus,
    ModelRecord,
    RoundPrivacy,
    RoundRecord,
    RoundStatus,
    UpdateRecord,
)
from aggregator.rounds import (
    Closing,
    RoundProgress,
    close_decision,
    sample_cohort,
    selection_target,
)
from aggregator.store import Store, Transaction
from fedcore import (
    UPDATE_META_KEY,
    FedAvg,
    FederationConfig,
    FederationStateError,
    NotFound,
    ParameterSet,
    Receipt,
    RoundStateError,
    Task,
    TaskAction,
    TensorSpec,
    UpdateConflict,
    UpdateMeta,
    WeightedMean,
    WireFormatError,
    wire,
)

__all__ = ["PRESENCE_WINDOW_S", "Aggregator"]

# A client that checked in this recently counts as available for sampling.
# It must exceed a client's long-poll interval plus its training time.
PRESENCE_WINDOW_S = 120.0
# Check-ins refresh `last_seen` at most this often, to spare the database.
_TOUCH_EVERY_S = 5.0
_OPEN = (RoundStatus.SELECTING, RoundStatus.TRAINING)
# A federation in one of these states runs no more rounds, ever.
_ENDED = (FederationStatus.FINISHED, FederationStatus.STOPPED, FederationStatus.BUDGET_EXHAUSTED)
# Updates folded together in one pass over the accumulator: `add_many` is
# several times faster per update than one `add` each (bench/aggregate.py).
_FOLD_BATCH = 16
_CACHED_MODELS = 8


@dataclass(slots=True)
class _Running:
    """A round's in-memory aggregate.

    `folded` lists the clients whose updates are in `aggregate`; `pending`
    holds accepted updates (memory-mapped where the blob store allows) that
    wait to be folded together with the next ones.
    """

    aggregate: WeightedMean
    folded: set[str] = field(default_factory=set)
    pending: dict[str, tuple[ParameterSet, float]] = field(default_factory=dict)

    def flush(self) -> None:
        """Fold every pending update."""
        self.aggregate.add_many(self.pending.values())
        self.folded.update(self.pending)
        self.pending.clear()


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
        self._running: dict[tuple[str, int], _Running] = {}
        self._running_lock = threading.Lock()
        self._present: dict[tuple[str, int], set[str]] = {}
        self._models: dict[str, tuple[ParameterSet, dict[str, TensorSpec]]] = {}
        self._configs: dict[str, FederationSettings] = {}

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
        with self.store.transaction() as tx:
            return _federation(tx, federation_id)

    def list_federations(self) -> Sequence[FederationRecord]:
        """Return every federation, oldest first."""
        with self.store.transaction() as tx:
            return tx.list_federations()

    def config(self, federation_id: str) -> FederationSettings:
        """Return a federation's validated configuration."""
        cached = self._configs.get(federation_id)
        return cached if cached is not None else self._config_of(self.get_federation(federation_id))

    def _config_of(self, fed: FederationRecord) -> FederationSettings:
        # Parses the record in hand: called inside a transaction, a fresh read
        # would open a second one, and on SQLite wait for the first one's lock.
        cached = self._configs.get(fed.id)
        if cached is None:
            cached = FederationSettings.model_validate_json(fed.config_json)
            self._configs[fed.id] = cached
        return cached

    def start(self, federation_id: str) -> FederationRecord:
        """Start (or resume) a federation's rounds.

        Raises:
            FederationStateError: the federation has already ended.
            ConfigError: a DP federation does not fit its enrolled clients
                (none enrolled, or δ not below 1/N).
        """
        now = self._clock()
        with self.store.transaction() as tx:
            fed = _locked(tx, federation_id)
            if fed.status in _ENDED:
                raise FederationStateError(f"federation {federation_id} has {fed.status}")
            dp = self._config_of(fed).dp
            if dp is not None:
                check_population(dp, len(enrolled_clients(tx, fed.id)))
            fed = tx.update_federation(federation_id, status=FederationStatus.RUNNING)
            self._restart_deadline(tx, fed, now)
            fed = self._advance(tx, fed, now)
        self._notify()
        return fed

    def pause(self, federation_id: str) -> FederationRecord:
        """Pause a running federation: no new tasks until it is started again."""
        with self.store.transaction() as tx:
            fed = _locked(tx, federation_id)
            if fed.status is not FederationStatus.RUNNING:
                raise FederationStateError(f"only a running federation can pause, not {fed.status}")
            fed = tx.update_federation(federation_id, status=FederationStatus.PAUSED)
        self._notify()
        return fed

    def stop(self, federation_id: str) -> FederationRecord:
        """Stop a federation for good; an open round fails."""
        now = self._clock()
        with self.store.transaction() as tx:
            fed = _locked(tx, federation_id)
            if fed.status in _ENDED:
                return fed
            rnd = _current_round(tx, fed)
            if rnd is not None and rnd.status in _OPEN:
                tx.update_round(
                    fed.id, rnd.number, status=RoundStatus.FAILED, closed_at=now, reason="stopped"
                )
            fed = tx.update_federation(federation_id, status=FederationStatus.STOPPED)
        self._notify()
        return fed

    def list_rounds(self, federation_id: str) -> Sequence[RoundRecord]:
        """Return a federation's rounds in order."""
        with self.store.transaction() as tx:
            _federation(tx, federation_id)
            return tx.list_rounds(federation_id)

    def get_round(self, federation_id: str, number: int) -> RoundRecord:
        """Return one round.

        Raises:
            NotFound: unknown federation or round.
        """
        with self.store.transaction() as tx:
            _federation(tx, federation_id)
            rnd = tx.get_round(federation_id, number)
        if rnd is None:
            raise NotFound(f"federation {federation_id} has no round {number}")
        return rnd

    def privacy(self, federation_id: str) -> PrivacyReport:
        """Return a federation's privacy: settings, ε spent (from the stored events), ε per round.

        Raises:
            NotFound: unknown federation.
        """
        with self.store.transaction() as tx:
            fed = _federation(tx, federation_id)
            rounds = tx.list_rounds(federation_id)
        return privacy_report(fed, self._config_of(fed).dp, rounds)

    def list_clients(self, federation_id: str) -> Sequence[ClientRecord]:
        """Return a federation's enrolled clients."""
        with self.store.transaction() as tx:
            _federation(tx, federation_id)
            return tx.list_clients(federation_id)

    def list_models(self, federation_id: str) -> Sequence[ModelRecord]:
        """Return a federation's model versions, oldest first."""
        with self.store.transaction() as tx:
            _federation(tx, federation_id)
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
        return self._model(version)

    # ----------------------------------------------------------- client side

    def next_task(self, client_id: str, federation_id: str) -> Task:
        """Check a client in and tell it what to do next.

        Raises:
            AuthError: the client is unknown or revoked.
            Forbidden: the client belongs to another federation.
            NotFound: unknown federation.
        """
        now = self._clock()
        with self.store.transaction() as tx:
            client = client_of(tx, client_id, federation_id)
            fed = _federation(tx, federation_id)
            if client.last_seen < now - _TOUCH_EVERY_S:
                tx.update_client(client_id, last_seen=now)
            rnd = _current_round(tx, fed)
        if rnd is not None and rnd.status is RoundStatus.SELECTING:
            self._present.setdefault((fed.id, rnd.number), set()).add(client_id)
        if self._due(fed, rnd, now):
            fed, rnd = self._transition(federation_id, now)
        return self._task(fed, rnd, client_id)

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
    ) -> Receipt:
        """Validate, persist and fold a client's update, then acknowledge it.

        The same content sent twice returns the original receipt; different
        content for a round already answered is refused.

        Raises:
            RoundStateError: the round is closed, failed, not yet open, or the
                client is not in its cohort.
            UpdateConflict: a different update is already stored.
            WireFormatError, TensorMismatch, NonFiniteUpdate: a bad payload.
        """
        try:
            existing, rnd = self._check_upload(client_id, federation_id, round_number)
            if existing is not None:
                return _receipt(_same_or_conflict(existing, staged.digest))
            params, meta = _parse_update(staged, self._spec(rnd.model_version))
            existed = self.blobs.exists(staged.digest)
            digest = staged.commit()
        finally:
            staged.discard()
        record = UpdateRecord(
            federation_id, round_number, client_id, digest, meta.num_examples, self._clock(),
            dict(meta.metrics),
        )  # fmt: skip
        try:
            stored = self._record_update(record, params)
        except Exception:
            if not existed:
                self.blobs.delete(digest)
            raise
        return _receipt(stored)

    def tick(self) -> None:
        """Apply due transitions of every running federation (deadlines)."""
        now = self._clock()
        for fed in self.list_federations():
            if fed.status is FederationStatus.RUNNING:
                with self.store.transaction() as tx:
                    rnd = _current_round(tx, fed)
                if self._due(fed, rnd, now, deadlines_only=True):
                    self._transition(fed.id, now)

    # ------------------------------------------------------------- internals

    def _check_upload(
        self, client_id: str, federation_id: str, number: int
    ) -> tuple[UpdateRecord | None, RoundRecord]:
        with self.store.transaction() as tx:
            client_of(tx, client_id, federation_id)
            fed = _federation(tx, federation_id)
            rnd = tx.get_round(federation_id, number)
            existing = tx.get_update(federation_id, number, client_id)
        if rnd is None:
            raise RoundStateError(f"round {number} is not open yet (current: {fed.current_round})")
        if existing is None:
            _check_accepting(rnd, client_id)
        return existing, rnd

    def _record_update(self, record: UpdateRecord, params: ParameterSet) -> UpdateRecord:
        fid, number = record.federation_id, record.round
        now = self._clock()
        with self.store.transaction() as tx:
            fed = _locked(tx, fid)
            rnd = tx.get_round(fid, number)
            existing = tx.get_update(fid, number, record.client_id)
            if existing is not None:
                return _same_or_conflict(existing, record.sha256)
            if rnd is None:
                raise RoundStateError(f"round {number} is not open yet")
            _check_accepting(rnd, record.client_id)
            tx.add_update(record)
            if fed.status is FederationStatus.RUNNING:
                self._advance(tx, fed, now)
        self._fold(record, params)
        # The upload may have closed the round and opened the next one:
        # wake long-polling check-ins now rather than at their next recheck.
        self._notify()
        return record

    def _fold(self, record: UpdateRecord, params: ParameterSet) -> None:
        with self._running_lock:
            running = self._running.get((record.federation_id, record.round))
            if running is None or record.client_id in running.folded:
                return
            running.pending[record.client_id] = (params, float(record.num_examples))
            if len(running.pending) >= _FOLD_BATCH:
                running.flush()

    def _due(
        self,
        fed: FederationRecord,
        rnd: RoundRecord | None,
        now: float,
        *,
        deadlines_only: bool = False,
    ) -> bool:
        if fed.status is not FederationStatus.RUNNING:
            return False
        if rnd is None or rnd.status not in _OPEN:
            return True
        if now >= rnd.deadline:
            return True
        if deadlines_only or rnd.status is not RoundStatus.SELECTING:
            return False
        # Who checked in this round is only a hint kept by this process; the
        # decision itself reads `last_seen` from the store under the lock.
        present = len(self._present.get((fed.id, rnd.number), ()))
        return present >= self._config_of(fed).min_clients

    def _transition(
        self, federation_id: str, now: float
    ) -> tuple[FederationRecord, RoundRecord | None]:
        with self.store.transaction() as tx:
            fed = self._advance(tx, _locked(tx, federation_id), now)
            rnd = _current_round(tx, fed)
        self._notify()
        return fed, rnd

    def _advance(self, tx: Transaction, fed: FederationRecord, now: float) -> FederationRecord:
        """Apply every transition that is due, under the federation's lock."""
        # Each pass applies one transition; a round can at most close, and the
        # next one open and select its cohort, in one call.
        for _ in range(8):
            if fed.status is not FederationStatus.RUNNING:
                return fed
            rnd = _current_round(tx, fed)
            if rnd is None or rnd.status not in _OPEN:
                fed = self._open_next(tx, fed, now)
                continue
            moved = (
                self._select(tx, fed, rnd, now)
                if rnd.status is RoundStatus.SELECTING
                else self._settle(tx, fed, rnd, now)
            )
            if not moved:
                return fed
            fed = _federation(tx, fed.id)
        return fed

    def _open_next(self, tx: Transaction, fed: FederationRecord, now: float) -> FederationRecord:
        config = self._config_of(fed)
        rounds = tx.list_rounds(fed.id)
        closed = sum(1 for r in rounds if r.status is RoundStatus.CLOSED)
        if closed >= config.rounds:
            return tx.update_federation(fed.id, status=FederationStatus.FINISHED)
        # Before the cohort is sampled: a round that would overshoot never starts.
        if config.dp is not None and not budget_allows(config.dp, rounds):
            return tx.update_federation(fed.id, status=FederationStatus.BUDGET_EXHAUSTED)
        number = fed.current_round + 1
        tx.add_round(
            RoundRecord(
                federation_id=fed.id,
                number=number,
                status=RoundStatus.SELECTING,
                model_version=fed.model_version,
                opened_at=now,
                deadline=now + config.checkin_wait_s,
            )
        )
        return tx.update_federation(fed.id, current_round=number)

    def _select(self, tx: Transaction, fed: FederationRecord, rnd: RoundRecord, now: float) -> bool:
        config = self._config_of(fed)
        if config.dp is not None:
            deadline = now + config.round_timeout_s
            return select_private(tx, rnd, config.dp, deadline=deadline)
        clients = [c for c in tx.list_clients(fed.id) if not c.revoked]
        present = [c.id for c in clients if c.last_seen >= now - PRESENCE_WINDOW_S]
        target = selection_target(config, len(clients))
        expired = now >= rnd.deadline
        if len(present) < target and not (expired and len(present) >= config.min_clients):
            return False
        size = _cohort_size(config, len(present))
        cohort = sample_cohort(present, size, seed=config.seed or 0, round_number=rnd.number)
        tx.update_round(
            fed.id,
            rnd.number,
            status=RoundStatus.TRAINING,
            cohort=cohort,
            deadline=now + config.round_timeout_s,
        )
        self._present.pop((fed.id, rnd.number), None)
        model = self._model(rnd.model_version)
        with self._running_lock:
            self._running[(fed.id, rnd.number)] = _Running(FedAvg().begin(model))
        return True

    def _settle(self, tx: Transaction, fed: FederationRecord, rnd: RoundRecord, now: float) -> bool:
        config = self._config_of(fed)
        received = tx.count_updates(fed.id, rnd.number)
        progress = RoundProgress(received, len(rnd.cohort), now >= rnd.deadline)
        private = config.dp is not None
        decision = close_private(progress) if private else close_decision(config, progress)
        if decision is Closing.KEEP_OPEN:
            return False
        if decision is Closing.FAIL:
            reason = f"{received} updates by the deadline, {config.min_clients} needed"
            tx.update_round(
                fed.id, rnd.number, status=RoundStatus.FAILED, closed_at=now, reason=reason
            )
            self._drop_running(fed.id, rnd.number)
            return True
        self._close(tx, fed, rnd, tx.list_updates(fed.id, rnd.number), now)
        return True

    def _close(
        self,
        tx: Transaction,
        fed: FederationRecord,
        rnd: RoundRecord,
        updates: Sequence[UpdateRecord],
        now: float,
    ) -> None:
        new, changes = self._result(tx, fed, rnd, updates)
        meta = {"fedcore.federation": fed.id, "fedcore.round": str(rnd.number)}
        privacy = changes.get("privacy")
        if isinstance(privacy, RoundPrivacy) and privacy.seeded:
            # Seeded noise gives no privacy: the model file itself says so.
            meta["fedcore.dp_seeded"] = "true"
        data = wire.encode(new, meta)
        version = self.blobs.put(data)
        if tx.get_model(fed.id, version) is None:
            tx.add_model(ModelRecord(fed.id, version, rnd.number, len(data), now))
        tx.update_round(
            fed.id,
            rnd.number,
            status=RoundStatus.CLOSED,
            closed_at=now,
            result_version=version,
            **changes,
        )
        tx.update_federation(fed.id, model_version=version)

    def _result(
        self,
        tx: Transaction,
        fed: FederationRecord,
        rnd: RoundRecord,
        updates: Sequence[UpdateRecord],
    ) -> tuple[ParameterSet, dict[str, object]]:
        """Return the round's next model and the round fields that go with it."""
        config = self._config_of(fed)
        model = self._model(rnd.model_version)
        metrics = _round_metrics(updates)
        if config.dp is None:
            aggregate = self._complete_aggregate(fed.id, rnd.number, model, updates)
            new = FedAvg(server_lr=config.server_lr).finish(model, aggregate)
            return new, {"metrics": metrics}
        # Streamed from the blobs one update at a time: O(P) memory.
        deltas = ((self.blobs.load(u.sha256)[0], float(u.num_examples)) for u in updates)
        release = release_round(config, model, deltas, rnd=rnd, rounds=tx.list_rounds(fed.id))
        metrics["epsilon"] = release.epsilon
        return release.model, {"metrics": metrics, "privacy": release.privacy}

    def _complete_aggregate(
        self, federation_id: str, number: int, model: ParameterSet, updates: Sequence[UpdateRecord]
    ) -> WeightedMean:
        running = self._drop_running(federation_id, number)
        stored = {u.client_id for u in updates}
        if running is None or not running.folded <= stored:
            running = _Running(FedAvg().begin(model))
        running.pending = {c: p for c, p in running.pending.items() if c in stored}
        for update in updates:
            if update.client_id not in running.folded and update.client_id not in running.pending:
                params, _ = self.blobs.load(update.sha256)
                running.pending[update.client_id] = (params, float(update.num_examples))
        running.flush()
        return running.aggregate

    def _drop_running(self, federation_id: str, number: int) -> _Running | None:
        with self._running_lock:
            return self._running.pop((federation_id, number), None)

    def _restart_deadline(self, tx: Transaction, fed: FederationRecord, now: float) -> None:
        rnd = _current_round(tx, fed)
        if rnd is None or rnd.status not in _OPEN:
            return
        config = self._config_of(fed)
        span = config.checkin_wait_s if rnd.status is RoundStatus.SELECTING else None
        deadline = now + (span if span is not None else config.round_timeout_s)
        tx.update_round(fed.id, rnd.number, deadline=max(rnd.deadline, deadline))

    def _task(self, fed: FederationRecord, rnd: RoundRecord | None, client_id: str) -> Task:
        if fed.status in _ENDED:
            return Task(action=TaskAction.FINISHED, federation_id=fed.id)
        wait = Task(action=TaskAction.WAIT, federation_id=fed.id, retry_after_s=1.0)
        if fed.status is not FederationStatus.RUNNING or rnd is None:
            return wait
        if rnd.status is not RoundStatus.TRAINING or client_id not in rnd.cohort:
            return wait
        with self.store.transaction() as tx:
            if tx.get_update(fed.id, rnd.number, client_id) is not None:
                return wait
        return Task(
            action=TaskAction.TRAIN,
            federation_id=fed.id,
            round=rnd.number,
            model_version=rnd.model_version,
            train=self._config_of(fed).train,
        )

    def _model_record(self, federation_id: str, version: str) -> ModelRecord:
        with self.store.transaction() as tx:
            _federation(tx, federation_id)
            record = tx.get_model(federation_id, version)
        if record is None:
            raise NotFound(f"federation {federation_id} has no model version {version[:80]!r}")
        return record

    def _model(self, version: str) -> ParameterSet:
        return self._cached(version)[0]

    def _spec(self, version: str) -> dict[str, TensorSpec]:
        return self._cached(version)[1]

    def _cached(self, version: str) -> tuple[ParameterSet, dict[str, TensorSpec]]:
        entry = self._models.get(version)
        if entry is None:
            params, _ = self.blobs.load(version)
            if len(self._models) >= _CACHED_MODELS:
                self._models.pop(next(iter(self._models)))
            entry = self._models[version] = (params, params.spec())
        return entry

    def _notify(self) -> None:
        with self._changed:
            self._generation += 1
            self._changed.notify_all()


def _cohort_size(config: FederationConfig, present: int) -> int:
    return min(selection_target(config, present), present)


def _federation(tx: Transaction, federation_id: str) -> FederationRecord:
    fed = tx.get_federation(federation_id)
    if fed is None:
        raise NotFound(f"unknown federation {federation_id[:80]!r}")
    return fed


def _locked(tx: Transaction, federation_id: str) -> FederationRecord:
    fed = tx.lock_federation(federation_id)
    if fed is None:
        raise NotFound(f"unknown federation {federation_id[:80]!r}")
    return fed


def _current_round(tx: Transaction, fed: FederationRecord) -> RoundRecord | None:
    return tx.get_round(fed.id, fed.current_round) if fed.current_round else None


def _check_accepting(rnd: RoundRecord, client_id: str) -> None:
    if rnd.status in (RoundStatus.CLOSED, RoundStatus.FAILED):
        raise RoundStateError(f"round {rnd.number} has {rnd.status}; no more updates")
    if rnd.status is not RoundStatus.TRAINING:
        raise RoundStateError(f"round {rnd.number} is still selecting its cohort")
    if client_id not in rnd.cohort:
        raise RoundStateError(f"this client was not selected for round {rnd.number}")


def _same_or_conflict(existing: UpdateRecord, digest: str) -> UpdateRecord:
    if existing.sha256 != digest:
        raise UpdateConflict(
            f"a different update for round {existing.round} is already stored; "
            "an update cannot be replaced"
        )
    return existing


def _parse_update(
    staged: StagedBlob, spec: dict[str, TensorSpec]
) -> tuple[ParameterSet, UpdateMeta]:
    params, metadata = staged.load()
    raw = metadata.get(UPDATE_META_KEY)
    if raw is None:
        raise WireFormatError(f"update metadata lacks the {UPDATE_META_KEY!r} entry")
    try:
        meta = UpdateMeta.model_validate_json(raw)
    except ValueError as exc:
        raise WireFormatError(f"update metadata {UPDATE_META_KEY!r} is invalid: {exc}") from None
    wire.conform(params, spec)
    wire.check_finite(params)
    return params, meta


def _round_metrics(updates: Sequence[UpdateRecord]) -> dict[str, float]:
    total = sum(u.num_examples for u in updates)
    metrics: dict[str, float] = {"clients": float(len(updates)), "examples": float(total)}
    sums: dict[str, float] = {}
    for update in updates:
        for key, value in update.metrics.items():
            sums[key] = sums.get(key, 0.0) + value * update.num_examples
    if total > 0:
        metrics.update({key: value / total for key, value in sums.items()})
    return metrics


def _receipt(record: UpdateRecord) -> Receipt:
    return Receipt(
        federation_id=record.federation_id,
        round=record.round,
        client_id=record.client_id,
        sha256=record.sha256,
        num_examples=record.num_examples,
    )
