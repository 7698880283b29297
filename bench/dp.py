"""Benchmark: accuracy of central and distributed DP-FedAvg against ε, and the cost of DP-SGD.

Part 1, accuracy against ε, for ε in {1, 2, 4, 8} at δ = 1e-5. A seeded
benchmark, NOT a private run: every noise source is `NoiseSource.from_seed`
(set through `DpConfig.noise_seed`, flagged `seeded`), so the figures are
reproducible and protect nobody.

- Task: synthetic 10-class classification. Features in R^20 come from a
  Gaussian mixture: each class has 3 modes whose means are drawn from
  N(0, I), each with unit covariance, so the classes overlap and are not
  linearly separable. N = 5,000 clients hold 20 to 60 examples each
  (uniform; 200,000 in all), with non-IID labels: each client's class
  proportions are drawn from Dirichlet(0.5). The test set holds 10,000
  held-out examples with uniform classes. The data is fixed (seed 0); a
  run's seed sets the model's initialization, the cohorts, the local
  minibatches and the DP noise.
- Model: a 20-64-10 ReLU MLP (1,994 float32 parameters).
- Rounds: R = 150, each with a Poisson cohort at rate q = 0.02 of the 5,000
  clients (`poisson_sample`, about 100 clients a round).
- Local training, the same for every variant: 10 steps of SGD (lr 0.1) on
  minibatches of 16 drawn with replacement from the client's own examples,
  for the whole cohort at once with batched torch matmuls. For a given seed
  the cohorts and minibatch indices are the same in every variant (common
  random numbers), so the variants differ only in how updates are combined.
- Variants, all with uniform client weights and the same server learning rate:
  - non-private: `fedcore.FedAvg` with weight 1 per client (the mean over
    the realized cohort), no clipping, no noise;
  - clip only: the same with every delta clipped to C (`privacy.dp.clip`),
    which separates the cost of clipping from the cost of noise;
  - central: `DpFedAvg` from `central_strategy` (fixed clipping, RDP
    accountant): clip to C, sum, add N(0, (zC)^2), divide by q·N, where z is
    `calibrate_noise_multiplier` for R rounds at q within (ε, δ);
  - distributed: the distributed discrete Gaussian of Kairouz et al.
    (ICML 2021) with parameters from `distributed_params` (16-bit ring,
    min_survivors 80 = 0.8·q·N). Every cohort client `encode`s its delta;
    the bench takes the `ring_sum`, which is what secure aggregation
    reveals exactly, `decode`s it, checks it against `sum_norm_bound` as the
    aggregator does, and divides by q·N. A round with fewer than
    min_survivors clients releases nothing and the model stays. z is the
    smallest (to 0.1%, by bisection) for which R `DistributedGaussianEvent`s
    fit ε under the RDP accountant. It is above the central z because
    the distributed event's subsampling bound (Zhu & Wang 2019, Theorem 5)
    is looser than dp-accounting's sampled-Gaussian RDP; rounding at 16
    bits inflates the sensitivity by only 0.06%. Every client adds noise
    for 80 survivors, so a cohort of about 100 carries about
    sqrt(100/80) = 1.12 times the accounted noise.
- Clip norm C = 0.5 and server learning rate 2 for every variant, picked in a
  pilot on seed 0 (R = 150) among (C, server lr) = (0.5, 1), (1, 1), (0.5, 2)
  and (0.25, 3), judged on the test set: all absolute accuracies are
  slightly optimistic, every variant alike. In the non-private run the
  median update norm is 1.09 in round 1 and 0.45, 0.38, 0.36 in rounds 50,
  100, 150: C clips every update early and about one in ten late.
- Reported: final test accuracy (mean ± std over the seeds), z, the ε that
  the RDP accountant gives for all R rounds' events (at most the target),
  the mean fraction of updates under the clip norm (central), and the
  rounds that distributed DP skipped.

Part 2, the cost of DP-SGD: the time of one local step of the digits MLP
(`clients.digits.make_mlp`, 64-64-10, 4,810 parameters) on a batch of 32 or
64 digits training examples. Plain torch (forward, cross-entropy, backward,
`torch.optim.SGD` step) is measured against Opacus DP-SGD through
`privacy.dp.dpsgd.make_private` and `DpSgd.step` (per-example gradients,
clipping, noise and the accountant's bookkeeping), in the same run on one
thread. Blocks of 25 steps of the four (batch, plain or DP-SGD) steppers
run in turns whose order rotates, 40 turns after a warm-up turn; the median
time per step, its ratio, and the ratio of the fastest blocks are printed.
Data loading is not timed.

Run: .venv/bin/python bench/dp.py [--quick] [--seeds K] [--out bench/dp.png]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from torch.nn import functional
from torch.utils.data import DataLoader, TensorDataset

from clients.digits import DigitsSplit, load_digits_split, make_mlp
from fedcore import FedAvg, ParameterSet
from privacy.dp import (
    DpConfig,
    DpFedAvg,
    DpMode,
    GaussianEvent,
    PrivacyBudget,
    calibrate_noise_multiplier,
    central_strategy,
    clip,
    decode,
    distributed_params,
    encode,
    epsilon,
    poisson_sample,
    ring_sum,
    sum_norm_bound,
    validate,
)
from privacy.dp.dpsgd import DpSgdConfig, make_private

NUM_CLIENTS = 5_000
RATE = 0.02
DELTA = 1e-5
EPSILONS = (1.0, 2.0, 4.0, 8.0)
ROUNDS = 150
CLIP_NORM = 0.5
SERVER_LR = 2.0
MIN_SURVIVORS = 80
BITS = 16

FEATURES = 20
HIDDEN = 64
CLASSES = 10
MODES = 3
DIRICHLET_ALPHA = 0.5
MIN_EXAMPLES, MAX_EXAMPLES = 20, 60
TEST_EXAMPLES = 10_000
DATA_SEED = 0

LOCAL_STEPS = 10
LOCAL_BATCH = 16
CLIENT_LR = 0.1

DPSGD_BATCHES = (32, 64)
DPSGD_LR = 0.05

Mode = Literal["non-private", "clip only", "central", "distributed"]
Delta = dict[str, npt.NDArray[np.float32]]
NAMES = ("w1", "b1", "w2", "b2")


@dataclass(frozen=True, slots=True)
class Task:
    """Every client's examples, padded to MAX_EXAMPLES, and the test set."""

    x: torch.Tensor
    y: torch.Tensor
    sizes: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass(frozen=True, slots=True)
