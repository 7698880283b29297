"""Per-round overhead of the aggregator over real HTTP on loopback.

Two trivial clients (no training: each returns a fixed small delta) run a
federation of R rounds against `fedcore serve` (SQLite, blobs on disk, every
upload fsynced before it is acknowledged). With no training, the wall time
per round is the framework's own overhead: check-in long-polls, model
download, upload, persistence, aggregation and the next round's opening.

    .venv/bin/python bench/round_latency.py [--rounds 100]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from aggregator import TokenKind
from aggregator.tokens import new_token
from api.launch import local_server
from clients import Client, HttpTransport, enroll
from fedcore import ParameterSet, TrainConfig, UpdateMeta, wire


class Trivial:
    """A trainer that does no work: it adds 0.001 to every parameter."""

    def fit(
        self, params: ParameterSet, config: TrainConfig, *, round_number: int = 0
    ) -> tuple[ParameterSet, UpdateMeta]:
        trained = ParameterSet(
            {n: (a + np.float32(0.001)).astype(a.dtype) for n, a in params.items()}
        )
        return trained, UpdateMeta(num_examples=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    token = new_token(TokenKind.ADMIN)
    with tempfile.TemporaryDirectory() as tmp, local_server(Path(tmp), token) as server:
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as admin:
            fid = create(admin, args.rounds)
            tokens = admin.post(
                f"/admin/federations/{fid}/enrollment-tokens", json={"count": 2, "ttl_s": 60}
            ).json()["tokens"]
            creds = [enroll(server.url, t) for t in tokens]
            admin.post(f"/admin/federations/{fid}/start").raise_for_status()
            started = time.perf_counter()
            run_clients(server.url, fid, [c.token for c in creds])
            wall = time.perf_counter() - started
            rounds = admin.get(f"/admin/federations/{fid}/rounds").json()
    durations = [r["closed_at"] - r["opened_at"] for r in rounds if r["status"] == "closed"]
    assert len(durations) == args.rounds, "every round must close"
    per_round_ms = wall / args.rounds * 1e3
    print(f"rounds: {args.rounds}, two clients, 10-parameter model, SQLite + fsync")
    print(f"wall time per round (client view): {per_round_ms:.1f} ms")
    print(f"open→close per round (server view): median {statistics.median(durations) * 1e3:.1f} ms,"
          f" p90 {np.percentile(durations, 90) * 1e3:.1f} ms")  # fmt: skip
    print(f"target < 50 ms per round: {'met' if per_round_ms < 50 else 'MISSED'}")


def create(admin: httpx.Client, rounds: int) -> str:
    model = ParameterSet({"w": np.zeros(10, np.float32)})
    config = {"name": "latency", "rounds": rounds, "clients_per_round": 2, "min_clients": 2}
    files = {
        "config": (None, json.dumps(config), "application/json"),
        "model": ("m.safetensors", wire.encode(model), wire.MEDIA_TYPE),
    }
    response = admin.post("/admin/federations", files=files)
    response.raise_for_status()
    return str(response.json()["id"])


def run_clients(url: str, fid: str, tokens: list[str]) -> None:
    transports = [HttpTransport(url, t, wait_s=10) for t in tokens]
    clients = [Client(t, Trivial(), fid) for t in transports]
    threads = [threading.Thread(target=c.run) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for transport in transports:
        transport.close()


if __name__ == "__main__":
    main()
