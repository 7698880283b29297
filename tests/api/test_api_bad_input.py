"""Bad input gets the exact 4xx problem it deserves, and changes nothing.

Every row runs against a federation whose round 1 is training two clients,
on every store. Before and after each request the test captures every table
row and every blob file (temporary parts included): a refused request must
leave no row, no blob and no partial file behind.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from liveapi import (
    Client,
    LiveServer,
    World,
    assert_problem,
    config,
    encode_update,
    small_model,
)

from aggregator.tokens import TokenKind, new_token
from fedcore import UPDATE_META_KEY, ParameterSet, wire

MAX_UPDATE_BYTES = 4096


@dataclass
class Arena:
    world: World
    fid: str
    alice: Client
    bob: Client
    outsider: Client
    model: ParameterSet

    @property
    def version(self) -> str:
        return str(self.world.admin.get(f"/admin/federations/{self.fid}").json()["model_version"])


@pytest.fixture(scope="module")
def arena(live: LiveServer) -> Iterator[Arena]:
    admin = httpx.Client(
        base_url=live.url, headers={"Authorization": f"Bearer {live.admin_token}"}, timeout=60
    )
    world = World(live, admin)
    fed = world.create_federation(config("arena", max_update_bytes=MAX_UPDATE_BYTES))
    alice, bob = world.training(fed["id"], 2)
    other = world.create_federation(config("other"))
    (outsider,) = world.enroll(other["id"], 1)
    yield Arena(world, fed["id"], alice, bob, outsider, small_model())
    world.close()
    admin.close()


def zero_delta() -> dict[str, np.ndarray]:
    return {
        "w": np.zeros((3, 4), np.float32),
        "b": np.zeros(4, np.float32),
        "steps": np.zeros(1, np.int64),
    }


def with_changes(**changes: np.ndarray | None) -> bytes:
    delta = zero_delta()
    for name, value in changes.items():
        if value is None:
            delta.pop(name)
        else:
            delta[name] = value
    return encode_update(delta)


def non_finite(name: str, value: float) -> bytes:
    delta = zero_delta()
    delta[name].reshape(-1)[1] = value
    return encode_update(delta)


def upload(body: bytes | Callable[[], Iterator[bytes]], round_number: int = 1) -> Any:
    def send(a: Arena) -> httpx.Response:
        content = body if isinstance(body, bytes) else body()
        return a.alice.http.put(
            f"/v1/federations/{a.fid}/rounds/{round_number}/update", content=content
        )

    return send


def upload_with(authorization: str | None) -> Any:
    def send(a: Arena) -> httpx.Response:
        headers = {} if authorization is None else {"Authorization": authorization}
        with httpx.Client(base_url=a.world.live.url, headers=headers) as http:
            return http.put(f"/v1/federations/{a.fid}/rounds/1/update", content=with_changes())

    return send


def create(cfg: Any, model: bytes | None) -> Any:
    def send(a: Arena) -> httpx.Response:
        data = {} if cfg is None else {"config": cfg if isinstance(cfg, str) else json.dumps(cfg)}
        files = None if model is None else {"model": ("m.safetensors", model)}
        return a.world.admin.post("/admin/federations", data=data, files=files)

    return send


def nan_model() -> bytes:
    model = dict(small_model())
    model["b"] = np.array([0.0, np.nan, 1.0, 2.0], np.float32)
    return wire.encode(model)


def chunked(size: int) -> Callable[[], Iterator[bytes]]:
    def body() -> Iterator[bytes]:
        for _ in range(size // 1000):
            yield b"x" * 1000

    return body


@dataclass(frozen=True)
class Row:
    name: str
    send: Callable[[Arena], httpx.Response]
    status: int
    slug: str


BAD_UPDATES = [
    Row("malformed-safetensors", upload(b"\x00this is not safetensors"), 422, "wire-format"),
    Row("truncated-safetensors", upload(with_changes()[:-5]), 422, "wire-format"),
    Row("header-longer-than-body", upload(struct.pack("<Q", 10_000) + b"{}"), 422, "wire-format"),
    Row("empty-body", upload(b""), 422, "wire-format"),
    Row("tensor-missing", upload(with_changes(b=None)), 422, "tensor-mismatch"),
    Row("tensor-extra", upload(with_changes(extra=np.ones(2, np.float32))), 422, "tensor-mismatch"),
    Row(
        "wrong-shape", upload(with_changes(w=np.zeros((4, 3), np.float32))), 422, "tensor-mismatch"
    ),
    Row(
        "wrong-dtype", upload(with_changes(w=np.zeros((3, 4), np.float64))), 422, "tensor-mismatch"
    ),
    Row("nan", upload(non_finite("w", float("nan"))), 422, "non-finite-update"),
    Row("inf", upload(non_finite("b", float("-inf"))), 422, "non-finite-update"),
    Row("no-update-metadata", upload(wire.encode(zero_delta())), 422, "wire-format"),
    Row(
        "negative-num-examples",
        upload(wire.encode(zero_delta(), {UPDATE_META_KEY: '{"num_examples": -1}'})),
        422,
        "wire-format",
    ),
    Row("over-size-limit", upload(b"x" * (MAX_UPDATE_BYTES + 1)), 413, "payload-too-large"),
    Row("over-size-limit-chunked", upload(chunked(3 * MAX_UPDATE_BYTES)), 413, "payload-too-large"),
    Row("future-round", upload(with_changes(), round_number=9), 409, "round-state"),
    Row("round-zero", upload(with_changes(), round_number=0), 409, "round-state"),
]

BAD_CREDENTIALS = [
    Row("missing-token", upload_with(None), 401, "unauthorized"),
    Row("malformed-token", upload_with("Bearer nonsense"), 401, "unauthorized"),
    Row("not-a-bearer-header", upload_with("Basic Zm9vOmJhcg=="), 401, "unauthorized"),
    Row("bearer-without-token", upload_with("Bearer"), 401, "unauthorized"),
    Row(
        "unknown-client-token",
        upload_with(f"Bearer {new_token(TokenKind.CLIENT)}"),
        401,
        "unauthorized",
    ),
    Row(
        "enrollment-token-as-credential",
        upload_with(f"Bearer {new_token(TokenKind.ENROLLMENT)}"),
        403,
        "forbidden",
    ),
    Row(
        "admin-token-on-client-route",
        lambda a: a.world.admin.put(f"/v1/federations/{a.fid}/rounds/1/update", content=b"x"),
        403,
        "forbidden",
    ),
    Row(
        "client-token-on-admin-route",
        lambda a: a.alice.http.get("/admin/federations"),
        403,
        "forbidden",
    ),
    Row(
        "client-token-creating-federation",
        lambda a: a.alice.http.post(
            "/admin/federations",
            data={"config": json.dumps(config("x"))},
            files={"model": ("m", wire.encode(small_model()))},
        ),
        403,
        "forbidden",
    ),
    Row(
        "client-of-another-federation-uploads",
        lambda a: a.outsider.http.put(
            f"/v1/federations/{a.fid}/rounds/1/update", content=with_changes()
        ),
        403,
        "forbidden",
    ),
    Row(
        "client-of-another-federation-checks-in",
        lambda a: a.outsider.http.get(f"/v1/federations/{a.fid}/task"),
        403,
        "forbidden",
    ),
    Row(
        "client-of-another-federation-downloads",
        lambda a: a.outsider.http.get(f"/v1/federations/{a.fid}/models/{a.version}"),
        403,
        "forbidden",
    ),
    Row(
        "unknown-enrollment-token",
        lambda a: a.world.http().post(
            "/v1/enroll", json={"enrollment_token": new_token(TokenKind.ENROLLMENT)}
        ),
        401,
        "unauthorized",
    ),
    Row(
        "client-token-as-enrollment-token",
        lambda a: a.world.http().post("/v1/enroll", json={"enrollment_token": a.alice.token}),
        401,
        "unauthorized",
    ),
]

UNKNOWN_IDS = [
    Row(
        "unknown-federation",
        lambda a: a.world.admin.get("/admin/federations/f_nope"),
        404,
        "not-found",
    ),
    Row(
        "start-unknown-federation",
        lambda a: a.world.admin.post("/admin/federations/f_no/start"),
        404,
        "not-found",
    ),
    Row(
        "tokens-for-unknown-federation",
        lambda a: a.world.admin.post(
            "/admin/federations/f_no/enrollment-tokens", json={"count": 2, "ttl_s": 60}
        ),
        404,
        "not-found",
    ),
    Row(
        "unknown-round",
        lambda a: a.world.admin.get(f"/admin/federations/{a.fid}/rounds/99"),
        404,
        "not-found",
    ),
    Row(
        "unknown-model-client",
        lambda a: a.alice.http.get(f"/v1/federations/{a.fid}/models/{'0' * 64}"),
        404,
        "not-found",
    ),
    Row(
        "unknown-model-admin",
        lambda a: a.world.admin.get(f"/admin/federations/{a.fid}/models/not-a-version"),
        404,
        "not-found",
    ),
    Row(
        "model-of-another-federation",
        lambda a: a.world.admin.get(f"/admin/federations/f_nope/models/{a.version}"),
        404,
        "not-found",
    ),
    Row(
        "unknown-client",
        lambda a: a.world.admin.post(f"/admin/federations/{a.fid}/clients/c_nope/revoke"),
        404,
        "not-found",
    ),
    Row(
        "client-of-another-federation-revoked-here",
        lambda a: a.world.admin.post(f"/admin/federations/{a.fid}/clients/{a.outsider.id}/revoke"),
        404,
        "not-found",
    ),
    Row("unknown-route", lambda a: a.world.admin.get("/v2/anything"), 404, "not-found"),
    Row(
        "wrong-method",
        lambda a: a.world.admin.delete("/admin/federations"),
        405,
        "method-not-allowed",
    ),
]

INVALID_REQUESTS = [
    Row(
        "task-negative-wait",
        lambda a: a.alice.http.get(f"/v1/federations/{a.fid}/task", params={"wait": -1}),
        422,
        "invalid-request",
    ),
    Row(
        "enroll-without-token",
        lambda a: a.world.http().post("/v1/enroll", json={}),
        422,
        "invalid-request",
    ),
    Row(
        "tokens-count-and-ttl-out-of-range",
        lambda a: a.world.admin.post(
            f"/admin/federations/{a.fid}/enrollment-tokens", json={"count": 0, "ttl_s": -1}
        ),
        422,
        "invalid-request",
    ),
    Row(
        "tokens-count-over-1000",
        lambda a: a.world.admin.post(
            f"/admin/federations/{a.fid}/enrollment-tokens", json={"count": 1001, "ttl_s": 5}
        ),
        422,
        "invalid-request",
    ),
    Row(
        "invalid-config-several-problems",
        create(
            {"name": "", "rounds": 0, "clients_per_round": 0, "bogus": 1},
            wire.encode(small_model()),
        ),
        422,
        "invalid-config",
    ),
    Row("config-not-json", create("{not json", wire.encode(small_model())), 422, "invalid-config"),
    Row("create-malformed-model", create(config("m"), b"garbage"), 422, "wire-format"),
    Row(
        "create-truncated-model",
        create(config("m"), wire.encode(small_model())[:-3]),
        422,
        "wire-format",
    ),
    Row("create-nan-model", create(config("m"), nan_model()), 422, "non-finite-update"),
    Row("create-without-parts", create(None, None), 422, "invalid-request"),
    Row("create-without-model", create(config("m"), None), 422, "invalid-request"),
    Row(
        "create-over-body-limit", create(config("m"), b"\x00" * (1 << 20)), 413, "payload-too-large"
    ),
]

OVERSIZED_JSON = b'{"enrollment_token": "' + b"x" * (2 << 20) + b'"}'
TOO_LARGE = [
    Row(
        "json-body-over-limit",
        lambda a: a.world.http().post("/v1/enroll", content=OVERSIZED_JSON),
        413,
        "payload-too-large",
    ),
    Row(
        "json-body-over-limit-chunked",
        lambda a: a.world.http().post("/v1/enroll", content=iter([OVERSIZED_JSON])),
        413,
        "payload-too-large",
    ),
    Row(
        "plain-body-over-limit-on-a-json-route",
        lambda a: a.world.admin.post(
            f"/admin/federations/{a.fid}/enrollment-tokens",
            content=chunked(2 << 20)(),
            headers={"Content-Type": "text/plain"},
        ),
        413,
        "payload-too-large",
    ),
]

ROWS = TOO_LARGE + BAD_UPDATES + BAD_CREDENTIALS + UNKNOWN_IDS + INVALID_REQUESTS


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_bad_input_gets_its_problem_and_changes_nothing(
    arena: Arena, live: LiveServer, row: Row
) -> None:
    before = live.snapshot()

    response = row.send(arena)

    body = assert_problem(response, row.status, row.slug)
    if row.status == 401:
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert live.snapshot() == before
    assert arena.alice.token not in response.text
    assert live.admin_token not in response.text
    assert body["type"].endswith(row.slug)


def test_invalid_config_lists_every_problem_at_once(arena: Arena, live: LiveServer) -> None:
    bad = {"name": "", "rounds": 0, "clients_per_round": 2, "min_clients": 3, "bogus": 1}
    response = create(bad, wire.encode(small_model()))(arena)

    body = assert_problem(response, 422, "invalid-config")
    problems = body["problems"]
    assert any(p.startswith("name:") for p in problems)
    assert any(p.startswith("rounds:") for p in problems)
    assert any(p.startswith("bogus:") for p in problems)
    assert len(problems) >= 3


def test_invalid_request_lists_every_problem_at_once(arena: Arena) -> None:
    response = arena.world.admin.post(
        f"/admin/federations/{arena.fid}/enrollment-tokens", json={"count": 0, "ttl_s": -1}
    )

    body = assert_problem(response, 422, "invalid-request")
    assert [p.split(":")[0] for p in body["problems"]] == ["body.count", "body.ttl_s"]


def test_arena_still_accepts_a_good_update_after_all_refusals(arena: Arena) -> None:
    response = arena.bob.upload(1, with_changes())

    assert response.status_code == 201, response.text
    assert response.json()["client_id"] == arena.bob.id
