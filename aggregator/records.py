"""Rows of the aggregator's state as frozen values, independent of any database.

The `Store` implementations translate these to and from their own storage
(SQLAlchemy rows, dictionaries); the service core only ever sees these.
Timestamps are POSIX seconds (UTC), so deadlines survive a restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

__all__ = [
    "AdminTokenRecord",
    "ClientRecord",
    "EnrollmentTokenRecord",
    "FederationRecord",
    "FederationStatus",
    "ModelRecord",
    "RoundRecord",
    "RoundStatus",
    "UpdateRecord",
]


class FederationStatus(StrEnum):
    """Lifecycle of a federation."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"
    STOPPED = "stopped"


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
    """An enrolled client of one federation; only its token's hash is kept."""

    id: str
    federation_id: str
    token_hash: str
    created_at: float
    last_seen: float
    revoked: bool = False


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
class RoundRecord:
    """One round of a federation.

    `cohort` lists the sampled client ids in sampling order; `metrics` holds
    the aggregated client metrics once the round closed; `reason` says why a
    round failed.
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
