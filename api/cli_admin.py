"""`fedcore admin ...`: the admin API from the command line.

Every command is one HTTP call to a running aggregator (`--server`) with an
admin token taken from `--token`, `FEDCORE_ADMIN_TOKEN`, or the
`<data-dir>/admin-token` file the server writes on its first start. Output is
a table, or JSON with `--json`; an error prints the problem's title and
detail and exits with status 1.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import quote

import httpx
import typer
from rich.console import Console
from rich.table import Table

__all__ = ["app"]

app = typer.Typer(help="Manage federations through the admin API.", no_args_is_help=True)
federations = typer.Typer(help="Create, list and show federations.", no_args_is_help=True)
app.add_typer(federations, name="federations")

_TIMEOUT_S = 60.0
# A model version is a SHA-256 in hex.
_VERSION_CHARS = 64

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
FedArg = Annotated[str, typer.Argument(help="Federation id.", show_default=False)]


@dataclass(frozen=True, slots=True)
class Connection:
    """Where the admin API is and which token to present."""

    server: str
    token: str | None
    data_dir: Path

    def admin_token(self) -> str:
        """Return the explicit token, else the one the server wrote to its data dir."""
        if self.token:
            return self.token
        path = self.data_dir / "admin-token"
        if path.is_file():
            return path.read_text(encoding="ascii").strip()
        _fail(
            f"no admin token: pass --token, set FEDCORE_ADMIN_TOKEN, or point --data-dir "
            f"at the server's data directory ({path} does not exist)"
        )

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send one request and return the answer; exit on an error answer."""
        headers = {"Authorization": f"Bearer {self.admin_token()}"}
        try:
            with httpx.Client(base_url=self.server, headers=headers, timeout=_TIMEOUT_S) as http:
                response = http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            _fail(f"cannot reach {self.server}: {exc}")
        _check(response)
        return response


@app.callback()
def connect(
    ctx: typer.Context,
    server: Annotated[
        str, typer.Option(envvar="FEDCORE_SERVER", help="Aggregator base URL.")
    ] = "http://127.0.0.1:8000",
    token: Annotated[
        str | None,
        typer.Option(
            envvar="FEDCORE_ADMIN_TOKEN", help="Admin token (fca_...).", show_default=False
        ),
    ] = None,
    data_dir: Annotated[
        Path,
        typer.Option(envvar="FEDCORE_DATA_DIR", help="Server data dir holding admin-token."),
    ] = Path("./fedcore-data"),
) -> None:
    """Talk to the admin API of a running aggregator."""
    ctx.obj = Connection(server.rstrip("/"), token, data_dir)


@federations.command("create")
def create_federation(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option(help="FederationConfig as .json or .toml.")],
    model: Annotated[Path, typer.Option(help="Initial model as .safetensors.")],
    json_output: JsonOpt = False,
) -> None:
    """Create a federation from a config file and an initial model."""
    text = _config_text(config)
    with model.open("rb") as fh:
        response = _conn(ctx).request(
            "POST",
            "/admin/federations",
            data={"config": text},
            files={"model": (model.name, fh, "application/octet-stream")},
        )
    _show(response.json(), json_output, _federation_table)


@federations.command("list")
def list_federations(ctx: typer.Context, json_output: JsonOpt = False) -> None:
    """List federations."""
    _show(_conn(ctx).request("GET", "/admin/federations").json(), json_output, _federations_table)


@federations.command("show")
def show_federation(ctx: typer.Context, fid: FedArg, json_output: JsonOpt = False) -> None:
    """Show one federation and its configuration."""
    _show(_get(ctx, _fed(fid)), json_output, _federation_table)


@app.command()
def start(ctx: typer.Context, fid: FedArg, json_output: JsonOpt = False) -> None:
    """Start (or resume) a federation's rounds."""
    _show(_post(ctx, f"{_fed(fid)}/start"), json_output, _federation_table)


@app.command()
def pause(ctx: typer.Context, fid: FedArg, json_output: JsonOpt = False) -> None:
    """Pause a running federation."""
    _show(_post(ctx, f"{_fed(fid)}/pause"), json_output, _federation_table)


@app.command()
def stop(ctx: typer.Context, fid: FedArg, json_output: JsonOpt = False) -> None:
    """Stop a federation for good."""
    _show(_post(ctx, f"{_fed(fid)}/stop"), json_output, _federation_table)


@app.command()
def rounds(ctx: typer.Context, fid: FedArg, json_output: JsonOpt = False) -> None:
    """List a federation's rounds."""
    _show(_get(ctx, f"{_fed(fid)}/rounds"), json_output, _rounds_table)