class Variant:
    mode: Mode
    eps: float = math.inf
    z: float | None = None


@dataclass(frozen=True, slots=True)
class Run:
    accuracy: float
    skipped: int
    unclipped: float
    seconds: float


def make_task() -> Task:
    rng = np.random.default_rng(DATA_SEED)
    means = rng.normal(size=(CLASSES, MODES, FEATURES))

    def draw(labels: npt.NDArray[np.int64]) -> torch.Tensor:
        modes = rng.integers(0, MODES, size=labels.shape)
        x = means[labels, modes] + rng.normal(size=(*labels.shape, FEATURES))
        return torch.tensor(x, dtype=torch.float32)

    sizes = rng.integers(MIN_EXAMPLES, MAX_EXAMPLES + 1, size=NUM_CLIENTS)
    mix = rng.dirichlet(np.full(CLASSES, DIRICHLET_ALPHA), size=NUM_CLIENTS)
    # Labels by the inverse CDF of each client's class proportions; the
    # padding slots beyond a client's size are never drawn.
    u = rng.random((NUM_CLIENTS, MAX_EXAMPLES))
    cdf = np.cumsum(mix, axis=1)
    labels = np.minimum((u[:, :, None] > cdf[:, None, :]).sum(axis=2), CLASSES - 1)
    y_test = rng.integers(0, CLASSES, size=TEST_EXAMPLES)
    return Task(
        x=draw(labels),
        y=torch.tensor(labels, dtype=torch.int64),
        sizes=torch.tensor(sizes, dtype=torch.int64),
        x_test=draw(y_test),
        y_test=torch.tensor(y_test, dtype=torch.int64),
    )


