"""SQLAlchemy tables of the aggregator's records, and their translation to records.

These rows never leave `aggregator.sqlstore`: the service core sees only the
frozen values of `aggregator.records`. Each row class says which column values
store a record (`columns`) and turns a row of its table back into one
(`to_record`, given a Core result row: `aggregator.sqlstore` reads and writes
with Core statements, not the ORM's sessions). The schema itself is created
by the Alembic migrations in `aggregator/migrations`, which a test compares
to these models.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from aggregator.records import (
    AdminTokenRecord,
    ClientRecord,
    EnrollmentTokenRecord,
    FederationRecord,
    FederationStatus,
    ModelRecord,
    RoundPrivacy,
    RoundRecord,
    RoundStatus,
    SecAggEntry,
    SecAggMessageRecord,
    UpdateRecord,
)

__all__ = [
    "AdminTokenRow",
    "Base",
    "ClientRow",
    "EnrollmentTokenRow",
    "FederationRow",
    "ModelRow",
    "RoundRow",
    "SecAggMessageRow",
    "UpdateRow",
    "finite_metrics",
]

# Deterministic constraint names, so that later migrations can address them
# (Alembic cannot drop or alter an unnamed constraint portably).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Generous bounds: ids and token hashes are chosen by the service (uuids, hex
# digests, password-hash strings); PostgreSQL enforces them, SQLite does not.
ID = String(128)
HASH = String(128)
NAME = String(200)
STATUS = String(16)
# An Ed25519 public key (RFC 8032 section 5.1.5: 32 bytes).
IDENTITY_KEY = LargeBinary(32)
# Inline stage-log payloads are small (keys, ciphertexts, revealed shares);
# masked inputs go to the blob store.
PAYLOAD = LargeBinary()


def finite_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Return a copy of `metrics` for a JSON column, refusing NaN and infinities.

    JSON has no NaN: PostgreSQL rejects it and SQLite would store a
    non-standard token, so refuse it before the database sees it.

    Raises:
        ValueError: A value is not a finite number.
    """
    bad = sorted(name for name, value in metrics.items() if not math.isfinite(value))
    if bad:
        raise ValueError(f"metrics must be finite numbers; not finite: {bad}")
    return dict(metrics)


class Base(DeclarativeBase):
    """Declarative base holding the aggregator's metadata."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class FederationRow(Base):
    """A row of `federations`."""

    __tablename__ = "federations"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    name: Mapped[str] = mapped_column(NAME)
    config_json: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(STATUS)
    model_version: Mapped[str] = mapped_column(HASH)
    current_round: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (CheckConstraint("current_round >= 0", name="current_round_nonnegative"),)

    @staticmethod
    def columns(record: FederationRecord) -> dict[str, Any]:
        """Return the column values that store `record`."""
        return {
            "id": record.id,
            "created_at": record.created_at,
            "name": record.name,
            "config_json": record.config_json,
            "status": FederationStatus(record.status).value,
            "model_version": record.model_version,
            "current_round": record.current_round,
        }

    @staticmethod
    def to_record(row: Any) -> FederationRecord:
        """Return the record a row holds: a Core result row of this table, or an instance."""
        return FederationRecord(
            id=row.id,
            name=row.name,
            config_json=row.config_json,
            status=FederationStatus(row.status),
            model_version=row.model_version,
            current_round=row.current_round,
            created_at=row.created_at,
        )


class ClientRow(Base):
    """A row of `clients`; the credential's hash is unique across federations."""

    __tablename__ = "clients"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    federation_id: Mapped[str] = mapped_column(ID, ForeignKey("federations.id"), index=True)
    token_hash: Mapped[str] = mapped_column(HASH, unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)
    revoked: Mapped[bool] = mapped_column(Boolean)
    identity_key: Mapped[bytes | None] = mapped_column(IDENTITY_KEY)

    @staticmethod
    def columns(record: ClientRecord) -> dict[str, Any]:
        """Return the column values that store `record`."""
        return {
            "id": record.id,
            "federation_id": record.federation_id,
            "created_at": record.created_at,
            "token_hash": record.token_hash,
            "last_seen": record.last_seen,
            "revoked": record.revoked,
            "identity_key": record.identity_key,
        }

    @staticmethod
    def to_record(row: Any) -> ClientRecord:
        """Return the record a row holds: a Core result row of this table, or an instance."""
        return ClientRecord(
            id=row.id,
            federation_id=row.federation_id,
            token_hash=row.token_hash,
            created_at=row.created_at,
            last_seen=row.last_seen,
            revoked=row.revoked,
            identity_key=None if row.identity_key is None else bytes(row.identity_key),
        )


