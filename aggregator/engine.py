"""The round engine: every transition of a federation's rounds, under its lock.

`RoundEngine.advance` opens rounds, samples cohorts, and closes or fails
rounds, inside the caller's transaction that holds the federation's lock; the
service (`aggregator.service`) calls it from check-ins, uploads and the
ticker. The engine also keeps the process-local caches that make this fast:
parsed configs, models with their specs, and each open round's running
aggregate.

The running aggregate of a round lives in memory as an optimization only.
When a round closes, whatever the committed rows hold but the memory aggregate
lacks (after a restart: everything) is folded from the blobs, so the result
never depends on which process saw which upload.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from aggregator.blobs import BlobStore
from aggregator.config import SECAGG_MIN_CLIENTS, FederationSettings
from aggregator.privacy import (
    budget_allows,
    close_private,
    distributed_noise,
    enrolled_clients,
    next_distributed_event,
    noise_message,
    release_distributed,
    release_round,
    select_private,
)
from aggregator.records import (
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
from aggregator.secagg import SecureRounds, Settling, secure_model
from aggregator.store import Transaction
from fedcore import (
    DistributedNoise,
    FedAvg,
    FederationConfig,
    NotFound,
    ParameterSet,
    RoundStateError,
    TensorSpec,
    WeightedMean,
    wire,
)
from privacy.dp import DpConfig, DpMode, PrivacyEvent
from privacy.secagg import LOSS_VALUES, RoundSetup, SecAggConfig, SecAggResult, loss_of

__all__ = [
    "ENDED",
    "OPEN_STAGES",
    "PRESENCE_WINDOW_S",
    "RoundEngine",
    "current_round",
    "federation_of",
    "locked_federation",
]

# A client that checked in this recently counts as available for sampling.
# It must exceed a client's long-poll interval plus its training time.
PRESENCE_WINDOW_S = 120.0
OPEN_STAGES = (RoundStatus.SELECTING, RoundStatus.TRAINING)
# A federation in one of these states runs no more rounds, ever.
ENDED = (FederationStatus.FINISHED, FederationStatus.STOPPED, FederationStatus.BUDGET_EXHAUSTED)
# Updates folded together in one pass over the accumulator: `add_many` is
# several times faster per update than one `add` each (bench/aggregate.py).
_FOLD_BATCH = 16
_CACHED_MODELS = 8


@dataclass(slots=True)
class _Running:
    """A round's in-memory aggregate.

    `folded` lists the clients whose updates are in `aggregate`; `pending`
    holds accepted updates (large ones memory-mapped, where the blob store
    allows) that wait to be folded together with the next ones.
    """

    aggregate: WeightedMean
    folded: set[str] = field(default_factory=set)
    pending: dict[str, tuple[ParameterSet, float]] = field(default_factory=dict)

    def flush(self) -> None:
        """Fold every pending update."""
        self.aggregate.add_many(self.pending.values())
        self.folded.update(self.pending)
        self.pending.clear()


class RoundEngine:
    """Applies round transitions and keeps the caches they need."""

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs
        self._running: dict[tuple[str, int], _Running] = {}
        self._running_lock = threading.Lock()
        self._present: dict[tuple[str, int], set[str]] = {}
        self._models: dict[str, tuple[ParameterSet, dict[str, TensorSpec]]] = {}
        self._configs: dict[str, FederationSettings] = {}
        self.secure = SecureRounds(blobs)

    def release(self, federation_id: str, current: RoundRecord | None) -> None:
        """Drop what this process keeps for the federation's rounds that ended before `current`.

        The worker that ends a round drops its caches then; with several
        workers on one database the others learn it from the round records
        they read (`current`, the federation's latest round, and whether it
        is still open), and call this: an aggregate kept for a round that
        another worker closed holds 8 bytes per parameter. Later rounds than
        `current` are kept: the record may be older than this process's
        caches.
        """
        if current is None:
            return
        latest, still_open = current.number, current.status in OPEN_STAGES

        def ended(number: int) -> bool:
            return number < latest or (number == latest and not still_open)

        with self._running_lock:
            for key in [k for k in self._running if k[0] == federation_id and ended(k[1])]:
                del self._running[key]
        for key in [k for k in list(self._present) if k[0] == federation_id and ended(k[1])]:
            self._present.pop(key, None)
        self.secure.release(federation_id, ended)

    def aggregating(self) -> list[tuple[str, int]]:
        """Return the (federation, round) of every running aggregate this process keeps."""
        with self._running_lock:
            return list(self._running)

    def note_present(self, federation_id: str, number: int, client_id: str) -> None:
        """Remember that a client checked in while round `number` was selecting."""
        self._present.setdefault((federation_id, number), set()).add(client_id)

    def cached_config(self, federation_id: str) -> FederationSettings | None:
        """Return a federation's parsed configuration if `config_of` parsed it before.

        A configuration is fixed when its federation is created, so the copy
        stays right.
        """
        return self._configs.get(federation_id)

    def config_of(self, fed: FederationRecord) -> FederationSettings:
        """Return the parsed configuration of a federation record (cached)."""
        # Parses the record in hand: called inside a transaction, a fresh read
        # would open a second one, and on SQLite wait for the first one's lock.
        cached = self._configs.get(fed.id)
        if cached is None:
            cached = FederationSettings.model_validate_json(fed.config_json)
            self._configs[fed.id] = cached
        return cached

    def fold(self, record: UpdateRecord, params: ParameterSet) -> None:
        """Add a committed update to its round's running aggregate (in batches)."""
        with self._running_lock:
            running = self._running.get((record.federation_id, record.round))
            if running is None or record.client_id in running.folded:
                return
            running.pending[record.client_id] = (params, float(record.num_examples))
            if len(running.pending) >= _FOLD_BATCH:
                running.flush()

    def due(
        self,
        fed: FederationRecord,
        rnd: RoundRecord | None,
        now: float,
        *,
        deadlines_only: bool = False,
    ) -> bool:
        """Whether a transition of `fed` is due (a hint; `advance` decides under the lock)."""
        if fed.status is not FederationStatus.RUNNING:
            return False
        if rnd is None or rnd.status not in OPEN_STAGES:
            return True
        if now >= rnd.deadline:
            return True
        if deadlines_only or rnd.status is not RoundStatus.SELECTING:
            return False
        # Who checked in this round is only a hint kept by this process; the
        # decision itself reads `last_seen` from the store under the lock.
        present = len(self._present.get((fed.id, rnd.number), ()))
        return present >= self.config_of(fed).min_clients

    def advance(
        self, tx: Transaction, fed: FederationRecord, now: float
    ) -> tuple[FederationRecord, bool]:
        """Apply every transition that is due, under the federation's lock.

        Returns:
            The federation afterwards, and whether any transition was applied
            (callers wake waiting check-ins only then).
        """
        # Each pass applies one transition; a round can at most close, and the
        # next one open and select its cohort, in one call.
        applied = False
        for _ in range(8):
            if fed.status is not FederationStatus.RUNNING:
                return fed, applied
            rnd = current_round(tx, fed)
            if rnd is None or rnd.status not in OPEN_STAGES:
                fed = self._open_next(tx, fed, now)
                applied = True
                continue
            moved = (
                self._select(tx, fed, rnd, now)
                if rnd.status is RoundStatus.SELECTING
                else self._settle(tx, fed, rnd, now)
            )
            if not moved:
                return fed, applied
            applied = True
            fed = federation_of(tx, fed.id)
        return fed, applied

    def _open_next(self, tx: Transaction, fed: FederationRecord, now: float) -> FederationRecord:
        config = self.config_of(fed)
        # A count, not the rounds: their rows (cohorts, metrics) grow with the run.
        if tx.count_rounds(fed.id, RoundStatus.CLOSED) >= config.rounds:
            return tx.update_federation(fed.id, status=FederationStatus.FINISHED)
        # Before the cohort is sampled: a round that would overshoot never starts.
        dp = config.client_level_dp
        if dp is not None and not budget_allows(
            dp, tx.list_rounds(fed.id), self._next_event(tx, fed, dp)
        ):
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
        config = self.config_of(fed)
        dp = config.client_level_dp
        if dp is not None:
            secure = config.secure_aggregation
            deadline = now + (config.stage_timeout_s() if secure else config.round_timeout_s)
            if not select_private(tx, rnd, dp, deadline=deadline, secure=secure):
                return False
            if secure:
                self._plan_distributed(tx, fed, dp, now)
            return True
        clients = [c for c in tx.list_clients(fed.id) if not c.revoked]
        if config.secure_aggregation:
            # Only a client with a registered identity can sign its round keys.
            clients = [c for c in clients if c.identity_key is not None]
        present = [c.id for c in clients if c.last_seen >= now - PRESENCE_WINDOW_S]
        target = selection_target(config, len(clients))
        expired = now >= rnd.deadline
        if len(present) < target and not (expired and len(present) >= config.min_clients):
            return False
        size = _cohort_size(config, len(present))
        cohort = sample_cohort(present, size, seed=config.seed or 0, round_number=rnd.number)
        self._present.pop((fed.id, rnd.number), None)
        model = self.model(rnd.model_version)
        if config.secure_aggregation:
            chosen = tx.update_round(fed.id, rnd.number, cohort=cohort)
            protocol = self._protocol(fed, rnd.model_version)
            setup = self.secure.plan(tx, chosen, protocol).to_bytes()
            tx.update_round(
                fed.id,
                rnd.number,
                status=RoundStatus.TRAINING,
                deadline=now + config.stage_timeout_s(),
                secagg_setup=setup,
            )
            return True
        tx.update_round(
            fed.id,
            rnd.number,
            status=RoundStatus.TRAINING,
            cohort=cohort,
            deadline=now + config.round_timeout_s,
        )
        with self._running_lock:
            self._running[(fed.id, rnd.number)] = _Running(FedAvg().begin(model))
        return True

    def _settle(self, tx: Transaction, fed: FederationRecord, rnd: RoundRecord, now: float) -> bool:
        config = self.config_of(fed)
        if rnd.secagg_setup is not None:
            return self._settle_secure(tx, fed, rnd, now)
        received = tx.count_updates(fed.id, rnd.number)
        progress = RoundProgress(received, len(rnd.cohort), now >= rnd.deadline)
        private = config.client_level_dp is not None
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

    def _settle_secure(
        self, tx: Transaction, fed: FederationRecord, rnd: RoundRecord, now: float
    ) -> bool:
        """Close a secure round's stage when due; fail or finish the round when it ends."""
        settling, detail = self.secure.settle(tx, rnd, expired=now >= rnd.deadline, now=now)
        if settling is Settling.KEEP_OPEN:
            return False
        if settling is Settling.NEXT_STAGE:
            deadline = now + self.config_of(fed).stage_timeout_s()
            tx.update_round(fed.id, rnd.number, deadline=deadline)
            return True
        self.secure.forget(fed.id, rnd.number)
        if not isinstance(detail, SecAggResult):
            return self._fail(tx, rnd, now, str(detail))
        config, model = self.config_of(fed), self.model(rnd.model_version)
        metrics = {
            "clients": float(len(detail.survivors)),
            "dropped": float(len(detail.dropped)),
            "excluded": float(len(detail.excluded)),
        }
        if config.client_level_dp is None:
            mean = detail.mean()
            new = secure_model(model, mean, config.server_lr)
            metrics["examples"] = detail.total_weight or 0.0
            # A round planned before the loss travelled in the vector has none.
            size = sum(spec.size for spec in self.spec(rnd.model_version).values())
            loss = loss_of(mean, config.secagg.clip) if mean.size > size else math.nan
            if math.isfinite(loss):
                metrics["train_loss"] = loss
            self._publish(tx, fed, rnd, (new, {"metrics": metrics}), now)
            return True
        try:
            release = release_distributed(
                config, model, detail, rnd=rnd, rounds=tx.list_rounds(fed.id)
            )
        except ValueError as exc:
            # Nothing is released, so the round spends no privacy.
            return self._fail(tx, rnd, now, f"distributed DP: {exc}")
        metrics["epsilon"] = release.epsilon
        changes = {"metrics": metrics, "privacy": release.privacy}
        self._publish(tx, fed, rnd, (release.model, changes), now)
        return True

    def _fail(self, tx: Transaction, rnd: RoundRecord, now: float, reason: str) -> bool:
        tx.update_round(
            rnd.federation_id, rnd.number, status=RoundStatus.FAILED, closed_at=now, reason=reason
        )
        return True

    def _next_event(
        self, tx: Transaction, fed: FederationRecord, dp: DpConfig
    ) -> PrivacyEvent | None:
        """Return the event a distributed round would release next (None: central's)."""
        if dp.mode is not DpMode.DISTRIBUTED:
            return None
        population = len(enrolled_clients(tx, fed.id, secure=True))
        return next_distributed_event(dp, max(population, 1), self.spec(fed.model_version))

    def _plan_distributed(
        self, tx: Transaction, fed: FederationRecord, dp: DpConfig, now: float
    ) -> None:
        """Plan secure aggregation for a distributed DP round whose cohort was just sampled.

        A cohort too small for secure aggregation or for the noise the round
        must hold fails the round at once: nothing is released, so nothing is
        spent.
        """
        rnd = tx.get_round(fed.id, fed.current_round)
        if rnd is None or rnd.privacy is None:
            raise RoundStateError(f"round {fed.current_round} of {fed.id} has no privacy state")
        needed = max(SECAGG_MIN_CLIENTS, dp.min_survivors or 0)
        if len(rnd.cohort) < needed:
            self._fail(
                tx, rnd, now,
                f"the Poisson cohort has {len(rnd.cohort)} clients; distributed DP with "
                f"secure aggregation needs at least {needed}",
            )  # fmt: skip
            return
        graph_seed = os.urandom(32)
        noise = distributed_noise(dp, rnd.privacy, self.spec(rnd.model_version), graph_seed)
        protocol = self._protocol(fed, rnd.model_version)
        ring = (noise.dimension, noise.bits)
        setup = self.secure.plan(tx, rnd, protocol, graph_seed=graph_seed, ring=ring)
        tx.update_round(fed.id, rnd.number, secagg_setup=setup.to_bytes())

    def _protocol(self, fed: FederationRecord, version: str) -> SecAggConfig:
        # The update, then the values that carry the training loss
        # (`privacy.secagg.with_loss`); distributed DP rounds set their own
        # vector length (`ring`).
        size = sum(s.size for s in self.spec(version).values())
        return self.config_of(fed).secagg.protocol(size + LOSS_VALUES)

    def round_noise(self, fed: FederationRecord, rnd: RoundRecord) -> DistributedNoise | None:
        """Return what each client of a distributed DP round must encode with, else None."""
        dp = self.config_of(fed).client_level_dp
        if dp is None or rnd.privacy is None or rnd.secagg_setup is None:
            return None
        graph_seed = RoundSetup.from_bytes(rnd.secagg_setup).graph_seed
        spec = self.spec(rnd.model_version)
        return noise_message(distributed_noise(dp, rnd.privacy, spec, graph_seed))

    def _close(
        self,
        tx: Transaction,
        fed: FederationRecord,
        rnd: RoundRecord,
        updates: Sequence[UpdateRecord],
        now: float,
    ) -> None:
        new, changes = self._result(tx, fed, rnd, updates)
        self._publish(tx, fed, rnd, (new, changes), now)

    def _publish(
        self,
        tx: Transaction,
        fed: FederationRecord,
        rnd: RoundRecord,
        outcome: tuple[ParameterSet, dict[str, object]],
        now: float,
    ) -> None:
        """Store the round's next model and close the round with the fields that go with it."""
        new, changes = outcome
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
        config = self.config_of(fed)
        model = self.model(rnd.model_version)
        metrics = _round_metrics(updates)
        if config.client_level_dp is None:
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

    def model(self, version: str) -> ParameterSet:
        """Return a model version's parameters (cached, read-only)."""
        return self._cached(version)[0]

    def spec(self, version: str) -> dict[str, TensorSpec]:
        """Return a model version's tensor names, dtypes and shapes (cached)."""
        return self._cached(version)[1]

    def _cached(self, version: str) -> tuple[ParameterSet, dict[str, TensorSpec]]:
        entry = self._models.get(version)
        if entry is None:
            params, _ = self.blobs.load(version)
            if len(self._models) >= _CACHED_MODELS:
                self._models.pop(next(iter(self._models)))
            entry = self._models[version] = (params, params.spec())
        return entry


