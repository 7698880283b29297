"""Whole federations in one process: the aggregator core and a virtual fleet.

The simulation wires the real service (`aggregator.Aggregator` over an
in-memory store and blob store) to virtual clients through the in-process
transport, so every update goes through the same validation, persistence
protocol and aggregation as over HTTP, minus the network and the disk.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from aggregator import (
    Aggregator,
    FederationSettings,
    InProcessTransport,
    MemoryBlobStore,
    MemoryStore,
    PrivacyReport,
    RoundRecord,
    RoundStatus,
    SecAggSettings,
)
from clients import Fleet, to_parameters
from clients.digits import (
    DigitsSplit,
    Evaluator,
    client_data,
    dirichlet_partition,
    load_digits_split,
    make_mlp,
)
from clients.pool import fork_available
from fedcore import ParameterSet, TrainConfig, wire
from privacy.dp import DpConfig, DpMode
from privacy.secagg import ClientIdentity

__all__ = ["RoundReport", "SimulationConfig", "SimulationResult", "simulate"]

# SecAgg+ cohorts have at least 3 clients (`aggregator.config`).
SECAGG_COHORT = 3


@dataclass(frozen=True, slots=True)
class SimulationConfig:
    """A simulated federation on the digits task.

    `fraction` of the clients is sampled each round; partitions are
    Dirichlet(`alpha`) label skews drawn with `seed` (for 20 and 100 clients
    with alpha 0.5 and seed 0 they equal the shared reference partitions).

    With `secure_aggregation`, every round runs SecAgg+: the aggregator only
    sees the sum of the clients' masked updates, each clipped to
    [-`secagg_clip`, `secagg_clip`] per value and quantized (cohorts of at
    least 3 clients).

    With `dp_epsilon` set, the federation runs central DP-FedAvg: each client
    is sampled with probability `fraction` (Poisson), its update clipped to
    L2 norm `dp_clip`, and the noise multiplier calibrated to fit `rounds`
    rounds in the budget (`dp_epsilon`, `dp_delta`). The noise is seeded
    with `seed`, so the run is reproducible and flagged as NOT private.

    With `dp_mode` "distributed" (and `secure_aggregation`), the same
    Poisson cohorts and budget, but each client clips its update to `dp_clip`
    and adds its share of discrete Gaussian noise before masking it, so the
    aggregator never sees a noise-free sum; a round releases only when at
    least 80% of the expected cohort (and at least 3 clients) survive.

    With `dp_mode` "local" instead, each client trains with DP-SGD (Opacus):
    every example's gradient clipped to `dp_clip`, and each client's noise
    multiplier calibrated so that `rounds` rounds of its training fit in its
    own budget (`dp_epsilon`, `dp_delta`, example-level). A round reports
    the largest ε of its clients.

    `workers` > 1 trains the clients of plain rounds in that many forked
    processes (`clients.Fleet`); the result is bit for bit that of one
    worker.
    """

    clients: int = 100
    rounds: int = 30
    fraction: float = 1.0
    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 0.05
    alpha: float = 0.5
    seed: int = 0
    dp_epsilon: float | None = None
    dp_clip: float = 1.0
    dp_delta: float = 1e-5
    dp_mode: Literal["central", "distributed", "local"] = "central"
    secure_aggregation: bool = False
    secagg_clip: float = 1.0
    workers: int = 1

    def problems(self) -> list[str]:
        """Return every invalid field, with the fix."""
        found = []
        if self.clients < 1:
            found.append(f"clients must be >= 1, got {self.clients}")
        if self.rounds < 1:
            found.append(f"rounds must be >= 1, got {self.rounds}")
        if not 0 < self.fraction <= 1:
            found.append(f"fraction must be in (0, 1], got {self.fraction}")
        if self.alpha <= 0:
            found.append(f"alpha must be > 0, got {self.alpha}")
        if self.dp_epsilon is not None and not self.dp_epsilon > 0:
            found.append(f"dp_epsilon must be > 0, got {self.dp_epsilon}")
        if not self.dp_clip > 0:
            found.append(f"dp_clip must be > 0, got {self.dp_clip}")
        if self.secure_aggregation and math.ceil(self.fraction * self.clients) < SECAGG_COHORT:
            found.append(
                f"secure aggregation needs at least {SECAGG_COHORT} clients per round; "
                "raise clients or fraction"
            )
        if not self.secagg_clip > 0:
            found.append(f"secagg_clip must be > 0, got {self.secagg_clip}")
        if self.dp_mode == "distributed" and not self.secure_aggregation:
            found.append("dp_mode 'distributed' needs secure_aggregation")
        return found + self._worker_problems()

    def _worker_problems(self) -> list[str]:
        if self.workers < 1:
            return [f"workers must be >= 1, got {self.workers}"]
        if self.workers > 1 and not fork_available():
            return ["workers > 1 needs the 'fork' start method, which this platform lacks"]
        return []

    def dp_config(self) -> DpConfig | None:
        """Return the federation's DP settings, or None without `dp_epsilon`."""
        if self.dp_epsilon is None:
            return None
        if self.dp_mode == "local":
            return DpConfig(
                mode=DpMode.LOCAL,
                epsilon=self.dp_epsilon,
                delta=self.dp_delta,
                clip_norm=self.dp_clip,
                rounds=self.rounds,
                noise_seed=self.seed,
            )
        if self.dp_mode == "distributed":
            expected = self.fraction * self.clients
            return DpConfig(
                mode=DpMode.DISTRIBUTED,
                epsilon=self.dp_epsilon,
                delta=self.dp_delta,
                clip_norm=self.dp_clip,
                sampling_rate=self.fraction,
                rounds=self.rounds,
                min_survivors=max(SECAGG_COHORT, math.floor(0.8 * expected)),
                noise_seed=self.seed,
            )
        return DpConfig(
            mode=DpMode.CENTRAL,
            epsilon=self.dp_epsilon,
            delta=self.dp_delta,
            clip_norm=self.dp_clip,
            sampling_rate=self.fraction,
            rounds=self.rounds,
            noise_seed=self.seed,
        )


