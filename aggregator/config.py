"""A federation's configuration as the aggregator runs it: fedcore's, plus privacy.

`fedcore.FederationConfig` holds what every package may read, and fedcore
imports nothing of ours, so it cannot name `privacy.dp.DpConfig`.
`FederationSettings` is that configuration plus its `dp` section, in the same
flat JSON object (`{"name": ..., "rounds": ..., "dp": {"mode": "central",
...}}`), and it is what the service stores and runs. It subclasses
`FederationConfig` rather than wrapping it, so every round rule written for a
`FederationConfig` applies unchanged, and a federation without `dp` is
exactly the federation it was before.

Checks come in two steps, both listing every problem at once in one
`ConfigError`:

- `parse_settings` checks a JSON object: the base fields, the `dp` fields,
  and the `dp` values and combinations that do not depend on the number of
  clients.
- `resolve_settings` (run when the federation is created) also calibrates
  the noise multiplier z when it is not given and writes it into the stored
  configuration, so z never changes during the federation, and refuses a
  budget too small for even one round.

The checks that need N, the number of clients (δ < 1/N), run when the
federation starts, because clients enroll after it was created (see
`aggregator.privacy.check_population`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedcore import ConfigError, FederationConfig
from privacy.dp import DpConfig, DpMode, GaussianEvent, check_budget, validate
from privacy.secagg import Quantization, SecAggConfig, ThreatModel

__all__ = ["FederationSettings", "SecAggSettings", "parse_settings", "resolve_settings"]

# SecAgg+ needs at least 3 clients in a cohort (`privacy.secagg.plan_round`):
# with fewer, a survivor could subtract its own input from the sum.
SECAGG_MIN_CLIENTS = 3


class SecAggSettings(BaseModel):
    """How a secure federation quantizes updates and which threat it withstands.

    Attributes:
        clip: c; every update value is clipped to [-c, c] before it is
            quantized. Choose it a little above the largest |delta| a round
            produces: a larger c costs precision, a smaller one biases.
        value_bits: bits per quantized value (the quantization step is
            2c / (2^value_bits - 1)). 20 bits keep a ring of 32 bits (4 bytes
            per value) for cohorts of up to 4096 clients.
        max_weight: W, the largest weight (number of examples) a client may
            send; the SDK caps larger weights at W. Each client quantizes
            w/W * delta, so W far above the real weights wastes precision.
        corrupt_fraction: gamma, the fraction of the cohort that may collude
            with the server (Bell et al. 2020, section 3).
        dropout_fraction: delta, the fraction that may drop out.
        stage_timeout_s: the deadline of each SecAgg stage; None reuses
            `round_timeout_s`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    clip: float = Field(default=1.0, gt=0, le=1e6, allow_inf_nan=False)
    value_bits: int = Field(default=20, ge=1, le=24)
    max_weight: float = Field(default=1000.0, gt=0, allow_inf_nan=False)
    corrupt_fraction: float = Field(default=0.05, ge=0, lt=1)
    dropout_fraction: float = Field(default=0.1, ge=0, lt=1)
    stage_timeout_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    def protocol(self, vector_length: int) -> SecAggConfig:
        """Return the protocol's settings for a model of `vector_length` values."""
        return SecAggConfig(
            vector_length=vector_length,
            quantization=Quantization(
                clip=self.clip, value_bits=self.value_bits, max_weight=self.max_weight
            ),
            threat=self.threat(),
        )

    def threat(self) -> ThreatModel:
        """Return the threat model (raises ValueError for an impossible one)."""
        return ThreatModel(
            corrupt_fraction=self.corrupt_fraction, dropout_fraction=self.dropout_fraction
        )


class FederationSettings(FederationConfig):
    """`FederationConfig` plus the federation's differential privacy.

    Attributes:
        dp: central differential privacy (DP-FedAvg), or None for none. A DP
            federation samples each round's cohort by Poisson sampling at
            rate `dp.sampling_rate` from every enrolled client, stops when
            its budget `(dp.epsilon, dp.delta)` would be exceeded, and
            ignores `clients_per_round`, `min_clients`, `over_selection` and
            `checkin_wait_s` (see `aggregator.privacy`). When neither
            `dp.noise_multiplier` nor `dp.rounds` is given, z is calibrated
            to fit `rounds` rounds in the budget.
    """

    dp: DpConfig | None = None
    secure_aggregation: bool = False
    secagg: SecAggSettings = Field(default_factory=SecAggSettings)

    @property
    def client_level_dp(self) -> DpConfig | None:
        """Return `dp` when the aggregator runs it (central or distributed), else None.

        Those modes protect each client's whole update: the aggregator
        samples Poisson cohorts, accounts every round and enforces the
        budget. Local mode (DP-SGD) protects each client's examples and is
        run and accounted by the clients, so its rounds are plain rounds.
        """
        if self.dp is None or self.dp.mode is DpMode.LOCAL:
            return None
        return self.dp

    def stage_timeout_s(self) -> float:
        """Return the deadline of one SecAgg stage, in seconds."""
        return self.secagg.stage_timeout_s or self.round_timeout_s


