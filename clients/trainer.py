"""The `Trainer` protocol and `TorchTrainer`, local training with plain SGD or DP-SGD.

A trainer turns the round's model into a trained model on the client's own
data. `TorchTrainer` is built to be called thousands of times in a
simulation: it keeps one model, loads each round's parameters into it in
place, and moves its data to the device once.

When the round's `TrainConfig.dpsgd` is set, `TorchTrainer` trains with
DP-SGD through Opacus (`privacy.dp.dpsgd`), imported only then: a client
of plain federations runs without Opacus installed.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import torch
from torch.nn import functional
from torch.utils.data import DataLoader, TensorDataset

from clients.torchstate import StateViews, copy_into, to_parameters
from fedcore import (
    BudgetExhausted,
    ConfigError,
    DpSgdSettings,
    ParameterSet,
    TrainConfig,
    UpdateMeta,
)

if TYPE_CHECKING:
    from privacy.dp.dpsgd import DpSgd, History

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

    With `config.dpsgd`, a round runs DP-SGD instead (Abadi et al. 2016, via
    Opacus): Poisson-sampled batches at rate q = 1 / ceil(n / batch_size),
    every example's gradient clipped, Gaussian noise added. The trainer keeps
    the client's accountant history across rounds (`dp_history`), reports
    its ε so far as the metric `epsilon` (and `dp_seeded` = 1.0 when the
    noise came from a fixed seed), and refuses, before training, a round
    that would take ε past the budget (`BudgetExhausted`).
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
        self._views = StateViews(self._state)
        self._params: list[torch.Tensor] = list(self.model.parameters())
        self._modules = tuple(self.model.modules())
        self._generator = torch.Generator()
        self._data = _place(data, self.device)
        self._dp_history: History = []
        # Calibrated noise multipliers by (settings, q, steps per round): Opacus
        # bisects for up to seconds, once per client.
        self._dp_noise: dict[tuple[DpSgdSettings, float, int], float] = {}

    @property
    def num_examples(self) -> int:
        """Number of training examples (for a `DataLoader`, of its data set if sized)."""
        if isinstance(self._data, DataLoader):
            dataset = self._data.dataset
            return len(dataset) if hasattr(dataset, "__len__") else 0
        return len(self._data[1])

    @property
    def dp_history(self) -> History:
        """The client's DP-SGD accountant history so far: (z, q, steps) triples."""
        return list(self._dp_history)

    def fit(
        self, params: ParameterSet, config: TrainConfig, *, round_number: int = 0
    ) -> tuple[ParameterSet, UpdateMeta]:
        """Train from `params` for `config.local_epochs` epochs; see `Trainer.fit`.

        A client without examples returns `params` unchanged with weight 0.

        Raises:
            BudgetExhausted: DP-SGD only: this round would take the client's
                ε past its budget; nothing was trained.
            ConfigError: DP-SGD only: Opacus is not installed, the model has
                layers it cannot train (BatchNorm), or δ is not below 1/n.
        """
        if isinstance(self._data, tuple) and len(self._data[1]) == 0:
            return params, UpdateMeta(num_examples=0)
        if config.dpsgd is not None:
            return self._fit_private(params, config, config.dpsgd, round_number)
        self._views.load(params)
        self._reseed(_round_seed(self._seed, round_number))
        # Module.train() walks the whole module tree; most calls find it set.
        if not all(module.training for module in self._modules):
            self.model.train()
        loss_sum, seen = self._train(config)
        if seen == 0:
            return params, UpdateMeta(num_examples=0)
        metrics = {"train_loss": loss_sum.item() / seen}
        # In the order of `params`, which may differ from the state dict's.
        trained = self._views.read(params)
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

    def _fit_private(
        self, params: ParameterSet, config: TrainConfig, settings: DpSgdSettings, round_number: int
    ) -> tuple[ParameterSet, UpdateMeta]:
        try:
            from privacy.dp import dpsgd
        except ImportError as exc:
            problem = "this federation trains with DP-SGD: install Opacus (fedcore[dp])"
            raise ConfigError([problem]) from exc
        self.model.train()  # Opacus refuses a model in eval mode
        self._check_private(settings)
        noise_seed, sampling_seed = _dp_seeds(settings.seed, self._seed, round_number)
        loader = self._private_loader(config.batch_size, sampling_seed)
        z, planned, epsilon = self._plan_private(settings, config.local_epochs, len(loader))
        if epsilon > settings.target_epsilon:
            raise BudgetExhausted(
                f"round {round_number} would take this client's epsilon to {epsilon:.4g}, "
                f"past its budget {settings.target_epsilon:g} (delta {settings.delta:g}); "
                "it trains no more rounds"
            )
        copy_into(self._state, params)
        dp_config = dpsgd.DpSgdConfig(
            max_grad_norm=settings.max_grad_norm,
            noise_multiplier=z,
            delta=settings.delta,
            accountant=settings.accountant,
            seed=noise_seed,
            history=self._dp_history,
        )
        optimizer = torch.optim.SGD(self._params, lr=config.lr)
        private = dpsgd.make_private(self.model, optimizer, loader, dp_config)
        try:
            loss = self._train_private(private, config.local_epochs)
        finally:
            private.close()
        self._dp_history = private.history()
        if self._dp_history != planned:  # Opacus records the planned steps; recount if not
            epsilon = private.epsilon()
        metrics = {"train_loss": loss, "epsilon": epsilon, "noise_multiplier": z}
        if private.seeded:
            metrics["dp_seeded"] = 1.0
        trained = to_parameters({name: self._state[name] for name in params}, copy=True)
        return trained, UpdateMeta(num_examples=self.num_examples, metrics=metrics)

    def _check_private(self, settings: DpSgdSettings) -> None:
        from privacy.dp.dpsgd import model_problems

        problems = [f"the model cannot train with DP-SGD: {p}" for p in model_problems(self.model)]
        if problems:
            problems.append("replace BatchNorm with GroupNorm (opacus ModuleValidator.fix does)")
        n = self.num_examples
        if settings.delta * n >= 1:
            # δ >= 1/n allows releasing one example outright with probability δ each.
            problems.append(f"dpsgd delta ({settings.delta:g}) must be below 1/n for n = {n}")
        if problems:
            raise ConfigError(problems)

    def _plan_private(
        self, settings: DpSgdSettings, epochs: int, batches: int
    ) -> tuple[float, History, float]:
        """Return a round's z, the accountant history after it, and the ε it leaves."""
        from privacy.dp.dpsgd import compose, compute_epsilon

        # Opacus's Poisson loader draws `batches` batches an epoch at this rate.
        rate, steps = 1 / batches, epochs * batches
        z = settings.noise_multiplier
        if z is None:
            key = (settings, rate, steps)
            if key not in self._dp_noise:
                # Calibrated once per client, for every round of the federation.
                total = (settings.rounds or 1) * steps
                self._dp_noise[key] = _calibrated(settings, rate, total)
            z = self._dp_noise[key]
        planned = compose(self._dp_history, z, rate, steps)
        epsilon = compute_epsilon(planned, delta=settings.delta, accountant=settings.accountant)
        return z, planned, epsilon

    def _private_loader(self, batch_size: int, seed: int | None) -> DataLoader[Any]:
        """Return a loader for Opacus to Poisson-sample, with its own sampling generator.

        Opacus samples with the loader's generator (torch's global one if
        none): a CSPRNG-seeded one keeps the sampling, which the privacy
        amplification rests on, as unpredictable as the noise.
        """
        generator = torch.Generator()
        generator.manual_seed(secrets.randbits(63) if seed is None else seed)
        if isinstance(self._data, DataLoader):
            source = self._data
            return DataLoader(
                source.dataset,
                batch_size=source.batch_size or batch_size,
                collate_fn=source.collate_fn,
                num_workers=source.num_workers,
                generator=generator,
            )
        return DataLoader(TensorDataset(*self._data), batch_size=batch_size, generator=generator)

    def _train_private(self, private: DpSgd, epochs: int) -> float:
        # The loss is read per batch: DP-SGD's per-example gradients cost far more.
        loss_sum, seen = 0.0, 0
        for _ in range(epochs):
            for x, y in private.data_loader:
                labels = y.to(self.device, non_blocking=True)
                loss_sum += private.step(x.to(self.device, non_blocking=True), labels) * len(labels)
                seen += len(labels)
        return loss_sum / seen if seen else float("nan")

    def _reseed(self, seed: int) -> None:
        self._generator.manual_seed(seed)
        if isinstance(self._data, DataLoader) and isinstance(self._data.generator, torch.Generator):
            self._data.generator.manual_seed(seed)

    def _train(self, config: TrainConfig) -> tuple[torch.Tensor, int]:
        # The loss is summed on the device and read once: reading it per batch
        # would synchronize a GPU after every step.
        loss_sum: torch.Tensor | None = None
        seen = 0
        for p in self._params:
            p.grad = None  # gradients left from outside must not enter the first step
        for _ in range(config.local_epochs):
            for x, y in self._batches(batch_size=config.batch_size, shuffle=True):
                loss = functional.cross_entropy(self.model(x), y)
                torch.autograd.backward(loss)
                self._step(config.lr)
                count = y.shape[0]
                # The first batch starts the sum and the next ones add to it in
                # place: the fewest tensor ops, which small batches pay for.
                if loss_sum is None:
                    loss_sum = loss.detach() * count
                else:
                    loss_sum.add_(loss.detach(), alpha=count)
                seen += count
        if loss_sum is None:
            return torch.zeros((), device=self.device), seen
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