@dataclass(frozen=True, slots=True)
class RoundReport:
    """One round as a person wants to see it.

    `epsilon` is the federation's ε spent so far with central DP, the largest
    ε of the round's clients with local DP (DP-SGD), NaN without DP.
    """

    round: int
    status: RoundStatus
    clients: int
    train_loss: float
    accuracy: float
    seconds: float
    epsilon: float = math.nan


@dataclass(frozen=True, slots=True)
class SimulationResult:
    """Every round's report, the final model, the privacy spent and how long the run took."""

    reports: tuple[RoundReport, ...]
    model: ParameterSet
    seconds: float
    privacy: PrivacyReport

    @property
    def accuracy(self) -> float:
        """Test accuracy of the final model."""
        closed = [r for r in self.reports if r.status is RoundStatus.CLOSED]
        return closed[-1].accuracy if closed else float("nan")


def simulate(
    config: SimulationConfig,
    *,
    on_round: Callable[[RoundReport], None] | None = None,
    split: DigitsSplit | None = None,
) -> SimulationResult:
    """Run a federation of virtual digits clients to the end.

    Args:
        config: the federation to simulate.
        on_round: called after each round with its report (progress display).
        split: the data set, if already loaded.

    Raises:
        ValueError: the configuration is invalid (listing every problem);
            `fedcore.ConfigError` for DP settings that cannot run.
    """
    problems = config.problems()
    if problems:
        raise ValueError("invalid simulation: " + "; ".join(problems))
    started = time.perf_counter()
    split = split or load_digits_split()
    torch.manual_seed(config.seed)
    model = make_mlp(seed=config.seed)
    aggregator = Aggregator(MemoryStore(), MemoryBlobStore())
    federation_id = _create(aggregator, config, to_parameters(model.state_dict(), copy=True))
    identities = _enroll(aggregator, federation_id, config.clients)
    client_ids = list(identities)
    parts = dirichlet_partition(split.y_train, config.clients, config.alpha, config.seed)
    shards = dict(zip(client_ids, client_data(split, parts), strict=True))
    fleet = Fleet.build(
        model,
        shards,
        lambda cid: InProcessTransport(aggregator, cid),
        federation_id=federation_id,
        seed=config.seed,
        identities=identities,
        workers=config.workers,
    )
    with fleet:
        # Every client checks in once before the first round opens, so round 1
        # samples from the whole fleet rather than from the first to arrive.
        fleet.step_all()
        aggregator.start(federation_id)
        reports = _drive(aggregator, fleet, federation_id, Evaluator(split), on_round)
    final = aggregator.get_federation(federation_id).model_version
    return SimulationResult(
        reports=tuple(reports),
        model=aggregator.load_model(federation_id, final),
        seconds=time.perf_counter() - started,
        privacy=aggregator.privacy(federation_id),
    )


