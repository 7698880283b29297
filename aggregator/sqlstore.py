"""The SQL `Store`: SQLite in a data directory, PostgreSQL in production.

Each transaction is one SQLAlchemy `Session`. Durability and the exclusion of
concurrent round transitions come from the database, not from this process,
so several API workers may share one database:

- SQLite runs in WAL mode with `synchronous=FULL`, so a transaction whose
  commit returned is on disk (https://www.sqlite.org/pragma.html#pragma_synchronous),
  and every write transaction starts with `BEGIN IMMEDIATE`, which takes
  the write lock up front: two processes never interleave, and a reader that
  later writes cannot deadlock on the lock upgrade. `busy_timeout` makes the
  second one wait instead of failing. Read transactions (`SqlStore.read`)
  begin deferred with `PRAGMA query_only` on: in WAL mode they wait for no
  writer, and cannot write.
- PostgreSQL keeps its durable default (`synchronous_commit=on`), and
  `lock_federation` takes the federation's row lock (`SELECT ... FOR UPDATE`).

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
from pathlib import Path
from typing import Any, Protocol, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, func, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from aggregator.records import (
    AdminTokenRecord,
    ClientRecord,
    EnrollmentTokenRecord,
    FederationRecord,
    ModelRecord,
    RoundRecord,
    SecAggMessageRecord,
    UpdateRecord,
)
from aggregator.tables import (
    AdminTokenRow,
    Base,
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
# The execution option that marks the engine of `SqlStore.read`'s sessions,
# and the connection info key that remembers its `query_only` setting.
_READ_ONLY = "fedcore_read_only"

# Fields that identify a row, or the federation it belongs to: `update_*`
# refuses to change them.
FEDERATION_KEYS = frozenset({"id", "created_at"})
CLIENT_KEYS = frozenset({"id", "federation_id", "created_at"})
ENROLLMENT_TOKEN_KEYS = frozenset({"token_hash", "federation_id", "created_at"})
ADMIN_TOKEN_KEYS = frozenset({"token_hash", "created_at"})
ROUND_KEYS = frozenset({"federation_id", "number"})

R = TypeVar("R")


class _Row(Protocol[R]):
    def to_record(self) -> R: ...

    def columns(self, record: R, /) -> dict[str, Any]: ...


class SqlTransaction:
    """A `Transaction` bound to one SQLAlchemy session.

    Inserts are plain INSERT statements and updates are flushed at once, so a
    taken key or a violated constraint raises the database's
    `sqlalchemy.exc.IntegrityError` from the call that caused it.
    """

    def __init__(self, session: Session, *, read_only: bool = False) -> None:
        self._session = session
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
        statement = (
            select(FederationRow)
            .where(FederationRow.id == federation_id)
            .with_for_update()
            # The row may sit in the session from before the lock: re-read it.
            .execution_options(populate_existing=True)
        )
        row = self._session.scalars(statement).one_or_none()
        return None if row is None else row.to_record()

    def add_federation(self, record: FederationRecord) -> None:
        """Insert a federation."""
        self._insert(FederationRow, FederationRow.columns(record))

    def get_federation(self, federation_id: str) -> FederationRecord | None:
        """Return a federation by id."""
        row = self._session.get(FederationRow, federation_id)
        return None if row is None else row.to_record()

    def list_federations(self) -> Sequence[FederationRecord]:
        """Return all federations, oldest first."""
        statement = select(FederationRow).order_by(FederationRow.created_at, FederationRow.id)
        return [row.to_record() for row in self._session.scalars(statement)]

    def update_federation(self, federation_id: str, **changes: Any) -> FederationRecord:
        """Change fields of a federation."""
        row = self._session.get(FederationRow, federation_id)
        return self._change(row, changes, FEDERATION_KEYS, f"federation {federation_id!r}")

    def add_client(self, record: ClientRecord) -> None:
        """Insert a client."""
        self._insert(ClientRow, ClientRow.columns(record))

    def get_client(self, client_id: str) -> ClientRecord | None:
        """Return a client by id."""
        row = self._session.get(ClientRow, client_id)
        return None if row is None else row.to_record()

    def find_client_by_token(self, token_hash: str) -> ClientRecord | None:
        """Return the client whose credential hashes to `token_hash`."""
        statement = select(ClientRow).where(ClientRow.token_hash == token_hash)
        row = self._session.scalars(statement).one_or_none()
        return None if row is None else row.to_record()

    def list_clients(self, federation_id: str) -> Sequence[ClientRecord]:
        """Return a federation's clients, oldest first (ties by id)."""
        statement = (
            select(ClientRow)
            .where(ClientRow.federation_id == federation_id)
            .order_by(ClientRow.created_at, ClientRow.id)
        )
        return [row.to_record() for row in self._session.scalars(statement)]

    def update_client(self, client_id: str, **changes: Any) -> ClientRecord:
        """Change fields of a client."""
        row = self._session.get(ClientRow, client_id)
        return self._change(row, changes, CLIENT_KEYS, f"client {client_id!r}")

    def add_enrollment_token(self, record: EnrollmentTokenRecord) -> None:
        """Insert an enrollment token."""
        self._insert(EnrollmentTokenRow, EnrollmentTokenRow.columns(record))

    def get_enrollment_token(self, token_hash: str) -> EnrollmentTokenRecord | None:
        """Return an enrollment token by hash."""
        row = self._session.get(EnrollmentTokenRow, token_hash)
        return None if row is None else row.to_record()

    def list_enrollment_tokens(self, federation_id: str) -> Sequence[EnrollmentTokenRecord]:
        """Return a federation's enrollment tokens, oldest first (ties by hash)."""
        statement = (
            select(EnrollmentTokenRow)
            .where(EnrollmentTokenRow.federation_id == federation_id)
            .order_by(EnrollmentTokenRow.created_at, EnrollmentTokenRow.token_hash)
        )
        return [row.to_record() for row in self._session.scalars(statement)]

    def update_enrollment_token(self, token_hash: str, **changes: Any) -> EnrollmentTokenRecord:
        """Change fields of an enrollment token."""
        row = self._session.get(EnrollmentTokenRow, token_hash)
        # The hash stays out of the message: it is half of a credential check.
        return self._change(row, changes, ENROLLMENT_TOKEN_KEYS, "enrollment token")

    def add_admin_token(self, record: AdminTokenRecord) -> None:
        """Insert an admin token."""
        self._insert(AdminTokenRow, AdminTokenRow.columns(record))

    def get_admin_token(self, token_hash: str) -> AdminTokenRecord | None:
        """Return an admin token by hash."""
        row = self._session.get(AdminTokenRow, token_hash)
        return None if row is None else row.to_record()

    def count_admin_tokens(self) -> int:
        """Return how many admin tokens exist (revoked ones included)."""
        statement = select(func.count()).select_from(AdminTokenRow)
        return self._session.scalars(statement).one()

    def update_admin_token(self, token_hash: str, **changes: Any) -> AdminTokenRecord:
        """Change fields of an admin token."""
        row = self._session.get(AdminTokenRow, token_hash)
        return self._change(row, changes, ADMIN_TOKEN_KEYS, "admin token")

    def add_round(self, record: RoundRecord) -> None:
        """Insert a round."""
        self._insert(RoundRow, RoundRow.columns(record))

    def get_round(self, federation_id: str, number: int) -> RoundRecord | None:
        """Return a round by federation and number."""
        row = self._session.get(RoundRow, (federation_id, number))
        return None if row is None else row.to_record()

    def list_rounds(self, federation_id: str) -> Sequence[RoundRecord]:
        """Return a federation's rounds by number."""
        statement = (
            select(RoundRow)
            .where(RoundRow.federation_id == federation_id)
            .order_by(RoundRow.number)
        )
        return [row.to_record() for row in self._session.scalars(statement)]

    def update_round(self, federation_id: str, number: int, **changes: Any) -> RoundRecord:
        """Change fields of a round."""
        row = self._session.get(RoundRow, (federation_id, number))
        what = f"round {number} of federation {federation_id!r}"
        return self._change(row, changes, ROUND_KEYS, what)

    def add_update(self, record: UpdateRecord) -> None:
        """Insert an accepted update."""
        self._insert(UpdateRow, UpdateRow.columns(record))

    def get_update(
        self, federation_id: str, round_number: int, client_id: str
    ) -> UpdateRecord | None:
        """Return a client's update for a round."""
        row = self._session.get(UpdateRow, (federation_id, round_number, client_id))
        return None if row is None else row.to_record()

    def list_updates(self, federation_id: str, round_number: int) -> Sequence[UpdateRecord]:
        """Return a round's updates in order of arrival (ties by client id)."""
        statement = (
            select(UpdateRow)
            .where(UpdateRow.federation_id == federation_id, UpdateRow.round == round_number)
            .order_by(UpdateRow.received_at, UpdateRow.client_id)
        )
        return [row.to_record() for row in self._session.scalars(statement)]

    def count_updates(self, federation_id: str, round_number: int) -> int:
        """Return how many updates a round holds."""
        statement = select(func.count()).where(
            UpdateRow.federation_id == federation_id, UpdateRow.round == round_number
        )
        return int(self._session.scalar(statement) or 0)

    def add_secagg_message(self, record: SecAggMessageRecord) -> None:
        """Append an entry to a secure round's stage log (its `seq` must be free)."""
        self._insert(SecAggMessageRow, SecAggMessageRow.columns(record))

    def list_secagg_messages(
        self, federation_id: str, round_number: int, *, since: int = 0
    ) -> Sequence[SecAggMessageRecord]:
        """Return a secure round's stage log in `seq` order, from `seq` `since` on."""
        statement = (
            select(SecAggMessageRow)
            .where(
                SecAggMessageRow.federation_id == federation_id,
                SecAggMessageRow.round == round_number,
                SecAggMessageRow.seq >= since,
            )
            .order_by(SecAggMessageRow.seq)
        )
        return [row.to_record() for row in self._session.scalars(statement)]

    def add_model(self, record: ModelRecord) -> None:
        """Insert a model version."""
        self._insert(ModelRow, ModelRow.columns(record))

    def get_model(self, federation_id: str, version: str) -> ModelRecord | None:
        """Return a model version of a federation."""
        row = self._session.get(ModelRow, (federation_id, version))
        return None if row is None else row.to_record()

    def list_models(self, federation_id: str) -> Sequence[ModelRecord]:
        """Return a federation's model versions, oldest first (ties by round, version)."""
        statement = (
            select(ModelRow)
            .where(ModelRow.federation_id == federation_id)
            .order_by(ModelRow.created_at, ModelRow.round, ModelRow.version)
        )
        return [row.to_record() for row in self._session.scalars(statement)]

    def _insert(self, table: type[Base], values: dict[str, Any]) -> None:
        # A Core INSERT rather than `Session.add`: a taken key then always
        # reaches the database (IntegrityError), never the identity map.
        self._session.execute(insert(table).values(values))

    def _change(
        self, row: _Row[R] | None, changes: dict[str, Any], keys: frozenset[str], what: str
    ) -> R:
        if row is None:
            raise NotFound(f"{what} does not exist; create it before changing it")
        changed = _replace(row.to_record(), changes, keys)
        # Key columns keep their values (refused above), so this only changes
        # the rest.
        for name, value in row.columns(changed).items():
            setattr(row, name, value)
        self._session.flush()
        return row.to_record()


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
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        reads = self._engine.execution_options(**{_READ_ONLY: True})
        self._reads = sessionmaker(reads, expire_on_commit=False)
        # SQLite has one writer at a time. Threads of this process queue for
        # it here and get it the moment it is free; queued on SQLite's busy
        # handler instead they sleep in steps of up to 100 ms. (Other
        # processes still wait on the busy handler.) Reentrant, so that a
        # nested transaction fails on SQLite's lock as before, not here.
        sqlite = self._engine.dialect.name == "sqlite"
        self._writer: contextlib.AbstractContextManager[Any] = (
            threading.RLock() if sqlite else contextlib.nullcontext()
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
        with self._writer, self._sessions.begin() as session:
            yield SqlTransaction(session)

    @contextmanager
    def read(self) -> Iterator[SqlTransaction]:
        """Open a transaction that only reads; see `Store.read`.

        On SQLite it begins deferred and sees the last commit (WAL readers
        wait for no writer) with `PRAGMA query_only` on; on PostgreSQL it
        is `READ ONLY`. A write raises the database's error.
        """
        with self._reads.begin() as session:
            yield SqlTransaction(session, read_only=True)

    def migrate(self) -> None:
        """Apply the Alembic migrations up to the newest revision.

        Safe to call from several processes at once: on SQLite the migration
        holds the write lock, on PostgreSQL an advisory lock, so the others
        wait and then find the schema current.
        """
        config = Config(str(ALEMBIC_INI))
        with self._engine.begin() as connection:
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
        event.listen(engine, "begin", _begin_server)
        return engine
    engine = create_engine(parsed, json_serializer=serializer)
    event.listen(engine, "connect", _configure_sqlite)
    event.listen(engine, "begin", _begin_sqlite)
    return engine


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


def _begin_sqlite(connection: Connection) -> None:
    # A writer takes the write lock up front (see the module docstring); a
    # reader takes none, and `query_only` makes any write in it fail rather
    # than upgrade to a lock it never waited for. The pragma is a connection
    # setting: it is changed only when the kind of transaction changes.
    # (Set before BEGIN: with `query_only` on, even BEGIN IMMEDIATE fails.)
    read_only = bool(connection.get_execution_options().get(_READ_ONLY))
    if connection.info.get(_READ_ONLY, False) != read_only:
        connection.exec_driver_sql(f"PRAGMA query_only = {int(read_only)}")
        connection.info[_READ_ONLY] = read_only
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _begin_server(connection: Connection) -> None:
    if connection.get_execution_options().get(_READ_ONLY):
        connection.exec_driver_sql("SET TRANSACTION READ ONLY")
