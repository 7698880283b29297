"""privacy.secagg: secure aggregation (SecAgg+) as two pure state machines.

The client half (`SecAggClient`) and the server half (`SecAggServer`) of
SecAgg+ (Bell et al., CCS 2020, built on Bonawitz et al., CCS 2017) exchange
the messages of `messages` over four stages: advertise-keys, share-keys,
masked-input and unmask. Neither does I/O, reads a clock or starts a thread:
the aggregator and the client SDK move the bytes and decide deadlines. The
server recovers the exact sum of the quantized updates of every client that
sent a masked input, as long as enough clients stay to the end, and never
sees an individual update. Imports fedcore, numpy and cryptography only.
"""

from privacy.secagg.client import SecAggClient
from privacy.secagg.commitments import ShareKind
from privacy.secagg.config import SecAggConfig, plan_round
from privacy.secagg.errors import MalformedMessage, ProtocolViolation, RoundFailed, SecAggError
from privacy.secagg.graph import GraphParameters, NeighbourGraph, ThreatModel, choose_parameters
from privacy.secagg.keys import ClientIdentity, Entropy, RoundKeys
from privacy.secagg.messages import (
    AdvertiseKeys,
    ClientMessage,
    EncryptedShare,
    ForwardedShare,
    KeyRoster,
    MaskedInput,
    RevealedShare,
    RoundSetup,
    ServerMessage,
    ShareDelivery,
    ShareKeys,
    Stage,
    UnmaskRequest,
    UnmaskResponse,
)
from privacy.secagg.prg import expand_mask, pairwise_sign
from privacy.secagg.quantize import (
    LOSS_VALUES,
    Quantization,
    flatten,
    loss_of,
    unflatten,
    with_loss,
)
from privacy.secagg.server import SecAggResult, SecAggServer, StageOutcome, Verdict
from privacy.secagg.simulation import Dropouts, SimulatedClient, SimulationReport, simulate_round

__all__ = [
    "LOSS_VALUES",
    "AdvertiseKeys",
    "ClientIdentity",
    "ClientMessage",
    "Dropouts",
    "EncryptedShare",
    "Entropy",
    "ForwardedShare",
    "GraphParameters",
    "KeyRoster",
    "MalformedMessage",
    "MaskedInput",
    "NeighbourGraph",
    "ProtocolViolation",
    "Quantization",
    "RevealedShare",
    "RoundFailed",
    "RoundKeys",
    "RoundSetup",
    "SecAggClient",
    "SecAggConfig",
    "SecAggError",
    "SecAggResult",
    "SecAggServer",
    "ServerMessage",
    "ShareDelivery",
    "ShareKeys",
    "ShareKind",
    "SimulatedClient",
    "SimulationReport",
    "Stage",
    "StageOutcome",
    "ThreatModel",
    "UnmaskRequest",
    "UnmaskResponse",
    "Verdict",
    "choose_parameters",
    "expand_mask",
    "flatten",
    "loss_of",
    "pairwise_sign",
    "plan_round",
    "simulate_round",
    "unflatten",
    "with_loss",
]