@app.command()
def privacy(ctx: typer.Context, fid: FedArg, json_output: JsonOpt = False) -> None:
    """Show a federation's privacy budget, the epsilon spent, and epsilon after each round."""
    _show(_get(ctx, f"{_fed(fid)}/privacy"), json_output, _privacy_table)


@app.command()
def clients(ctx: typer.Context, fid: FedArg, json_output: JsonOpt = False) -> None:
    """List a federation's enrolled clients."""
    _show(_get(ctx, f"{_fed(fid)}/clients"), json_output, _clients_table)


@app.command()
def revoke(
    ctx: typer.Context,
    fid: FedArg,
    client_id: Annotated[str, typer.Argument(help="Client id.", show_default=False)],
    json_output: JsonOpt = False,
) -> None:
    """Revoke a client's credential."""
    path = f"{_fed(fid)}/clients/{quote(client_id, safe='')}/revoke"
    _show(_post(ctx, path), json_output, lambda c: _clients_table([c]))


@app.command()
def tokens(
    ctx: typer.Context,
    fid: FedArg,
    count: Annotated[int, typer.Option(min=1, max=1000, help="How many tokens.")] = 1,
    ttl: Annotated[float, typer.Option(min=0.001, help="Validity in seconds.")] = 86400.0,
    json_output: JsonOpt = False,
) -> None:
    """Issue one-time enrollment tokens (printed once, one per line)."""
    body = {"count": count, "ttl_s": ttl}
    data = _conn(ctx).request("POST", f"{_fed(fid)}/enrollment-tokens", json=body).json()
    if json_output:
        _print_json(data)
        return
    for token in data["tokens"]:
        typer.echo(token)
    Console(stderr=True).print(f"valid until {_when(data['expires_at'])}")


@app.command()
def models(ctx: typer.Context, fid: FedArg, json_output: JsonOpt = False) -> None:
    """List a federation's model versions."""
    _show(_get(ctx, f"{_fed(fid)}/models"), json_output, _models_table)


