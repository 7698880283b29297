"""The `Trainer` protocol and `TorchTrainer`, local training with plain SGD.

A trainer turns the round's model into a trained model on the client's own
data. `TorchTrainer` is built to be called thousands of times in a
simulation: it keeps one model, loads each round's parameters into it in
place, and moves its data to the device once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch.nn import functional
from torch.utils.data import DataLoader

from clients.torchstate import copy_into, to_parameters
from fedcore import ParameterSet, TrainConfig, UpdateMeta

__all__ = ["Device", "TensorData", "TorchTrainer", "Trainer", "resolve_device"]

Device = Literal["auto", "cpu", "cuda"]
TensorData = tuple[torch.Tensor, torch.Tensor]
"""Features and integer class labels, one row per example."""


class Trainer(Protocol):
    """Local training on one client's data.

    Implementations may also offer `evaluate(params) -> dict[str, float]`;
    the client loop does not need it.
    """

    def fit(
        self, params: ParameterSet, config: TrainConfig, *, round_number: int = 0
    ) -> tuple[ParameterSet, UpdateMeta]:
        """Train from `params` and return the trained parameters (not the delta).

        Args:
            params: the round's model.
            config: epochs, batch size and learning rate of the round.
            round_number: the round, so that shuffling is reproducible per round.

        Returns:
            The trained parameters (same names, shapes and dtypes as `params`)
            and the update's metadata: the number of examples (its weight in
            the average) and metrics such as `train_loss`.
        """
        ...


def resolve_device(device: Device) -> torch.device:
    """Return the torch device for `device`; "auto" picks CUDA when available.

    Raises:
        ValueError: "cuda" was asked for on a machine without CUDA.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available; use 'auto' or 'cpu'")
    return torch.device(device)