def init_model(seed: int) -> ParameterSet:
    """Return the MLP's weights, initialized as torch's `Linear` initializes biases."""
    generator = torch.Generator().manual_seed(seed)
    arrays = {}
    for layer, fan_in, fan_out in (("1", FEATURES, HIDDEN), ("2", HIDDEN, CLASSES)):
        bound = 1.0 / math.sqrt(fan_in)
        for kind, shape in (("w", (fan_in, fan_out)), ("b", (fan_out,))):
            values = (torch.rand(shape, generator=generator) * 2 - 1) * bound
            arrays[kind + layer] = values.numpy()
    return ParameterSet(arrays)


def num_parameters(model: ParameterSet) -> int:
    return sum(int(a.size) for a in model.values())


def forward(params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Return the logits of K stacked models on their own batches x of shape (K, B, F)."""
    w1, b1, w2, b2 = params
    hidden = torch.relu(torch.bmm(x, w1) + b1.unsqueeze(1))
    return torch.bmm(hidden, w2) + b2.unsqueeze(1)


def local_deltas(
    model: ParameterSet, task: Task, cohort: npt.NDArray[np.int64], rng: np.random.Generator
) -> list[Delta]:
    """Train every cohort client from `model` at once and return each client's delta."""
    k = len(cohort)
    start = [torch.from_numpy(model[n]).expand(k, *model[n].shape) for n in NAMES]
    params = [p.clone().requires_grad_(True) for p in start]
    index = torch.from_numpy(cohort)
    x, y, sizes = task.x[index], task.y[index], task.sizes[index].unsqueeze(1)
    rows = torch.arange(k).unsqueeze(1)
    for _ in range(LOCAL_STEPS):
        u = torch.from_numpy(rng.random((k, LOCAL_BATCH), dtype=np.float32))
        pick = torch.minimum((u * sizes).long(), sizes - 1)
        logits = forward(params, x[rows, pick])
        # The sum over clients of each client's mean loss: its gradient with
        # respect to client i's parameters is client i's own gradient.
        loss = functional.cross_entropy(
            logits.reshape(-1, CLASSES), y[rows, pick].reshape(-1), reduction="sum"
        )
        grads = torch.autograd.grad(loss / LOCAL_BATCH, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= CLIENT_LR * g
    with torch.no_grad():
        deltas = [(p - s).numpy() for p, s in zip(params, start, strict=True)]
    return [{n: d[i] for n, d in zip(NAMES, deltas, strict=True)} for i in range(k)]


def accuracy(model: ParameterSet, task: Task) -> float:
    params = [torch.from_numpy(model[n]).unsqueeze(0) for n in NAMES]
    with torch.no_grad():
        logits = forward(params, task.x_test.unsqueeze(0))[0]
    return float((logits.argmax(dim=1) == task.y_test).float().mean())


def dp_config(mode: DpMode, eps: float, z: float | None, *, rounds: int, seed: int) -> DpConfig:
    """Return a validated DP configuration (z calibrated from the budget when None)."""
    config = DpConfig(
        mode=mode,
        epsilon=eps,
        delta=DELTA,
        clip_norm=CLIP_NORM,
        noise_multiplier=z,
        rounds=rounds,
        sampling_rate=RATE,
        min_survivors=MIN_SURVIVORS,
        bits=BITS,
        noise_seed=seed,
    )
    validate(config, num_clients=NUM_CLIENTS, secure_aggregation=mode is DpMode.DISTRIBUTED)
    return config


def distributed_epsilon(config: DpConfig, size: int, rounds: int) -> float:
    """Return ε of `rounds` distributed rounds (the rotation seed does not enter it)."""
    params = distributed_params(
        config, num_clients=NUM_CLIENTS, num_parameters=size, rotation_seed=0
    )
    return epsilon([dataclasses.replace(params.event(RATE), count=rounds)], DELTA)


def calibrate_distributed(eps: float, *, size: int, rounds: int, start: float) -> float:
    """Return the smallest z (to 0.1%) for which `rounds` distributed rounds fit (eps, DELTA).

    ε falls as z grows. `start`, the central z, is a lower end: the
    distributed event spends more than the Gaussian one at the same z.
    """

    def spends(z: float) -> float:
        config = dp_config(DpMode.DISTRIBUTED, eps, z, rounds=rounds, seed=0)
        return distributed_epsilon(config, size, rounds)

    low, high = start, start * 1.25
    while spends(high) > eps:
        low, high = high, high * 1.25
    while high - low > 1e-3 * high:
        middle = (low + high) / 2
        low, high = (middle, high) if spends(middle) > eps else (low, middle)
    return high


class Combiner:
    """Turns a round's deltas into the next model, the way one variant does."""

    def __init__(self, variant: Variant, *, rounds: int, seed: int) -> None:
        self.variant = variant
        self.central: DpFedAvg | None = None
        self.distributed: DpConfig | None = None
        self.skipped = 0
        self.unclipped: list[float] = []
        if variant.mode == "central":
            config = dp_config(DpMode.CENTRAL, variant.eps, None, rounds=rounds, seed=seed)
            # One strategy, hence one seeded noise stream, for the whole run.
            self.central = central_strategy(config, num_clients=NUM_CLIENTS, server_lr=SERVER_LR)
            assert self.central.source.seeded
        elif variant.mode == "distributed":
            self.distributed = dp_config(
                DpMode.DISTRIBUTED, variant.eps, variant.z, rounds=rounds, seed=seed
            )
            self.source = self.distributed.noise_source()
            assert self.source.seeded

    def step(self, model: ParameterSet, deltas: list[Delta], round_number: int) -> ParameterSet:
        if self.central is not None:
            return self.step_central(self.central, model, deltas)
        if self.distributed is not None:
            return self.step_distributed(self.distributed, model, deltas, round_number)
        plain = FedAvg(server_lr=SERVER_LR)
        aggregate = plain.begin(model)
        for delta in deltas:
            if self.variant.mode == "clip only":
                clipped, _ = clip(delta, CLIP_NORM)
                aggregate.add(clipped, 1.0)
            else:
                aggregate.add(delta, 1.0)
        return plain.finish(model, aggregate)

    def step_central(
        self, strategy: DpFedAvg, model: ParameterSet, deltas: list[Delta]
    ) -> ParameterSet:
        aggregate = strategy.begin(model)
        for delta in deltas:
            aggregate.add(delta, 1.0)
        self.unclipped.append(aggregate.centered_count / max(aggregate.count, 1) + 0.5)
        return strategy.release(model, aggregate).model

    def step_distributed(
        self, config: DpConfig, model: ParameterSet, deltas: list[Delta], round_number: int
    ) -> ParameterSet:
        params = distributed_params(
            config,
            num_clients=NUM_CLIENTS,
            num_parameters=num_parameters(model),
            rotation_seed=round_number,
        )
        if len(deltas) < params.min_survivors:
            self.skipped += 1
            return model
        total = ring_sum([encode(delta, params, self.source) for delta in deltas], params)
        sums = decode(total, params, model.spec(), survivors=len(deltas))
        norm = math.sqrt(sum(float(np.vdot(v, v)) for v in sums.values()))
        if norm > sum_norm_bound(params, len(deltas)):
            raise RuntimeError(f"round {round_number}: the decoded sum failed the norm check")
        scale = SERVER_LR / (RATE * NUM_CLIENTS)
        return ParameterSet(
            {name: (a + scale * sums[name]).astype(np.float32) for name, a in model.items()}
        )


def train(task: Task, variant: Variant, *, seed: int, rounds: int) -> Run:
    start = time.perf_counter()
    combiner = Combiner(variant, rounds=rounds, seed=seed)
    model = init_model(seed)
    ids = [f"{i:05d}" for i in range(NUM_CLIENTS)]
    cohorts = np.random.default_rng([seed, 1])
    batches = np.random.default_rng([seed, 2])
    for round_number in range(rounds):
        cohort = np.array([int(c) for c in poisson_sample(ids, RATE, cohorts)], dtype=np.int64)
        deltas = local_deltas(model, task, cohort, batches)
        model = combiner.step(model, deltas, round_number)
    unclipped = statistics.fmean(combiner.unclipped) if combiner.unclipped else math.nan
    return Run(accuracy(model, task), combiner.skipped, unclipped, time.perf_counter() - start)


def calibrate(size: int, rounds: int) -> list[Variant]:
    """Return the DP variants with their z, the central z checked against `central_strategy`."""
    variants = []
    for eps in EPSILONS:
        budget = PrivacyBudget(eps, DELTA)
        z = calibrate_noise_multiplier(budget, sampling_rate=RATE, rounds=rounds)
        config = dp_config(DpMode.CENTRAL, eps, None, rounds=rounds, seed=0)
        assert central_strategy(config, num_clients=NUM_CLIENTS).noise.multiplier == z
        variants.append(Variant("central", eps, z))
        z_distributed = calibrate_distributed(eps, size=size, rounds=rounds, start=z)
        variants.append(Variant("distributed", eps, z_distributed))
    return variants


def spent(variant: Variant, size: int, rounds: int) -> float:
    assert variant.z is not None
    if variant.mode == "central":
        return epsilon([GaussianEvent(RATE, variant.z, rounds)], DELTA)
    config = dp_config(DpMode.DISTRIBUTED, variant.eps, variant.z, rounds=rounds, seed=0)
    return distributed_epsilon(config, size, rounds)


def spread(values: Sequence[float]) -> float:
    """Return the sample standard deviation (0 for a single value)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def mean_std(values: Sequence[float]) -> str:
    if len(values) < 2:
        return f"{statistics.fmean(values):.4f}"
    return f"{statistics.fmean(values):.4f} ± {spread(values):.4f}"


def report(
    variants: list[Variant], runs: dict[Variant, list[Run]], *, size: int, rounds: int
) -> None:
    print("\n| variant | ε target | z | ε spent (RDP) | accuracy | unclipped | skipped rounds |")
    print("|---|---|---|---|---|---|---|")
    for variant in variants:
        results = runs[variant]
        acc = mean_std([r.accuracy for r in results])
        if variant.z is None:
            print(f"| {variant.mode} | ∞ | 0 | ∞ | {acc} | | |")
            continue
        unclipped = statistics.fmean(r.unclipped for r in results)
        skipped = "/".join(str(r.skipped) for r in results)
        shown = f"{unclipped:.2f}" if variant.mode == "central" else ""
        print(
            f"| {variant.mode} | {variant.eps:g} | {variant.z:.3f} | "
            f"{spent(variant, size, rounds):.3f} | {acc} | {shown} | "
            f"{skipped if variant.mode == 'distributed' else ''} |"
        )


def plot(variants: list[Variant], runs: dict[Variant, list[Run]], out: Path, title: str) -> None:
    import matplotlib as mpl

    mpl.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7.2, 3.6), dpi=100)
    baselines = {"non-private": ("-", "non-private"), "clip only": ("--", "clip only, no noise")}
    for variant in variants:
        if variant.mode in baselines:
            style, label = baselines[variant.mode]
            level = statistics.fmean(r.accuracy for r in runs[variant])
            axes.axhline(level, color="grey", linestyle=style, linewidth=1, label=label)
    for mode, marker in (("central", "o"), ("distributed", "s")):
        chosen = [v for v in variants if v.mode == mode]
        means = [statistics.fmean(r.accuracy for r in runs[v]) for v in chosen]
        stds = [spread([r.accuracy for r in runs[v]]) for v in chosen]
        # A small shift keeps the two modes' error bars apart.
        xs = [v.eps * (0.97 if mode == "central" else 1.03) for v in chosen]
        axes.errorbar(xs, means, yerr=stds, marker=marker, capsize=3, label=f"{mode} DP")
    axes.set_xscale("log", base=2)
    axes.set_xticks(EPSILONS, [f"{e:g}" for e in EPSILONS])
    axes.set_xlim(0.8, 10)
    axes.set_xlabel("ε (δ = 1e-5)")
    axes.set_ylabel("test accuracy")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, pil_kwargs={"optimize": True})
    plt.close(figure)


def run_accuracy(seeds: int, rounds: int, out: Path) -> None:
    task = make_task()
    size = num_parameters(init_model(0))
    start = time.perf_counter()
    variants = [Variant("non-private"), Variant("clip only"), *calibrate(size, rounds)]
    print(f"calibration: {time.perf_counter() - start:.1f} s")
    runs: dict[Variant, list[Run]] = {v: [] for v in variants}
    for seed in range(seeds):
        for variant in variants:
            run = train(task, variant, seed=seed, rounds=rounds)
            runs[variant].append(run)
            print(
                f"seed {seed} {variant.mode:11} ε={variant.eps:g}: "
                f"accuracy {run.accuracy:.4f} ({run.seconds:.1f} s)",
                flush=True,
            )
    print(
        f"\nN = {NUM_CLIENTS}, q = {RATE}, R = {rounds}, δ = {DELTA:g}, C = {CLIP_NORM}, "
        f"{size} parameters, {seeds} seed(s); seeded noise: NOT a private run"
    )
    report(variants, runs, size=size, rounds=rounds)
    title = f"DP-FedAvg: N = {NUM_CLIENTS:,}, q = {RATE}, R = {rounds}, {seeds} seed(s)"
    plot(variants, runs, out, title)
    print(f"\nplot: {out}")


def time_steps(step: Callable[[], object], steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


@dataclass
class Steppers:
    """A plain and a DP-SGD local step of the digits MLP on batches of one size."""

    plain: Callable[[], float]
    private: Callable[[], float]
    close: Callable[[], None]


def steppers(split: DigitsSplit, batch: int) -> Steppers:
    x, y = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(y) - batch + 1, batch)]
    plain = make_mlp(seed=0)
    optimizer = torch.optim.SGD(plain.parameters(), lr=DPSGD_LR)
    model = make_mlp(seed=0)
    private = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=DPSGD_LR),
        DataLoader(TensorDataset(x, y), batch_size=batch),
        DpSgdConfig(max_grad_norm=1.0, noise_multiplier=1.0, seed=0),
    )
    counter = itertools.count()

    def plain_step() -> float:
        xs, ys = batches[next(counter) % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        loss = functional.cross_entropy(plain(xs), ys)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        return float(loss.detach())

    def private_step() -> float:
        return private.step(*batches[next(counter) % len(batches)])

    return Steppers(plain_step, private_step, private.close)


def run_dpsgd(repeats: int, steps: int = 25) -> None:
    """Time blocks of `steps` steps of every stepper in turns, `repeats` times."""
    split = load_digits_split()
    timed = {batch: steppers(split, batch) for batch in DPSGD_BATCHES}
    runs = [(batch, kind) for batch in DPSGD_BATCHES for kind in ("plain", "private")]
    times: dict[tuple[int, str], list[float]] = {run: [] for run in runs}
    for repeat in range(repeats + 1):
        # The turn's order rotates, so that a slow spell of a shared machine
        # is spread over all four; the first turn is the warm-up.
        for batch, kind in runs[repeat % 4 :] + runs[: repeat % 4]:
            seconds = time_steps(getattr(timed[batch], kind), steps)
            if repeat:
                times[batch, kind].append(seconds)
    for steps_of in timed.values():
        steps_of.close()
    print(f"\nDP-SGD local step, digits MLP, 1 thread, median of {repeats} blocks of {steps}:")
    print("\n| batch | plain step ms | DP-SGD step ms | DP-SGD / plain | ratio of fastest blocks |")
    print("|---|---|---|---|---|")
    for batch in DPSGD_BATCHES:
        plain, private = times[batch, "plain"], times[batch, "private"]
        median_plain, median_private = statistics.median(plain), statistics.median(private)
        print(
            f"| {batch} | {median_plain * 1e3:.3f} | {median_private * 1e3:.3f} | "
            f"{median_private / median_plain:.2f}x | {min(private) / min(plain):.2f}x |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"40 rounds, not {ROUNDS}; 1 seed")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 3)")
    parser.add_argument("--out", type=Path, default=Path("bench/dp.png"), help="the plot (PNG)")
    args = parser.parse_args()
    seeds = args.seeds or (1 if args.quick else 3)
    # One thread: the cohort's batched matmuls are small, and timings of a
    # shared machine are steadier on one core.
    torch.set_num_threads(1)
    # dp-accounting logs a warning for each RDP order it cannot evaluate at
    # the small noise multipliers a bisection probes; those probes are
    # discarded, and the final ε comes from orders that converged.
    logging.getLogger("absl").setLevel(logging.ERROR)
    run_accuracy(seeds, 40 if args.quick else ROUNDS, args.out)
    run_dpsgd(5 if args.quick else 40)


if __name__ == "__main__":
    main()
