"""The DP part of a federation's configuration, checked with every problem listed.

`DpConfig` holds types only; `validate` checks every value, every combination
and the deployment it runs in (number of clients, secure aggregation) and
raises one `ConfigError` that lists every problem, so that a user fixes a
configuration in one pass. The builders turn a valid configuration into the
objects a round needs.
"""

from __future__ import annotations

import functools
import math
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from fedcore import ConfigError
from privacy.dp.accounting import Accountant, PldAccountant, RdpAccountant
from privacy.dp.budget import PrivacyBudget, calibrate_noise_multiplier
from privacy.dp.central import CappedWeights, DpFedAvg, UniformWeights, Weighting
from privacy.dp.clipping import AdaptiveClipping, FixedClipping
from privacy.dp.distributed import MIN_HEADROOM, DistributedDp
from privacy.dp.noise import GaussianNoise, NoiseSource

__all__ = [
    "AccountantKind",
    "ClippingKind",
    "DpConfig",
    "DpMode",
    "WeightingKind",
    "central_strategy",
    "distributed_params",
    "validate",
]


class DpMode(StrEnum):
    """Where the noise is added and what it protects."""

    CENTRAL = "central"
    """DP-FedAvg: a trusted aggregator clips, sums and adds noise (client-level DP)."""
    DISTRIBUTED = "distributed"
    """Each client adds a share of discrete Gaussian noise under secure aggregation."""
    LOCAL = "local"
    """Each client trains with DP-SGD (example-level DP of its own data)."""


class ClippingKind(StrEnum):
    """A fixed clip norm, or one adapted to a quantile of update norms."""

    FIXED = "fixed"
    ADAPTIVE = "adaptive"


class AccountantKind(StrEnum):
    """RDP (every mode) or PLD (central only, tighter)."""

    RDP = "rdp"
    PLD = "pld"


class WeightingKind(StrEnum):
    """How central DP-FedAvg weighs clients (see `central`)."""

    UNIFORM = "uniform"
    CAPPED = "capped"


class DpConfig(BaseModel):
    """Differential privacy settings of a federation; check them with `validate`.

    Attributes:
        mode: central, distributed or local.
        epsilon: the federation's privacy budget ε (target).
        delta: the budget's δ; below 1/N for client-level modes.
        clip_norm: C, the L2 clip norm (the initial norm with adaptive clipping;
            the per-example gradient norm in local mode).
        noise_multiplier: z; when absent, the smallest z that fits `rounds`
            rounds in the budget is used.
        rounds: the number of rounds to fit in the budget when calibrating z.
        sampling_rate: q, the Poisson rate of cohort sampling (central,
            distributed).
        clipping: fixed or adaptive (central only).
        target_quantile: adaptive clipping's target quantile of update norms.
        clip_learning_rate: adaptive clipping's geometric learning rate.
        count_noise_std: adaptive clipping's noise on the clipped count; more
            than z / 2 (Andrew et al. suggest expected clients / 20).
        weighting: uniform, or example counts capped at `weight_cap`.
        weight_cap: w_max for capped weights.
        population_weight: W, the sum of capped weights over all clients.
        min_survivors: distributed mode: the fewest clients a sum may hold.
        bits: distributed mode: bits per coordinate of the secure-aggregation ring.
        accountant: rdp or pld.
        noise_seed: a FIXED noise seed, for tests and simulation only: the
            run is then reproducible and NOT private, and says so.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: DpMode
    epsilon: float
    delta: float
    clip_norm: float
    noise_multiplier: float | None = None
    rounds: int | None = None
    sampling_rate: float | None = None
    clipping: ClippingKind = ClippingKind.FIXED
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    count_noise_std: float | None = None
    weighting: WeightingKind = WeightingKind.UNIFORM
    weight_cap: float | None = None
    population_weight: float | None = None
    min_survivors: int | None = None
    bits: int = 20
    accountant: AccountantKind = AccountantKind.RDP
    noise_seed: int | None = None

    def budget(self) -> PrivacyBudget:
        """Return the federation's target (ε, δ)."""
        return PrivacyBudget(self.epsilon, self.delta)

    def make_accountant(self) -> Accountant:
        """Return the configured accountant."""
        return PldAccountant() if self.accountant is AccountantKind.PLD else RdpAccountant()

    def noise_source(self) -> NoiseSource:
        """Return a secure noise source, or a seeded one (flagged) if `noise_seed` is set."""
        if self.noise_seed is None:
            return NoiseSource.secure()
        return NoiseSource.from_seed(self.noise_seed)

    def resolved_noise_multiplier(self) -> float:
        """Return z, calibrated to fit `rounds` rounds in the budget when not given.

        Calibration assumes Gaussian rounds; distributed rounds spend slightly
        more (rounding inflates their sensitivity), so the budget check may
        stop such a federation a round or two before `rounds`.
        """
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        return _calibrated(self)


