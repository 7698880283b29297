"""A large upload streams to disk: the server's memory grows by far less than the body.

The server runs in its own process (`python -m api serve --port 0`), so its
resident memory can be watched with psutil while a 100 MB update streams in.
Only anonymous memory counts: the service memory-maps staged files to check
them, and mapped file pages are page cache the kernel can drop, not memory
the upload holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from liveapi import encode_update

from aggregator.tokens import TokenKind, new_token
from fedcore import wire

ELEMENTS = 25_000_000  # float32: a 100 MB update
LIMIT = 64 << 20
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Subprocess:
    url: str
    process: psutil.Process
    admin: httpx.Client


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Subprocess]:
    token = new_token(TokenKind.ADMIN)
    env = os.environ | {"FEDCORE_ADMIN_TOKEN": token, "FEDCORE_TICK_INTERVAL_S": "0.2"}
    command = [sys.executable, "-m", "api", "serve", "--port", "0", "--data-dir",
               str(tmp_path / "data"), "--log-level", "warning"]  # fmt: skip
    with (tmp_path / "server.log").open("w") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, env=env, cwd=REPO)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().decode().split()[-1]
        admin = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120
        )
        wait_ready(admin)
        yield Subprocess(url, psutil.Process(proc.pid), admin)
        admin.close()
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()


def wait_ready(http: httpx.Client) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if http.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.05)


class PeakMemory:
    """Samples a process's anonymous resident memory (RSS minus file pages)."""

    def __init__(self, process: psutil.Process) -> None:
        self._process = process
        self.baseline = self._anon()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _anon(self) -> int:
        info = self._process.memory_info()
        return int(info.rss - info.shared)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._anon())

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._anon())

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def enroll_and_train(server: Subprocess, fid: str, count: int) -> list[httpx.Client]:
    response = server.admin.post(
        f"/admin/federations/{fid}/enrollment-tokens", json={"count": count, "ttl_s": 60}
    )
    clients = []
    for token in response.json()["tokens"]:
        enrolled = httpx.post(f"{server.url}/v1/enroll", json={"enrollment_token": token}).json()
        headers = {"Authorization": f"Bearer {enrolled['token']}"}
        clients.append(httpx.Client(base_url=server.url, headers=headers, timeout=120))
    server.admin.post(f"/admin/federations/{fid}/start")
    for _ in range(2):
        tasks = [c.get(f"/v1/federations/{fid}/task").json() for c in clients]
    assert all(t["action"] == "train" for t in tasks), tasks
    return clients


def test_large_upload_streams_without_buffering_the_body(server: Subprocess) -> None:
    model = {"w": np.zeros(ELEMENTS, np.float32)}
    cfg = {"name": "big", "rounds": 1, "clients_per_round": 2, "checkin_wait_s": 60}
    created = server.admin.post(
        "/admin/federations",
        data={"config": json.dumps(cfg)},
        files={"model": ("big.safetensors", wire.encode(model))},
    )
    assert created.status_code == 201, created.text
    fid = created.json()["id"]
    alice, bob = enroll_and_train(server, fid, 2)
    path = f"/v1/federations/{fid}/rounds/1/update"
    delta = np.full(ELEMENTS, 0.5, np.float32)
    delta[-1] = np.nan
    poisoned = encode_update({"w": delta}, 7)
    delta[-1] = 0.5
    valid = encode_update({"w": delta}, 7)

    # Refused after the last byte was read and checked: the whole path, no fold.
    with PeakMemory(server.process) as refused_memory:
        refused = alice.put(path, content=poisoned)
    # Accepted: folding touches the float64 running sum (8 bytes per
    # parameter) that the round holds whatever the transport.
    with PeakMemory(server.process) as accepted_memory:
        accepted = alice.put(path, content=valid)

    assert refused.status_code == 422, refused.text
    assert accepted.status_code == 201, accepted.text
    assert refused_memory.growth < LIMIT, refused_memory.growth
    assert accepted_memory.growth < LIMIT + 8 * ELEMENTS, accepted_memory.growth
    bob.close()
    alice.close()
