"""Accountants: ε of a list of privacy events, as a pure function of the list.

Two implementations of one `Accountant` protocol, both on Google's
`dp-accounting` library (imported lazily: it is in the `[dp]` extra and takes
most of a second to import, and neither clients nor `import privacy` need it):

- `RdpAccountant` (the default): Rényi DP (Mironov, CSF 2017) with the
  conversion to (ε, δ) of Canonne, Kamath, Steinke (2020) that dp-accounting
  implements. It is the standard of the federated DP literature (McMahan et
  al. 2018 and Kairouz et al. 2021 account with RDP), it was Opacus's
  accountant until 1.3, and it is the only one of the two that composes the
  distributed discrete Gaussian: RDP curves of different mechanisms simply
  add. It over-estimates ε, which is the safe side for a budget.
- `PldAccountant`: privacy loss distributions (Meiser & Mohammadi, CCS 2018;
  Koskela et al. 2020), tight up to its discretization, so it grants more
  rounds for the same budget; Gaussian events only.

Both group identical events before composing (composition is commutative),
so the cost grows with the number of distinct round configurations, not with
the number of rounds.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedcore import Array
from privacy.dp.events import DistributedGaussianEvent, GaussianEvent, PrivacyEvent

__all__ = [
    "Accountant",
    "PldAccountant",
    "RdpAccountant",
    "distributed_gaussian_rdp",
    "epsilon",
]


class Accountant(Protocol):
    """Computes the ε that a list of events spends at a given δ."""

    def epsilon(self, events: Sequence[PrivacyEvent], delta: float) -> float:
        """Return ε of all `events` composed, at `delta`; 0 for no events."""
        ...


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _gaussian_groups(events: Sequence[PrivacyEvent]) -> Counter[tuple[float, float]]:
    groups: Counter[tuple[float, float]] = Counter()
    for event in events:
        if isinstance(event, GaussianEvent):
            groups[(event.sampling_rate, event.noise_multiplier)] += event.count
    return groups


def _library_event(groups: Counter[tuple[float, float]]) -> Any:
    """Return the dp-accounting event of the grouped Gaussian rounds."""
    import dp_accounting as dpa  # lazy: the [dp] extra, slow to import

    return dpa.ComposedDpEvent(
        [
            dpa.SelfComposedDpEvent(
                dpa.PoissonSampledDpEvent(rate, dpa.GaussianDpEvent(multiplier)), count
            )
            for (rate, multiplier), count in groups.items()
        ]
    )


@functools.lru_cache(maxsize=8)
def _orders(orders: tuple[float, ...] | None) -> tuple[float, ...]:
    from dp_accounting import rdp  # lazy, see the module docstring

    return tuple(rdp.RdpAccountant(orders=None if orders is None else list(orders)).orders)


@functools.lru_cache(maxsize=1024)
def _sampled_gaussian_rdp(
    rate: float, multiplier: float, orders: tuple[float, ...] | None
) -> tuple[float, ...]:
    """Return the RDP of ONE round of the Poisson-sampled Gaussian (dp-accounting).

    Cached: the same few (q, z) pairs recur in every budget check of a
    federation, and dp-accounting takes tens of milliseconds per pair.
    """
    from dp_accounting import rdp  # lazy, see the module docstring

    library = rdp.RdpAccountant(orders=None if orders is None else list(orders))
    library.compose(_library_event(Counter({(rate, multiplier): 1})))
    return tuple(float(value) for value in library.rdp)


@dataclass(frozen=True, slots=True)
class RdpAccountant:
    """Rényi DP accounting (dp-accounting's `RdpAccountant`), for every event kind.

    Attributes:
        orders: the RDP orders; None means dp-accounting's defaults
            (1.1 ... 10.9, 11 ... 63, 128, 256, 512, 1024).
    """

    orders: tuple[float, ...] | None = None

    def curve(self, events: Sequence[PrivacyEvent]) -> tuple[Array, Array]:
        """Return the RDP orders and the composed RDP of `events` at each order."""
        orders = np.array(_orders(self.orders))
        total = np.zeros(orders.size)
        for (rate, multiplier), count in _gaussian_groups(events).items():
            total += count * np.array(_sampled_gaussian_rdp(rate, multiplier, self.orders))
        distributed: Counter[DistributedGaussianEvent] = Counter()
        for event in events:
            if isinstance(event, DistributedGaussianEvent):
                distributed[event] += event.count
        for event, count in distributed.items():
            total += count * distributed_gaussian_rdp(event, orders)
        return orders, total

    def epsilon(self, events: Sequence[PrivacyEvent], delta: float) -> float:
        """Return ε of all `events` composed, at `delta`."""
        from dp_accounting import rdp  # lazy, see the module docstring

        _check_delta(delta)
        orders, total = self.curve(events)
        return float(rdp.compute_epsilon(orders, total, delta)[0])


@dataclass(frozen=True, slots=True)
class PldAccountant:
    """Privacy-loss-distribution accounting (dp-accounting's `PLDAccountant`).

    Tighter than RDP; composes `GaussianEvent`s only.

    Attributes:
        value_discretization_interval: the PLD grid; dp-accounting's default
            1e-4 keeps ε within about 1e-3 of the exact value for typical
            federated settings.
    """

    value_discretization_interval: float = 1e-4

    def epsilon(self, events: Sequence[PrivacyEvent], delta: float) -> float:
        """Return ε of all `events` composed, at `delta`.

        Raises:
            ValueError: an event is not a `GaussianEvent`.
        """
        from dp_accounting import pld  # lazy, see the module docstring

        _check_delta(delta)
        if any(not isinstance(event, GaussianEvent) for event in events):
            raise ValueError(
                "PldAccountant composes Gaussian events only; account distributed "
                "discrete Gaussian rounds with RdpAccountant"
            )
        library = pld.PLDAccountant(
            value_discretization_interval=self.value_discretization_interval
        )
        library.compose(_library_event(_gaussian_groups(events)))
        return float(library.get_epsilon(delta))


def epsilon(
    events: Sequence[PrivacyEvent], delta: float, accountant: Accountant | None = None
) -> float:
    """Return the ε that `events` spend at `delta` (RDP unless `accountant` says otherwise).

    A pure function of its arguments: the same list (for instance rebuilt with
    `load_events` after a restart) gives the same ε.
    """
    return (accountant or RdpAccountant()).epsilon(events, delta)


def distributed_gaussian_rdp(event: DistributedGaussianEvent, orders: Array) -> Array:
    """Return the RDP of one round of the distributed discrete Gaussian at `orders`.

    The unsampled curve is Kairouz, Liu, Steinke, "The Distributed Discrete
    Gaussian Mechanism for Federated Learning with Secure Aggregation" (ICML
    2021), Theorem 1 with Proposition 14 (Eq. 17): the sum of n clients'
    discrete Gaussians N_Z(0, sigma²) is close to N_Z(0, n·sigma²), and the gap τ
    enters the bound. Poisson sampling with rate q < 1 is applied with the
    general upper bound of Zhu & Wang, "Poisson Subsampled Rényi Differential
    Privacy" (ICML 2019), Theorem 5, at integer orders, as the paper's own
    accounting code does (google-research/federated, distributed_dp); for a
    fractional order alpha the bound at ceil(alpha) is used, valid because RDP is
    non-decreasing in the order.
    """
    alphas = np.asarray(orders, dtype=np.float64)
    base = _unsampled(event)
    unsampled = base(alphas)
    if event.sampling_rate == 1:
        return unsampled
    q = event.sampling_rate
    sampled = np.array([_poisson_subsampled(math.ceil(a), q, base) for a in alphas])
    result: Array = np.minimum(sampled, unsampled)
    return result


def _unsampled(event: DistributedGaussianEvent) -> Callable[[Array], Array]:
    """Return alpha ↦ RDP of the unsampled distributed discrete Gaussian (Kairouz et al.)."""
    n, variance, dim = event.min_survivors, event.local_variance, event.dimension
    central_std = math.sqrt(n * variance)
    l2 = event.l2_sensitivity / central_std
    l1 = event.l1_sensitivity / central_std
    # τ of Theorem 1: how far the sum of n discrete Gaussians is from one
    # discrete Gaussian of n times the variance; 0 for a single client.
    tau = 10.0 * sum(math.exp(-2.0 * math.pi**2 * variance * k / (k + 1)) for k in range(1, n))
    root_d = math.sqrt(dim)

    def curve(alpha: Array) -> Array:
        first = alpha * l2**2 / 2.0 + tau * dim
        second = alpha / 2.0 * (l2**2 + 2.0 * l1 * tau + tau**2 * dim)
        third = alpha / 2.0 * (l2 + root_d * tau) ** 2
        result: Array = np.minimum(np.minimum(first, second), third)
        return result

    return curve


def _poisson_subsampled(alpha: int, q: float, base: Callable[[Array], Array]) -> float:
    """Return Zhu & Wang's (ICML 2019) Theorem 5 bound at integer order `alpha` >= 2."""
    alpha = max(alpha, 2)
    ells = np.arange(2, alpha + 1, dtype=np.float64)
    js = np.arange(1, alpha + 1, dtype=np.float64)
    # log C(alpha, l) for l = 1..alpha by a running sum, exact enough and scipy-free.
    log_binom = np.cumsum(np.log((alpha - js + 1) / js))[1:]
    log1m_q = math.log1p(-q)
    terms = log_binom + ells * math.log(q) + (alpha - ells) * log1m_q + (ells - 1) * base(ells)
    # Theorem 5's constants: 1 for l = 2, 3 for l >= 3 (the price of a
    # mechanism that is not known to satisfy the condition of Theorem 6).
    terms[1:] += math.log(3.0)
    head = (alpha - 1) * log1m_q + math.log(alpha * q - q + 1)
    log_sum = float(np.logaddexp.reduce(np.concatenate(([head], terms))))
    return log_sum / (alpha - 1)