def _cohort_size(config: FederationConfig, present: int) -> int:
    return min(selection_target(config, present), present)


def federation_of(tx: Transaction, federation_id: str) -> FederationRecord:
    """Return a federation, or raise `NotFound`."""
    fed = tx.get_federation(federation_id)
    if fed is None:
        raise NotFound(f"unknown federation {federation_id[:80]!r}")
    return fed


def locked_federation(tx: Transaction, federation_id: str) -> FederationRecord:
    """Lock a federation until the transaction ends and return it, or raise `NotFound`."""
    fed = tx.lock_federation(federation_id)
    if fed is None:
        raise NotFound(f"unknown federation {federation_id[:80]!r}")
    return fed


def current_round(tx: Transaction, fed: FederationRecord) -> RoundRecord | None:
    """Return the federation's current round, if it has one."""
    return tx.get_round(fed.id, fed.current_round) if fed.current_round else None


def _round_metrics(updates: Sequence[UpdateRecord]) -> dict[str, float]:
    """Average the clients' metrics weighted by examples; ε (DP-SGD's, per client) takes the max.

    Each DP-SGD client reports the ε its own data spent so far; the round
    shows the largest, the guarantee that holds for every client.
    """
    total = sum(u.num_examples for u in updates)
    metrics: dict[str, float] = {"clients": float(len(updates)), "examples": float(total)}
    sums: dict[str, float] = {}
    for update in updates:
        for key, value in update.metrics.items():
            if key == "epsilon":
                metrics[key] = max(metrics.get(key, 0.0), value)
            else:
                sums[key] = sums.get(key, 0.0) + value * update.num_examples
    if total > 0:
        metrics.update({key: value / total for key, value in sums.items()})
    return metrics
