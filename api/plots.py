"""PNG plots of a federation's history: test accuracy, train loss and ε per round."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from api.simulation import RoundReport

__all__ = ["plot_history"]


def plot_history(reports: Sequence[RoundReport], path: Path, *, title: str) -> Path:
    """Write accuracy and loss (and ε, for a DP federation) per round to a PNG file.

    Returns:
        `path`.
    """
    # Imported here: matplotlib is slow to import and only plotting needs it.
    import matplotlib as mpl

    mpl.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [r.round for r in reports]
    private = any(math.isfinite(r.epsilon) for r in reports)
    panels = 3 if private else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), constrained_layout=True)
    acc_ax, loss_ax = axes[0], axes[1]
    acc_ax.plot(rounds, [r.accuracy for r in reports], marker="o", color="tab:blue")
    acc_ax.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1), title="Test accuracy")
    loss_ax.plot(rounds, [r.train_loss for r in reports], marker="o", color="tab:red")
    loss_ax.set(xlabel="round", ylabel="train loss", title="Train loss (client mean)")
    if private:
        eps_ax = axes[2]
        eps_ax.plot(rounds, [r.epsilon for r in reports], marker="o", color="tab:green")
        eps_ax.set(xlabel="round", ylabel="ε spent", title="Privacy spent (ε)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
