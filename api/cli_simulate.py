"""`fedcore simulate` and `fedcore demo`: federations run on this machine."""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from aggregator import PrivacyReport, RoundStatus
from privacy.dp import DpMode

if TYPE_CHECKING:
    from api.simulation import RoundReport

# The commands import torch, scikit-learn and matplotlib inside their bodies:
# `fedcore serve` and `fedcore admin` should not pay for them at start-up.

__all__ = ["demo", "digits_model", "simulate_command"]

DpEpsilonOpt = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        help="Run central DP-FedAvg with this privacy budget epsilon (off by default).",
        show_default=False,
    ),
]
DpClipOpt = Annotated[float, typer.Option(min=0.0, help="DP: L2 clip norm of client updates.")]
DpModeOpt = Annotated[
    Literal["central", "distributed", "local"],
    typer.Option(
        help="DP with --dp-epsilon: central (DP-FedAvg on the aggregator), distributed (each "
        "client adds its share of discrete Gaussian noise before masking; needs "
        "--secure-aggregation) or local (DP-SGD with Opacus on each client: --dp-clip clips "
        "every example's gradient, and epsilon is each client's own, example-level budget)."
    ),
]
SecureOpt = Annotated[
    bool,
    typer.Option(
        "--secure-aggregation/--no-secure-aggregation",
        help="Run every round with SecAgg+: the aggregator sees only the sum of masked updates.",
    ),
]


