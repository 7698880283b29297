"""A federation's secure aggregation settings, and the planning of one round.

The aggregator keeps a `SecAggConfig` per federation and, when it opens a
round, calls `plan_round` with the round's cohort: the degree and threshold
follow the threat model (`graph.choose_parameters`), the ring follows the
quantization and the cohort size (`Quantization.ring_bits`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from privacy.secagg.graph import ThreatModel, choose_parameters
from privacy.secagg.keys import SECRET_BYTES
from privacy.secagg.messages import RoundSetup
from privacy.secagg.quantize import Quantization

__all__ = ["SecAggConfig", "plan_round"]


@dataclass(frozen=True, slots=True)
class SecAggConfig:
    """A federation's secure aggregation settings.

    Attributes:
        vector_length: P, the number of update values (the model's size).
        quantization: clipping, weighting and rounding to integers.
        threat: the corruption and dropout the parameters must withstand.
    """

    vector_length: int
    quantization: Quantization
    threat: ThreatModel = field(default_factory=ThreatModel)


def plan_round(
    config: SecAggConfig,
    *,
    federation_id: str,
    round: int,
    cohort: Iterable[str],
    graph_seed: bytes | None = None,
) -> RoundSetup:
    """Choose the round's graph degree, threshold and ring for `cohort`.

    Args:
        config: the federation's settings.
        federation_id: the federation.
        round: the round number.
        cohort: the selected clients (at least 3, distinct).
        graph_seed: the public seed of the neighbour graph; 32 fresh random
            bytes if None. The aggregator persists the setup before sending it.

    Raises:
        ValueError: a duplicate client, too few clients, or a ring over 64 bits.
    """
    members = list(cohort)
    if len(set(members)) != len(members):
        raise ValueError("the cohort lists a client twice")
    ordered = tuple(sorted(members))
    parameters = choose_parameters(len(ordered), config.threat)
    return RoundSetup(
        federation_id=federation_id,
        round=round,
        cohort=ordered,
        degree=parameters.degree,
        threshold=parameters.threshold,
        graph_seed=graph_seed if graph_seed is not None else os.urandom(SECRET_BYTES),
        vector_length=config.vector_length,
        quantization=config.quantization,
        ring_bits=config.quantization.ring_bits(len(ordered)),
    )