@functools.lru_cache(maxsize=64)
def _calibrated(config: DpConfig) -> float:
    """Calibrate once per configuration: a bisection costs up to a second."""
    if config.rounds is None or config.sampling_rate is None:
        raise ConfigError(["noise_multiplier: give it, or rounds and sampling_rate"])
    return calibrate_noise_multiplier(
        config.budget(),
        sampling_rate=config.sampling_rate,
        rounds=config.rounds,
        accountant=config.make_accountant(),
    )


def validate(config: DpConfig, *, num_clients: int | None, secure_aggregation: bool) -> None:
    """Check `config` for a federation of `num_clients` clients.

    Args:
        config: the DP settings.
        num_clients: N, the population; None skips the checks that need it
            (δ < 1/N, min_survivors <= q·N, bits for N clients).
        secure_aggregation: whether the federation runs secure aggregation.

    Raises:
        ConfigError: listing every problem found, all at once.
    """
    problems = [
        *_budget_problems(config, num_clients),
        *_noise_problems(config),
        *_sampling_problems(config),
        *_adaptive_problems(config),
        *_weighting_problems(config),
        *_distributed_problems(config, num_clients, secure_aggregation=secure_aggregation),
    ]
    if problems:
        raise ConfigError(problems)


def _positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def _client_level(config: DpConfig) -> bool:
    return config.mode is not DpMode.LOCAL


def _budget_problems(config: DpConfig, num_clients: int | None) -> list[str]:
    problems = []
    if not _positive(config.epsilon):
        problems.append(f"epsilon must be finite and > 0, got {config.epsilon!r}")
    if not 0 < config.delta < 1:
        problems.append(f"delta must be in (0, 1), got {config.delta!r}")
    elif num_clients is not None and _client_level(config) and config.delta >= 1 / num_clients:
        # δ >= 1/N allows releasing one client's data outright with
        # probability δ per client: the guarantee would be void.
        problems.append(
            f"delta ({config.delta!r}) must be below 1/num_clients (1/{num_clients}); "
            "use at most 1/N^1.1"
        )
    return problems


def _noise_problems(config: DpConfig) -> list[str]:
    problems = []
    if not _positive(config.clip_norm):
        problems.append(f"clip_norm must be finite and > 0, got {config.clip_norm!r}")
    if config.noise_multiplier is not None and not _positive(config.noise_multiplier):
        problems.append(f"noise_multiplier must be > 0, got {config.noise_multiplier!r}")
    if config.noise_multiplier is None and config.rounds is None:
        problems.append("give noise_multiplier, or rounds to calibrate it from the budget")
    if config.rounds is not None and config.rounds < 1:
        problems.append(f"rounds must be >= 1, got {config.rounds}")
    if config.accountant is AccountantKind.PLD and config.mode is DpMode.DISTRIBUTED:
        problems.append("accountant 'pld' cannot account distributed mode; use 'rdp'")
    return problems


def _sampling_problems(config: DpConfig) -> list[str]:
    if not _client_level(config):
        return []
    if config.sampling_rate is None:
        return [f"sampling_rate is required in {config.mode.value} mode (Poisson rate q)"]
    if not 0 < config.sampling_rate <= 1:
        return [f"sampling_rate must be in (0, 1], got {config.sampling_rate!r}"]
    return []


def _adaptive_problems(config: DpConfig) -> list[str]:
    if config.clipping is not ClippingKind.ADAPTIVE:
        return []
    problems = []
    if config.mode is not DpMode.CENTRAL:
        problems.append(f"adaptive clipping needs central mode, not {config.mode.value}")
    if not 0 < config.target_quantile < 1:
        problems.append(f"target_quantile must be in (0, 1), got {config.target_quantile!r}")
    if not _positive(config.clip_learning_rate):
        problems.append(f"clip_learning_rate must be > 0, got {config.clip_learning_rate!r}")
    std, z = config.count_noise_std, config.noise_multiplier
    if not _positive(std):
        problems.append("adaptive clipping needs count_noise_std > 0 (e.g. expected clients / 20)")
    elif std is not None and _positive(z) and z is not None and 2 * std <= z:
        problems.append(
            f"count_noise_std ({std!r}) must exceed noise_multiplier / 2 ({z / 2!r}), "
            "or the count query alone spends the whole budget"
        )
    return problems