def simulate_command(  # noqa: PLR0913, PLR0917 -- one parameter per command-line option
    clients: Annotated[int, typer.Option(min=1, help="Number of virtual clients.")] = 100,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds to run.")] = 30,
    fraction: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of clients sampled per round.")
    ] = 1.0,
    local_epochs: Annotated[int, typer.Option(min=1, help="Local epochs per round.")] = 1,
    lr: Annotated[float, typer.Option(min=0.0, help="Client SGD learning rate.")] = 0.05,
    batch_size: Annotated[int, typer.Option(min=1, help="Client mini-batch size.")] = 16,
    alpha: Annotated[float, typer.Option(min=0.0, help="Dirichlet label-skew alpha.")] = 0.5,
    seed: Annotated[int, typer.Option(min=0, help="Seed of data split, init and sampling.")] = 0,
    plot: Annotated[Path, typer.Option(help="Where to write the PNG plot.")] = Path(
        "simulation.png"
    ),
    dp_epsilon: DpEpsilonOpt = None,
    dp_clip: DpClipOpt = 1.0,
    dp_delta: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="DP: the budget's delta.")
    ] = 1e-5,
    dp_mode: DpModeOpt = "central",
    secure_aggregation: SecureOpt = False,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Processes that train the clients of plain rounds "
            "[default: one per CPU, at most 8, on Linux; else 1].",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Simulate a federation of virtual digits clients in-process, without HTTP.

    With --dp-epsilon, each client is Poisson-sampled with probability
    --fraction, and the noise (seeded with --seed: reproducible, not private)
    is calibrated to fit --rounds rounds in the budget. With --dp-mode local,
    each client trains with DP-SGD instead, its noise calibrated to fit
    --rounds rounds in its own budget; the table shows the largest client
    epsilon of each round.
    """
    from api.plots import plot_history
    from api.simulation import SimulationConfig, simulate

    config = SimulationConfig(
        clients=clients,
        rounds=rounds,
        fraction=fraction,
        local_epochs=local_epochs,
        lr=lr,
        batch_size=batch_size,
        alpha=alpha,
        seed=seed,
        dp_epsilon=dp_epsilon,
        dp_clip=dp_clip,
        dp_delta=dp_delta,
        dp_mode=dp_mode,
        secure_aggregation=secure_aggregation,
        workers=workers if workers is not None else _default_workers(),
    )
    problems = config.problems()
    if problems:
        raise typer.BadParameter("; ".join(problems))
    _quiet_accounting()
    console = Console()
    columns = (TextColumn("rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task("rounds", total=rounds)

        def show(report: RoundReport) -> None:
            progress.advance(bar)

        result = simulate(config, on_round=show)
    console.print(_table(result.reports))
    path = plot_history(result.reports, plot, title=f"simulation: {clients} digits clients")
    console.print(
        f"final test accuracy [bold]{result.accuracy:.3f}[/] after {len(result.reports)} rounds "
        f"in {result.seconds:.1f} s; plot: {path}"
    )
    if result.privacy.dp is not None:
        console.print(_privacy_line(result.privacy, result.reports))


def _default_workers() -> int:
    # Linux only by default: macOS has fork, but forking a process that has
    # loaded its system frameworks is unsafe there (ask for --workers to try).
    from clients.pool import fork_available

    if not sys.platform.startswith("linux") or not fork_available():
        return 1
    return min(os.cpu_count() or 1, 8)


def demo(
    output: Annotated[Path, typer.Option(help="Folder for the data, model and plot.")] = Path(
        "demo-output"
    ),
    dp_epsilon: DpEpsilonOpt = None,
    dp_clip: DpClipOpt = 1.0,
    secure_aggregation: SecureOpt = False,
) -> None:
    """Run the demo: aggregator, admin API, 20 HTTP clients, 20 rounds of digits.

    With --dp-epsilon, the federation runs central DP-FedAvg (every client
    every round, secure noise) and shows the epsilon spent after each round.
    With --secure-aggregation, every round runs SecAgg+ over HTTP.
    """
    from api.demo import DemoConfig, run_demo

    _quiet_accounting()
    console = Console()
    config = DemoConfig(
        output=output,
        dp_epsilon=dp_epsilon,
        dp_clip=dp_clip,
        secure_aggregation=secure_aggregation,
    )
    result = run_demo(config, console)
    console.print(
        f"\nfinal test accuracy: [bold]{result.accuracy:.3f}[/] "
        f"({len(result.reports)} rounds in {result.seconds:.1f} s)\n"
        f"final model: {result.model_path}\nplot: {result.plot_path}"
    )


def digits_model(
    output: Annotated[Path, typer.Argument(help="Where to write the safetensors file.")],
    seed: Annotated[int, typer.Option(min=0, help="Seed of the initial weights.")] = 0,
) -> None:
    """Write the initial weights of the digits MLP (64-64-10), to create a federation with."""
    from clients import to_parameters
    from clients.digits import make_mlp
    from fedcore import wire

    params = to_parameters(make_mlp(seed=seed).state_dict(), copy=True)
    wire.write(params, output)
    typer.echo(f"wrote {output} ({params.num_parameters} parameters)")


def _quiet_accounting() -> None:
    # dp-accounting warns (through absl) each time a fractional RDP order does
    # not converge and is left out of the minimum over orders; ε stays a valid
    # bound, and dozens of such lines would bury the results table.
    logging.getLogger("absl").setLevel(logging.ERROR)


def _table(reports: tuple[RoundReport, ...]) -> Table:
    table = Table(title="rounds")
    private = any(math.isfinite(r.epsilon) for r in reports)
    columns = ("round", "clients", "train loss", "test accuracy", "seconds")
    for column in (*columns, "epsilon") if private else columns:
        table.add_column(column, justify="right")
    for r in reports:
        status = "" if r.status is RoundStatus.CLOSED else f" ({r.status})"
        # Secure rounds collect no client metrics: the aggregator sees only sums.
        loss = f"{r.train_loss:.4f}" if math.isfinite(r.train_loss) else "-"
        cells = [f"{r.round}{status}", str(r.clients), loss,
                 f"{r.accuracy:.3f}", f"{r.seconds:.3f}"]  # fmt: skip
        table.add_row(*cells, *([f"{r.epsilon:.4f}"] if private else []))
    return table


def _privacy_line(report: PrivacyReport, rounds: tuple[RoundReport, ...]) -> str:
    dp = report.dp
    if dp is None:
        return "no differential privacy"
    noise = (
        "seeded noise: reproducible, NOT private" if dp.noise_seed is not None else "secure noise"
    )
    if dp.mode is DpMode.LOCAL:
        spent = max((r.epsilon for r in rounds if math.isfinite(r.epsilon)), default=0.0)
        return (
            f"local DP-SGD: largest client epsilon [bold]{spent:.4f}[/] of {dp.epsilon:g} each "
            f"(example-level, delta {dp.delta:g}, per-example clip norm {dp.clip_norm:g}; "
            f"{noise}); federation {report.status}"
        )
    if dp.mode is DpMode.DISTRIBUTED:
        # The clients' noise is always secure; only the cohort sampling is seeded.
        noise = "seeded sampling: NOT private" if dp.noise_seed is not None else "secure"
    return (
        f"{dp.mode.value} DP: epsilon spent [bold]{report.epsilon_spent:.4f}[/] of {dp.epsilon:g} "
        f"(delta {dp.delta:g}, noise multiplier {dp.noise_multiplier:.4g}, "
        f"sampling rate {dp.sampling_rate:g}, clip norm {report.clip_norm:.4g}; {noise}); "
        f"federation {report.status}"
    )
