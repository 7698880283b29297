"""Fixtures shared by every test package: one database URL per backend.

The PostgreSQL variants run only when FEDCORE_TEST_DATABASE_URL names a
database; each test then gets a schema of its own (via libpq's `options`
search_path), dropped afterwards, so tests neither see nor leave state.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

PG_URL_VARIABLE = "FEDCORE_TEST_DATABASE_URL"

# Property tests check results, not speed: no per-example deadline, whose
# default (200 ms) would fail them on a loaded machine (`make test` runs the
# tests in parallel processes). Benchmarks under bench/ measure speed.
settings.register_profile("fedcore", deadline=None)
settings.load_profile("fedcore")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fedcore.db'}"


@pytest.fixture
def postgresql_url() -> Iterator[str]:
    base = os.environ.get(PG_URL_VARIABLE)
    if not base:
        pytest.skip(f"PostgreSQL variant: set {PG_URL_VARIABLE} to a PostgreSQL URL to run it")
    schema = f"fedcore_test_{uuid.uuid4().hex[:16]}"
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


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url
