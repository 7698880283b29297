"""Client-side DP-SGD with Opacus: per-example clipping, noise, and the client's ε.

Abadi et al., "Deep Learning with Differential Privacy" (CCS 2016), as
implemented by Opacus (Yousefpour et al. 2021): every example's gradient is
clipped to `max_grad_norm`, the clipped gradients of a Poisson-sampled batch
are summed, Gaussian noise of std `noise_multiplier * max_grad_norm` is
added, and Opacus's accountant tracks the example-level ε of the client's
data.

This module imports torch and Opacus (the `[torch]` and `[dp]` extras) and
is therefore NOT imported by `privacy` or `privacy.dp`: import
`privacy.dp.dpsgd` explicitly, from client code only.

Noise. Opacus draws noise from a `torch.Generator`. Without a seed it is
seeded here with 63 bits from the OS CSPRNG; torch's CPU generator (a
Mersenne Twister) is not itself cryptographic. Opacus's `secure_mode` needs
the torchcsprng package, which is not a dependency. A fixed `seed` is for
tests and simulation and is reported as `seeded`.

Accounting state. Opacus's accountant history is a list of
(noise_multiplier, sample_rate, steps) triples; `DpSgd.history` returns it
and `DpSgdConfig.history` restores it, so a client's ε keeps composing
across rounds and restarts. `compose` and `compute_epsilon` tell the ε of a
history before any step is taken, so that a client can refuse a round its
budget cannot pay for.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.validators import ModuleValidator
from torch.nn import functional
from torch.utils.data import DataLoader

__all__ = [
    "DpSgd",
    "DpSgdConfig",
    "calibrate_noise",
    "compose",
    "compute_epsilon",
    "make_private",
    "model_problems",
]

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
History = Sequence[tuple[float, float, int]]
"""Opacus's accountant history: (noise_multiplier, sample_rate, steps) triples."""

_WARNINGS_LOCK = threading.Lock()


@dataclass(frozen=True, slots=True, kw_only=True)
class DpSgdConfig:
    """How a client trains with DP-SGD.

    Attributes:
        max_grad_norm: C, the per-example gradient clip norm.
        noise_multiplier: z; give it or `target_epsilon`.
        target_epsilon: the ε to reach after `epochs` epochs (Opacus
            calibrates z); needs `epochs`.
        delta: δ of the client's example-level guarantee; below 1/n for n
            examples.
        epochs: the epochs `target_epsilon` is calibrated for.
        accountant: Opacus's "prv" (its default, tight) or "rdp".
        seed: a fixed noise seed (tests, simulation; NOT private).
        history: the accountant history of earlier rounds, to keep composing.
    """

    max_grad_norm: float
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    epochs: int | None = None
    accountant: Literal["prv", "rdp"] = "prv"
    seed: int | None = None
    history: Sequence[tuple[float, float, int]] = ()

    def __post_init__(self) -> None:
        problems = []
        if not math.isfinite(self.max_grad_norm) or self.max_grad_norm <= 0:
            problems.append(f"max_grad_norm must be > 0, got {self.max_grad_norm!r}")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            problems.append("give exactly one of noise_multiplier and target_epsilon")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            problems.append(f"noise_multiplier must be > 0, got {self.noise_multiplier!r}")
        if self.target_epsilon is not None and (not self.target_epsilon > 0 or not self.epochs):
            problems.append("target_epsilon must be > 0 and needs epochs >= 1")
        if not 0 < self.delta < 1:
            problems.append(f"delta must be in (0, 1), got {self.delta!r}")
        if problems:
            raise ValueError("invalid DP-SGD configuration: " + "; ".join(problems))


