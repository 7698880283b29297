"""Helpers for the API tests: a live server, its state, and shortcuts over HTTP.

`serve` runs `create_app(settings)` under uvicorn in a background thread on a
free loopback port. `LiveServer.snapshot()` captures every table row and
every blob file, so a test can prove that a refused request changed nothing.
`World` offers the calls most tests need (create a federation, enroll
clients, check in, upload) as plain httpx requests, not the client SDK.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from aggregator.tables import Base
from api import Settings, create_app
from fedcore import UPDATE_META_KEY, ParameterSet, UpdateMeta, wire

PG_URL_VARIABLE = "FEDCORE_TEST_DATABASE_URL"
TYPE_BASE = "https://fedcore.dev/problems/"


def small_model() -> ParameterSet:
    """Two float32 tensors and an int64 buffer, in a non-alphabetical order."""
    rng = np.random.default_rng(7)
    return ParameterSet(
        {
            "w": rng.standard_normal((3, 4)).astype(np.float32),
            "b": rng.standard_normal(4).astype(np.float32),
            "steps": np.array([5], dtype=np.int64),
        }
    )


def encode_update(delta: Mapping[str, np.ndarray], num_examples: int = 10) -> bytes:
    meta = UpdateMeta(num_examples=num_examples, metrics={"loss": 0.5})
    return wire.encode(delta, {UPDATE_META_KEY: meta.model_dump_json()})


def config(name: str, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": name,
        "rounds": 3,
        "clients_per_round": 2,
        "min_clients": 1,
        "checkin_wait_s": 300.0,
        "round_timeout_s": 600.0,
    }
    return base | overrides


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["type"] == TYPE_BASE + slug, body
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    return body


@dataclass(frozen=True)
class Snapshot:
    rows: dict[str, list[tuple[Any, ...]]]
    blobs: list[str]


@dataclass
class LiveServer:
    """A running app: its URL, data directory, database and admin token."""

    url: str
    app: FastAPI
    data_dir: Path
    database_url: str
    admin_token: str
    engine: Engine

    def snapshot(self) -> Snapshot:
        names = [table.name for table in Base.metadata.sorted_tables] + ["alembic_version"]
        rows = {}
        with self.engine.connect() as connection:
            for name in names:
                result = connection.execute(text(f"SELECT * FROM {name}"))  # noqa: S608
                rows[name] = sorted((tuple(row) for row in result), key=repr)
        root = self.data_dir / "blobs"
        blobs = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        return Snapshot(rows, blobs)


@dataclass
class Client:
    """An enrolled client and its own HTTP connection."""

    id: str
    federation_id: str
    token: str
    http: httpx.Client

    def task(self, wait: float = 0.0) -> dict[str, Any]:
        response = self.http.get(
            f"/v1/federations/{self.federation_id}/task", params={"wait": wait}
        )
        assert response.status_code == 200, response.text
        task: dict[str, Any] = response.json()
        return task

    def upload(self, round_number: int, body: bytes) -> httpx.Response:
        return self.http.put(
            f"/v1/federations/{self.federation_id}/rounds/{round_number}/update",
            content=body,
            headers={"Content-Type": wire.MEDIA_TYPE},
        )


@dataclass
class World:
    """Shortcuts over the admin and client APIs of one live server."""

    live: LiveServer
    admin: httpx.Client
    _opened: list[httpx.Client] = field(default_factory=list)

    def http(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = httpx.Client(base_url=self.live.url, headers=headers, timeout=60)
        self._opened.append(client)
        return client

    def create_federation(
        self, cfg: dict[str, Any], model: ParameterSet | None = None
    ) -> dict[str, Any]:
        data = wire.encode(model if model is not None else small_model())
        response = self.admin.post(
            "/admin/federations",
            data={"config": json.dumps(cfg)},
            files={"model": ("init.safetensors", data, "application/octet-stream")},
        )
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created

    def tokens(self, fid: str, count: int = 1, ttl_s: float = 600.0) -> list[str]:
        response = self.admin.post(
            f"/admin/federations/{fid}/enrollment-tokens", json={"count": count, "ttl_s": ttl_s}
        )
        assert response.status_code == 201, response.text
        tokens: list[str] = response.json()["tokens"]
        return tokens

    def enroll(self, fid: str, count: int) -> list[Client]:
        clients = []
        for token in self.tokens(fid, count):
            response = self.http().post("/v1/enroll", json={"enrollment_token": token})
            assert response.status_code == 201, response.text
            body = response.json()
            assert body["federation_id"] == fid
            clients.append(Client(body["client_id"], fid, body["token"], self.http(body["token"])))
        return clients

    def start(self, fid: str) -> dict[str, Any]:
        response = self.admin.post(f"/admin/federations/{fid}/start")
        assert response.status_code == 200, response.text
        started: dict[str, Any] = response.json()
        return started

    def training(self, fid: str, count: int) -> list[Client]:
        """Enroll `count` clients, start, and check all in: round 1 trains them all."""
        clients = self.enroll(fid, count)
        self.start(fid)
        # The last check-in completes the cohort; the others learn it on the next one.
        tasks = [c.task() for c in clients]
        tasks = [c.task() for c in clients]
        assert all(t["action"] == "train" and t["round"] == 1 for t in tasks), tasks
        return clients

    def close(self) -> None:
        for client in self._opened:
            client.close()


@contextlib.contextmanager
def serve(settings: Settings) -> Iterator[tuple[str, FastAPI]]:
    """Run the app under uvicorn in a thread; yield its URL once it is up."""
    app = create_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as `fedcore serve` does
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_config=None, access_log=False, ws="none", lifespan="on", log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@contextlib.contextmanager
def postgres_schema(base: str) -> Iterator[str]:
    schema = f"fedcore_api_{uuid.uuid4().hex[:16]}"
    admin = create_engine(base, poolclass=NullPool)
    with admin.begin() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


@contextlib.contextmanager
def database(kind: str, data_dir: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{data_dir / 'fedcore.db'}"
        return
    base = os.environ.get(PG_URL_VARIABLE)
    if not base:
        pytest.skip(f"PostgreSQL variant: set {PG_URL_VARIABLE} to a PostgreSQL URL to run it")
    with postgres_schema(base) as url:
        yield url