def _calibrated(settings: DpSgdSettings, rate: float, steps: int) -> float:
    from privacy.dp.dpsgd import calibrate_noise

    try:
        return calibrate_noise(
            target_epsilon=settings.target_epsilon,
            delta=settings.delta,
            sample_rate=rate,
            steps=steps,
            accountant=settings.accountant,
        )
    except ValueError as exc:
        raise ConfigError([f"dpsgd: {exc} (target_epsilon {settings.target_epsilon:g})"]) from None


def _dp_seeds(
    seed: int | None, client_seed: int, round_number: int
) -> tuple[int | None, int | None]:
    """Return the (noise, sampling) seeds of a round: None, None without a fixed seed.

    A fixed seed is for tests and simulation only; mixing in the client's
    seed and the round keeps clients and rounds from drawing the same noise.
    """
    if seed is None:
        return None, None
    state = np.random.SeedSequence([seed % 2**64, client_seed, round_number])
    noise, sampling = state.generate_state(2, np.uint64)
    return int(noise) >> 1, int(sampling) >> 1


def _round_seed(seed: int, round_number: int) -> int:
    # SeedSequence hashes the pair, so neighbouring (seed, round) pairs give
    # unrelated streams instead of overlapping ones.
    state = np.random.SeedSequence([seed, round_number]).generate_state(1, np.uint64)
    return int(state[0])
