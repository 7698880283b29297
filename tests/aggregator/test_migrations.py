"""The Alembic migrations build exactly the schema the SQLAlchemy models describe."""

from __future__ import annotations

import sys
from collections.abc import Callable

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from aggregator.sqlstore import ALEMBIC_INI, SqlStore
from aggregator.tables import Base

TABLES = {
    "admin_tokens",
    "alembic_version",
    "clients",
    "enrollment_tokens",
    "federations",
    "model_versions",
    "rounds",
    "secagg_messages",
    "updates",
}


def schema_differences(store: SqlStore) -> list[object]:
    with store.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def table_names(store: SqlStore) -> set[str]:
    with store.engine.connect() as connection:
        return set(inspect(connection).get_table_names())


def test_migrated_schema_matches_the_models(database_url: str) -> None:
    store = SqlStore.open(database_url)
    try:
        assert table_names(store) == TABLES
        assert schema_differences(store) == []
    finally:
        store.close()


def test_the_constructor_creates_no_tables(database_url: str) -> None:
    store = SqlStore(database_url)
    try:
        assert table_names(store) == set()
        store.migrate()
        store.migrate()  # a second run finds the schema current
        assert table_names(store) == TABLES
    finally:
        store.close()


def test_migrations_form_one_line_of_history() -> None:
    scripts = ScriptDirectory.from_config(Config(str(ALEMBIC_INI)))
    assert len(scripts.get_heads()) == 1
    assert [s.revision for s in scripts.walk_revisions()][-1] == "0001"


def test_downgrade_to_base_removes_every_table_and_upgrade_restores_them(
    database_url: str,
) -> None:
    store = SqlStore.open(database_url)
    config = Config(str(ALEMBIC_INI))
    try:
        with store.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "base")
        assert table_names(store) <= {"alembic_version"}
        store.migrate()
        assert schema_differences(store) == []
    finally:
        store.close()


# Both processes wait for "go" so that their migrations really race.
MIGRATE_WORKER = """
import sys
from aggregator import SqlStore
store = SqlStore(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
store.migrate()
store.close()
"""


def test_two_processes_migrating_at_once_both_succeed(
    database_url: str, run_together: Callable[[list[str]], list[int]]
) -> None:
    assert run_together([sys.executable, "-c", MIGRATE_WORKER, database_url]) == [0, 0]
    store = SqlStore(database_url)
    try:
        assert schema_differences(store) == []
    finally:
        store.close()


def test_upgrade_to_0002_keeps_existing_rounds_without_privacy(database_url: str) -> None:
    store = SqlStore(database_url)
    config = Config(str(ALEMBIC_INI))
    try:
        with store.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "0001")
            connection.execute(
                text(
                    "INSERT INTO federations (id, name, config_json, status, model_version, "
                    "current_round, created_at) VALUES ('f1', 'old', '{}', 'running', 'm0', 1, 1.0)"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO rounds (federation_id, number, status, model_version, opened_at, "
                    "deadline, cohort, metrics) VALUES ('f1', 1, 'closed', 'm0', 1.0, 2.0, '[]', "
                    "'{\"clients\": 2.0}')"
                )
            )
        store.migrate()
        with store.transaction() as tx:
            old = tx.get_round("f1", 1)
            tx.update_federation("f1", status="budget_exhausted")
        assert old is not None
        assert old.privacy is None
        assert old.metrics == {"clients": 2.0}
        assert schema_differences(store) == []
        with store.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0001")
        with store.engine.connect() as connection:
            columns = {c["name"] for c in inspect(connection).get_columns("rounds")}
        assert "privacy" not in columns
        assert "metrics" in columns
    finally:
        store.close()
