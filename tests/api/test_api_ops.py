"""Operations and admin credentials: health, readiness, metrics, token bootstrap and roles."""

from __future__ import annotations

import logging
import stat
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from liveapi import LiveServer, World, assert_problem, config, encode_update, serve
from prometheus_client.parser import text_string_to_metric_families

from aggregator import Access, MemoryStore
from aggregator.tokens import TokenKind, new_token
from api import Settings
from api.deps import Member


def scrape(http: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_healthz_and_readyz_answer(world: World) -> None:
    plain = world.http()

    assert plain.get("/healthz").json() == {"status": "ok"}
    assert plain.get("/readyz").json() == {"status": "ready"}


def test_openapi_describes_every_route(world: World) -> None:
    paths = world.http().get("/openapi.json").json()["paths"]

    assert "/v1/federations/{fid}/rounds/{n}/update" in paths
    assert "multipart/form-data" in paths["/admin/federations"]["post"]["requestBody"]["content"]


def test_metrics_count_requests_updates_and_rounds(world: World) -> None:
    fid = world.create_federation(config("metrics", clients_per_round=1))["id"]
    (alice,) = world.training(fid, 1)
    before = scrape(world.http())

    bad = alice.upload(1, encode_update({"w": np.zeros(2, np.float32)}))
    good = alice.upload(1, encode_update(zero_model_delta()))
    again = alice.upload(1, encode_update(zero_model_delta()))
    after = scrape(world.http())

    assert (bad.status_code, good.status_code, again.status_code) == (422, 201, 200)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("fedcore_updates_rejected_total", reason="tensor-mismatch") == 1
    assert grew("fedcore_updates_accepted_total") == 1
    assert grew("fedcore_updates_repeated_total") == 1
    assert grew("fedcore_rounds_closed_total") == 1
    assert grew("fedcore_rounds_failed_total") == 0
    route = "/v1/federations/{fid}/rounds/{n}/update"
    assert grew("fedcore_http_requests_total", method="PUT", route=route, status="422") == 1
    assert grew("fedcore_http_requests_total", method="PUT", route=route, status="201") == 1
    assert grew("fedcore_http_request_duration_seconds_count", method="PUT", route=route) == 3
    assert after[("fedcore_federations", (("status", "running"),))] >= 1


def test_metrics_count_a_stopped_round_as_failed(world: World) -> None:
    fid = world.create_federation(config("metrics-failed", clients_per_round=1))["id"]
    world.training(fid, 1)
    before = scrape(world.http())

    stopped = world.admin.post(f"/admin/federations/{fid}/stop")
    after = scrape(world.http())

    assert stopped.status_code == 200
    failed = ("fedcore_rounds_failed_total", ())
    assert after.get(failed, 0.0) - before.get(failed, 0.0) == 1
    assert after[("fedcore_federations", (("status", "stopped"),))] >= 1


def zero_model_delta() -> dict[str, np.ndarray]:
    return {
        "w": np.zeros((3, 4), np.float32),
        "b": np.zeros(4, np.float32),
        "steps": np.zeros(1, np.int64),
    }


def test_two_apps_in_one_process_keep_separate_metrics(tmp_path: Path) -> None:
    key = ("fedcore_http_requests_total", (("method", "GET"), ("route", "/healthz"),
                                           ("status", "200")))  # fmt: skip
    with (
        serve(Settings(data_dir=tmp_path / "a")) as (first_url, _),
        serve(Settings(data_dir=tmp_path / "b")) as (second_url, _),
        httpx.Client(base_url=first_url) as first,
        httpx.Client(base_url=second_url) as second,
    ):
        first.get("/healthz")
        first.get("/healthz")
        second.get("/healthz")

        assert scrape(first)[key] == 2
        assert scrape(second)[key] == 1


def test_revoked_admin_token_gets_401_and_others_keep_working(
    world: World, live: LiveServer
) -> None:
    access = live.app.state.runtime.aggregator.access
    second = access.create_admin_token("second operator")
    assert world.http(second).get("/admin/federations").status_code == 200

    access.revoke_admin_token(second)

    assert_problem(world.http(second).get("/admin/federations"), 401, "unauthorized")
    assert world.admin.get("/admin/federations").status_code == 200


def test_a_client_credential_does_not_show_its_token() -> None:
    # What a route holds for a client (`api.deps.Member`) may reach a log
    # through its repr: the bearer token must not.
    token = new_token(TokenKind.CLIENT)
    member = Member(Access(MemoryStore(), time.time), token, "f_x")
    assert token not in repr(member)
    assert token not in str(member)


def test_tokens_of_other_roles_are_forbidden_on_admin_routes(world: World) -> None:
    fid = world.create_federation(config("roles"))["id"]
    (enrollment,) = world.tokens(fid, 1)
    (client,) = world.enroll(fid, 1)

    for token in (enrollment, client.token):
        response = world.http(token).post(f"/admin/federations/{fid}/start")
        assert_problem(response, 403, "forbidden")
    assert world.admin.get(f"/admin/federations/{fid}").json()["status"] == "created"


def test_first_start_writes_an_admin_token_file_and_logs_only_its_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "data"
    caplog.set_level(logging.WARNING, logger="api.runtime")
    with serve(Settings(data_dir=data_dir)) as (url, _):
        path = data_dir / "admin-token"
        token = path.read_text().strip()
        assert token.startswith("fca_")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
            assert http.get("/admin/federations").status_code == 200
    assert str(path) in caplog.text
    assert token not in caplog.text

    with serve(Settings(data_dir=data_dir)):
        assert path.read_text().strip() == token


def test_admin_token_from_the_environment_is_registered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = new_token(TokenKind.ADMIN)
    monkeypatch.setenv("FEDCORE_ADMIN_TOKEN", token)
    data_dir = tmp_path / "data"

    with (
        serve(Settings(data_dir=data_dir)) as (url, _),
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http,
    ):
        assert http.get("/admin/federations").status_code == 200
    assert not (data_dir / "admin-token").exists()


def test_readyz_fails_when_the_database_is_unreachable(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with serve(Settings(data_dir=data_dir)) as (url, app), httpx.Client(base_url=url) as http:
        assert http.get("/readyz").status_code == 200
        moved = data_dir.rename(tmp_path / "moved")
        app.state.runtime.store.engine.dispose()
        try:
            assert_problem(http.get("/readyz"), 503, "unavailable")
            assert http.get("/healthz").status_code == 200
        finally:
            moved.rename(data_dir)
        assert http.get("/readyz").status_code == 200


def test_readyz_fails_when_the_ticker_stopped(tmp_path: Path) -> None:
    with serve(Settings(data_dir=tmp_path)) as (url, app), httpx.Client(base_url=url) as http:
        app.state.runtime.ticker.stop()

        body = assert_problem(http.get("/readyz"), 503, "unavailable")

    assert "ticker" in body["detail"]
