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

from pydantic import ValidationError

from fedcore import ConfigError, FederationConfig
from privacy.dp import DpConfig, DpMode, GaussianEvent, check_budget, validate

__all__ = ["FederationSettings", "parse_settings", "resolve_settings"]


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
        problems += _dp_problems(_with_rounds(dp, data.get("rounds")))
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
    if settings.dp is None:
        return settings
    dp = _with_rounds(settings.dp, settings.rounds)
    _raise(_dp_problems(dp))
    if dp.noise_multiplier is None:
        try:
            multiplier = dp.resolved_noise_multiplier()
        except ValueError as exc:
            raise ConfigError([f"dp: {exc}"]) from None
        dp = dp.model_copy(update={"noise_multiplier": multiplier})
        # Adaptive clipping's count noise is checked against z, known only now.
        _raise(_dp_problems(dp))
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


def _dp_problems(dp: DpConfig) -> list[str]:
    problems = []
    if dp.mode is not DpMode.CENTRAL:
        problems.append(
            f"dp.mode: the aggregator runs 'central' differential privacy only, "
            f"not {dp.mode.value!r}"
        )
    try:
        validate(dp, num_clients=None, secure_aggregation=False)
    except ConfigError as exc:
        problems += [f"dp: {problem}" for problem in exc.problems]
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
