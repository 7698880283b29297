"""The reference task: scikit-learn's digits, split, scaled and partitioned.

Everything here follows `/work/shared/data/README.md` so that runs compare
with other frameworks on the identical task: the 80/20 stratified split
(`random_state=0`), per-pixel standardization with the training statistics,
the 64-64-10 ReLU MLP, and label-skew Dirichlet partitions whose JSON files
carry a fingerprint. The data come from scikit-learn's package, which is
only located, not imported.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch.nn import functional

from clients.torchstate import copy_into
from clients.trainer import Device, TensorData, resolve_device
from fedcore import ParameterSet

__all__ = [
    "DigitsSplit",
    "Evaluator",
    "client_data",
    "dirichlet_partition",
    "load_digits_split",
    "load_partition",
    "make_mlp",
    "partition_fingerprint",
]

Indices = npt.NDArray[np.int64]

_EPS = 1e-6
_TEST_FRACTION = 0.2
_FEATURES = 64
_HIDDEN = 64
_CLASSES = 10
# Resampling for `min_size` gives up after this many draws: a request that
# cannot be met (more clients than samples) must fail, not loop forever.
_MAX_DRAWS = 1000


@dataclass(frozen=True, slots=True)
class DigitsSplit:
    """The scaled training and test arrays (features float32, labels int64)."""

    x_train: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.int64]
    x_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[np.int64]


def load_digits_split() -> DigitsSplit:
    """Load digits, split 80/20 stratified (seed 0) and standardize per pixel.

    The split equals scikit-learn's `train_test_split(x, y, test_size=0.2,
    stratify=y, random_state=0)`, which the shared partition files index.

    Raises:
        ImportError: scikit-learn is not installed (`pip install fedcore[sim]`).
    """
    x, y = _read_digits()
    train, test = _stratified_split(y, _TEST_FRACTION, seed=0)
    x = x.astype(np.float32)
    y = y.astype(np.int64)
    x_train, x_test, y_train, y_test = x[train], x[test], y[train], y[test]
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0) + _EPS
    return DigitsSplit(
        x_train=((x_train - mean) / std).astype(np.float32),
        y_train=y_train,
        x_test=((x_test - mean) / std).astype(np.float32),
        y_test=y_test,
    )


def _read_digits() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    # The data ship with scikit-learn as a gzipped CSV (64 pixels, then the
    # label), which `sklearn.datasets.load_digits` reads with `np.loadtxt`.
    # It is read here the same way without importing scikit-learn: the import
    # pulls in scipy and takes about a second, more than the whole
    # framework's start-up. `find_spec` on a top-level package only locates
    # it. Should a release move the file, `load_digits` reads it.
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the digits task needs scikit-learn: pip install 'fedcore[sim]'")
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        return np.asarray(x, np.float64), np.asarray(y, np.int64)
    with gzip.open(path, "rt", encoding="utf-8") as text:
        data = np.loadtxt(text, delimiter=",")
    return data[:, :-1], data[:, -1].astype(np.int64)


def _stratified_split(
    y: npt.NDArray[np.int64], test_fraction: float, seed: int
) -> tuple[Indices, Indices]:
    # scikit-learn's StratifiedShuffleSplit (behind `train_test_split` with
    # `stratify`), step for step and with the same legacy RandomState draws,
    # so that the indices are identical (tests compare them with
    # scikit-learn's); written out for the same reason as `_read_digits`.
    n_test = math.ceil(test_fraction * len(y))
    n_train = len(y) - n_test
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(counts, n_train, rng)
    t_i = _approximate_mode(counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for members, count, k, t in zip(by_class, counts, n_i, t_i, strict=True):
        shuffled = members[rng.permutation(count)]
        train.extend(shuffled[:k])
        test.extend(shuffled[k : k + t])
    return rng.permutation(train).astype(np.int64), rng.permutation(test).astype(np.int64)


def _approximate_mode(
    counts: npt.NDArray[np.int64], draws: int, rng: np.random.RandomState
) -> npt.NDArray[np.int64]:
    # scikit-learn's `_approximate_mode`: each class's share of `draws`,
    # floored, then the leftover draws go to the largest remainders, ties
    # broken at random.
    continuous = counts / counts.sum() * draws
    floored = np.floor(continuous)
    need = int(draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (tied,) = np.where(remainder == value)
            now = min(len(tied), need)
            floored[rng.choice(tied, size=now, replace=False)] += 1
            need -= now
            if need == 0:
                break
    mode: npt.NDArray[np.int64] = floored.astype(np.int64)
    return mode


def make_mlp(seed: int = 0) -> torch.nn.Sequential:
    """Return the reference MLP (64-64-10, ReLU, 4,810 parameters), initialized from `seed`.

    The initialization is torch's default for `Linear` layers, drawn from a
    private generator so that the global torch RNG is left alone.
    """
    model = torch.nn.Sequential(
        torch.nn.Linear(_FEATURES, _HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(_HIDDEN, _CLASSES),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                _init_linear(layer, generator)
    return model


def _init_linear(layer: torch.nn.Linear, generator: torch.Generator) -> None:
    # torch's own Linear.reset_parameters: kaiming-uniform weights with
    # a = sqrt(5) and biases uniform in +-1/sqrt(fan_in).
    torch.nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    bound = 1.0 / math.sqrt(layer.in_features)
    torch.nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def dirichlet_partition(
    labels: npt.ArrayLike, num_clients: int, alpha: float, seed: int, *, min_size: int = 0
) -> list[Indices]:
    """Split sample indices among clients with Dirichlet(`alpha`) label skew.

    For each class in turn, its shuffled indices are cut among the clients in
    proportions drawn from Dirichlet(alpha, ..., alpha) (Hsu et al., 2019,
    "Measuring the Effects of Non-Identical Data Distribution"); small alpha
    gives each client few classes. With `min_size` > 0 the whole draw repeats
    until every client has that many samples. The shared partition files are
    this function with `alpha=0.5, seed=0`.

    Returns:
        One sorted int64 index array per client; every index appears exactly
        once. Clients may get no samples when `min_size` is 0.

    Raises:
        ValueError: bad arguments, or `min_size` not met after 1,000 draws.
    """
    y = np.asarray(labels)
    if num_clients < 1 or alpha <= 0 or min_size < 0:
        raise ValueError(
            f"need num_clients >= 1, alpha > 0 and min_size >= 0; got {num_clients}, "
            f"{alpha}, {min_size}"
        )
    if num_clients * min_size > len(y):
        raise ValueError(
            f"{len(y)} samples cannot give each of {num_clients} clients {min_size}; "
            "lower min_size or num_clients"
        )
    rng = np.random.default_rng(seed)
    for _ in range(_MAX_DRAWS):
        parts = _draw(y, num_clients, alpha, rng)
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise ValueError(
        f"no partition of {len(y)} samples gives each of {num_clients} clients "
        f"{min_size} samples after {_MAX_DRAWS} draws; lower min_size or num_clients"
    )


def _draw(
    y: npt.NDArray[np.generic], num_clients: int, alpha: float, rng: np.random.Generator
) -> list[Indices]:
    chunks: list[list[Indices]] = [[] for _ in range(num_clients)]
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares) * len(idx)).astype(np.int64)[:-1]
        for client, chunk in enumerate(np.split(idx, cuts)):
            chunks[client].append(chunk)
    return [np.sort(np.concatenate(c)).astype(np.int64) for c in chunks]


def partition_fingerprint(parts: Sequence[npt.ArrayLike]) -> str:
    """Return the first 16 hex digits of sha256 over each part's int64 bytes and `|`."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(np.asarray(part, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def load_partition(path: Path | str) -> list[Indices]:
    """Read a partition file of `/work/shared/data/` and check its fingerprint.

    Raises:
        ValueError: the file is not a partition, or its parts do not match
            its fingerprint (the file was altered or truncated).
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text())
        parts = [np.asarray(p, dtype=np.int64) for p in document["parts"]]
        expected = str(document["fingerprint"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"{path} is not a partition file (JSON with 'parts' and 'fingerprint')"
        ) from exc
    actual = partition_fingerprint(parts)
    if actual != expected:
        raise ValueError(
            f"{path}: the parts have fingerprint {actual} but the file says {expected}; "
            "the file was altered, restore it from /work/shared/data"
        )
    return parts


def client_data(split: DigitsSplit, parts: Sequence[Indices]) -> list[TensorData]:
    """Return each client's training features and labels as tensors."""
    x = torch.from_numpy(split.x_train)
    y = torch.from_numpy(split.y_train)
    return [(x[torch.from_numpy(p)], y[torch.from_numpy(p)]) for p in parts]


class Evaluator:
    """Central evaluation on the test split, keeping one model and the test tensors."""

    def __init__(self, split: DigitsSplit, *, device: Device = "cpu") -> None:
        self.device = resolve_device(device)
        self._model = make_mlp().to(self.device).eval()
        self._state = self._model.state_dict()
        self._x = torch.from_numpy(split.x_test).to(self.device)
        self._y = torch.from_numpy(split.y_test).to(self.device)

    def evaluate(self, params: ParameterSet) -> tuple[float, float]:
        """Return the test accuracy and the mean cross-entropy of `params`."""
        copy_into(self._state, params)
        with torch.inference_mode():
            logits = self._model(self._x)
            loss = functional.cross_entropy(logits, self._y)
            accuracy = (logits.argmax(dim=1) == self._y).float().mean()
        return float(accuracy.item()), float(loss.item())
