"""The privacy budget: refuse a round that would spend more than the target (ε, δ).

The check runs BEFORE a round starts (before the cohort is even sampled): it
composes the events of the rounds already released with the event of the
round about to run and compares that ε, not the ε spent so far, with the
target. A round that would overshoot never starts, so the released models
never exceed the budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from privacy.dp.accounting import Accountant, epsilon
from privacy.dp.events import GaussianEvent, PrivacyEvent

__all__ = ["BudgetCheck", "PrivacyBudget", "calibrate_noise_multiplier", "check_budget"]


@dataclass(frozen=True, slots=True)
class PrivacyBudget:
    """A target (ε, δ) for a whole federation.

    Raises:
        ValueError: ε is not finite and > 0, or δ is not in (0, 1).
    """

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.epsilon) or self.epsilon <= 0:
            raise ValueError(f"budget epsilon must be finite and > 0, got {self.epsilon!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"budget delta must be in (0, 1), got {self.delta!r}")


@dataclass(frozen=True, slots=True)
class BudgetCheck:
    """Whether the next round may run.

    Attributes:
        allowed: True when `epsilon_if_run <= budget.epsilon`.
        epsilon_if_run: ε of the released rounds plus the next one.
        epsilon_spent: ε of the released rounds alone.
    """

    allowed: bool
    epsilon_if_run: float
    epsilon_spent: float


def check_budget(
    spent: Sequence[PrivacyEvent],
    next_round: PrivacyEvent,
    budget: PrivacyBudget,
    accountant: Accountant | None = None,
) -> BudgetCheck:
    """Decide whether a round described by `next_round` may start.

    Args:
        spent: the events of every round released so far (persisted).
        next_round: the event the round would add if it ran.
        budget: the federation's target (ε, δ).
        accountant: RDP unless given.
    """
    spent_eps = epsilon(spent, budget.delta, accountant)
    if_run = epsilon([*spent, next_round], budget.delta, accountant)
    return BudgetCheck(
        allowed=if_run <= budget.epsilon, epsilon_if_run=if_run, epsilon_spent=spent_eps
    )


def calibrate_noise_multiplier(
    budget: PrivacyBudget,
    *,
    sampling_rate: float,
    rounds: int,
    accountant: Accountant | None = None,
) -> float:
    """Return the smallest noise multiplier (to 0.1%) that fits `rounds` rounds in `budget`.

    ε decreases as the noise multiplier grows, so a bisection on a bracket
    that is doubled until it holds finds it.

    Raises:
        ValueError: no multiplier up to 10^4 fits (the budget is too small).
    """

    def spends(multiplier: float) -> float:
        event = GaussianEvent(sampling_rate, multiplier, rounds)
        return epsilon([event], budget.delta, accountant)

    low, high = 0.0, 1.0
    while spends(high) > budget.epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(
                f"no noise multiplier up to 1e4 fits {rounds} rounds at q={sampling_rate} "
                f"in {budget}; raise epsilon or lower the rounds"
            )
    while high - low > 1e-3 * high:
        middle = (low + high) / 2
        if spends(middle) > budget.epsilon:
            low = middle
        else:
            high = middle
    return high
