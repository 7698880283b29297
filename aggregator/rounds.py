"""Round decisions as pure functions: whom to sample, when to close.

The service calls these with values read from the store and persists what
they decide, so the rules test without a database or a clock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from fedcore import FederationConfig

__all__ = ["Closing", "RoundProgress", "close_decision", "sample_cohort", "selection_target"]


def selection_target(config: FederationConfig, active_clients: int) -> int:
    """Return how many checked-in clients a round waits for before sampling.

    That is `clients_per_round` plus the over-selection margin, capped by the
    number of clients that could ever check in.
    """
    wanted = math.ceil(config.clients_per_round * (1.0 + config.over_selection))
    return max(1, min(wanted, active_clients))


def sample_cohort(
    candidates: Sequence[str], size: int, *, seed: int, round_number: int
) -> tuple[str, ...]:
    """Sample `size` distinct clients uniformly without replacement.

    The generator is seeded by (federation seed, round number) and draws
    positions in `candidates`, which the caller passes in a canonical order
    (the service uses enrollment order): a round's cohort then depends only on
    who was checked in, not on the order of their check-ins, and a simulation
    that enrolls its clients in the same order samples the same cohorts.
    """
    pool = list(candidates)
    size = min(size, len(pool))
    rng = np.random.default_rng([seed, round_number])
    picks = rng.choice(len(pool), size=size, replace=False)
    return tuple(pool[int(i)] for i in picks)


class Closing(StrEnum):
    """What to do with a round in its training stage."""

    KEEP_OPEN = "keep-open"
    CLOSE = "close"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class RoundProgress:
    """What a close decision looks at."""

    received: int
    cohort: int
    expired: bool


def close_decision(config: FederationConfig, progress: RoundProgress) -> Closing:
    """Decide whether a training round closes, fails or stays open.

    A round closes as soon as `clients_per_round` updates arrived or the whole
    cohort reported; at its deadline it closes with at least `min_clients`
    updates and fails with fewer.
    """
    enough = progress.received >= min(config.clients_per_round, progress.cohort)
    if enough and progress.received > 0:
        return Closing.CLOSE
    if not progress.expired:
        return Closing.KEEP_OPEN
    return Closing.CLOSE if progress.received >= config.min_clients else Closing.FAIL