def _create(aggregator: Aggregator, config: SimulationConfig, initial: ParameterSet) -> str:
    per_round = max(1, math.ceil(config.fraction * config.clients))
    federation = FederationSettings(
        name="simulation",
        rounds=config.rounds,
        clients_per_round=per_round,
        min_clients=SECAGG_COHORT if config.secure_aggregation else 1,
        train=TrainConfig(
            local_epochs=config.local_epochs, batch_size=config.batch_size, lr=config.lr
        ),
        seed=config.seed,
        dp=config.dp_config(),
        secure_aggregation=config.secure_aggregation,
        secagg=SecAggSettings(clip=config.secagg_clip),
    )
    data = wire.encode(initial)
    staged = aggregator.blobs.stage(len(data))
    staged.write(data)
    return aggregator.create_federation(federation, staged).id


def _enroll(aggregator: Aggregator, federation_id: str, count: int) -> dict[str, ClientIdentity]:
    """Enroll `count` clients, each with a fresh identity key; return them by client id."""
    identities: dict[str, ClientIdentity] = {}
    while len(identities) < count:
        batch = min(1000, count - len(identities))
        tokens, _ = aggregator.access.create_enrollment_tokens(federation_id, batch, 3600)
        for token in tokens:
            key = Ed25519PrivateKey.generate()
            public = key.public_key().public_bytes_raw()
            client_id = aggregator.access.enroll(token, identity_key=public).client_id
            identities[client_id] = ClientIdentity(client_id, key)
    return identities


def _drive(
    aggregator: Aggregator,
    fleet: Fleet,
    federation_id: str,
    evaluator: Evaluator,
    on_round: Callable[[RoundReport], None] | None,
) -> list[RoundReport]:
    reports: list[RoundReport] = []
    while not fleet.finished:
        fleet.step_all()
        for record in _ended(aggregator, federation_id, len(reports)):
            report = _report(aggregator, record, evaluator)
            reports.append(report)
            if on_round is not None:
                on_round(report)
    return reports


def _ended(aggregator: Aggregator, federation_id: str, reported: int) -> list[RoundRecord]:
    """Return the rounds after the first `reported` that ended, up to the first still open.

    Read one by one from the federation's current round: listing every
    round after each step would read the whole history once per round.
    """
    current = aggregator.get_federation(federation_id).current_round
    ended = []
    for number in range(reported + 1, current + 1):
        record = aggregator.get_round(federation_id, number)
        if record.status not in (RoundStatus.CLOSED, RoundStatus.FAILED):
            break
        ended.append(record)
    return ended


def _report(aggregator: Aggregator, record: RoundRecord, evaluator: Evaluator) -> RoundReport:
    accuracy = float("nan")
    if record.result_version is not None:
        params = aggregator.load_model(record.federation_id, record.result_version)
        accuracy, _ = evaluator.evaluate(params)
    return RoundReport(
        round=record.number,
        status=record.status,
        clients=int(record.metrics.get("clients", 0)),
        train_loss=record.metrics.get("train_loss", float("nan")),
        accuracy=accuracy,
        seconds=(record.closed_at or record.opened_at) - record.opened_at,
        # Central and distributed DP: the federation's ε; local: the largest client's.
        epsilon=record.metrics.get("epsilon", math.nan),
    )
