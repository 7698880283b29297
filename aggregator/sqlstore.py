"""The SQL `Store`: SQLite in a data directory, PostgreSQL in production.

Each transaction is one SQLAlchemy connection in a transaction, read and
written with Core statements. Durability and the exclusion of concurrent
round transitions come from the database, not from this process, so several
API workers may share one database:

- SQLite runs in WAL mode with `synchronous=FULL`, so a transaction whose
  commit returned is on disk (https://www.sqlite.org/pragma.html#pragma_synchronous),
  and every write transaction starts with `BEGIN IMMEDIATE`, which takes
  the write lock up front: two processes never interleave, and a reader that
  later writes cannot deadlock on the lock upgrade. `busy_timeout` makes the
  second one wait instead of failing. Read transactions (`SqlStore.read`)
  begin deferred with `PRAGMA query_only` on: in WAL mode they wait for no
  writer, and cannot write.
- PostgreSQL keeps its durable default (`synchronous_commit=on`),
  `lock_federation` takes the federation's row lock (`SELECT ... FOR UPDATE`),
  and read transactions begin `READ ONLY`.

The schema comes only from the Alembic migrations (`SqlStore.migrate`, or
`SqlStore.open` in one call), never from `create_all`, so tests exercise the
production schema.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    FromClause,
    Insert,
    Select,
    Table,
    Update,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url

from aggregator.records import (
    AdminTokenRecord,
    ClientRecord,
    EnrollmentTokenRecord,
    FederationRecord,
    ModelRecord,
    RoundRecord,
    RoundStatus,
    SecAggMessageRecord,
    UpdateRecord,
)
from aggregator.tables import (
    AdminTokenRow,
    ClientRow,
    EnrollmentTokenRow,
    FederationRow,
    ModelRow,
    RoundRow,
    SecAggMessageRow,
    UpdateRow,
)
from fedcore.errors import NotFound

__all__ = ["SqlStore", "SqlTransaction"]

ALEMBIC_INI = Path(__file__).with_name("alembic.ini")

# Long enough to ride out another worker's round transition (a few fsyncs),
# short enough that a stuck lock surfaces as an error rather than a hang.
SQLITE_BUSY_TIMEOUT_MS = 10_000

# Key of the PostgreSQL advisory lock that serializes concurrent migrations
# (workers starting together); any constant unique to this application.
MIGRATION_LOCK_KEY = 0x66656463  # "fedc"
# The execution option that marks the engine of `SqlStore.read`'s
# connections, and the connection info key that remembers its `query_only`
# setting.
_READ_ONLY = "fedcore_read_only"

# Fields that identify a row, or the federation it belongs to: `update_*`
# refuses to change them.
FEDERATION_KEYS = frozenset({"id", "created_at"})
CLIENT_KEYS = frozenset({"id", "federation_id", "created_at"})
ENROLLMENT_TOKEN_KEYS = frozenset({"token_hash", "federation_id", "created_at"})
ADMIN_TOKEN_KEYS = frozenset({"token_hash", "created_at"})
ROUND_KEYS = frozenset({"federation_id", "number"})

R = TypeVar("R")


class _Rows(Protocol[R]):
    """A row class of `aggregator.tables`: its table and its record translation."""

    __table__: FromClause

    @staticmethod
    def to_record(row: Any, /) -> R: ...

    @staticmethod
    def columns(record: R, /) -> dict[str, Any]: ...


def _table(rows: _Rows[Any]) -> Table:
    table = rows.__table__
    assert isinstance(table, Table)  # noqa: S101 -- every row class maps one table
    return table


def _key_clause(table: Table) -> list[ColumnElement[bool]]:
    """The key columns equal to the parameters `k_<column>`."""
    return [column == bindparam(f"k_{column.key}") for column in table.primary_key]


@dataclass(frozen=True, slots=True)
class _Statements:
    """The statements of one table, built once (at import).

    A statement built per call costs more to construct and to find in the
    compiled cache than the query itself takes in SQLite; built once, its
    cache key is computed once.
    """

    keys: frozenset[str]
    by_key: Select[Any]
    insert: Insert
    update: Update

    @staticmethod
    def of(rows: _Rows[Any]) -> _Statements:
        """Return the statements of the table of `rows`."""
        return _STATEMENTS[_table(rows)]

    @staticmethod
    def build(table: Table) -> _Statements:
        """Build the statements of `table`: the update sets every non-key column."""
        keys = frozenset(column.key for column in table.primary_key)
        values: dict[str, Any] = {
            c.key: bindparam(f"v_{c.key}") for c in table.columns if c.key not in keys
        }
        return _Statements(
            keys=keys,
            by_key=select(table).where(*_key_clause(table)),
            insert=insert(table),
            update=update(table).where(*_key_clause(table)).values(values),
        )


_ROW_CLASSES: tuple[_Rows[Any], ...] = (
    FederationRow,
    ClientRow,
    EnrollmentTokenRow,
    AdminTokenRow,
    RoundRow,
    UpdateRow,
    SecAggMessageRow,
    ModelRow,
)
_STATEMENTS = {_table(rows): _Statements.build(_table(rows)) for rows in _ROW_CLASSES}

_LOCKED_FEDERATION = _Statements.of(FederationRow).by_key.with_for_update()
_CLIENT_BY_TOKEN = select(_table(ClientRow)).where(
    _table(ClientRow).c.token_hash == bindparam("token_hash")
)
_ROUNDS_WITH_STATUS = select(func.count()).where(
    _table(RoundRow).c.federation_id == bindparam("federation_id"),
    _table(RoundRow).c.status == bindparam("status"),
)
_ROUND_UPDATES = select(func.count()).where(
    _table(UpdateRow).c.federation_id == bindparam("federation_id"),
    _table(UpdateRow).c.round == bindparam("round"),
)


class SqlTransaction:
    """A `Transaction` on one database connection, in SQLAlchemy Core.

    Core statements, not ORM sessions: the records are plain values, so the
    ORM's identity map and change tracking would only add work (a lookup by
    key cost about three times as much through `Session.get`). Inserts and
    updates execute at once, so a taken key or a violated constraint raises
    the database's `sqlalchemy.exc.IntegrityError` from the call that caused
    it.
    """

    def __init__(self, connection: Connection, *, read_only: bool = False) -> None:
        self._connection = connection
        self._read_only = read_only

    def lock_federation(self, federation_id: str) -> FederationRecord | None:
        """Lock the federation row until the transaction ends, and return it.

        Raises:
            RuntimeError: this is a read transaction (`SqlStore.read`).
        """
        if self._read_only:
            # PostgreSQL refuses FOR UPDATE in a read-only transaction, but
            # SQLite has no row locks to refuse: refuse on both alike.
            raise RuntimeError("a read transaction (Store.read) cannot write or lock")
        return self._get(FederationRow, _LOCKED_FEDERATION, k_id=federation_id)

    def add_federation(self, record: FederationRecord) -> None:
        """Insert a federation."""
        self._insert(FederationRow, record)

    def get_federation(self, federation_id: str) -> FederationRecord | None:
        """Return a federation by id."""
        return self._by_key(FederationRow, k_id=federation_id)

    def list_federations(self) -> Sequence[FederationRecord]:
        """Return all federations, oldest first."""
        table = _table(FederationRow)
        statement = select(table).order_by(table.c.created_at, table.c.id)
        return self._list(FederationRow, statement)

    def update_federation(self, federation_id: str, **changes: Any) -> FederationRecord:
        """Change fields of a federation."""
        what = f"federation {federation_id!r}"
        return self._change(FederationRow, FEDERATION_KEYS, what, changes, k_id=federation_id)

    def add_client(self, record: ClientRecord) -> None:
        """Insert a client."""
        self._insert(ClientRow, record)

    def get_client(self, client_id: str) -> ClientRecord | None:
        """Return a client by id."""
        return self._by_key(ClientRow, k_id=client_id)

    def find_client_by_token(self, token_hash: str) -> ClientRecord | None:
        """Return the client whose credential hashes to `token_hash`."""
        return self._get(ClientRow, _CLIENT_BY_TOKEN, token_hash=token_hash)

    def list_clients(self, federation_id: str) -> Sequence[ClientRecord]:
        """Return a federation's clients, oldest first (ties by id)."""
        table = _table(ClientRow)
        statement = (
            select(table)
            .where(table.c.federation_id == federation_id)
            .order_by(table.c.created_at, table.c.id)
        )
        return self._list(ClientRow, statement)

    def update_client(self, client_id: str, **changes: Any) -> ClientRecord:
        """Change fields of a client."""
        return self._change(
            ClientRow, CLIENT_KEYS, f"client {client_id!r}", changes, k_id=client_id
        )

    def add_enrollment_token(self, record: EnrollmentTokenRecord) -> None:
        """Insert an enrollment token."""
        self._insert(EnrollmentTokenRow, record)

    def get_enrollment_token(self, token_hash: str) -> EnrollmentTokenRecord | None:
        """Return an enrollment token by hash."""
        return self._by_key(EnrollmentTokenRow, k_token_hash=token_hash)

    def list_enrollment_tokens(self, federation_id: str) -> Sequence[EnrollmentTokenRecord]:
        """Return a federation's enrollment tokens, oldest first (ties by hash)."""
        table = _table(EnrollmentTokenRow)
        statement = (
            select(table)
            .where(table.c.federation_id == federation_id)
            .order_by(table.c.created_at, table.c.token_hash)
        )
        return self._list(EnrollmentTokenRow, statement)

    def update_enrollment_token(self, token_hash: str, **changes: Any) -> EnrollmentTokenRecord:
        """Change fields of an enrollment token."""
        # The hash stays out of the message: it is half of a credential check.
        return self._change(
            EnrollmentTokenRow,
            ENROLLMENT_TOKEN_KEYS,
            "enrollment token",
            changes,
            k_token_hash=token_hash,
        )

    def add_admin_token(self, record: AdminTokenRecord) -> None:
        """Insert an admin token."""
        self._insert(AdminTokenRow, record)

    def get_admin_token(self, token_hash: str) -> AdminTokenRecord | None:
        """Return an admin token by hash."""
        return self._by_key(AdminTokenRow, k_token_hash=token_hash)

    def count_admin_tokens(self) -> int:
        """Return how many admin tokens exist (revoked ones included)."""
        statement = select(func.count()).select_from(_table(AdminTokenRow))
        return int(self._connection.execute(statement).scalar_one())

    def update_admin_token(self, token_hash: str, **changes: Any) -> AdminTokenRecord:
        """Change fields of an admin token."""
        return self._change(
            AdminTokenRow, ADMIN_TOKEN_KEYS, "admin token", changes, k_token_hash=token_hash
        )

    def add_round(self, record: RoundRecord) -> None:
        """Insert a round."""
        self._insert(RoundRow, record)

    def get_round(self, federation_id: str, number: int) -> RoundRecord | None:
        """Return a round by federation and number."""
        return self._by_key(RoundRow, k_federation_id=federation_id, k_number=number)

    def list_rounds(self, federation_id: str) -> Sequence[RoundRecord]:
        """Return a federation's rounds by number."""
        table = _table(RoundRow)
        statement = (
            select(table).where(table.c.federation_id == federation_id).order_by(table.c.number)
        )
        return self._list(RoundRow, statement)

    def count_rounds(self, federation_id: str, status: RoundStatus) -> int:
        """Return how many of a federation's rounds have `status`."""
        result = self._connection.execute(
            _ROUNDS_WITH_STATUS,
            {"federation_id": federation_id, "status": RoundStatus(status).value},
        )
        return int(result.scalar_one())

    def update_round(self, federation_id: str, number: int, **changes: Any) -> RoundRecord:
        """Change fields of a round."""
        what = f"round {number} of federation {federation_id!r}"
        return self._change(
            RoundRow, ROUND_KEYS, what, changes, k_federation_id=federation_id, k_number=number
        )

    def add_update(self, record: UpdateRecord) -> None:
        """Insert an accepted update."""
        self._insert(UpdateRow, record)

    def get_update(
        self, federation_id: str, round_number: int, client_id: str
    ) -> UpdateRecord | None:
        """Return a client's update for a round."""
        return self._by_key(
            UpdateRow, k_federation_id=federation_id, k_round=round_number, k_client_id=client_id
        )

    def list_updates(self, federation_id: str, round_number: int) -> Sequence[UpdateRecord]:
        """Return a round's updates in order of arrival (ties by client id)."""
        table = _table(UpdateRow)
        statement = (
            select(table)
            .where(table.c.federation_id == federation_id, table.c.round == round_number)
            .order_by(table.c.received_at, table.c.client_id)
        )
        return self._list(UpdateRow, statement)

    def count_updates(self, federation_id: str, round_number: int) -> int:
        """Return how many updates a round holds."""
        result = self._connection.execute(
            _ROUND_UPDATES, {"federation_id": federation_id, "round": round_number}
        )
        return int(result.scalar_one())

    def add_secagg_message(self, record: SecAggMessageRecord) -> None:
        """Append an entry to a secure round's stage log (its `seq` must be free)."""
        self._insert(SecAggMessageRow, record)

    def list_secagg_messages(
        self, federation_id: str, round_number: int, *, since: int = 0
    ) -> Sequence[SecAggMessageRecord]:
        """Return a secure round's stage log in `seq` order, from `seq` `since` on."""
        table = _table(SecAggMessageRow)
        statement = (
            select(table)
            .where(
                table.c.federation_id == federation_id,
                table.c.round == round_number,
                table.c.seq >= since,
            )
            .order_by(table.c.seq)
        )
        return self._list(SecAggMessageRow, statement)

    def add_model(self, record: ModelRecord) -> None:
        """Insert a model version."""
        self._insert(ModelRow, record)

    def get_model(self, federation_id: str, version: str) -> ModelRecord | None:
        """Return a model version of a federation."""
        return self._by_key(ModelRow, k_federation_id=federation_id, k_version=version)

    def list_models(self, federation_id: str) -> Sequence[ModelRecord]:
        """Return a federation's model versions, oldest first (ties by round, version)."""
        table = _table(ModelRow)
        statement = (
            select(table)
            .where(table.c.federation_id == federation_id)
            .order_by(table.c.created_at, table.c.round, table.c.version)
        )
        return self._list(ModelRow, statement)

    def _by_key(self, rows: _Rows[R], **key: Any) -> R | None:
        """Return the record of `rows` whose key columns equal `key` (as `k_<column>`)."""
        return self._get(rows, _Statements.of(rows).by_key, **key)

    def _get(self, rows: _Rows[R], statement: Select[Any], **params: Any) -> R | None:
        row = self._connection.execute(statement, params).one_or_none()
        return None if row is None else rows.to_record(row)

    def _list(self, rows: _Rows[R], statement: Select[Any]) -> list[R]:
        return [rows.to_record(row) for row in self._connection.execute(statement)]

    def _insert(self, rows: _Rows[R], record: R) -> None:
        self._connection.execute(_Statements.of(rows).insert, rows.columns(record))

    def _change(
        self, rows: _Rows[R], keys: frozenset[str], what: str, changes: dict[str, Any], **key: Any
    ) -> R:
        """Apply `changes` to the record of `rows` whose key columns equal `key` (`k_<column>`)."""
        current = self._by_key(rows, **key)
        if current is None:
            raise NotFound(f"{what} does not exist; create it before changing it")
        stored = rows.columns(_replace(current, changes, keys))
        statements = _Statements.of(rows)
        # Key columns keep their values (refused above): the statement sets the rest.
        values = {f"v_{n}": value for n, value in stored.items() if n not in statements.keys}
        self._connection.execute(statements.update, {**values, **key})
        # The record as it now reads back (column values normalized, e.g. enums).
        return rows.to_record(SimpleNamespace(**stored))


