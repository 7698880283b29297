"""TorchTrainer with DP-SGD: per-example clipping, the client's ε, and its budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.accountants import create_accountant
from torch.utils.data import DataLoader, TensorDataset

from clients import TorchTrainer, digits, to_parameters
from fedcore import BudgetExhausted, ConfigError, DpSgdSettings, ParameterSet, TrainConfig

DELTA = 1e-3


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    split = digits.load_digits_split()
    return torch.from_numpy(split.x_train[:120]), torch.from_numpy(split.y_train[:120])


def initial(seed: int = 0) -> ParameterSet:
    return to_parameters(digits.make_mlp(seed).state_dict(), copy=True)


def private(batch_size: int = 12, epochs: int = 2, **settings: object) -> TrainConfig:
    base: dict[str, object] = {"max_grad_norm": 1.0, "delta": DELTA, "target_epsilon": 50.0}
    dpsgd = DpSgdSettings.model_validate(base | settings)
    return TrainConfig(local_epochs=epochs, batch_size=batch_size, lr=0.1, dpsgd=dpsgd)


def opacus_epsilon(accountant: str, z: float, q: float, steps: int) -> float:
    """ε of `steps` DP-SGD steps, composed one step at a time by a fresh Opacus accountant."""
    engine = create_accountant(mechanism=accountant)
    for _ in range(steps):
        engine.step(noise_multiplier=z, sample_rate=q)
    return float(engine.get_epsilon(delta=DELTA))


def test_each_example_gradient_is_clipped_before_the_sum() -> None:
    # Two examples whose gradients point in exactly opposite directions, one
    # a thousand times longer: clipped one by one to C they cancel, so the
    # update is the noise alone. Clipping their sum, or not clipping, would
    # move the weights by lr*C/2 = 0.05, or by about 350.
    features = torch.tensor([[1000.0, 0.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0])
    model = torch.nn.Linear(2, 2, bias=False)
    zeros = ParameterSet({"weight": np.zeros((2, 2), dtype=np.float32)})
    trainer = TorchTrainer(model, (features, labels), device="cpu", seed=1)
    # Batch size 2 of 2 examples: Poisson rate 1, both in the one batch.
    config = private(
        batch_size=2, epochs=1, max_grad_norm=0.1, noise_multiplier=0.05, target_epsilon=1e3, seed=4
    )
    config = config.model_copy(update={"lr": 1.0})
    trained, meta = trainer.fit(zeros, config)
    moved = float(np.linalg.norm(trained["weight"]))
    # The noise alone: lr * N(0, (zC)^2) per weight / expected batch size 2,
    # norm about 0.005 over 4 weights.
    assert 0 < moved < 0.02, moved
    plain, _ = TorchTrainer(model, (features, labels), device="cpu").fit(
        zeros, TrainConfig(local_epochs=1, batch_size=2, lr=1.0)
    )
    assert float(np.linalg.norm(plain["weight"])) > 100
    assert meta.metrics["dp_seeded"] == 1.0


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_reported_epsilon_is_opacus_epsilon_of_every_round_so_far(
    data: tuple[torch.Tensor, torch.Tensor], accountant: str
) -> None:
    trainer = TorchTrainer(digits.make_mlp(0), data, device="cpu", seed=2)
    config = private(noise_multiplier=1.1, accountant=accountant, seed=7)
    params = initial()
    epsilons = []
    for number in (1, 2, 3):
        trained, meta = trainer.fit(params, config, round_number=number)
        assert meta.num_examples == 120
        assert meta.metrics["noise_multiplier"] == 1.1
        assert meta.metrics["dp_seeded"] == 1.0
        assert any(not np.array_equal(trained[n], params[n]) for n in params)
        epsilons.append(meta.metrics["epsilon"])
        params = trained
    # 120 examples in batches of 12: q = 0.1, 10 steps an epoch, 20 a round.
    assert trainer.dp_history == [(1.1, 0.1, 60)]
    for number, epsilon in enumerate(epsilons, start=1):
        expected = opacus_epsilon(accountant, 1.1, 0.1, 20 * number)
        assert epsilon == pytest.approx(expected, rel=1e-9)
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2]


def test_unseeded_rounds_are_not_flagged_and_draw_fresh_noise(
    data: tuple[torch.Tensor, torch.Tensor],
) -> None:
    config = private(noise_multiplier=1.1)
    first, meta = TorchTrainer(digits.make_mlp(0), data, device="cpu").fit(initial(), config)
    second, _ = TorchTrainer(digits.make_mlp(0), data, device="cpu").fit(initial(), config)
    assert "dp_seeded" not in meta.metrics
    assert any(not np.array_equal(first[n], second[n]) for n in first)


def test_a_round_past_the_budget_is_refused_before_training(
    data: tuple[torch.Tensor, torch.Tensor],
) -> None:
    one, two = (opacus_epsilon("rdp", 1.0, 0.1, 20 * k) for k in (1, 2))
    trainer = TorchTrainer(digits.make_mlp(0), data, device="cpu", seed=3)
    config = private(noise_multiplier=1.0, target_epsilon=(one + two) / 2, seed=1)
    trained, meta = trainer.fit(initial(), config, round_number=1)
    assert meta.metrics["epsilon"] == pytest.approx(one, rel=1e-9)
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(BudgetExhausted, match=r"round 2 would take .* past its budget"):
        trainer.fit(trained, config, round_number=2)
    assert trainer.dp_history == [(1.0, 0.1, 20)]
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, state[name])  # nothing trained


def test_calibrated_noise_makes_the_budget_last_the_configured_rounds(
    data: tuple[torch.Tensor, torch.Tensor],
) -> None:
    trainer = TorchTrainer(digits.make_mlp(0), data, device="cpu", seed=4)
    config = private(target_epsilon=2.0, rounds=3, seed=2)
    params, epsilons = initial(), []
    for number in (1, 2, 3):
        params, meta = trainer.fit(params, config, round_number=number)
        epsilons.append(meta.metrics["epsilon"])
    z = meta.metrics["noise_multiplier"]
    assert epsilons[-1] == pytest.approx(opacus_epsilon("rdp", z, 0.1, 60), rel=1e-9)
    # Opacus's bisection stops within 0.01 below the target.
    assert 1.98 <= epsilons[-1] <= 2.0
    with pytest.raises(BudgetExhausted):
        trainer.fit(params, config, round_number=4)


def test_a_model_opacus_cannot_train_is_refused_with_the_fix() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    features, labels = torch.randn(10, 4), torch.randint(0, 8, (10,))
    trainer = TorchTrainer(model, (features, labels), device="cpu")
    params = to_parameters(model.state_dict(), copy=True)
    with pytest.raises(ConfigError, match="BatchNorm") as caught:
        trainer.fit(params, private(batch_size=5, noise_multiplier=1.0))
    assert any("GroupNorm" in p for p in caught.value.problems)
    assert trainer.dp_history == []


def test_delta_must_be_below_one_over_the_client_examples(
    data: tuple[torch.Tensor, torch.Tensor],
) -> None:
    trainer = TorchTrainer(digits.make_mlp(0), data, device="cpu")
    with pytest.raises(ConfigError, match=r"below 1/n for n = 120"):
        trainer.fit(initial(), private(noise_multiplier=1.0, delta=0.01))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dpsgd_trains_on_cuda_and_accounts_like_on_cpu(
    data: tuple[torch.Tensor, torch.Tensor],
) -> None:
    config = private(noise_multiplier=1.1)
    runs = {}
    for device in ("cpu", "cuda"):
        trainer = TorchTrainer(digits.make_mlp(0), data, device=device)
        trained, meta = trainer.fit(initial(), config)
        assert all(np.isfinite(trained[n]).all() for n in trained)
        runs[device] = (trainer.dp_history, meta.metrics["epsilon"])
    assert runs["cuda"] == runs["cpu"]


def test_a_data_loader_is_poisson_sampled_at_one_over_its_length(
    data: tuple[torch.Tensor, torch.Tensor],
) -> None:
    loader = DataLoader(TensorDataset(*data), batch_size=12, shuffle=True)
    trainer = TorchTrainer(digits.make_mlp(0), loader, device="cpu")
    _, meta = trainer.fit(initial(), private(batch_size=99, noise_multiplier=1.1))
    # The loader's own batch size (12 of 120) sets q, not the round's.
    assert trainer.dp_history == [(1.1, 0.1, 20)]
    assert meta.num_examples == 120
    assert meta.metrics["epsilon"] == pytest.approx(opacus_epsilon("rdp", 1.1, 0.1, 20), rel=1e-9)
