import contextlib
import email.utils
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest
import torch

from clients import (
    Client,
    HttpTransport,
    RetryPolicy,
    RoundResult,
    TorchTrainer,
    digits,
    enroll,
    to_parameters,
)
from fedcore import (
    UPDATE_META_KEY,
    AuthError,
    ConfigError,
    FedcoreError,
    Forbidden,
    NonFiniteUpdate,
    NotFound,
    ParameterSet,
    PayloadTooLarge,
    Receipt,
    RoundStateError,
    Task,
    TaskAction,
    TensorMismatch,
    TrainConfig,
    TransportError,
    UpdateConflict,
    UpdateMeta,
    WireFormatError,
    wire,
)

FAST = RetryPolicy(attempts=40, backoff_s=0.02, max_backoff_s=0.1)
BEARER = "fcc_loopback-credential"


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


Responder = Reply | Callable[[Seen], Reply]


class Aggregator(ThreadingHTTPServer):
    """A loopback HTTP server answering each route from a script of replies."""

    daemon_threads = True

    def __init__(self, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.routes: dict[tuple[str, str], list[Responder]] = {}
        self.seen: list[Seen] = []
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def script(self, method: str, path: str, *replies: Responder) -> None:
        self.routes[(method, path)] = list(replies)

    def answer(self, seen: Seen) -> Reply:
        with self.lock:
            self.seen.append(seen)
            replies = self.routes.get((seen.method, seen.path))
            if not replies:
                return problem(404, "not-found", f"no route {seen.path}")
            reply = replies.pop(0) if len(replies) > 1 else replies[0]
        return reply(seen) if callable(reply) else reply

    def requests_to(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Aggregator

    def setup(self) -> None:
        super().setup()
        self.server.connections.add(self.connection)

    def handle_one(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        parts = urlsplit(self.path)
        seen = Seen(
            method=self.command,
            path=parts.path,
            query=parse_qs(parts.query),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=self.rfile.read(length),
        )
        reply = self.server.answer(seen)
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    # http.server dispatches on these names.
    def do_GET(self) -> None:
        self.handle_one()

    def do_PUT(self) -> None:
        self.handle_one()

    def do_POST(self) -> None:
        self.handle_one()

    def log_message(self, format: str, *args: object) -> None:
        pass


def start(server: Aggregator) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02})
    thread.start()
    return thread


def stop(server: Aggregator, thread: threading.Thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join()
    for conn in list(server.connections):
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def server() -> Iterator[Aggregator]:
    aggregator = Aggregator()
    thread = start(aggregator)
    yield aggregator
    stop(aggregator, thread)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def json_reply(status: int, payload: object, **headers: str) -> Reply:
    return Reply(
        status, json.dumps(payload).encode(), {"Content-Type": "application/json", **headers}
    )


def problem(status: int, slug: str | None, detail: str, **extra: object) -> Reply:
    body: dict[str, object] = {"title": "refused", "status": status, "detail": detail, **extra}
    if slug is not None:
        body["type"] = f"https://fedcore.dev/problems/{slug}"
    return Reply(status, json.dumps(body).encode(), {"Content-Type": "application/problem+json"})


def task(action: str, **fields: object) -> Reply:
    return json_reply(200, {"action": action, "federation_id": "fed", **fields})


def receipt(round_number: int = 1) -> Reply:
    body = {
        "federation_id": "fed",
        "round": round_number,
        "client_id": "c1",
        "sha256": "ab",
        "num_examples": 3,
    }
    return json_reply(201, body)


def small_params() -> ParameterSet:
    return ParameterSet(
        {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(2, dtype=np.int64)}
    )


TASK = "/v1/federations/fed/task"
UPDATE = "/v1/federations/fed/rounds/1/update"


def test_fetch_task_long_polls_with_the_bearer_token(server: Aggregator) -> None:
    server.script("GET", TASK, task("wait", retry_after_s=2.5))
    with HttpTransport(server.url, BEARER, wait_s=7, retry=FAST) as transport:
        got = transport.fetch_task("fed")
    assert got == Task(action=TaskAction.WAIT, federation_id="fed", retry_after_s=2.5)
    (seen,) = server.seen
    assert seen.query == {"wait": ["7"]}
    assert seen.headers["authorization"] == f"Bearer {BEARER}"


def test_retries_with_backoff_until_a_late_server_comes_up() -> None:
    port = free_port()
    late = Aggregator.__new__(Aggregator)
    threads: list[threading.Thread] = []

    def come_up() -> None:
        time.sleep(0.6)
        Aggregator.__init__(late, port)
        late.script("GET", TASK, task("finished"))
        threads.append(start(late))

    opener = threading.Thread(target=come_up)
    opener.start()
    began = time.monotonic()
    try:
        with HttpTransport(f"http://127.0.0.1:{port}", BEARER, retry=FAST) as transport:
            got = transport.fetch_task("fed")
    finally:
        opener.join()
        stop(late, threads[0])
    assert got.action is TaskAction.FINISHED
    assert time.monotonic() - began >= 0.5
    assert len(late.seen) == 1


def test_reconnects_after_a_server_restart() -> None:
    first = Aggregator()
    port = first.server_address[1]
    first.script("GET", TASK, task("wait"))
    thread = start(first)
    second = Aggregator.__new__(Aggregator)
    threads: list[threading.Thread] = []

    def restart() -> None:
        time.sleep(0.4)
        Aggregator.__init__(second, port)
        second.script("GET", TASK, task("finished"))
        threads.append(start(second))

    with HttpTransport(first.url, BEARER, retry=FAST) as transport:
        assert transport.fetch_task("fed").action is TaskAction.WAIT
        stop(first, thread)
        opener = threading.Thread(target=restart)
        opener.start()
        try:
            assert transport.fetch_task("fed").action is TaskAction.FINISHED
        finally:
            opener.join()
            stop(second, threads[0])


def test_gives_up_with_a_transport_error_after_the_last_attempt() -> None:
    retry = RetryPolicy(attempts=3, backoff_s=0.01, max_backoff_s=0.01)
    url = f"http://127.0.0.1:{free_port()}"
    with (
        HttpTransport(url, BEARER, retry=retry) as transport,
        pytest.raises(TransportError, match="failed after 3 attempts: ConnectError") as caught,
    ):
        transport.fetch_task("fed")
    assert BEARER not in str(caught.value)


@pytest.mark.parametrize(
    ("status", "slug", "error"),
    [
        (401, "unauthorized", AuthError),
        (401, None, AuthError),
        (403, None, Forbidden),
        (404, None, NotFound),
        (409, None, RoundStateError),
        (409, "update-conflict", UpdateConflict),
        (413, None, PayloadTooLarge),
        (422, "tensor-mismatch", TensorMismatch),
        (422, "non-finite-update", NonFiniteUpdate),
        (422, "wire-format", WireFormatError),
        (422, "invalid-config", ConfigError),
        (400, None, TransportError),
    ],
)
def test_problem_answers_raise_the_matching_error_without_retry(
    server: Aggregator, status: int, slug: str | None, error: type[FedcoreError]
) -> None:
    server.script("PUT", UPDATE, problem(status, slug, "the server's own words"))
    with HttpTransport(server.url, BEARER, retry=FAST) as transport, pytest.raises(error) as caught:
        transport.submit_update("fed", 1, small_params(), UpdateMeta(num_examples=3))
    assert type(caught.value) is error
    assert "the server's own words" in str(caught.value)
    assert len(server.seen) == 1


def test_invalid_config_problem_carries_every_listed_problem(server: Aggregator) -> None:
    server.script(
        "GET", TASK, problem(422, "invalid-config", "bad", problems=["a: too big", "b: missing"])
    )
    with (
        HttpTransport(server.url, BEARER, retry=FAST) as transport,
        pytest.raises(ConfigError) as caught,
    ):
        transport.fetch_task("fed")
    assert caught.value.problems == ["a: too big", "b: missing"]


def test_upload_is_safetensors_with_meta_and_is_retried_after_a_5xx(server: Aggregator) -> None:
    server.script("PUT", UPDATE, problem(503, None, "busy"), Reply(500), receipt())
    meta = UpdateMeta(num_examples=3, metrics={"train_loss": 0.5})
    with HttpTransport(server.url, BEARER, retry=FAST) as transport:
        got = transport.submit_update("fed", 1, small_params(), meta)
    assert got == Receipt(federation_id="fed", round=1, client_id="c1", sha256="ab", num_examples=3)
    bodies = [s.body for s in server.seen]
    assert len(bodies) == 3
    assert bodies[0] == bodies[1] == bodies[2]
    assert server.seen[0].headers["content-type"] == wire.MEDIA_TYPE
    delta, metadata = wire.decode(bodies[0])
    assert list(delta) == ["w", "n"]
    np.testing.assert_array_equal(delta["w"], small_params()["w"])
    assert delta["n"].shape == ()
    assert UpdateMeta.model_validate_json(metadata[UPDATE_META_KEY]) == meta


def test_429_waits_as_long_as_retry_after_says(server: Aggregator) -> None:
    server.script("GET", TASK, Reply(429, headers={"Retry-After": "1"}), task("finished"))
    patient = RetryPolicy(attempts=3, backoff_s=0.0, max_backoff_s=0.0)
    began = time.monotonic()
    with HttpTransport(server.url, BEARER, retry=patient) as transport:
        assert transport.fetch_task("fed").action is TaskAction.FINISHED
    assert 0.95 <= time.monotonic() - began < 5
    assert len(server.seen) == 2


def test_retry_after_is_capped_by_the_policy(server: Aggregator) -> None:
    server.script("GET", TASK, Reply(429, headers={"Retry-After": "3600"}), task("finished"))
    capped = RetryPolicy(attempts=2, backoff_s=0.0, max_retry_after_s=0.05)
    began = time.monotonic()
    with HttpTransport(server.url, BEARER, retry=capped) as transport:
        assert transport.fetch_task("fed").action is TaskAction.FINISHED
    assert time.monotonic() - began < 1


def test_model_download_is_revalidated_by_etag(server: Aggregator) -> None:
    body = wire.encode(small_params())

    def model(seen: Seen) -> Reply:
        if seen.headers.get("if-none-match") == '"v1"':
            return Reply(304, headers={"ETag": '"v1"'})
        return Reply(200, body, {"ETag": '"v1"', "Content-Type": wire.MEDIA_TYPE})

    server.script("GET", "/v1/federations/fed/models/v1", model)
    server.script("GET", "/v1/federations/fed/models/v2", Reply(200, body, {"ETag": '"v2"'}))
    with HttpTransport(server.url, BEARER, retry=FAST) as transport:
        first = transport.fetch_model("fed", "v1")
        again = transport.fetch_model("fed", "v1")
        transport.fetch_model("fed", "v2")
    assert again is first
    np.testing.assert_array_equal(first["w"], small_params()["w"])
    assert [s.headers.get("if-none-match") for s in server.seen] == [None, '"v1"', None]


def test_path_segments_are_quoted(server: Aggregator) -> None:
    server.script("GET", "/v1/federations/a%2F..%2Fb/task", task("finished"))
    with HttpTransport(server.url, BEARER, retry=FAST) as transport:
        assert transport.fetch_task("a/../b").action is TaskAction.FINISHED


def test_an_answer_that_is_not_the_message_raises_transport_error(server: Aggregator) -> None:
    server.script("GET", TASK, Reply(200, b"<html>proxy</html>"))
    with (
        HttpTransport(server.url, BEARER, retry=FAST) as transport,
        pytest.raises(TransportError, match="without a valid Task"),
    ):
        transport.fetch_task("fed")


def test_enroll_exchanges_the_token_without_authorization(server: Aggregator) -> None:
    credential = {"federation_id": "fed", "client_id": "c9", "token": "fcc_new"}
    server.script("POST", "/v1/enroll", json_reply(201, credential))
    enrollment = enroll(server.url, "fce_once", retry=FAST)
    assert (enrollment.client_id, enrollment.token) == ("c9", "fcc_new")
    (seen,) = server.seen
    assert "authorization" not in seen.headers
    assert json.loads(seen.body) == {"enrollment_token": "fce_once"}


def test_enroll_is_not_retried_after_a_server_error(server: Aggregator) -> None:
    server.script("POST", "/v1/enroll", problem(500, None, "crashed"), json_reply(201, {}))
    with pytest.raises(TransportError, match="crashed"):
        enroll(server.url, "fce_once", retry=FAST)
    assert len(server.seen) == 1


def test_client_trains_and_uploads_the_delta_over_http(server: Aggregator) -> None:
    split = digits.load_digits_split()
    data = (torch.from_numpy(split.x_train[:40]), torch.from_numpy(split.y_train[:40]))
    model = to_parameters(digits.make_mlp(1).state_dict(), copy=True)
    config = {"local_epochs": 2, "batch_size": 8, "lr": 0.1}
    server.script(
        "GET",
        TASK,
        task("wait", retry_after_s=0.01),
        task("train", round=1, model_version="v1", train=config),
        task("finished"),
    )
    server.script(
        "GET", "/v1/federations/fed/models/v1", Reply(200, wire.encode(model), {"ETag": '"v1"'})
    )
    server.script("PUT", UPDATE, receipt())
    results: list[RoundResult] = []
    with HttpTransport(server.url, BEARER, retry=FAST, wait_s=0) as transport:
        client = Client(
            transport, TorchTrainer(digits.make_mlp(), data, device="cpu", seed=4), "fed"
        )
        assert client.run(on_round=results.append) == 1
    assert [r.round for r in results] == [1]
    assert results[0].receipt is not None
    expected, meta = TorchTrainer(digits.make_mlp(), data, device="cpu", seed=4).fit(
        model, TrainConfig(**config), round_number=1
    )
    (upload,) = server.requests_to(UPDATE)
    delta, metadata = wire.decode(upload.body)
    for name in model:
        np.testing.assert_array_equal(delta[name], expected[name] - model[name])
    assert UpdateMeta.model_validate_json(metadata[UPDATE_META_KEY]) == meta


def test_command_line_client_prints_one_line_per_round(server: Aggregator) -> None:
    model = to_parameters(digits.make_mlp(1).state_dict(), copy=True)
    train = task("train", round=1, model_version="v1")
    server.script("GET", TASK, train, task("finished"))
    server.script(
        "GET", "/v1/federations/fed/models/v1", Reply(200, wire.encode(model), {"ETag": '"v1"'})
    )
    server.script("PUT", UPDATE, receipt())
    partition = "/work/shared/data/digits-dirichlet-a0.5-n20-s0.json"
    args = [
        "--server",
        server.url,
        "--federation",
        "fed",
        "--shard-file",
        partition,
        "--shard",
        "3",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "clients", *args, "--device", "cpu", "--wait", "0"],
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "FEDCORE_TOKEN": BEARER},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    size = len(digits.load_partition(partition)[3])
    lines = done.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"round 1: trained on {size} examples, train_loss ")
    assert lines[0].endswith("accepted")
    assert BEARER not in done.stdout + done.stderr
    (upload,) = server.requests_to(UPDATE)
    assert upload.headers["authorization"] == f"Bearer {BEARER}"


def test_backoff_is_full_jitter_under_an_exponential_cap() -> None:
    policy = RetryPolicy(backoff_s=0.5, max_backoff_s=4.0)
    for retry in range(8):
        cap = min(4.0, 0.5 * 2**retry)
        pauses = [policy.delay(retry) for _ in range(300)]
        assert 0 <= min(pauses) < 0.2 * cap
        assert 0.8 * cap < max(pauses) <= cap


def test_retry_after_may_be_an_http_date() -> None:
    when = email.utils.formatdate(time.time() + 3, usegmt=True)
    pause = RetryPolicy().delay(0, httpx.Response(503, headers={"Retry-After": when}))
    assert 1.5 < pause <= 3.0


def test_retry_policy_refuses_impossible_settings() -> None:
    with pytest.raises(ConfigError, match="attempts must be >= 1, got 0"):
        RetryPolicy(attempts=0)