class EnrollmentTokenRow(Base):
    """A row of `enrollment_tokens`; `client_id` is set once the token was used."""

    __tablename__ = "enrollment_tokens"

    token_hash: Mapped[str] = mapped_column(HASH, primary_key=True)
    federation_id: Mapped[str] = mapped_column(ID, ForeignKey("federations.id"), index=True)
    expires_at: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    client_id: Mapped[str | None] = mapped_column(ID, ForeignKey("clients.id"))
    revoked: Mapped[bool] = mapped_column(Boolean)

    @staticmethod
    def columns(record: EnrollmentTokenRecord) -> dict[str, Any]:
        """Return the column values that store `record`."""
        return {
            "token_hash": record.token_hash,
            "federation_id": record.federation_id,
            "created_at": record.created_at,
            "expires_at": record.expires_at,
            "client_id": record.client_id,
            "revoked": record.revoked,
        }

    @staticmethod
    def to_record(row: Any) -> EnrollmentTokenRecord:
        """Return the record a row holds: a Core result row of this table, or an instance."""
        return EnrollmentTokenRecord(
            token_hash=row.token_hash,
            federation_id=row.federation_id,
            expires_at=row.expires_at,
            created_at=row.created_at,
            client_id=row.client_id,
            revoked=row.revoked,
        )


class AdminTokenRow(Base):
    """A row of `admin_tokens`."""

    __tablename__ = "admin_tokens"

    token_hash: Mapped[str] = mapped_column(HASH, primary_key=True)
    name: Mapped[str] = mapped_column(NAME)
    created_at: Mapped[float] = mapped_column(Float)
    revoked: Mapped[bool] = mapped_column(Boolean)

    @staticmethod
    def columns(record: AdminTokenRecord) -> dict[str, Any]:
        """Return the column values that store `record`."""
        return {
            "token_hash": record.token_hash,
            "created_at": record.created_at,
            "name": record.name,
            "revoked": record.revoked,
        }

    @staticmethod
    def to_record(row: Any) -> AdminTokenRecord:
        """Return the record a row holds: a Core result row of this table, or an instance."""
        return AdminTokenRecord(
            token_hash=row.token_hash,
            name=row.name,
            created_at=row.created_at,
            revoked=row.revoked,
        )