class SqlStore:
    """A `Store` on a SQLAlchemy database URL (SQLite or PostgreSQL).

    The constructor only prepares a connection pool (no I/O); `migrate`
    creates or upgrades the schema, and `SqlStore.open` does both.

    Args:
        url: A SQLAlchemy URL, e.g. `sqlite:////var/lib/fedcore/fedcore.db`
            or `postgresql+psycopg://user@host/db`.
    """

    def __init__(self, url: str) -> None:
        self._engine = _create_engine(url)
        options = _read_options(self._engine)
        self._reads = self._engine.execution_options(**options) if options else self._engine
        # SQLite has one writer at a time. Threads of this process queue for
        # it here and get it the moment it is free; queued on SQLite's busy
        # handler instead they sleep in steps of up to 100 ms. (Other
        # processes still wait on the busy handler.) Reentrant, so that a
        # nested transaction fails on SQLite's lock as before, not here.
        self._sqlite = self._engine.dialect.name == "sqlite"
        self._writer: contextlib.AbstractContextManager[Any] = (
            threading.RLock() if self._sqlite else contextlib.nullcontext()
        )

    @classmethod
    def open(cls, url: str) -> SqlStore:
        """Return a store on `url` whose schema is migrated to the newest revision."""
        store = cls(url)
        try:
            store.migrate()
        except BaseException:
            store.close()
            raise
        return store

    @property
    def engine(self) -> Engine:
        """The engine behind the store (for health checks and tests)."""
        return self._engine

    @contextmanager
    def transaction(self) -> Iterator[SqlTransaction]:
        """Open a transaction that commits on normal exit and rolls back on error."""
        with self._writer, self._begin(read_only=False) as connection:
            yield SqlTransaction(connection)

    @contextmanager
    def read(self) -> Iterator[SqlTransaction]:
        """Open a transaction that only reads; see `Store.read`.

        On SQLite it begins deferred and sees the last commit (WAL readers
        wait for no writer) with `PRAGMA query_only` on; on PostgreSQL it
        is `READ ONLY`. A write raises the database's error.
        """
        with self._begin(read_only=True) as connection:
            yield SqlTransaction(connection, read_only=True)

    @contextmanager
    def _begin(self, *, read_only: bool) -> Iterator[Connection]:
        """Open a connection in a transaction that commits on normal exit, else rolls back.

        SQLite's BEGIN is issued here rather than from a `begin` event
        listener: any connection event listened to on the engine makes
        SQLAlchemy dispatch every connection event (before and after each
        statement, though none of those is listened to). That dispatch took
        about a sixth of the server's CPU time per round in
        `bench/round_latency.py`.
        """
        engine = self._reads if read_only else self._engine
        with engine.connect() as connection, connection.begin():
            if self._sqlite:
                _begin_sqlite(connection, read_only=read_only)
            yield connection

    def migrate(self) -> None:
        """Apply the Alembic migrations up to the newest revision.

        Safe to call from several processes at once: on SQLite the migration
        holds the write lock, on PostgreSQL an advisory lock, so the others
        wait and then find the schema current.
        """
        config = Config(str(ALEMBIC_INI))
        with self._begin(read_only=False) as connection:
            if connection.dialect.name == "postgresql":
                lock = text("SELECT pg_advisory_xact_lock(:key)")
                connection.execute(lock, {"key": MIGRATION_LOCK_KEY})
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def close(self) -> None:
        """Release connections."""
        self._engine.dispose()


