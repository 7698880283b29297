"""The client half of secure aggregation (SecAgg+), driven one stage per check-in.

When a check-in answers with a secure task, `SecureParticipant.answer`
fetches the server message that opens the task's stage, computes this
client's reply with `privacy.secagg.SecAggClient`, and sends it. The client
trains at the masked-input stage and sends only its masked, quantized
delta: the aggregator never sees the update itself. A retry of a stage sends
the same reply again, which the aggregator takes once.

In a federation with distributed DP the opening also carries the round's
distributed discrete Gaussian parameters: the client clips, rotates, rounds
and noises its delta with `privacy.dp.distributed.encode` (noise from the OS
CSPRNG) and masks that ring vector, so the unmasked sum already holds every
survivor's noise share. The client checks that the parameters fit the
round's setup; it cannot check that the noise multiplier is what the
federation promised (the server announces it), which an operator who does
not trust the server pins in the clients' configuration.

On a `ProtocolViolation` (the server's message breaks the protocol) the
client abandons the round and logs why; it takes part again from the next
round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from fedcore import (
    DistributedNoise,
    ParameterSet,
    RoundStateError,
    SecAggSetup,
    Task,
    Transport,
    TransportError,
    UpdateMeta,
)
from privacy.dp.distributed import DistributedDp, encode
from privacy.dp.noise import NoiseSource
from privacy.secagg import (
    ClientIdentity,
    KeyRoster,
    ProtocolViolation,
    RoundSetup,
    SecAggClient,
    ShareDelivery,
    Stage,
    UnmaskRequest,
    flatten,
    with_loss,
)

__all__ = ["Progress", "SecureParticipant"]

logger = logging.getLogger(__name__)

# Trains and returns (delta, meta) for the task's round.
Training = Callable[[], tuple[ParameterSet, UpdateMeta]]


class Progress(Enum):
    """What one secure check-in achieved."""

    WAITING = "waiting"
    """The stage's server message is not ready yet."""
    SENT = "sent"
    """This client's reply for the stage was sent."""
    TRAINED = "trained"
    """This client trained and sent its masked input."""
    ABORTED = "aborted"
    """The round was abandoned (a protocol violation or a refusal)."""


@dataclass(slots=True)
class _Round:
    number: int
    machine: SecAggClient | None = None
    setup: RoundSetup | None = None
    noise: DistributedDp | None = None
    masked: bytes | None = None
    aborted: bool = False


class SecureParticipant:
    """Answers the stages of secure rounds for one client identity."""

    def __init__(self, identity: ClientIdentity, transport: Transport, federation_id: str) -> None:
        self.identity = identity
        self._transport = transport
        self._federation_id = federation_id
        self._round: _Round | None = None
        self.last_meta: UpdateMeta | None = None

    def answer(self, task: Task, train: Training) -> Progress:
        """Answer the stage that `task` names.

        Raises:
            TransportError: a task without round or stage.
            FedcoreError: the transport failed.
        """
        if task.round is None or task.stage is None:
            raise TransportError("the aggregator sent a secure task without round or stage")
        current = self._round
        if current is None or current.number != task.round:
            current = self._round = _Round(task.round)
        if current.aborted:
            return Progress.ABORTED
        try:
            return self._answer(current, Stage(task.stage), train)
        except (ProtocolViolation, RoundStateError) as exc:
            logger.warning("round %d: left secure aggregation: %s", task.round, exc)
            current.aborted = True
            return Progress.ABORTED

    def _answer(self, current: _Round, stage: Stage, train: Training) -> Progress:
        fid, number = self._federation_id, current.number
        data = self._transport.fetch_secagg(fid, number, stage.value)
        if data is None:
            return Progress.WAITING
        reply, progress = self._reply(current, stage, data, train)
        self._transport.send_secagg(fid, number, stage.value, reply)
        return progress

    def _reply(
        self, current: _Round, stage: Stage, data: bytes, train: Training
    ) -> tuple[bytes, Progress]:
        if stage is Stage.ADVERTISE_KEYS:
            return self._open(current, data).advertise_keys().to_bytes(), Progress.SENT
        machine, setup = current.machine, current.setup
        if machine is None or setup is None:
            raise RoundStateError(f"the {stage} stage came before this client advertised keys")
        if stage is Stage.SHARE_KEYS:
            return machine.share_keys(KeyRoster.from_bytes(data)).to_bytes(), Progress.SENT
        if stage is Stage.UNMASK:
            return machine.unmask(UnmaskRequest.from_bytes(data)).to_bytes(), Progress.SENT
        if current.masked is not None:  # a retry: the same reply, without training again
            return current.masked, Progress.SENT
        delivery = ShareDelivery.from_bytes(data)
        delta, meta = train()
        if current.noise is not None:
            # Every client counts once in distributed DP: no weight is sent.
            codes = encode(delta, current.noise, NoiseSource.secure())
            masked = machine.masked_ring_input(delivery, codes)
        elif setup.quantization is not None:
            weight = min(float(meta.num_examples), setup.quantization.max_weight)
            # The training loss travels in the masked vector too, so the
            # aggregator learns only its weighted mean.
            loss = meta.metrics.get("train_loss")
            vector = with_loss(flatten(delta), loss, setup.quantization.clip)
            masked = machine.masked_input(delivery, vector, weight=weight)
        else:
            raise ProtocolViolation("a round without quantization and without DP parameters")
        self.last_meta = meta
        current.masked = masked.to_bytes()
        return current.masked, Progress.TRAINED

    def _open(self, current: _Round, data: bytes) -> SecAggClient:
        if current.machine is None:
            opening = SecAggSetup.model_validate_json(data)
            setup = RoundSetup.from_bytes(opening.setup)
            if (setup.federation_id, setup.round) != (self._federation_id, current.number):
                raise ProtocolViolation(
                    f"the setup of federation {setup.federation_id!r} round {setup.round} "
                    f"came for round {current.number}: a replay"
                )
            registry = {c: bytes.fromhex(k) for c, k in opening.registry.items()}
            current.noise = _noise(opening.distributed_dp, setup)
            current.machine = SecAggClient(self.identity, setup=setup, registry=registry)
            current.setup = setup
        return current.machine


def _noise(message: DistributedNoise | None, setup: RoundSetup) -> DistributedDp | None:
    """Return the round's distributed DP parameters, checked against its setup."""
    if message is None:
        return None
    try:
        params = DistributedDp(**message.model_dump())
    except ValueError as exc:
        raise ProtocolViolation(f"invalid distributed DP parameters: {exc}") from None
    expected = (None, params.dimension, params.bits)
    if (setup.quantization, setup.vector_length, setup.ring_bits) != expected:
        raise ProtocolViolation(
            "the distributed DP parameters do not match the round's setup "
            f"(vector of {setup.vector_length} values in {setup.ring_bits} bits, "
            f"expected {params.dimension} in {params.bits})"
        )
    return params