class RoundRow(Base):
    """A row of `rounds`, keyed by (federation_id, number)."""

    __tablename__ = "rounds"

    federation_id: Mapped[str] = mapped_column(ID, ForeignKey("federations.id"), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(STATUS)
    model_version: Mapped[str] = mapped_column(HASH)
    opened_at: Mapped[float] = mapped_column(Float)
    deadline: Mapped[float] = mapped_column(Float)
    cohort: Mapped[list[str]] = mapped_column(JSON)
    closed_at: Mapped[float | None] = mapped_column(Float)
    result_version: Mapped[str | None] = mapped_column(HASH)
    metrics: Mapped[dict[str, float]] = mapped_column(JSON)
    reason: Mapped[str | None] = mapped_column(Text)
    # NULL (not JSON null) for the rounds of federations without DP.
    privacy: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    secagg_setup: Mapped[bytes | None] = mapped_column(PAYLOAD)

    __table_args__ = (CheckConstraint("number >= 0", name="number_nonnegative"),)

    @staticmethod
    def columns(record: RoundRecord) -> dict[str, Any]:
        """Return the column values that store `record`."""
        return {
            "federation_id": record.federation_id,
            "number": record.number,
            "status": RoundStatus(record.status).value,
            "model_version": record.model_version,
            "opened_at": record.opened_at,
            "deadline": record.deadline,
            "cohort": list(record.cohort),
            "closed_at": record.closed_at,
            "result_version": record.result_version,
            "metrics": finite_metrics(record.metrics),
            "reason": record.reason,
            "privacy": None if record.privacy is None else record.privacy.to_json(),
            "secagg_setup": record.secagg_setup,
        }

    @staticmethod
    def to_record(row: Any) -> RoundRecord:
        """Return the record a row holds: a Core result row of this table, or an instance."""
        return RoundRecord(
            federation_id=row.federation_id,
            number=row.number,
            status=RoundStatus(row.status),
            model_version=row.model_version,
            opened_at=row.opened_at,
            deadline=row.deadline,
            cohort=tuple(row.cohort),
            closed_at=row.closed_at,
            result_version=row.result_version,
            metrics=dict(row.metrics),
            reason=row.reason,
            privacy=None if row.privacy is None else RoundPrivacy.from_json(row.privacy),
            secagg_setup=None if row.secagg_setup is None else bytes(row.secagg_setup),
        )


class UpdateRow(Base):
    """A row of `updates`, keyed by (federation_id, round, client_id): one per client and round."""

    __tablename__ = "updates"

    federation_id: Mapped[str] = mapped_column(ID, primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    client_id: Mapped[str] = mapped_column(ID, ForeignKey("clients.id"), primary_key=True)
    sha256: Mapped[str] = mapped_column(HASH)
    num_examples: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[float] = mapped_column(Float)
    metrics: Mapped[dict[str, float]] = mapped_column(JSON)

    __table_args__ = (
        ForeignKeyConstraint(
            ["federation_id", "round"],
            ["rounds.federation_id", "rounds.number"],
        ),
        CheckConstraint("num_examples >= 0", name="num_examples_nonnegative"),
    )

    @staticmethod
    def columns(record: UpdateRecord) -> dict[str, Any]:
        """Return the column values that store `record`."""
        return {
            "federation_id": record.federation_id,
            "round": record.round,
            "client_id": record.client_id,
            "sha256": record.sha256,
            "num_examples": record.num_examples,
            "received_at": record.received_at,
            "metrics": finite_metrics(record.metrics),
        }

    @staticmethod
    def to_record(row: Any) -> UpdateRecord:
        """Return the record a row holds: a Core result row of this table, or an instance."""
        return UpdateRecord(
            federation_id=row.federation_id,
            round=row.round,
            client_id=row.client_id,
            sha256=row.sha256,
            num_examples=row.num_examples,
            received_at=row.received_at,
            metrics=dict(row.metrics),
        )


class SecAggMessageRow(Base):
    """A row of `secagg_messages`: a secure round's stage log, keyed by (round, seq)."""

    __tablename__ = "secagg_messages"

    federation_id: Mapped[str] = mapped_column(ID, primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    stage: Mapped[str] = mapped_column(STATUS)
    entry: Mapped[str] = mapped_column(STATUS)
    received_at: Mapped[float] = mapped_column(Float)
    sender: Mapped[str | None] = mapped_column(ID, ForeignKey("clients.id"))
    payload: Mapped[bytes | None] = mapped_column(PAYLOAD)
    blob: Mapped[str | None] = mapped_column(HASH)
    reason: Mapped[str] = mapped_column(Text)

    __table_args__ = (
        ForeignKeyConstraint(
            ["federation_id", "round"],
            ["rounds.federation_id", "rounds.number"],
        ),
        CheckConstraint("seq >= 0", name="seq_nonnegative"),
    )

    @staticmethod
    def columns(record: SecAggMessageRecord) -> dict[str, Any]:
        """Return the column values that store `record`."""
        return {
            "federation_id": record.federation_id,
            "round": record.round,
            "seq": record.seq,
            "stage": record.stage,
            "entry": SecAggEntry(record.entry).value,
            "received_at": record.received_at,
            "sender": record.sender,
            "payload": record.payload,
            "blob": record.blob,
            "reason": record.reason,
        }

    @staticmethod
    def to_record(row: Any) -> SecAggMessageRecord:
        """Return the record a row holds: a Core result row of this table, or an instance."""
        return SecAggMessageRecord(
            federation_id=row.federation_id,
            round=row.round,
            seq=row.seq,
            stage=row.stage,
            entry=SecAggEntry(row.entry),
            received_at=row.received_at,
            sender=row.sender,
            payload=None if row.payload is None else bytes(row.payload),
            blob=row.blob,
            reason=row.reason,
        )


class ModelRow(Base):
    """A row of `model_versions`, keyed by (federation_id, version)."""

    __tablename__ = "model_versions"

    federation_id: Mapped[str] = mapped_column(ID, ForeignKey("federations.id"), primary_key=True)
    version: Mapped[str] = mapped_column(HASH, primary_key=True)
    round: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (CheckConstraint("size_bytes >= 0", name="size_bytes_nonnegative"),)

    @staticmethod
    def columns(record: ModelRecord) -> dict[str, Any]:
        """Return the column values that store `record`."""
        return {
            "federation_id": record.federation_id,
            "version": record.version,
            "round": record.round,
            "size_bytes": record.size_bytes,
            "created_at": record.created_at,
        }

    @staticmethod
    def to_record(row: Any) -> ModelRecord:
        """Return the record a row holds: a Core result row of this table, or an instance."""
        return ModelRecord(
            federation_id=row.federation_id,
            version=row.version,
            round=row.round,
            size_bytes=row.size_bytes,
            created_at=row.created_at,
        )
