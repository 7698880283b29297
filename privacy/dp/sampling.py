"""Poisson sampling of a round's cohort, the scheme the DP accountant assumes.

Privacy amplification by subsampling (the `sampling_rate` q of every
accounting event) holds only if each client is in the cohort independently
with probability q, from the whole population, and the sample is hidden from
observers. A cohort drawn any other way (fixed size, only from clients that
happen to be online, with over-selection) is NOT what the accountant
composes, and its ε is then wrong. For the same reason the generator should
be a `NoiseSource.secure()` generator in a real run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["expected_cohort", "poisson_sample"]


def poisson_sample(client_ids: Sequence[str], q: float, rng: np.random.Generator) -> list[str]:
    """Return each id independently with probability `q`, in the input order.

    Args:
        client_ids: the whole population (every enrolled, non-revoked client),
            not only the clients online now.
        q: the sampling rate, in (0, 1].
        rng: the generator; seed it from the OS CSPRNG in a real run.

    Raises:
        ValueError: `q` is not in (0, 1] or an id repeats.
    """
    if not 0 < q <= 1:
        raise ValueError(f"sampling rate q must be in (0, 1], got {q!r}")
    if len(set(client_ids)) != len(client_ids):
        raise ValueError("client ids repeat; each client must appear once in the population")
    keep = rng.random(len(client_ids)) < q
    return [client for client, kept in zip(client_ids, keep, strict=True) if kept]


def expected_cohort(num_clients: int, q: float) -> float:
    """Return q·N, the expected cohort size that DP-FedAvg divides the noisy sum by.

    Raises:
        ValueError: `q` is not in (0, 1] or `num_clients` < 1.
    """
    if not 0 < q <= 1 or num_clients < 1 or not math.isfinite(q):
        raise ValueError(f"need q in (0, 1] and num_clients >= 1, got q={q!r}, N={num_clients}")
    return q * num_clients
