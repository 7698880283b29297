"""PNG plots of a federation's history: test accuracy and train loss per round."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from api.simulation import RoundReport

__all__ = ["plot_history"]


def plot_history(reports: Sequence[RoundReport], path: Path, *, title: str) -> Path:
    """Write accuracy and loss per round to a PNG file and return its path."""
    # Imported here: matplotlib is slow to import and only plotting needs it.
    import matplotlib as mpl

    mpl.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [r.round for r in reports]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    acc_ax.plot(rounds, [r.accuracy for r in reports], marker="o", color="tab:blue")
    acc_ax.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1), title="Test accuracy")
    acc_ax.grid(alpha=0.3)
    loss_ax.plot(rounds, [r.train_loss for r in reports], marker="o", color="tab:red")
    loss_ax.set(xlabel="round", ylabel="train loss", title="Train loss (client mean)")
    loss_ax.grid(alpha=0.3)
    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
