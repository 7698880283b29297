import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from clients import TorchTrainer, digits, to_parameters
from fedcore import TrainConfig

DATA = Path("/work/shared/data")
FILES = {
    "digits-dirichlet-a0.5-n100-s0.json": (100, 2, 45),
    "digits-dirichlet-a0.5-n20-s0.json": (20, 29, 126),
}


@pytest.fixture(scope="module")
def split() -> digits.DigitsSplit:
    return digits.load_digits_split()


def test_split_has_the_reference_sizes_dtypes_and_scaling(split: digits.DigitsSplit) -> None:
    assert split.x_train.shape == (1437, 64)
    assert split.x_test.shape == (360, 64)
    assert split.x_train.dtype == np.float32
    assert split.y_train.dtype == np.int64
    assert np.bincount(split.y_test).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    np.testing.assert_allclose(split.x_train.mean(axis=0), 0.0, atol=1e-5)
    varying = split.x_train.std(axis=0) > 0
    np.testing.assert_allclose(split.x_train.std(axis=0)[varying], 1.0, atol=1e-3)


def test_split_equals_scikit_learns_load_and_train_test_split(split: digits.DigitsSplit) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32), y.astype(np.int64), test_size=0.2, stratify=y, random_state=0
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    assert np.array_equal(split.x_train, ((x_train - mean) / std).astype(np.float32))
    assert np.array_equal(split.x_test, ((x_test - mean) / std).astype(np.float32))
    assert np.array_equal(split.y_train, y_train)
    assert np.array_equal(split.y_test, y_test)


@given(
    counts=st.lists(st.integers(2, 40), min_size=2, max_size=8),
    fraction=st.sampled_from([0.1, 0.2, 0.25, 1 / 3, 0.5]),
    seed=st.integers(0, 2**31 - 1),
    shuffle=st.integers(0, 2**31 - 1),
)
@settings(max_examples=60, deadline=None)
def test_stratified_split_draws_scikit_learns_indices(
    counts: list[int], fraction: float, seed: int, shuffle: int
) -> None:
    from sklearn.model_selection import train_test_split

    labels = np.random.default_rng(shuffle).permutation(np.repeat(np.arange(len(counts)), counts))
    try:
        train, test = train_test_split(
            np.arange(len(labels)), test_size=fraction, stratify=labels, random_state=seed
        )
    except ValueError:  # fewer test or training samples than classes
        assume(False)
    ours = digits._stratified_split(labels, fraction, seed)
    assert np.array_equal(ours[0], train)
    assert np.array_equal(ours[1], test)


def test_mlp_has_4810_parameters_and_a_seeded_init() -> None:
    a = to_parameters(digits.make_mlp(1).state_dict())
    b = to_parameters(digits.make_mlp(1).state_dict())
    c = to_parameters(digits.make_mlp(2).state_dict())
    assert a.num_parameters == 4810
    assert all(np.array_equal(a[n], b[n]) for n in a)
    assert not np.array_equal(a["0.weight"], c["0.weight"])


@pytest.mark.parametrize("num_clients", [1, 7, 100])
def test_dirichlet_partition_assigns_every_index_exactly_once(num_clients: int) -> None:
    labels = np.random.default_rng(0).integers(0, 10, size=500)
    parts = digits.dirichlet_partition(labels, num_clients, alpha=0.5, seed=3)
    assert len(parts) == num_clients
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(500))
    assert all(p.dtype == np.int64 for p in parts)


def test_dirichlet_partition_is_reproducible_by_seed() -> None:
    labels = np.arange(300) % 10
    first = digits.dirichlet_partition(labels, 10, alpha=0.5, seed=1)
    again = digits.dirichlet_partition(labels, 10, alpha=0.5, seed=1)
    other = digits.dirichlet_partition(labels, 10, alpha=0.5, seed=2)
    assert digits.partition_fingerprint(first) == digits.partition_fingerprint(again)
    assert digits.partition_fingerprint(first) != digits.partition_fingerprint(other)


