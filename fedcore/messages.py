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
    "SecAggSetup",
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
    """The answer to a client's check-in.

    In a round with secure aggregation, `secure` is true and `stage` names
    the SecAgg+ stage the client must answer now (`advertise-keys`,
    `share-keys`, `masked-input` or `unmask`): the client fetches that
    stage's server message and sends its reply (`Transport.fetch_secagg`,
    `Transport.send_secagg`). It trains at the `masked-input` stage.
    """

    action: TaskAction
    federation_id: str
    round: int | None = None
    model_version: str | None = None
    train: TrainConfig | None = None
    retry_after_s: float = Field(default=1.0, ge=0)
    secure: bool = False
    stage: str | None = None


class SecAggSetup(_Message):
    """What opens a secure round for a client: the round's setup and the cohort's keys.

    Attributes:
        setup: the encoded `privacy.secagg.RoundSetup` (base64 in JSON).
        registry: client id -> its Ed25519 identity public key (hex), for
            every client of the cohort, as registered at enrollment.
    """

    model_config = ConfigDict(
        frozen=True, extra="forbid", ser_json_bytes="base64", val_json_bytes="base64"
    )

    setup: bytes
    registry: dict[str, str]


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
    """A client credential, returned once in exchange for an enrollment token.

    `identity_key` echoes the Ed25519 public key (hex) the client registered,
    if any; secure aggregation checks the client's signatures against it.
    """

    federation_id: str
    client_id: str
    token: str
    identity_key: str | None = None