def _replace(record: R, changes: dict[str, Any], keys: frozenset[str]) -> R:
    """Return `record` with `changes` applied, refusing unknown and key fields."""
    names = {field.name for field in dataclasses.fields(record)}  # type: ignore[arg-type]
    refused = sorted(set(changes) - (names - keys))
    if refused:
        kind = type(record).__name__
        changeable = ", ".join(sorted(names - keys))
        raise TypeError(f"cannot change {refused} of a {kind}; changeable fields: {changeable}")
    return dataclasses.replace(record, **changes)  # type: ignore[type-var]


def _create_engine(url: str) -> Engine:
    # Metrics are checked before they get here (`finite_metrics`); this keeps
    # any other NaN from becoming SQLite's non-standard JSON.
    serializer = functools.partial(json.dumps, allow_nan=False)
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        engine = create_engine(parsed, json_serializer=serializer, pool_pre_ping=True)
        if parsed.get_backend_name() != "postgresql":
            event.listen(engine, "begin", _begin_server)
        return engine
    engine = create_engine(parsed, json_serializer=serializer)
    event.listen(engine, "connect", _configure_sqlite)
    return engine


def _read_options(engine: Engine) -> dict[str, Any]:
    """Return the execution options of the engine behind `SqlStore.read`."""
    if engine.dialect.name == "postgresql":
        # The driver begins with `BEGIN READ ONLY`: one round trip fewer per
        # read than a `SET TRANSACTION` after the `BEGIN`. SQLAlchemy resets
        # it when the connection goes back to the pool.
        return {"postgresql_readonly": True}
    if engine.dialect.name == "sqlite":
        # `SqlStore._begin` begins SQLite's reads itself.
        return {}
    return {_READ_ONLY: True}


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # SQLAlchemy's recipe: stop pysqlite from emitting its own (deferred,
    # DML-only) BEGIN, so that `_begin_immediate` controls every transaction.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        _enable_wal(cursor)
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _enable_wal(cursor: Any) -> None:
    # Turning a new database file to WAL takes an exclusive lock without
    # calling the busy handler, so a second process opening the same new file
    # at that moment gets SQLITE_BUSY at once: retry until the busy timeout.
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as error:
            if error.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
        else:
            return


def _begin_sqlite(connection: Connection, *, read_only: bool) -> None:
    # A writer takes the write lock up front (see the module docstring); a
    # reader takes none, and `query_only` makes any write in it fail rather
    # than upgrade to a lock it never waited for. The pragma is a connection
    # setting: it is changed only when the kind of transaction changes.
    # (Set before BEGIN: with `query_only` on, even BEGIN IMMEDIATE fails.)
    if connection.info.get(_READ_ONLY, False) != read_only:
        connection.exec_driver_sql(f"PRAGMA query_only = {int(read_only)}")
        connection.info[_READ_ONLY] = read_only
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _begin_server(connection: Connection) -> None:
    # Server databases other than PostgreSQL (see `_read_options`).
    if connection.get_execution_options().get(_READ_ONLY):
        connection.exec_driver_sql("SET TRANSACTION READ ONLY")
