"""`fedcore simulate` and `fedcore demo`: federations run on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from aggregator import RoundStatus

if TYPE_CHECKING:
    from api.simulation import RoundReport

# The commands import torch, scikit-learn and matplotlib inside their bodies:
# `fedcore serve` and `fedcore admin` should not pay for them at start-up.

__all__ = ["demo", "digits_model", "simulate_command"]


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
) -> None:
    """Simulate a federation of virtual digits clients in-process, without HTTP."""
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
    )
    problems = config.problems()
    if problems:
        raise typer.BadParameter("; ".join(problems))
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


def demo(
    output: Annotated[Path, typer.Option(help="Folder for the data, model and plot.")] = Path(
        "demo-output"
    ),
) -> None:
    """Run the demo: aggregator, admin API, 20 HTTP clients, 20 rounds of digits."""
    from api.demo import DemoConfig, run_demo

    console = Console()
    result = run_demo(DemoConfig(output=output), console)
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


def _table(reports: tuple[RoundReport, ...]) -> Table:
    table = Table(title="rounds")
    for column in ("round", "clients", "train loss", "test accuracy", "seconds"):
        table.add_column(column, justify="right")
    for r in reports:
        status = "" if r.status is RoundStatus.CLOSED else f" ({r.status})"
        table.add_row(
            f"{r.round}{status}",
            str(r.clients),
            f"{r.train_loss:.4f}",
            f"{r.accuracy:.3f}",
            f"{r.seconds:.3f}",
        )
    return table