def test_dirichlet_partition_allows_empty_clients_and_honours_min_size() -> None:
    labels = np.arange(200) % 10
    parts = digits.dirichlet_partition(labels, 150, alpha=0.5, seed=0)
    assert min(len(p) for p in parts) == 0
    sized = digits.dirichlet_partition(labels, 10, alpha=0.5, seed=0, min_size=5)
    assert min(len(p) for p in sized) >= 5
    with pytest.raises(ValueError, match="cannot give each of 150 clients 2"):
        digits.dirichlet_partition(labels, 150, alpha=0.5, seed=0, min_size=2)
    with pytest.raises(ValueError, match="after 1000 draws"):
        digits.dirichlet_partition(labels, 20, alpha=0.01, seed=0, min_size=9)


@pytest.mark.parametrize("name", sorted(FILES))
def test_shared_partition_files_load_with_their_fingerprint_and_sizes(name: str) -> None:
    parts = digits.load_partition(DATA / name)
    clients, smallest, largest = FILES[name]
    assert len(parts) == clients
    assert (min(map(len, parts)), max(map(len, parts))) == (smallest, largest)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1437))
    assert (
        digits.partition_fingerprint(parts) == json.loads((DATA / name).read_text())["fingerprint"]
    )


@pytest.mark.parametrize("name", sorted(FILES))
def test_dirichlet_partition_reproduces_the_shared_files(
    split: digits.DigitsSplit, name: str
) -> None:
    clients = FILES[name][0]
    parts = digits.dirichlet_partition(split.y_train, clients, alpha=0.5, seed=0)
    shared = digits.load_partition(DATA / name)
    assert digits.partition_fingerprint(parts) == digits.partition_fingerprint(shared)


def test_load_partition_refuses_an_altered_file(tmp_path: Path) -> None:
    document = json.loads((DATA / "digits-dirichlet-a0.5-n20-s0.json").read_text())
    document["parts"][0] = document["parts"][0][1:]
    altered = tmp_path / "altered.json"
    altered.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"fingerprint .* but the file says 66a93d110e25e60d"):
        digits.load_partition(altered)
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a partition file"):
        digits.load_partition(tmp_path / "junk.json")


def test_client_data_selects_the_rows_of_each_part(split: digits.DigitsSplit) -> None:
    parts = [np.array([3, 1], dtype=np.int64), np.array([], dtype=np.int64)]
    data = digits.client_data(split, parts)
    np.testing.assert_array_equal(data[0][0].numpy(), split.x_train[[3, 1]])
    np.testing.assert_array_equal(data[0][1].numpy(), split.y_train[[3, 1]])
    assert len(data[1][1]) == 0


def test_evaluator_matches_a_per_sample_reference(split: digits.DigitsSplit) -> None:
    params = to_parameters(digits.make_mlp(4).state_dict(), copy=True)
    accuracy, loss = digits.Evaluator(split).evaluate(params)
    model = digits.make_mlp(4).eval()
    losses, hits = [], 0
    with torch.no_grad():
        for x, y in zip(split.x_test, split.y_test, strict=True):
            logits = model(torch.from_numpy(x)[None])
            losses.append(float(torch.nn.functional.cross_entropy(logits, torch.tensor([y]))))
            hits += int(logits.argmax()) == y
    assert accuracy == pytest.approx(hits / 360)
    assert loss == pytest.approx(np.mean(losses), rel=1e-4)


def test_evaluator_scores_chance_before_and_well_after_training(split: digits.DigitsSplit) -> None:
    evaluator = digits.Evaluator(split)
    params = to_parameters(digits.make_mlp().state_dict(), copy=True)
    accuracy, _ = evaluator.evaluate(params)
    assert accuracy < 0.3
    data = digits.client_data(split, [np.arange(1437)])[0]
    trainer = TorchTrainer(digits.make_mlp(), data, device="cpu")
    trained, _ = trainer.fit(params, TrainConfig(local_epochs=3))
    assert evaluator.evaluate(trained)[0] > 0.9
