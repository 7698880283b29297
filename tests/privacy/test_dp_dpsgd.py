"""Client DP-SGD with Opacus reports a finite ε that grows with every step."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from privacy.dp.dpsgd import DpSgdConfig, make_private


def tiny_task(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader[object]]:
    """A 10-class problem on 64 features, shaped like scikit-learn's 8x8 digits."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(300, 64, generator=generator)
    labels = (features[:, :10].argmax(dim=1)).long()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader: DataLoader[object] = DataLoader(TensorDataset(features, labels), batch_size=30)
    return model, optimizer, loader


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_dpsgd_reports_a_finite_positive_epsilon_that_grows_with_steps(accountant: str) -> None:
    model, optimizer, loader = tiny_task(0)
    config = DpSgdConfig(
        max_grad_norm=1.0, noise_multiplier=1.1, delta=1e-4, accountant=accountant, seed=3
    )
    dp = make_private(model, optimizer, loader, config)
    assert dp.seeded
    before = [p.detach().clone() for p in dp.model.parameters()]
    epsilons = []
    for features, labels in dp.data_loader:
        loss = dp.step(features, labels)
        assert math.isfinite(loss)
        epsilons.append(dp.epsilon())
    assert len(epsilons) == 10  # Poisson batches, expected size 30 of 300
    assert all(math.isfinite(e) and e > 0 for e in epsilons)
    assert all(b > a for a, b in itertools.pairwise(epsilons))
    assert any(not torch.equal(a, b) for a, b in zip(before, dp.model.parameters(), strict=True))
    assert dp.history() == [(1.1, 0.1, 10)]


def test_restored_history_keeps_composing_across_rounds() -> None:
    model, optimizer, loader = tiny_task(1)
    first = make_private(
        model, optimizer, loader, DpSgdConfig(max_grad_norm=1.0, noise_multiplier=1.0, seed=4)
    )
    for features, labels in first.data_loader:
        first.step(features, labels)
    model, optimizer, loader = tiny_task(1)
    config = DpSgdConfig(max_grad_norm=1.0, noise_multiplier=1.0, seed=5, history=first.history())
    second = make_private(model, optimizer, loader, config)
    assert second.epsilon() == pytest.approx(first.epsilon(), rel=1e-9)
    features, labels = next(iter(second.data_loader))
    second.step(features, labels)
    assert second.epsilon() > first.epsilon()


def test_target_epsilon_is_met_after_the_planned_epochs() -> None:
    model, optimizer, loader = tiny_task(2)
    config = DpSgdConfig(max_grad_norm=1.0, target_epsilon=3.0, epochs=2, delta=1e-4, seed=6)
    dp = make_private(model, optimizer, loader, config)
    for _ in range(2):
        for features, labels in dp.data_loader:
            dp.step(features, labels)
    assert dp.noise_multiplier > 0
    assert 2.5 < dp.epsilon() <= 3.0 * 1.01


def test_config_lists_every_problem() -> None:
    with pytest.raises(ValueError, match="invalid DP-SGD configuration") as caught:
        DpSgdConfig(max_grad_norm=0.0, delta=2.0)
    message = str(caught.value)
    assert "max_grad_norm" in message
    assert "exactly one of" in message
    assert "delta" in message
