import numpy as np
import pytest
import torch
from torch.nn import functional

from clients import TorchTrainer, copy_into, digits, to_parameters
from clients.trainer import _round_seed
from fedcore import ParameterSet, TensorMismatch, TrainConfig


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    split = digits.load_digits_split()
    return torch.from_numpy(split.x_train[:45]), torch.from_numpy(split.y_train[:45])


def reference_fit(
    params: ParameterSet, data: tuple[torch.Tensor, torch.Tensor], config: TrainConfig, seed: int
) -> ParameterSet:
    """The obvious loop: torch.optim.SGD over the trainer's shuffled mini-batches."""
    model = digits.make_mlp()
    model.load_state_dict({name: torch.from_numpy(a.copy()) for name, a in params.items()})
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(_round_seed(seed, 3))
    x, y = data
    for _ in range(config.local_epochs):
        order = torch.randperm(len(y), generator=generator)
        for lo in range(0, len(y), config.batch_size):
            idx = order[lo : lo + config.batch_size]
            optimizer.zero_grad(set_to_none=True)
            functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return to_parameters(model.state_dict(), copy=True)


def test_fit_equals_torch_optim_sgd_bit_for_bit(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    params = to_parameters(digits.make_mlp(4).state_dict(), copy=True)
    config = TrainConfig(local_epochs=3, batch_size=8, lr=0.1)
    trainer = TorchTrainer(digits.make_mlp(), data, device="cpu", seed=5)
    trained, _ = trainer.fit(params, config, round_number=3)
    expected = reference_fit(params, data, config, seed=5)
    for name in expected:
        np.testing.assert_array_equal(trained[name], expected[name])


def test_gradients_left_on_the_model_do_not_enter_training(
    data: tuple[torch.Tensor, torch.Tensor],
) -> None:
    params = to_parameters(digits.make_mlp(4).state_dict(), copy=True)
    clean = TorchTrainer(digits.make_mlp(), data, device="cpu").fit(params, TrainConfig())[0]
    model = digits.make_mlp()
    for p in model.parameters():
        p.grad = torch.full_like(p, 100.0)
    stale = TorchTrainer(model, data, device="cpu").fit(params, TrainConfig())[0]
    for name in clean:
        np.testing.assert_array_equal(stale[name], clean[name])


def test_frozen_parameters_are_not_trained(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    params = to_parameters(digits.make_mlp(4).state_dict(), copy=True)
    model = digits.make_mlp()
    model[0].weight.requires_grad_(False)
    trained, _ = TorchTrainer(model, data, device="cpu").fit(params, TrainConfig())
    np.testing.assert_array_equal(trained["0.weight"], params["0.weight"])
    assert not np.array_equal(trained["0.bias"], params["0.bias"])


def test_copy_into_refuses_other_shapes_listing_each() -> None:
    state = digits.make_mlp().state_dict()
    params = dict(to_parameters(state, copy=True))
    params["0.bias"] = np.zeros(3, dtype=np.float32)
    params["2.bias"] = np.zeros(4, dtype=np.float32)
    with pytest.raises(TensorMismatch, match=r"'0\.bias' has shape \(3,\).*'2\.bias'"):
        copy_into(state, params)
