"""HTTP request and response bodies, one family per resource.

The records of `aggregator` never leave the process as they are: each
resource has an `...Out` model that says what a caller may see (never a
token hash). Client messages (`Task`, `Receipt`, `Enrollment`) are the
`fedcore.messages` models themselves, shared with the SDK.
"""

from __future__ import annotations

import binascii
import json
from base64 import b64decode
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from aggregator import (
    ClientRecord,
    FederationRecord,
    FederationStatus,
    ModelRecord,
    PrivacyReport,
    RoundRecord,
    RoundStatus,
)
from aggregator.access import IDENTITY_KEY_BYTES
from privacy.dp import AccountantKind, DpMode

__all__ = [
    "ClientOut",
    "EnrollIn",
    "FederationOut",
    "HealthOut",
    "ModelOut",
    "PrivacyOut",
    "RoundEpsilonOut",
    "RoundOut",
    "TokensIn",
    "TokensOut",
]


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class _In(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FederationOut(_Out):
    """A federation, its state, current model version and configuration."""

    id: str
    name: str
    status: FederationStatus
    model_version: str
    current_round: int
    created_at: float
    config: dict[str, Any]

    @classmethod
    def of(cls, record: FederationRecord) -> FederationOut:
        """Describe `record`."""
        return cls(
            id=record.id,
            name=record.name,
            status=record.status,
            model_version=record.model_version,
            current_round=record.current_round,
            created_at=record.created_at,
            config=json.loads(record.config_json),
        )


class RoundOut(_Out):
    """A round: its stage, cohort, deadline and, once closed, its result."""

    federation_id: str
    number: int
    status: RoundStatus
    model_version: str
    opened_at: float
    deadline: float
    cohort: list[str]
    closed_at: float | None
    result_version: str | None
    metrics: dict[str, float]
    reason: str | None

    @classmethod
    def of(cls, record: RoundRecord) -> RoundOut:
        """Describe `record`."""
        # Reads the declared fields only: nothing else of the record is shown.
        return cls.model_validate(record, from_attributes=True)


class ClientOut(_Out):
    """An enrolled client; its credential is never shown again."""

    id: str
    federation_id: str
    created_at: float
    last_seen: float
    revoked: bool

    @classmethod
    def of(cls, record: ClientRecord) -> ClientOut:
        """Describe `record`."""
        # Reads the declared fields only: nothing else of the record is shown.
        return cls.model_validate(record, from_attributes=True)


class ModelOut(_Out):
    """A model version (the sha256 of its safetensors) and the round that made it."""

    federation_id: str
    version: str
    round: int
    size_bytes: int
    created_at: float

    @classmethod
    def of(cls, record: ModelRecord) -> ModelOut:
        """Describe `record`."""
        # Reads the declared fields only: nothing else of the record is shown.
        return cls.model_validate(record, from_attributes=True)


class RoundEpsilonOut(_Out):
    """The ε a federation had spent once a round was released, and the round's clip norm."""

    round: int
    epsilon: float
    clip_norm: float


class PrivacyOut(_Out):
    """A federation's differential privacy: budget, noise, ε spent and ε after each round.

    Every field but `federation_id`, `status` and `rounds` is null for a
    federation without differential privacy (`mode` null).
    """

    federation_id: str
    status: FederationStatus
    mode: DpMode | None = None
    epsilon_target: float | None = None
    delta: float | None = None
    epsilon_spent: float | None = None
    noise_multiplier: float | None = None
    sampling_rate: float | None = None
    clip_norm: float | None = None
    accountant: AccountantKind | None = None
    seeded: bool | None = None
    rounds: list[RoundEpsilonOut] = Field(default_factory=list)

    @classmethod
    def of(cls, report: PrivacyReport) -> PrivacyOut:
        """Describe `report`."""
        dp = report.dp
        if dp is None:
            return cls(federation_id=report.federation_id, status=report.status)
        return cls(
            federation_id=report.federation_id,
            status=report.status,
            mode=dp.mode,
            epsilon_target=dp.epsilon,
            delta=dp.delta,
            epsilon_spent=report.epsilon_spent,
            noise_multiplier=dp.noise_multiplier,
            sampling_rate=dp.sampling_rate,
            clip_norm=report.clip_norm,
            accountant=dp.accountant,
            seeded=dp.noise_seed is not None,
            rounds=[
                RoundEpsilonOut(round=r.round, epsilon=r.epsilon, clip_norm=r.clip_norm)
                for r in report.rounds
            ],
        )


class TokensIn(_In):
    """A request for one-time enrollment tokens."""

    count: int = Field(ge=1, le=1000)
    ttl_s: float = Field(gt=0, le=366 * 86400, allow_inf_nan=False)


class TokensOut(_Out):
    """Fresh enrollment tokens: shown once, stored only hashed."""

    tokens: list[str]
    expires_at: float


class EnrollIn(_In):
    """A device's enrollment request.

    `identity_key` is the device's raw 32-byte Ed25519 public key, as 64 hex
    digits or 44 characters of standard base64; secure federations require it.
    """

    enrollment_token: str = Field(min_length=1, max_length=512)
    identity_key: str | None = Field(default=None, min_length=1, max_length=100)

    @field_validator("identity_key")
    @classmethod
    def _decodes_to_a_key(cls, value: str | None) -> str | None:
        if value is not None:
            _decode_identity_key(value)
        return value

    def identity_key_bytes(self) -> bytes | None:
        """Return the identity key as raw bytes, or None."""
        return None if self.identity_key is None else _decode_identity_key(self.identity_key)


def _decode_identity_key(text: str) -> bytes:
    """Decode a 32-byte Ed25519 public key from hex or standard base64.

    Raises:
        ValueError: the text is neither, or does not hold 32 bytes.
    """
    try:
        raw = (
            bytes.fromhex(text)
            if len(text) == 2 * IDENTITY_KEY_BYTES
            else b64decode(text, validate=True)
        )
    except (ValueError, binascii.Error):
        raw = b""
    if len(raw) != IDENTITY_KEY_BYTES:
        raise ValueError(
            f"identity_key must be a {IDENTITY_KEY_BYTES}-byte Ed25519 public key as "
            f"{2 * IDENTITY_KEY_BYTES} hex digits or standard base64"
        )
    return raw


class HealthOut(_Out):
    """The answer of `/healthz` and `/readyz`."""

    status: str
