"""`Fleet`: many virtual clients in one process, for simulation.

The clients run one after another, never at once, so they share one torch
model object (each loads the round's parameters before it trains) and each
keeps only its data shard. No threads: a simulation steps the fleet and the
aggregator in turn, which makes a run deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from clients.client import Client
from clients.trainer import Device, TensorData, TorchTrainer
from fedcore import TaskAction, Transport
from privacy.secagg import ClientIdentity

__all__ = ["Fleet"]


class Fleet:
    """Virtual clients stepped sequentially in a fixed order."""

    def __init__(self, clients: Sequence[Client]) -> None:
        self._clients = tuple(clients)

    @classmethod
    def build(  # noqa: PLR0913 -- keyword-only options of one construction
        cls,
        model: torch.nn.Module,
        shards: Mapping[str, TensorData],
        connect: Callable[[str], Transport],
        *,
        federation_id: str,
        seed: int = 0,
        identities: Mapping[str, ClientIdentity] | None = None,
    ) -> Fleet:
        """Build one client per shard, all training the one `model`.

        Training runs on the device `model` is on: move it first, e.g.
        `model.to("cuda")`.

        Args:
            model: the network every client trains in turn.
            shards: client id → that client's features and labels, in the
                order the clients are stepped. A shard may be empty.
            connect: returns the transport of a client id.
            federation_id: the federation every client joins.
            seed: the base seed; each client's shuffling seed derives from it
                and the client's position.
            identities: client id → its identity registered at enrollment,
                for federations with secure aggregation.
        """
        device = _device_of(model)
        clients = [
            Client(
                connect(client_id),
                TorchTrainer(model, data, device=device, seed=_client_seed(seed, index)),
                federation_id,
                identity=None if identities is None else identities[client_id],
            )
            for index, (client_id, data) in enumerate(shards.items())
        ]
        return cls(clients)

    @property
    def clients(self) -> tuple[Client, ...]:
        """The clients, in stepping order."""
        return self._clients

    @property
    def finished(self) -> bool:
        """Whether every client was told the federation finished."""
        return all(_is_finished(c) for c in self._clients)

    def step_all(self, *, torch_threads: int | None = 1) -> int:
        """Step every client not yet finished once, in order; return how many trained.

        Args:
            torch_threads: torch's intra-op threads while stepping (restored
                after), or None to leave torch's setting alone. One thread is
                the default because a virtual client's batches are tiny: a
                thread pool costs more than it saves on them, and many times
                more on a busy machine.
        """
        previous = torch.get_num_threads()
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        try:
            return sum(
                1
                for client in self._clients
                if not _is_finished(client) and client.step() is TaskAction.TRAIN
            )
        finally:
            torch.set_num_threads(previous)


def _is_finished(client: Client) -> bool:
    return client.finished


def _device_of(model: torch.nn.Module) -> Device:
    tensor = next(iter(model.state_dict().values()), None)
    kind = tensor.device.type if tensor is not None else "cpu"
    if kind == "cuda":
        return "cuda"
    if kind != "cpu":
        raise ValueError(f"the model is on {kind!r}; move it to 'cpu' or 'cuda'")
    return "cpu"


def _client_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
