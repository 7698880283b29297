"""Federation configuration, validated as a whole with every problem listed."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from fedcore.errors import ConfigError
from fedcore.messages import TrainConfig

__all__ = ["FederationConfig", "StrategyName", "parse_config"]


class StrategyName(StrEnum):
    """Aggregation strategies the aggregator can run."""

    FEDAVG = "fedavg"


class FederationConfig(BaseModel):
    """Everything the aggregator needs to run a federation's rounds.

    A round samples `clients_per_round` clients (plus `over_selection` of that
    many extra, so stragglers do not stall it) from the checked-in clients,
    closes once `clients_per_round` updates arrived or `round_timeout_s`
    passed with at least `min_clients` updates, and fails otherwise.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    rounds: int = Field(ge=1, le=1_000_000)
    clients_per_round: int = Field(ge=1)
    min_clients: int = Field(default=1, ge=1)
    over_selection: float = Field(default=0.0, ge=0, le=10)
    round_timeout_s: float = Field(default=600.0, gt=0)
    checkin_wait_s: float = Field(default=60.0, ge=0)
    strategy: StrategyName = StrategyName.FEDAVG
    server_lr: float = Field(default=1.0, gt=0)
    train: TrainConfig = Field(default_factory=TrainConfig)
    seed: int | None = Field(default=None, ge=0)
    max_update_bytes: int = Field(default=1 << 30, ge=1)

    # A field validator, not a model validator: pydantic runs model validators
    # only when every field is valid, and parse_config must list every problem.
    # It sees clients_per_round because that field is declared first.
    @field_validator("min_clients")
    @classmethod
    def _check_counts(cls, min_clients: int, info: ValidationInfo) -> int:
        clients_per_round = info.data.get("clients_per_round")
        if clients_per_round is not None and min_clients > clients_per_round:
            raise ValueError(
                f"min_clients ({min_clients}) exceeds clients_per_round "
                f"({clients_per_round}); lower min_clients"
            )
        return min_clients


def parse_config(data: Any) -> FederationConfig:
    """Validate `data` as a federation configuration.

    Raises:
        ConfigError: listing every problem at once.
    """
    try:
        return FederationConfig.model_validate(data)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in exc.errors()
        ]
        raise ConfigError(problems) from None
