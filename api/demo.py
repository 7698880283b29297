"""The demo: a whole federation over real HTTP on this machine.

It starts the aggregator (`fedcore serve` on a free loopback port, SQLite and
blobs in the output folder), creates a federation for an MLP on the digits
data through the admin API, enrolls 20 clients through the client API, and
runs them as real HTTP clients of the SDK, each on its own non-IID shard,
until the federation ends. Each round is evaluated on the held-out test set.

With `dp_epsilon` set, the federation runs central DP-FedAvg: every client
is sampled every round (q = 1), updates are clipped to `dp_clip`, the
noise (from the OS CSPRNG) is calibrated to fit the rounds in the budget,
and each round's line shows the ε spent so far, read from the admin API.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from aggregator import RoundStatus, TokenKind
from aggregator.tokens import new_token
from api.launch import local_server
from api.plots import plot_history
from api.simulation import RoundReport
from clients import (
    Client,
    HttpTransport,
    TensorData,
    TorchTrainer,
    enroll_identity,
    to_parameters,
)
from clients.digits import Evaluator, client_data, dirichlet_partition, load_digits_split, make_mlp
from fedcore import Enrollment, ParameterSet, wire
from privacy.secagg import ClientIdentity

__all__ = ["DemoConfig", "DemoResult", "run_demo"]

_POLL_S = 0.1
# δ of the demo's budget: below 1/N^1.1 for its 20 clients, as δ must be.
_DP_DELTA = 1e-3
_ENDED = ("finished", "stopped", "budget_exhausted")


@dataclass(frozen=True, slots=True)
class DemoConfig:
    """What the demo runs, and where it writes."""

    clients: int = 20
    rounds: int = 20
    local_epochs: int = 2
    lr: float = 0.1
    batch_size: int = 16
    alpha: float = 0.5
    seed: int = 0
    output: Path = Path("demo-output")
    timeout_s: float = 600.0
    dp_epsilon: float | None = None
    dp_clip: float = 1.0
    secure_aggregation: bool = False


@dataclass(frozen=True, slots=True)
class DemoResult:
    """The rounds as they were shown, and the files written."""

    reports: tuple[RoundReport, ...]
    accuracy: float
    model_path: Path
    plot_path: Path
    seconds: float


@dataclass(slots=True)
class _Fleet:
    """Client threads and the first error any of them raised."""

    threads: list[threading.Thread] = field(default_factory=list)
    clients: list[Client] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Watch:
    """What following a federation's rounds needs."""

    admin: httpx.Client
    federation_id: str
    evaluator: Evaluator
    fleet: _Fleet


def run_demo(config: DemoConfig, console: Console) -> DemoResult:
    """Run the demo federation end to end and return what it showed."""
    started = time.perf_counter()
    if config.output.exists():
        shutil.rmtree(config.output)
    config.output.mkdir(parents=True)
    torch.set_num_threads(1)
    admin_token = new_token(TokenKind.ADMIN)
    with local_server(config.output / "server", admin_token) as server:
        url = server.url
        console.print(f"aggregator listening on [bold]{url}[/] (data in {config.output}/server)")
        admin = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=30
        )
        with admin:
            reports, final = _federate(config, console, url, admin)
    model_path = config.output / "final-model.safetensors"
    wire.write(final, model_path)
    plot_path = plot_history(reports, config.output / "history.png", title="fedcore demo: digits")
    accuracy = reports[-1].accuracy if reports else float("nan")
    return DemoResult(
        tuple(reports), accuracy, model_path, plot_path, time.perf_counter() - started
    )


def _federate(
    config: DemoConfig, console: Console, url: str, admin: httpx.Client
) -> tuple[list[RoundReport], ParameterSet]:
    split = load_digits_split()
    federation_id = _create_federation(admin, config)
    console.print(f"created federation [bold]{federation_id}[/] through the admin API")
    tokens = _post(admin, f"/admin/federations/{federation_id}/enrollment-tokens",
                   json={"count": config.clients, "ttl_s": 600})["tokens"]  # fmt: skip
    enrolled = [enroll_identity(url, token) for token in tokens]
    console.print(f"enrolled {len(enrolled)} clients through the client API")
    if config.secure_aggregation:
        console.print("secure aggregation: the aggregator sees only the sum of masked updates")
    parts = dirichlet_partition(split.y_train, config.clients, config.alpha, config.seed)
    fleet = _start_clients(url, enrolled, client_data(split, parts), config.seed)
    _post(admin, f"/admin/federations/{federation_id}/start")
    try:
        watch = _Watch(admin, federation_id, Evaluator(split), fleet)
        reports = _follow(watch, config, console)
    finally:
        for client in fleet.clients:
            client.stop()
        for thread in fleet.threads:
            thread.join(timeout=30)
    final_version = _get(admin, f"/admin/federations/{federation_id}")["model_version"]
    privacy = _get(admin, f"/admin/federations/{federation_id}/privacy")
    if privacy["mode"] is not None:
        console.print(
            f"central DP: epsilon spent {privacy['epsilon_spent']:.4f} of "
            f"{privacy['epsilon_target']:g} (delta {privacy['delta']:g}, noise multiplier "
            f"{privacy['noise_multiplier']:.4g}); federation {privacy['status']}"
        )
    return reports, _download(admin, federation_id, final_version)