def _weighting_problems(config: DpConfig) -> list[str]:
    if config.weighting is WeightingKind.UNIFORM:
        if config.weight_cap is not None or config.population_weight is not None:
            return ["weight_cap and population_weight apply to weighting 'capped' only"]
        return []
    problems = []
    if config.mode is not DpMode.CENTRAL:
        problems.append(f"weighting 'capped' needs central mode, not {config.mode.value}")
    if not _positive(config.weight_cap):
        problems.append("weighting 'capped' needs weight_cap > 0 to bound the sensitivity")
    if not _positive(config.population_weight):
        problems.append("weighting 'capped' needs population_weight > 0 (W, the divisor's base)")
    return problems


def _distributed_problems(
    config: DpConfig, num_clients: int | None, *, secure_aggregation: bool
) -> list[str]:
    if config.mode is not DpMode.DISTRIBUTED:
        return []
    problems = []
    if not secure_aggregation:
        problems.append("distributed mode needs secure aggregation; enable it or use central")
    if config.min_survivors is None or config.min_survivors < 1:
        problems.append(f"distributed mode needs min_survivors >= 1, got {config.min_survivors}")
    elif num_clients is not None and _positive(config.sampling_rate):
        expected = (config.sampling_rate or 0.0) * num_clients
        if config.min_survivors > expected:
            problems.append(
                f"min_survivors ({config.min_survivors}) exceeds the expected cohort q·N "
                f"({expected:g}); most rounds would fail"
            )
    if not 2 <= config.bits <= 62:
        problems.append(f"bits must be in [2, 62], got {config.bits}")
    elif num_clients is not None and 4.0**config.bits <= MIN_HEADROOM**2 * num_clients:
        problems.append(f"{config.bits} bits overflow for {num_clients} clients; raise bits")
    return problems


def _clipping_policy(config: DpConfig) -> FixedClipping | AdaptiveClipping:
    if config.clipping is ClippingKind.FIXED:
        return FixedClipping(config.clip_norm)
    return AdaptiveClipping(
        count_noise_std=config.count_noise_std or 0.0,
        clip_norm=config.clip_norm,
        target_quantile=config.target_quantile,
        learning_rate=config.clip_learning_rate,
    )


def _weighting(config: DpConfig) -> Weighting:
    if config.weighting is WeightingKind.UNIFORM:
        return UniformWeights()
    return CappedWeights(
        cap=config.weight_cap or 0.0, population_weight=config.population_weight or 0.0
    )


def central_strategy(
    config: DpConfig,
    *,
    num_clients: int,
    clipping: FixedClipping | AdaptiveClipping | None = None,
    server_lr: float = 1.0,
) -> DpFedAvg:
    """Return the round's DP-FedAvg strategy for a validated central `config`.

    Args:
        config: a configuration that passed `validate`.
        num_clients: N, the population the cohort is sampled from.
        clipping: the policy persisted from the previous round's release
            (adaptive clipping moves the norm); the initial one if None.
        server_lr: the server learning rate.
    """
    return DpFedAvg(
        clipping=clipping or _clipping_policy(config),
        noise=GaussianNoise(config.resolved_noise_multiplier()),
        sampling_rate=config.sampling_rate or 0.0,
        num_clients=num_clients,
        source=config.noise_source(),
        weighting=_weighting(config),
        server_lr=server_lr,
    )


def distributed_params(
    config: DpConfig, *, num_clients: int, num_parameters: int, rotation_seed: int
) -> DistributedDp:
    """Return the round's distributed DP parameters for a validated distributed `config`.

    `max_clients` (which sets the bits' headroom) is q·N plus six standard
    deviations of the Poisson cohort size, capped at N: a larger cohort
    happens with probability below 1e-9 and would only risk wrap-around
    (utility), never privacy, which rests on the norm bound and the noise.
    """
    q = config.sampling_rate or 0.0
    expected = q * num_clients
    max_clients = min(num_clients, math.ceil(expected + 6 * math.sqrt(expected * (1 - q))))
    return DistributedDp(
        clip_norm=config.clip_norm,
        noise_multiplier=config.resolved_noise_multiplier(),
        min_survivors=config.min_survivors or 0,
        max_clients=max(max_clients, config.min_survivors or 1),
        bits=config.bits,
        num_parameters=num_parameters,
        rotation_seed=rotation_seed,
    )
