"""Fixtures: a real aggregator on a loopback port, per test module and store.

`live` runs over SQLite always, and over PostgreSQL when
FEDCORE_TEST_DATABASE_URL is set (in a schema of its own, dropped afterwards);
otherwise that variant is skipped with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from liveapi import LiveServer, World, database, serve
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from aggregator.tokens import TokenKind, new_token
from api import Settings


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    data_dir = tmp_path_factory.mktemp(f"data-{request.param}")
    token = new_token(TokenKind.ADMIN)
    with database(request.param, data_dir) as url:
        settings = Settings(
            data_dir=data_dir,
            database_url=url,
            admin_token=token,
            tick_interval_s=0.05,
            max_body_bytes=1 << 20,
            long_poll_max_s=10.0,
        )
        engine = create_engine(url, poolclass=NullPool)
        try:
            with serve(settings) as (base_url, app):
                yield LiveServer(base_url, app, data_dir, url, token, engine)
        finally:
            engine.dispose()


@pytest.fixture
def world(live: LiveServer) -> Iterator[World]:
    admin = httpx.Client(
        base_url=live.url, headers={"Authorization": f"Bearer {live.admin_token}"}, timeout=60
    )
    created = World(live, admin)
    yield created
    created.close()
    admin.close()