def parse_settings(data: Any) -> FederationSettings:
    """Validate `data` as a federation configuration with its privacy section.

    Raises:
        ConfigError: listing every problem, of the base fields and of `dp`, at once.
    """
    problems: list[str] = []
    settings: FederationSettings | None = None
    try:
        settings = FederationSettings.model_validate(data)
    except ValidationError as exc:
        problems += [
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in exc.errors()
        ]
    # The DP values are checked even when a base field is wrong, so that one
    # answer lists everything.
    dp = _dp_section(data)
    if dp is not None:
        secure = bool(data.get("secure_aggregation", False))
        problems += _dp_problems(_with_rounds(dp, data.get("rounds")), secure=secure)
    if settings is not None:
        problems += _secagg_problems(settings)
        if settings.train.dpsgd is not None:
            # The service fills it from `dp` so that it is validated and reported.
            problems.append("train.dpsgd: turn DP-SGD on with dp.mode 'local', not here")
    if problems or settings is None:
        raise ConfigError(problems)
    return settings


def resolve_settings(config: FederationConfig) -> FederationSettings:
    """Return `config` ready to run: DP checked, z calibrated once and fixed.

    Args:
        config: a `FederationSettings`, or a plain `FederationConfig` (no DP).

    Raises:
        ConfigError: listing every DP problem, including a budget too small
            for one round.
    """
    settings = (
        config
        if isinstance(config, FederationSettings)
        else FederationSettings.model_validate(config.model_dump())
    )
    _raise(_secagg_problems(settings))
    if settings.dp is None:
        return settings
    dp = _with_rounds(settings.dp, settings.rounds)
    secure = settings.secure_aggregation
    _raise(_dp_problems(dp, secure=secure))
    if dp.mode is DpMode.LOCAL:
        # Each client calibrates and accounts DP-SGD for its own data size.
        return settings.model_copy(update={"dp": dp})
    if dp.noise_multiplier is None:
        try:
            multiplier = dp.resolved_noise_multiplier()
        except ValueError as exc:
            raise ConfigError([f"dp: {exc}"]) from None
        dp = dp.model_copy(update={"noise_multiplier": multiplier})
        # Adaptive clipping's count noise is checked against z, known only now.
        _raise(_dp_problems(dp, secure=secure))
    _raise(_first_round_problems(dp))
    return settings.model_copy(update={"dp": dp})


def _dp_section(data: Any) -> DpConfig | None:
    if not isinstance(data, dict) or data.get("dp") is None:
        return None
    try:
        return DpConfig.model_validate(data["dp"])
    except ValidationError:
        return None  # already listed by the whole object's validation


def _with_rounds(dp: DpConfig, rounds: Any) -> DpConfig:
    """Calibrate z for the federation's rounds when neither z nor `dp.rounds` is given."""
    valid = isinstance(rounds, int) and rounds >= 1  # else the base fields' problem says it
    if dp.noise_multiplier is None and dp.rounds is None and valid:
        return dp.model_copy(update={"rounds": rounds})
    return dp


def _dp_problems(dp: DpConfig, *, secure: bool) -> list[str]:
    problems = []
    try:
        validate(dp, num_clients=None, secure_aggregation=secure)
    except ConfigError as exc:
        problems += [f"dp: {problem}" for problem in exc.problems]
    return problems


def _secagg_problems(settings: FederationSettings) -> list[str]:
    """List what keeps a secure federation from running (nothing for a plain one)."""
    if not settings.secure_aggregation:
        return []
    problems = []
    if settings.dp is not None and settings.dp.mode is DpMode.CENTRAL:
        problems.append(
            "secure_aggregation: central DP needs each update in the clear; use "
            "dp.mode 'distributed', remove dp, or turn secure_aggregation off"
        )
    if settings.min_clients < SECAGG_MIN_CLIENTS:
        problems.append(
            f"min_clients: secure aggregation needs at least {SECAGG_MIN_CLIENTS} clients "
            f"per round, got {settings.min_clients}"
        )
    try:
        settings.secagg.threat()
    except ValueError as exc:
        problems.append(f"secagg: {exc}")
    return problems


def _first_round_problems(dp: DpConfig) -> list[str]:
    event = GaussianEvent(dp.sampling_rate or 1.0, dp.resolved_noise_multiplier())
    check = check_budget([], event, dp.budget(), dp.make_accountant())
    if check.allowed:
        return []
    return [
        f"dp: one round spends epsilon {check.epsilon_if_run:.4g}, more than the budget "
        f"{dp.epsilon!r}; raise noise_multiplier or epsilon, or lower sampling_rate"
    ]


def _raise(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems)