class DpSgd:
    """A model, optimizer and Poisson-sampling data loader made private by Opacus.

    Iterate over `data_loader` and call `step` on each batch; `epsilon()`
    reports the client's ε so far.
    """

    def __init__(
        self,
        engine: PrivacyEngine,
        parts: tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader[Any]],
        *,
        config: DpSgdConfig,
        loss: Loss,
    ) -> None:
        self.engine = engine
        self.model, self.optimizer, self.data_loader = parts
        self.config = config
        self.loss = loss

    @property
    def seeded(self) -> bool:
        """Whether the noise came from a fixed seed (record it: then NOT private)."""
        return self.config.seed is not None

    @property
    def noise_multiplier(self) -> float:
        """The noise multiplier in use (calibrated when a target ε was given)."""
        return float(self.optimizer.noise_multiplier)  # type: ignore[attr-defined]

    def step(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Run one DP-SGD step on a batch and return its loss (0.0 for an empty batch)."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        # Opacus captures per-example gradients with full backward hooks;
        # torch >= 2.8 warns when the first layer's input (the data) does not
        # require grad (pytorch/pytorch#155339), although the hooks need only
        # the output gradients (opacus#328). Floating-point data is marked
        # as requiring grad (one small extra product in the first layer)
        # rather than the warning filtered: filters are process-wide.
        if features.is_floating_point():
            features = features.detach().requires_grad_(True)
        loss = self.loss(self.model(features), labels)
        if features.requires_grad:
            loss.backward()  # type: ignore[no-untyped-call]
        else:
            with _quiet("Full backward hook is firing"):
                loss.backward()  # type: ignore[no-untyped-call]
        # Opacus clips, noises and records the step even for an empty Poisson
        # batch: skipping it would under-count the accountant's steps.
        self.optimizer.step()
        return float(loss.detach()) if labels.numel() else 0.0

    def epsilon(self) -> float:
        """Return the client's example-level ε at the configured δ, all rounds so far."""
        return float(self.engine.get_epsilon(self.config.delta))

    def history(self) -> list[tuple[float, float, int]]:
        """Return the accountant history to persist, JSON-able."""
        return [(float(z), float(q), int(n)) for z, q, n in self.engine.accountant.history]

    def close(self) -> None:
        """Remove Opacus's hooks and per-example gradients from the model.

        The model can then be made private again (the next round) or trained
        without DP; Opacus refuses to hook a model twice.
        """
        self.optimizer.zero_grad(set_to_none=True)
        # `model` is Opacus's GradSampleModule wrapper; its `_close` (Opacus
        # >= 1.2, the public `cleanup` only from 1.6) unhooks the wrapped model.
        self.model._close()  # type: ignore[operator]


def compose(history: History, noise_multiplier: float, sample_rate: float, steps: int) -> History:
    """Return `history` followed by `steps` steps of (z, q), merged as Opacus records them.

    Opacus's accountants merge consecutive steps of equal (z, q) into one
    entry; merging the same way here keeps a planned history equal to the
    one training leaves, entry for entry.
    """
    entries = [(float(z), float(q), int(n)) for z, q, n in history]
    if entries and entries[-1][:2] == (noise_multiplier, sample_rate):
        z, q, n = entries.pop()
        return [*entries, (z, q, n + steps)]
    return [*entries, (noise_multiplier, sample_rate, steps)]


def compute_epsilon(
    history: History, *, delta: float, accountant: Literal["prv", "rdp"] = "prv"
) -> float:
    """Return the example-level ε at `delta` of an accountant history (0.0 when empty)."""
    if not history:
        return 0.0
    engine = create_accountant(mechanism=accountant)
    engine.history = list(history)
    return float(engine.get_epsilon(delta=delta))


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: Literal["prv", "rdp"] = "prv",
) -> float:
    """Return Opacus's noise multiplier for `steps` steps at rate q within (ε, δ).

    Opacus bisects to within 0.01 of the target and returns the noisier
    end, so `steps` steps spend at most `target_epsilon`.

    Raises:
        ValueError: the budget is too small for any noise multiplier up to 1e6.
    """
    # The bisection's first probes are tiny noise multipliers whose ε is
    # huge, where the RDP analysis warns that the optimal order is the
    # largest; those probes are discarded anyway.
    with _quiet("Optimal order is the"):
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )


def model_problems(model: torch.nn.Module) -> list[str]:
    """List the layers Opacus cannot compute per-example gradients for (empty: fine).

    The model must be in training mode (Opacus checks that too).
    """
    return [str(error) for error in ModuleValidator.validate(model, strict=False)]


def make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader[Any],
    config: DpSgdConfig,
    loss: Loss = functional.cross_entropy,
) -> DpSgd:
    """Wrap a model, its optimizer and its data for DP-SGD with Opacus.

    Raises:
        ValueError: the model has layers Opacus cannot compute per-example
            gradients for (e.g. BatchNorm; use GroupNorm).
    """
    # Opacus warns whenever secure_mode is off; this module documents its
    # RNG choice (module docstring) and seeds the generator itself.
    with _quiet("Secure RNG turned off"):
        engine = PrivacyEngine(accountant=config.accountant)
    engine.accountant.history = list(config.history)
    # Opacus draws the noise on each parameter's device, which needs a
    # generator of that device.
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63) if config.seed is None else config.seed)
    common: dict[str, Any] = {
        "module": model,
        "optimizer": optimizer,
        "data_loader": data_loader,
        "max_grad_norm": config.max_grad_norm,
        "noise_generator": generator,
        "poisson_sampling": True,
    }
    if config.noise_multiplier is not None:
        parts = engine.make_private(noise_multiplier=config.noise_multiplier, **common)
    else:
        # Opacus bisects over noise multipliers; at the tiny ones it tries
        # first, ε is huge and its RDP analysis warns that the optimal order
        # is the largest; that probe is discarded anyway.
        with _quiet("Optimal order is the"):
            parts = engine.make_private_with_epsilon(
                target_epsilon=config.target_epsilon,
                target_delta=config.delta,
                epochs=config.epochs,
                **common,
            )
    return DpSgd(engine, (parts[0], parts[1], parts[-1]), config=config, loss=loss)


@contextlib.contextmanager
def _quiet(message: str) -> Iterator[None]:
    """Ignore the UserWarnings that start with `message` inside the block.

    `warnings.catch_warnings` swaps process-wide state and is not
    thread-safe (Python docs, warnings module): two clients training in
    threads of one process would restore each other's filters mid-block.
    The lock keeps such blocks from overlapping.
    """
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
        yield
