"""The `fedcore` command line: serve the aggregator, administer it, run a client.

`app` is the root Typer application. A command defined in another module is
added with one line here, e.g. `app.command()(simulate)`.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Any

import typer
import uvicorn

from api.app import create_app
from api.cli_admin import app as admin_app
from api.cli_simulate import demo, digits_model, simulate_command
from api.settings import Settings

__all__ = ["app", "main"]

app = typer.Typer(
    name="fedcore",
    help="Federated learning: run the aggregator, administer federations, run clients.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(admin_app, name="admin")
app.command(name="simulate")(simulate_command)
app.command()(demo)
app.command(name="digits-model")(digits_model)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind [FEDCORE_HOST].")] = None,
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="Port; 0 picks a free one [FEDCORE_PORT].")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Blobs, SQLite database, admin token [FEDCORE_DATA_DIR].")
    ] = None,
    database_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL, e.g. PostgreSQL [FEDCORE_DATABASE_URL].")
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the aggregator's HTTP API until interrupted.

    Prints the URL it listens on (useful with --port 0).
    """
    given = {"host": host, "port": port, "data_dir": data_dir, "database_url": database_url}
    overrides: dict[str, Any] = {key: value for key, value in given.items() if value is not None}
    settings = Settings(**overrides)
    sock = _bind(settings.host, settings.port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    typer.echo(f"fedcore aggregator listening on http://{shown}:{bound_port}")
    config = uvicorn.Config(create_app(settings), log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def client(
    ctx: typer.Context,
    server: Annotated[str, typer.Option(help="Aggregator base URL.")],
    token: Annotated[
        str | None, typer.Option(help="Client token (fcc_...) [FEDCORE_TOKEN].", show_default=False)
    ] = None,
    federation: Annotated[str | None, typer.Option(help="Federation id.")] = None,
) -> None:
    """Run a training client until its federation ends (see `python -m clients --help`).

    Other options (--enrollment-token, --data, --shard-file, --device, ...)
    are passed to the client unchanged.
    """
    # Imported here: the client pulls in torch, which `serve` and `admin` do not need.
    from clients.__main__ import main as run_client

    argv = ["--server", server]
    if token is not None:
        argv += ["--token", token]
    if federation is not None:
        argv += ["--federation", federation]
    raise typer.Exit(run_client([*argv, *ctx.args]))


def main() -> None:
    """Run the `fedcore` command line."""
    app()


def _bind(host: str, port: int) -> socket.socket:
    # Binding here, not in uvicorn, lets `--port 0` report the port it got.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this. asyncio sets it only on sockets it
    # creates itself; without it, Nagle's algorithm and delayed ACKs add
    # ~40 ms to every request whose response goes out in two writes.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise typer.BadParameter(f"cannot listen on {host}:{port}: {exc}") from None
    return sock