class TorchTrainer:
    """Train a torch classifier with plain SGD and cross-entropy over mini-batches.

    Mini-batches keep the last partial batch. With tensor data the order is
    shuffled by a generator seeded from `(seed, round_number)`, so a run is
    reproducible; a `DataLoader` shuffles by its own sampler, and its
    generator, if it was given one, is reseeded the same way.

    Several trainers may share one model (a virtual fleet does): each call
    loads the round's parameters first, and plain SGD keeps no state between
    calls.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        data: TensorData | DataLoader[Any],
        *,
        device: Device = "auto",
        seed: int = 0,
    ) -> None:
        """Prepare training of `model` on `data`.

        Args:
            model: the network; it is moved to the device in place.
            data: features and labels as tensors (moved to the device once), or
                a `DataLoader` yielding `(features, labels)` batches.
            device: where to train; "auto" picks CUDA when available.
            seed: the base of the per-round shuffling seed, >= 0.

        Raises:
            ValueError: `seed` is negative, or features and labels differ in length.
        """
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self._seed = seed
        self._state = self.model.state_dict()
        self._params: list[torch.Tensor] = list(self.model.parameters())
        self._generator = torch.Generator()
        self._data = _place(data, self.device)

    @property
    def num_examples(self) -> int:
        """Number of training examples (for a `DataLoader`, of its data set if sized)."""
        if isinstance(self._data, DataLoader):
            dataset = self._data.dataset
            return len(dataset) if hasattr(dataset, "__len__") else 0
        return len(self._data[1])

    def fit(
        self, params: ParameterSet, config: TrainConfig, *, round_number: int = 0
    ) -> tuple[ParameterSet, UpdateMeta]:
        """Train from `params` for `config.local_epochs` epochs; see `Trainer.fit`.

        A client without examples returns `params` unchanged with weight 0.
        """
        if isinstance(self._data, tuple) and len(self._data[1]) == 0:
            return params, UpdateMeta(num_examples=0)
        copy_into(self._state, params)
        self._reseed(_round_seed(self._seed, round_number))
        # Module.train() walks the whole module tree; most calls find it set.
        if not all(module.training for module in self.model.modules()):
            self.model.train()
        loss_sum, seen = self._train(config)
        if seen == 0:
            return params, UpdateMeta(num_examples=0)
        metrics = {"train_loss": loss_sum.item() / seen}
        # In the order of `params`, which may differ from the state dict's.
        trained = to_parameters({name: self._state[name] for name in params}, copy=True)
        return trained, UpdateMeta(num_examples=seen // config.local_epochs, metrics=metrics)

    def evaluate(self, params: ParameterSet) -> dict[str, float]:
        """Return the mean loss and the accuracy of `params` on this client's data."""
        copy_into(self._state, params)
        self.model.eval()
        loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen = 0
        with torch.inference_mode():
            for x, y in self._batches(batch_size=1024, shuffle=False):
                logits = self.model(x)
                loss += functional.cross_entropy(logits, y, reduction="sum")
                correct += (logits.argmax(dim=1) == y).sum()
                seen += len(y)
        if seen == 0:
            return {"loss": float("nan"), "accuracy": float("nan")}
        return {"loss": loss.item() / seen, "accuracy": correct.item() / seen}

    def _reseed(self, seed: int) -> None:
        self._generator.manual_seed(seed)
        if isinstance(self._data, DataLoader) and isinstance(self._data.generator, torch.Generator):
            self._data.generator.manual_seed(seed)

    def _train(self, config: TrainConfig) -> tuple[torch.Tensor, int]:
        # The loss is summed on the device and read once: reading it per batch
        # would synchronize a GPU after every step.
        loss_sum = torch.zeros((), device=self.device)
        seen = 0
        for p in self._params:
            p.grad = None  # gradients left from outside must not enter the first step
        for _ in range(config.local_epochs):
            for x, y in self._batches(batch_size=config.batch_size, shuffle=True):
                loss = functional.cross_entropy(self.model(x), y)
                torch.autograd.backward(loss)
                self._step(config.lr)
                loss_sum += loss.detach() * len(y)
                seen += len(y)
        return loss_sum, seen

    def _step(self, lr: float) -> None:
        """Apply one plain SGD step, `p -= lr * grad`, and drop the gradients.

        The arithmetic of `torch.optim.SGD` without momentum or weight decay
        (the same kernel, bit for bit), without its cost: its first
        construction imports torch's compiler stack (about a second of a
        simulation's cold start), and every step runs its hooks and profiler
        records, a quarter of a small model's step.
        """
        params: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        for p in self._params:
            if p.grad is not None:
                params.append(p)
                grads.append(p.grad)
                p.grad = None
        if params:
            with torch.no_grad():
                torch._foreach_add_(params, grads, alpha=-lr)

    def _batches(self, *, batch_size: int, shuffle: bool) -> Iterator[TensorData]:
        if isinstance(self._data, DataLoader):
            return _loader_batches(self._data, self.device)
        x, y = self._data
        n = len(y)
        if not shuffle:
            return ((x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size))
        order = torch.randperm(n, generator=self._generator).to(self.device)
        return (
            (x[idx], y[idx]) for idx in (order[i : i + batch_size] for i in range(0, n, batch_size))
        )


def _place(
    data: TensorData | DataLoader[Any], device: torch.device
) -> TensorData | DataLoader[Any]:
    if isinstance(data, DataLoader):
        return data
    features, labels = data
    if len(features) != len(labels):
        raise ValueError(
            f"{len(features)} feature rows but {len(labels)} labels; pass one label per row"
        )
    return features.to(device), labels.to(device=device, dtype=torch.int64)


def _loader_batches(loader: DataLoader[Any], device: torch.device) -> Iterator[TensorData]:
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _round_seed(seed: int, round_number: int) -> int:
    # SeedSequence hashes the pair, so neighbouring (seed, round) pairs give
    # unrelated streams instead of overlapping ones.
    state = np.random.SeedSequence([seed, round_number]).generate_state(1, np.uint64)
    return int(state[0])
