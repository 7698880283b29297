"""Run `fedcore serve` as a child process, for the demo, benchmarks and tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

__all__ = ["LocalServer", "local_server"]


@dataclass(frozen=True, slots=True)
class LocalServer:
    """A running aggregator process and the URL it serves."""

    url: str
    process: subprocess.Popen[str]


@contextlib.contextmanager
def local_server(
    data_dir: Path,
    admin_token: str,
    *,
    database_url: str | None = None,
    port: int = 0,
    timeout_s: float = 60.0,
) -> Iterator[LocalServer]:
    """Start `fedcore serve` on loopback, wait until it is ready, stop it on exit.

    Args:
        data_dir: the server's data directory (SQLite database, blobs).
        admin_token: an admin token (`fca_...`) the server registers.
        database_url: a SQLAlchemy URL instead of the SQLite default.
        port: the port to listen on; 0 picks a free one.
        timeout_s: how long to wait for the server to become ready.

    Raises:
        RuntimeError: the server exited or did not become ready in time.
    """
    env = {**os.environ, "FEDCORE_ADMIN_TOKEN": admin_token}
    if database_url is not None:
        env["FEDCORE_DATABASE_URL"] = database_url
    command = [
        *(sys.executable, "-m", "api", "serve", "--host", "127.0.0.1", "--port", str(port)),
        *("--data-dir", str(data_dir), "--log-level", "warning"),
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)  # noqa: S603
    try:
        yield LocalServer(_await_ready(process, timeout_s), process)
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _await_ready(process: subprocess.Popen[str], timeout_s: float) -> str:
    if process.stdout is None:
        raise RuntimeError("the server's output is not captured")
    started = time.monotonic()
    line = process.stdout.readline()
    if "http://" not in line:
        raise RuntimeError(f"the aggregator did not start: {line.strip() or 'no output'}")
    url = line.strip().split()[-1]
    while time.monotonic() - started < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"the aggregator at {url} exited with {process.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return url
        time.sleep(0.05)
    raise RuntimeError(f"the aggregator at {url} did not become ready in {timeout_s:.0f} s")
