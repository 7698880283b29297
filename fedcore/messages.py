"""Control messages that clients and the aggregator exchange, as pydantic models.

Arrays never travel in these messages: they travel as safetensors (see
`fedcore.wire`). An update's small fields ride in its safetensors metadata
under `UPDATE_META_KEY`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "UPDATE_META_KEY",
    "DistributedNoise",
    "DpSgdSettings",
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


class DpSgdSettings(_Message):
    """How a client trains with DP-SGD: example-level DP of its own data.

    Each client clips every example's gradient, adds Gaussian noise and
    accounts its own ε over every round it trains (Abadi et al. 2016, as
    Opacus implements it); it trains no round that would take its ε past
    `target_epsilon`.

    Attributes:
        max_grad_norm: C, the per-example gradient clip norm.
        noise_multiplier: z; None calibrates it, per client, so that `rounds`
            rounds of its training fit in its budget.
        target_epsilon: the client's budget ε.
        delta: δ of the client's guarantee; below 1/n for n examples.
        rounds: the rounds the budget must last when z is calibrated.
        accountant: Opacus's accountant: "rdp", or "prv" (numerical, tighter).
        seed: a FIXED seed of noise and sampling, for tests and simulation
            only: the run is then reproducible and NOT private, and each
            update says so (metric `dp_seeded`).
    """

    max_grad_norm: float = Field(gt=0, allow_inf_nan=False)
    noise_multiplier: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    target_epsilon: float = Field(gt=0, allow_inf_nan=False)
    delta: float = Field(gt=0, lt=1)
    rounds: int | None = Field(default=None, ge=1)
    accountant: Literal["rdp", "prv"] = "rdp"
    seed: int | None = None

    @model_validator(mode="after")
    def _noise_is_known(self) -> Self:
        if self.noise_multiplier is None and self.rounds is None:
            raise ValueError("give noise_multiplier, or rounds to calibrate it from the budget")
        return self


class TrainConfig(_Message):
    """How a client trains in one round; with `dpsgd`, it trains with DP-SGD."""

    local_epochs: int = Field(default=1, ge=1, le=1000)
    batch_size: int = Field(default=16, ge=1, le=1_000_000)
    lr: float = Field(default=0.05, gt=0, le=100)
    dpsgd: DpSgdSettings | None = None


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


class DistributedNoise(_Message):
    """The distributed discrete Gaussian of a secure round with distributed DP.

    The fields of `privacy.dp.distributed.DistributedDp`, which checks them
    and documents each; every client of the round encodes its update with
    them before masking it.
    """

    clip_norm: float = Field(gt=0, allow_inf_nan=False)
    noise_multiplier: float = Field(gt=0, allow_inf_nan=False)
    min_survivors: int = Field(ge=1)
    max_clients: int = Field(ge=1)
    bits: int = Field(ge=2, le=62)
    num_parameters: int = Field(ge=1)
    rotation_seed: int = Field(ge=0)
    beta: float = Field(ge=0, lt=1)
    wrap_probability: float = Field(gt=0, lt=1)


class SecAggSetup(_Message):
    """What opens a secure round for a client: the round's setup and the cohort's keys.

    Attributes:
        setup: the encoded `privacy.secagg.RoundSetup` (base64 in JSON).
        registry: client id -> its Ed25519 identity public key (hex), for
            every client of the cohort, as registered at enrollment.
        distributed_dp: the noise each client adds before masking, in a
            federation with distributed DP; None otherwise.
    """

    model_config = ConfigDict(
        frozen=True, extra="forbid", ser_json_bytes="base64", val_json_bytes="base64"
    )

    setup: bytes
    registry: dict[str, str]
    distributed_dp: DistributedNoise | None = None


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
