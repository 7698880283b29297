"""Privacy events: what one round spent, as JSON-able values.

The accountant's state is the list of events, nothing else: ε after any
number of rounds is a pure function of that list (see `accounting.epsilon`).
Persist `dump_events(...)` after every released round and rebuild with
`load_events(...)` after a restart; the ε then comes out the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError

from fedcore import ConfigError

__all__ = [
    "DistributedGaussianEvent",
    "GaussianEvent",
    "PrivacyEvent",
    "dump_events",
    "load_events",
]


def _check_rate(rate: float) -> None:
    if not 0 < rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {rate!r}")


def _check_count(count: int) -> None:
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count!r}")


def _check_positive(name: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class GaussianEvent:
    """`count` rounds of the Poisson-sampled Gaussian mechanism (central DP-FedAvg).

    Attributes:
        sampling_rate: q, the Poisson sampling rate of the cohort.
        noise_multiplier: z, noise std over sensitivity. With adaptive
            clipping this is the target z of sum and count together, not z_Δ.
        count: number of identical rounds.
    """

    sampling_rate: float
    noise_multiplier: float
    count: int = 1
    kind: Literal["gaussian"] = "gaussian"

    def __post_init__(self) -> None:
        _check_rate(self.sampling_rate)
        _check_positive("noise_multiplier", self.noise_multiplier)
        _check_count(self.count)


@dataclass(frozen=True, slots=True)
class DistributedGaussianEvent:
    """`count` rounds of the distributed discrete Gaussian (Kairouz et al., ICML 2021).

    All quantities are in the scaled integer domain the clients encode into
    (see `distributed.DistributedDp.event`).

    Attributes:
        sampling_rate: q, the Poisson sampling rate of the cohort.
        l2_sensitivity: Δ₂, the L2 bound of one client's rounded vector.
        l1_sensitivity: Δ₁, its L1 bound.
        local_variance: sigma², the discrete Gaussian variance each client adds.
        min_survivors: n, the fewest clients whose noise the released sum holds.
        dimension: d, the length of the encoded (padded) vector.
        count: number of identical rounds.
    """

    sampling_rate: float
    l2_sensitivity: float
    l1_sensitivity: float
    local_variance: float
    min_survivors: int
    dimension: int
    count: int = 1
    kind: Literal["distributed_gaussian"] = "distributed_gaussian"

    def __post_init__(self) -> None:
        _check_rate(self.sampling_rate)
        _check_positive("l2_sensitivity", self.l2_sensitivity)
        _check_positive("l1_sensitivity", self.l1_sensitivity)
        _check_positive("local_variance", self.local_variance)
        _check_count(self.count)
        if self.min_survivors < 1 or self.dimension < 1:
            raise ValueError(
                f"min_survivors and dimension must be >= 1, got {self.min_survivors}, "
                f"{self.dimension}"
            )


PrivacyEvent = Annotated[GaussianEvent | DistributedGaussianEvent, Field(discriminator="kind")]
"""Any event an accountant composes; `kind` tells them apart in JSON."""

_EVENTS: TypeAdapter[list[GaussianEvent | DistributedGaussianEvent]] = TypeAdapter(
    list[PrivacyEvent]
)


def dump_events(events: Sequence[PrivacyEvent]) -> list[dict[str, Any]]:
    """Return the events as JSON-able dicts (floats round-trip exactly through JSON)."""
    return [asdict(event) for event in events]


def load_events(data: Any) -> list[PrivacyEvent]:
    """Rebuild events from `dump_events` output (e.g. parsed from JSON).

    Raises:
        ConfigError: listing every malformed event.
    """
    try:
        return _EVENTS.validate_python(data, strict=False)
    except ValidationError as exc:
        problems = [
            f"events.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        ]
        raise ConfigError(problems) from None
