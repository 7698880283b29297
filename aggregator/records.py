"""Rows of the aggregator's state as frozen values, independent of any database.

The `Store` implementations translate these to and from their own storage
(SQLAlchemy rows, dictionaries); the service core only ever sees these.
Timestamps are POSIX seconds (UTC), so deadlines survive a restart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from privacy.dp import PrivacyEvent, dump_events, load_events

__all__ = [
    "AdminTokenRecord",
    "ClientRecord",
    "EnrollmentTokenRecord",
    "FederationRecord",
    "FederationStatus",
    "ModelRecord",
    "RoundPrivacy",
    "RoundRecord",
    "RoundStatus",
    "SecAggEntry",
    "SecAggMessageRecord",
    "UpdateRecord",
]


class FederationStatus(StrEnum):
    """Lifecycle of a federation."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"
    STOPPED = "stopped"
    BUDGET_EXHAUSTED = "budget_exhausted"
    """A DP federation whose next round would spend more than its privacy budget."""


class RoundStatus(StrEnum):
    """Lifecycle of a round: selecting → training → closed, or failed."""

    SELECTING = "selecting"
    TRAINING = "training"
    CLOSED = "closed"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class FederationRecord:
    """A federation: its validated config (as JSON), state and current model."""

    id: str
    name: str
    config_json: str
    status: FederationStatus
    model_version: str
    current_round: int
    created_at: float


@dataclass(frozen=True, slots=True)
class ClientRecord:
    """An enrolled client of one federation; only its token's hash is kept.

    `identity_key` is the raw 32-byte Ed25519 public key the client registered
    at enrollment: it signs the client's secure aggregation keys. Required in
    secure federations, optional elsewhere.
    """

    id: str
    federation_id: str
    token_hash: str
    created_at: float
    last_seen: float
    revoked: bool = False
    identity_key: bytes | None = None


@dataclass(frozen=True, slots=True)
class EnrollmentTokenRecord:
    """A one-time token that a device exchanges for a client credential."""

    token_hash: str
    federation_id: str
    expires_at: float
    created_at: float
    client_id: str | None = None
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class AdminTokenRecord:
    """An operator's credential for the admin API; only its hash is kept."""

    token_hash: str
    name: str
    created_at: float
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class RoundPrivacy:
    """What a differentially private round must keep to be accounted after a restart.

    Attributes:
        population: N, the enrolled clients the cohort was Poisson-sampled
            from; the noisy sum is divided by q·N.
        clip_norm: C, the L2 norm updates are clipped to in this round.
        seeded: whether the round's sampling and noise came from a fixed seed
            (tests, simulation): such a round gives no privacy.
        events: the accounting events the round released (one once it
            closed; none while it runs, and none ever for a failed round).
        next_clip_norm: the clip norm of the next round (adaptive clipping
            moves it); None until the round closed.
        noisy_fraction: adaptive clipping's noisy fraction of unclipped
            updates (itself DP), else None.

    Raises:
        ValueError: a count is negative or a norm or fraction is not finite.
    """

    population: int
    clip_norm: float
    seeded: bool
    events: tuple[PrivacyEvent, ...] = ()
    next_clip_norm: float | None = None
    noisy_fraction: float | None = None

    def __post_init__(self) -> None:
        # Checked here, so the memory store refuses what JSON columns cannot hold.
        if self.population < 0:
            raise ValueError(f"population must be >= 0, got {self.population}")
        norms = (self.clip_norm, self.next_clip_norm, self.noisy_fraction)
        if not all(value is None or math.isfinite(value) for value in norms):
            raise ValueError(f"clip norms and noisy_fraction must be finite, got {norms}")

    def to_json(self) -> dict[str, Any]:
        """Return the value as a JSON-able dict (floats round-trip exactly)."""
        return {
            "population": self.population,
            "clip_norm": self.clip_norm,
            "seeded": self.seeded,
            "events": dump_events(self.events),
            "next_clip_norm": self.next_clip_norm,
            "noisy_fraction": self.noisy_fraction,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundPrivacy:
        """Rebuild a value from `to_json` output."""
        return cls(
            population=int(data["population"]),
            clip_norm=float(data["clip_norm"]),
            seeded=bool(data["seeded"]),
            events=tuple(load_events(data["events"])),
            next_clip_norm=data["next_clip_norm"],
            noisy_fraction=data["noisy_fraction"],
        )


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """One round of a federation.

    `cohort` lists the sampled client ids in sampling order; `metrics` holds
    the aggregated client metrics once the round closed; `reason` says why a
    round failed; `privacy` is set for rounds of a differentially private
    federation only; `secagg_setup` holds the encoded `RoundSetup` of a
    secure round (public parameters only), set when its cohort is chosen.
    """

    federation_id: str
    number: int
    status: RoundStatus
    model_version: str
    opened_at: float
    deadline: float
    cohort: tuple[str, ...] = ()
    closed_at: float | None = None
    result_version: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    privacy: RoundPrivacy | None = None
    secagg_setup: bytes | None = None


@dataclass(frozen=True, slots=True)
class UpdateRecord:
    """An accepted, durably stored client update of one round."""

    federation_id: str
    round: int
    client_id: str
    sha256: str
    num_examples: int
    received_at: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """A model version (its blob's sha256) and the round that produced it (0: initial)."""

    federation_id: str
    version: str
    round: int
    size_bytes: int
    created_at: float


class SecAggEntry(StrEnum):
    """What one entry of a secure round's stage log records."""

    ACCEPTED = "accepted"
    """A client message the server state machine took (first time)."""
    EXCLUDED = "excluded"
    """A client message that excluded its sender; replayed to exclude it again."""
    CLOSE = "close"
    """The close of the open stage (`SecAggServer.close_stage`)."""


@dataclass(frozen=True, slots=True)
class SecAggMessageRecord:
    """One entry of a secure round's stage log, replayed in `seq` order after a restart.

    A client message rides inline in `payload` when small, or is stored in
    the blob store under `blob` (masked inputs: P+1 values). Either holds the
    bytes the client sent, which are masked or encrypted: never an update in
    the clear. A `CLOSE` entry has neither, and no sender.

    Raises:
        ValueError: a message entry without exactly one of payload and blob,
            or a close entry with a sender or bytes.
    """

    federation_id: str
    round: int
    seq: int
    stage: str
    entry: SecAggEntry
    received_at: float
    sender: str | None = None
    payload: bytes | None = None
    blob: str | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        has_bytes = (self.payload is not None) + (self.blob is not None)
        if self.entry is SecAggEntry.CLOSE:
            if self.sender is not None or has_bytes:
                raise ValueError("a close entry carries no sender, payload or blob")
        elif self.sender is None or has_bytes != 1:
            raise ValueError("a message entry needs a sender and exactly one of payload and blob")
        if self.seq < 0:
            raise ValueError(f"seq must be >= 0, got {self.seq}")