def _create_federation(admin: httpx.Client, config: DemoConfig) -> str:
    federation = {
        "name": "digits-demo",
        "rounds": config.rounds,
        "clients_per_round": config.clients,
        "min_clients": max(3 if config.secure_aggregation else 1, config.clients // 2),
        "round_timeout_s": 60,
        "checkin_wait_s": 30,
        "seed": config.seed,
        "train": {"local_epochs": config.local_epochs, "batch_size": config.batch_size,
                  "lr": config.lr},
    }  # fmt: skip
    if config.dp_epsilon is not None:
        federation["dp"] = {
            "mode": "central",
            "epsilon": config.dp_epsilon,
            "delta": _DP_DELTA,
            "clip_norm": config.dp_clip,
            "sampling_rate": 1.0,
        }
    if config.secure_aggregation:
        federation["secure_aggregation"] = True
        federation["secagg"] = {"clip": 1.0}
    model = to_parameters(make_mlp(seed=config.seed).state_dict(), copy=True)
    files = {
        "config": (None, json.dumps(federation), "application/json"),
        "model": ("init.safetensors", wire.encode(model), wire.MEDIA_TYPE),
    }
    return str(_post(admin, "/admin/federations", files=files)["id"])


def _start_clients(
    url: str,
    enrolled: Sequence[tuple[Enrollment, ClientIdentity]],
    shards: Sequence[TensorData],
    seed: int,
) -> _Fleet:
    fleet = _Fleet()
    for index, ((enrollment, identity), data) in enumerate(zip(enrolled, shards, strict=True)):
        transport = HttpTransport(url, enrollment.token, wait_s=10)
        trainer = TorchTrainer(make_mlp(seed=seed), data, device="auto", seed=seed + index)
        client = Client(transport, trainer, enrollment.federation_id, identity=identity)
        thread = threading.Thread(
            target=_run_client, args=(client, transport, fleet), name=f"client-{index}"
        )
        fleet.clients.append(client)
        fleet.threads.append(thread)
        thread.start()
    return fleet


def _run_client(client: Client, transport: HttpTransport, fleet: _Fleet) -> None:
    with transport:
        try:
            client.run()
        except Exception as exc:  # noqa: BLE001 -- re-raised by the main thread in _follow
            fleet.errors.append(exc)


def _follow(watch: _Watch, config: DemoConfig, console: Console) -> list[RoundReport]:
    admin, federation_id, fleet = watch.admin, watch.federation_id, watch.fleet
    reports: list[RoundReport] = []
    columns = (TextColumn("rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    console.print("round  clients  train loss  test acc  seconds  epsilon")
    deadline = time.monotonic() + config.timeout_s
    with Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task("rounds", total=config.rounds)
        while True:
            if fleet.errors:
                raise RuntimeError(f"a client failed: {fleet.errors[0]!r}") from fleet.errors[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"the demo did not finish within {config.timeout_s:.0f} s")
            # Read the status first: rounds that closed before it are all listed below.
            ended = _get(admin, f"/admin/federations/{federation_id}")["status"] in _ENDED
            for row in _get(admin, f"/admin/federations/{federation_id}/rounds")[len(reports) :]:
                if row["status"] not in (RoundStatus.CLOSED, RoundStatus.FAILED):
                    break
                report = _report(admin, row, watch.evaluator)
                reports.append(report)
                progress.advance(bar)
                progress.console.print(_line(report))
            if ended:
                return reports
            time.sleep(_POLL_S)


def _report(admin: httpx.Client, row: dict[str, Any], evaluator: Evaluator) -> RoundReport:
    accuracy = float("nan")
    if row["result_version"] is not None:
        params = _download(admin, row["federation_id"], row["result_version"])
        accuracy, _ = evaluator.evaluate(params)
    metrics = row["metrics"]
    return RoundReport(
        round=row["number"],
        status=RoundStatus(row["status"]),
        clients=int(metrics.get("clients", 0)),
        train_loss=float(metrics.get("train_loss", float("nan"))),
        accuracy=accuracy,
        seconds=(row["closed_at"] or row["opened_at"]) - row["opened_at"],
        epsilon=float(metrics.get("epsilon", math.nan)),
    )


def _line(report: RoundReport) -> str:
    failed = "" if report.status is RoundStatus.CLOSED else "  (failed)"
    epsilon = f"{report.epsilon:>7.3f}" if math.isfinite(report.epsilon) else f"{'-':>7}"
    # Secure rounds collect no client metrics: the aggregator sees only sums.
    loss = f"{report.train_loss:>10.4f}" if math.isfinite(report.train_loss) else f"{'-':>10}"
    return (
        f"{report.round:>5}  {report.clients:>7}  {loss}  "
        f"{report.accuracy:>8.3f}  {report.seconds:>7.2f}  {epsilon}{failed}"
    )


def _download(admin: httpx.Client, federation_id: str, version: str) -> ParameterSet:
    response = admin.get(f"/admin/federations/{federation_id}/models/{version}")
    response.raise_for_status()
    params, _ = wire.decode(response.content)
    return params


def _get(admin: httpx.Client, path: str) -> Any:
    response = admin.get(path)
    response.raise_for_status()
    return response.json()


def _post(admin: httpx.Client, path: str, **kwargs: Any) -> Any:
    response = admin.post(path, **kwargs)
    if response.is_error:
        raise RuntimeError(f"POST {path} failed: {response.status_code} {response.text}")
    return response.json()
