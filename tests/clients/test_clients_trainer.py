import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from clients import TorchTrainer, digits, to_parameters
from fedcore import ParameterSet, TrainConfig


@pytest.fixture(scope="module")
def split() -> digits.DigitsSplit:
    return digits.load_digits_split()


def small_data(split: digits.DigitsSplit, n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(split.x_train[:n]), torch.from_numpy(split.y_train[:n])


def initial(seed: int = 0) -> ParameterSet:
    return to_parameters(digits.make_mlp(seed).state_dict(), copy=True)


def assert_same(a: ParameterSet, b: ParameterSet) -> None:
    assert list(a) == list(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_fit_reduces_the_training_loss_on_digits(split: digits.DigitsSplit) -> None:
    trainer = TorchTrainer(digits.make_mlp(), small_data(split), device="cpu", seed=1)
    params = initial()
    before = trainer.evaluate(params)
    trained, meta = trainer.fit(params, TrainConfig(local_epochs=5, batch_size=16, lr=0.05))
    after = trainer.evaluate(trained)
    assert meta.num_examples == 200
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] > before["accuracy"] + 0.3
    assert 0 < meta.metrics["train_loss"] < before["loss"]


def test_fit_returns_the_trained_parameters_in_their_own_memory(split: digits.DigitsSplit) -> None:
    model = digits.make_mlp()
    trainer = TorchTrainer(model, small_data(split), device="cpu")
    params = initial()
    trained, _ = trainer.fit(params, TrainConfig())
    snapshot = trained.copy()
    trainer.fit(trained, TrainConfig())
    assert_same(trained, snapshot)
    assert [str(a.dtype) for a in trained.values()] == ["float32"] * 4
    assert not np.array_equal(trained["0.weight"], params["0.weight"])


def test_fit_is_reproducible_per_seed_and_round(split: digits.DigitsSplit) -> None:
    config = TrainConfig(local_epochs=2, batch_size=8)
    params = initial()

    def run(seed: int, round_number: int) -> ParameterSet:
        trainer = TorchTrainer(digits.make_mlp(9), small_data(split, 50), device="cpu", seed=seed)
        return trainer.fit(params, config, round_number=round_number)[0]

    assert_same(run(3, 1), run(3, 1))
    assert not np.array_equal(run(3, 1)["0.weight"], run(3, 2)["0.weight"])
    assert not np.array_equal(run(3, 1)["0.weight"], run(4, 1)["0.weight"])


def test_trainers_sharing_one_model_do_not_disturb_each_other(split: digits.DigitsSplit) -> None:
    params = initial()
    alone = TorchTrainer(digits.make_mlp(), small_data(split, 40), device="cpu", seed=5)
    expected = alone.fit(params, TrainConfig(), round_number=2)[0]
    shared = digits.make_mlp()
    first = TorchTrainer(shared, small_data(split, 40), device="cpu", seed=5)
    other = TorchTrainer(
        shared,
        (torch.from_numpy(split.x_train[500:600]), torch.from_numpy(split.y_train[500:600])),
        device="cpu",
    )
    other.fit(params, TrainConfig(lr=1.0), round_number=7)
    assert_same(first.fit(params, TrainConfig(), round_number=2)[0], expected)


def test_a_client_with_zero_examples_returns_the_model_unchanged(split: digits.DigitsSplit) -> None:
    empty = (torch.zeros(0, 64), torch.zeros(0, dtype=torch.int64))
    model = digits.make_mlp(3)
    before = to_parameters(model.state_dict(), copy=True)
    trainer = TorchTrainer(model, empty, device="cpu")
    params = initial()
    trained, meta = trainer.fit(params, TrainConfig())
    assert meta.num_examples == 0
    assert_same(
        trained.subtract(params), ParameterSet({n: np.zeros_like(a) for n, a in params.items()})
    )
    assert_same(to_parameters(model.state_dict()), before)


def test_last_partial_batch_is_trained(split: digits.DigitsSplit) -> None:
    params = initial()
    config = TrainConfig(batch_size=16)
    full = TorchTrainer(digits.make_mlp(), small_data(split, 17), device="cpu").fit(params, config)
    cut = TorchTrainer(digits.make_mlp(), small_data(split, 16), device="cpu").fit(params, config)
    assert full[1].num_examples == 17
    assert not np.array_equal(full[0]["0.weight"], cut[0]["0.weight"])


def test_data_loader_input_trains_and_is_reseeded_per_round(split: digits.DigitsSplit) -> None:
    x, y = small_data(split, 64)
    params = initial()

    def run(round_number: int) -> ParameterSet:
        loader = DataLoader(
            TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator()
        )
        trainer = TorchTrainer(digits.make_mlp(), loader, device="cpu", seed=2)
        trained, meta = trainer.fit(params, TrainConfig(), round_number=round_number)
        assert meta.num_examples == 64
        return trained

    assert_same(run(0), run(0))
    assert not np.array_equal(run(0)["0.weight"], run(1)["0.weight"])


def test_mismatched_features_and_labels_are_refused() -> None:
    with pytest.raises(ValueError, match="3 feature rows but 2 labels"):
        TorchTrainer(
            digits.make_mlp(), (torch.zeros(3, 64), torch.zeros(2, dtype=torch.int64)), device="cpu"
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_on_cuda_matches_cpu_closely(split: digits.DigitsSplit) -> None:
    params = initial()
    config = TrainConfig(local_epochs=2)
    on_cpu = TorchTrainer(digits.make_mlp(), small_data(split), device="cpu", seed=1).fit(
        params, config
    )
    on_gpu = TorchTrainer(digits.make_mlp(), small_data(split), device="cuda", seed=1).fit(
        params, config
    )
    assert on_gpu[1].num_examples == on_cpu[1].num_examples
    for name in params:
        np.testing.assert_allclose(on_gpu[0][name], on_cpu[0][name], atol=1e-4)
