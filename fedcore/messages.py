"""Control messages that clients and the aggregator exchange, as pydantic models.

Arrays never travel in these messages: they travel as safetensors (see
`fedcore.wire`). An update's small fields ride in its safetensors metadata
under `UPDATE_META_KEY`.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "UPDATE_META_KEY",
    "Enrollment",
    "Receipt",
    "Task",
    "TaskAction",
    "TrainConfig",
    "UpdateMeta",
]

UPDATE_META_KEY = "fedcore.update"


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TrainConfig(_Message):
    """How a client trains in one round."""

    local_epochs: int = Field(default=1, ge=1, le=1000)
    batch_size: int = Field(default=16, ge=1, le=1_000_000)
    lr: float = Field(default=0.05, gt=0, le=100)


class TaskAction(StrEnum):
    """What the aggregator asks a checked-in client to do."""

    TRAIN = "train"
    WAIT = "wait"
    FINISHED = "finished"


class Task(_Message):
    """The answer to a client's check-in."""

    action: TaskAction
    federation_id: str
    round: int | None = None
    model_version: str | None = None
    train: TrainConfig | None = None
    retry_after_s: float = Field(default=1.0, ge=0)


class UpdateMeta(_Message):
    """The small fields of an update: its weight and the client's metrics."""

    num_examples: int = Field(ge=0)
    metrics: dict[str, float] = Field(default_factory=dict)


class Receipt(_Message):
    """The aggregator's acknowledgement that an update is durably stored."""

    federation_id: str
    round: int
    client_id: str
    sha256: str
    num_examples: int


class Enrollment(_Message):
    """A client credential, returned once in exchange for an enrollment token."""

    federation_id: str
    client_id: str
    token: str