@app.command()
def download(
    ctx: typer.Context,
    fid: FedArg,
    version: Annotated[
        str,
        typer.Argument(
            help="Model version: its sha256, a prefix of it that names one version "
            "(as the tables show), or 'latest' for the federation's current model.",
            show_default=False,
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write.")],
) -> None:
    """Download a model version as safetensors."""
    conn = _conn(ctx)
    headers = {"Authorization": f"Bearer {conn.admin_token()}"}
    path = f"{_fed(fid)}/models/{quote(_version(ctx, fid, version), safe='')}"
    try:
        with (
            httpx.Client(base_url=conn.server, headers=headers, timeout=_TIMEOUT_S) as http,
            http.stream("GET", path) as response,
        ):
            if response.is_error:
                response.read()
                _check(response)
            size = _save(response, output)
    except httpx.HTTPError as exc:
        _fail(f"download from {conn.server} failed: {exc}")
    Console(stderr=True).print(f"wrote {size} bytes to {output}")


def _version(ctx: typer.Context, fid: str, given: str) -> str:
    """Return the full model version that `given` names (see `download`)."""
    if given == "latest":
        current: str = _get(ctx, _fed(fid))["model_version"]
        return current
    if len(given) == _VERSION_CHARS:
        return given
    versions: list[str] = [m["version"] for m in _get(ctx, f"{_fed(fid)}/models")]
    matches = [v for v in versions if v.startswith(given.lower())]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        _fail(f"no model version of {fid} starts with {given!r}; `fedcore admin models {fid}` "
              "lists them")  # fmt: skip
    _fail(f"{given!r} starts {len(matches)} model versions of {fid}; give more characters")


def _conn(ctx: typer.Context) -> Connection:
    conn: Connection = ctx.find_object(Connection) or _fail("no connection; run `fedcore admin`")
    return conn


def _fed(fid: str) -> str:
    return f"/admin/federations/{quote(fid, safe='')}"


def _get(ctx: typer.Context, path: str) -> Any:
    return _conn(ctx).request("GET", path).json()


def _post(ctx: typer.Context, path: str) -> Any:
    return _conn(ctx).request("POST", path).json()


def _save(response: httpx.Response, output: Path) -> int:
    partial = output.with_name(output.name + ".part")
    try:
        with partial.open("wb") as fh:
            for chunk in response.iter_bytes():
                fh.write(chunk)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(output)
    return output.stat().st_size


def _config_text(path: Path) -> str:
    try:
        if path.suffix.lower() == ".toml":
            with path.open("rb") as fh:
                return json.dumps(tomllib.load(fh))
        return path.read_text(encoding="utf-8")
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        _fail(f"cannot read the config {path}: {exc}")


def _check(response: httpx.Response) -> None:
    if not response.is_error:
        return
    try:
        problem = response.json()
    except ValueError:
        problem = {}
    if not isinstance(problem, dict):
        problem = {}
    title = problem.get("title") or response.reason_phrase
    lines = [f"error: {title} (HTTP {response.status_code})"]
    if problem.get("detail"):
        lines.append(str(problem["detail"]))
    lines += [f"  - {p}" for p in problem.get("problems") or []]
    _fail("\n".join(lines))


def _fail(message: str) -> NoReturn:
    Console(stderr=True, highlight=False).print(message, markup=False)
    raise typer.Exit(1)


def _show(data: Any, json_output: bool, render: Callable[[Any], Table]) -> None:
    if json_output:
        _print_json(data)
    else:
        Console().print(render(data))


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _short(version: str | None) -> str:
    return "-" if version is None else version[:12]


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    table = Table(title=title)
    for index, column in enumerate(columns):
        # Ids are what people copy into the next command: never wrap them.
        # The other columns keep their header's width, so that a long id
        # does not squeeze them to a letter per line on a narrow terminal.
        table.add_column(column, no_wrap=index == 0, overflow="fold", min_width=len(column))
    for row in rows:
        table.add_row(*row)
    return table


def _federations_table(feds: list[dict[str, Any]]) -> Table:
    columns = ("id", "name", "status", "round", "model", "created")
    rows = [
        (f["id"], f["name"], f["status"], str(f["current_round"]), _short(f["model_version"]),
         _when(f["created_at"]))
        for f in feds
    ]  # fmt: skip
    return _table("federations", columns, rows)


def _federation_table(fed: dict[str, Any]) -> Table:
    rows = [
        ("id", fed["id"]),
        ("name", fed["name"]),
        ("status", fed["status"]),
        ("current round", str(fed["current_round"])),
        ("model version", fed["model_version"]),
        ("created", _when(fed["created_at"])),
    ]
    rows += [(f"config.{key}", json.dumps(value)) for key, value in fed["config"].items()]
    return _table(f"federation {fed['id']}", ("field", "value"), rows)


def _rounds_table(rnds: list[dict[str, Any]]) -> Table:
    columns = ("round", "status", "cohort", "model", "result", "closed", "reason")
    rows = [
        (str(r["number"]), r["status"], str(len(r["cohort"])), _short(r["model_version"]),
         _short(r["result_version"]), _when(r["closed_at"]), r["reason"] or "")
        for r in rnds
    ]  # fmt: skip
    return _table("rounds", columns, rows)


def _privacy_table(report: dict[str, Any]) -> Table:
    title = f"privacy of {report['federation_id']}"
    if report["mode"] is None:
        rows = [("status", report["status"]), ("mode", "none: no differential privacy")]
        return _table(title, ("field", "value"), rows)
    rows = [
        ("status", report["status"]),
        ("mode", report["mode"]),
        ("epsilon spent", f"{report['epsilon_spent']:.6g} of {report['epsilon_target']:g}"),
        ("delta", f"{report['delta']:g}"),
        ("noise multiplier", f"{report['noise_multiplier']:.6g}"),
        ("sampling rate", f"{report['sampling_rate']:g}"),
        ("clip norm", f"{report['clip_norm']:.6g}"),
        ("accountant", report["accountant"]),
        ("noise", "SEEDED: reproducible, NOT private" if report["seeded"] else "secure"),
    ]
    rows += [
        (
            f"after round {r['round']}",
            f"epsilon {r['epsilon']:.6g} (clip norm {r['clip_norm']:.4g})",
        )
        for r in report["rounds"]
    ]
    return _table(title, ("field", "value"), rows)


def _clients_table(items: list[dict[str, Any]]) -> Table:
    columns = ("id", "federation", "enrolled", "last seen", "revoked")
    rows = [
        (c["id"], c["federation_id"], _when(c["created_at"]), _when(c["last_seen"] or None),
         "yes" if c["revoked"] else "no")
        for c in items
    ]  # fmt: skip
    return _table("clients", columns, rows)


def _models_table(items: list[dict[str, Any]]) -> Table:
    # Versions shortened as in the other tables; `download` takes the prefix.
    columns = ("version", "round", "bytes", "created")
    rows = [
        (_short(m["version"]), str(m["round"]), str(m["size_bytes"]), _when(m["created_at"]))
        for m in items
    ]
    return _table("model versions", columns, rows)
