"""What one large update costs the server in memory.

Starts `fedcore serve` (SQLite, blobs on disk), creates a federation whose
model has P float32 parameters (400 MB at the default P = 1e8), and uploads
one update of the same size from a file, streamed. A sampler thread reads the
server's memory every 5 ms while the update travels, is validated, stored and
acknowledged. The round waits for a second client, so it does not close:
what is measured is the upload alone, not the aggregation at the round's end.

Two figures, both as the peak during the upload minus the level just before:
- anonymous memory (RSS minus file-backed pages): what the server has to hold;
- total RSS, which also counts pages of memory-mapped files (the update being
  validated in place); those are page cache, which the kernel reclaims.

    .venv/bin/python bench/upload.py [--params 100000000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil

from aggregator import TokenKind
from aggregator.tokens import new_token
from api.launch import local_server
from clients import enroll
from fedcore import UPDATE_META_KEY, ParameterSet, UpdateMeta, wire

MB = 1 << 20


class Sampler:
    """Peak anonymous and total RSS of a process, sampled in a thread."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak_anon = 0
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> tuple[int, int]:
        info = self.process.memory_info()
        return info.rss - info.shared, info.rss

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            anon, rss = self.now()
            self.peak_anon = max(self.peak_anon, anon)
            self.peak_rss = max(self.peak_rss, rss)
            time.sleep(0.005)


def chunks(path: Path, size: int = 4 * MB) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while block := fh.read(size):
            yield block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=100_000_000)
    args = parser.parse_args()
    token = new_token(TokenKind.ADMIN)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        root = Path(tmp)
        model_path, update_path = root / "model.safetensors", root / "update.safetensors"
        wire.write(ParameterSet({"w": np.zeros(args.params, np.float32)}), model_path)
        delta = ParameterSet({"w": np.full(args.params, 0.001, np.float32)})
        meta = {UPDATE_META_KEY: UpdateMeta(num_examples=10).model_dump_json()}
        wire.write(delta, update_path, meta)
        del delta
        size = update_path.stat().st_size
        with local_server(root / "server", token) as server:
            headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=server.url, headers=headers, timeout=600) as admin:
                fid, tokens = prepare(admin, server.url, model_path)
            for token in tokens[1:]:
                check_in(server.url, fid, token)
            measure(Target(server.url, server.process.pid, fid, tokens[0]), update_path, size)


def prepare(admin: httpx.Client, url: str, model_path: Path) -> tuple[str, list[str]]:
    # The round opens once both clients checked in (a short check-in wait
    # could open it with one, and the measured client would wait forever).
    config = {"name": "upload", "rounds": 1, "clients_per_round": 2, "min_clients": 1,
              "checkin_wait_s": 60}  # fmt: skip
    with model_path.open("rb") as model:
        files = {
            "config": (None, json.dumps(config), "application/json"),
            "model": ("m.safetensors", model, wire.MEDIA_TYPE),
        }
        response = admin.post("/admin/federations", files=files)
    response.raise_for_status()
    fid = str(response.json()["id"])
    tokens = admin.post(
        f"/admin/federations/{fid}/enrollment-tokens", json={"count": 2, "ttl_s": 600}
    ).json()["tokens"]
    admin.post(f"/admin/federations/{fid}/start").raise_for_status()
    return fid, [enroll(url, t).token for t in tokens]


@dataclass(frozen=True)
class Target:
    url: str
    pid: int
    fid: str
    token: str


def check_in(url: str, fid: str, token: str) -> str:
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        return str(client.get(f"/v1/federations/{fid}/task").json()["action"])


def measure(target: Target, update_path: Path, size: int) -> None:
    url, pid, fid = target.url, target.pid, target.fid
    headers = {"Authorization": f"Bearer {target.token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
        deadline = time.monotonic() + 30
        # The other client checked in: the cohort holds both, and one upload
        # does not close the round.
        while client.get(f"/v1/federations/{fid}/task").json()["action"] != "train":
            assert time.monotonic() < deadline, "the round did not start"
            time.sleep(0.2)
        sampler = Sampler(pid)
        time.sleep(1.0)
        base_anon, base_rss = sampler.now()
        started = time.perf_counter()
        with sampler:
            response = client.put(
                f"/v1/federations/{fid}/rounds/1/update",
                content=chunks(update_path),
                headers={"Content-Type": wire.MEDIA_TYPE, "Content-Length": str(size)},
            )
        seconds = time.perf_counter() - started
    assert response.status_code == 201, response.text
    extra_anon = (sampler.peak_anon - base_anon) / MB
    extra_rss = (sampler.peak_rss - base_rss) / MB
    print(f"update: {size / MB:.0f} MB, uploaded, validated and stored in {seconds:.1f} s")
    print(f"server anonymous memory: +{extra_anon:.1f} MB at peak (target < 64 MB)")
    print(f"server total RSS incl. mapped file pages: +{extra_rss:.1f} MB at peak")
    print(f"target: {'met' if extra_anon < 64 else 'MISSED'} (anonymous memory)")
    with httpx.Client(base_url=url, timeout=60) as client:
        status = client.get(f"/v1/federations/{fid}/task", headers=headers).json()["action"]
    assert status == "wait", "the round must still be open (waiting for the other client)"


if __name__ == "__main__":
    main()
