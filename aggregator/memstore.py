"""The in-memory `Store`: dictionaries, for fast in-process simulation.

Nothing survives the process. Transactions are still atomic and isolated: one
lock is held for the whole transaction, and every write first logs the value
it replaces, so an exception undoes the block's writes in reverse order. The
constraints of the SQL schema (taken keys, missing parents, unique client
token hashes) are checked too, and raise `ValueError` where the database
raises its integrity error, so simulation finds the same bugs as production.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final, TypeVar

from aggregator.records import (
    AdminTokenRecord,
    ClientRecord,
    EnrollmentTokenRecord,
    FederationRecord,
    FederationStatus,
    ModelRecord,
    RoundRecord,
    RoundStatus,
    SecAggEntry,
    SecAggMessageRecord,
    UpdateRecord,
)
from fedcore.errors import NotFound

__all__ = ["MemoryStore", "MemoryTransaction"]

R = TypeVar("R")

_MISSING: Final = object()


def _changeable(record_type: type[Any], *keys: str) -> frozenset[str]:
    return frozenset(field.name for field in dataclasses.fields(record_type)) - set(keys)


# The same fields that the SQL store refuses to change: identity, owner, birth.
FEDERATION_FIELDS = _changeable(FederationRecord, "id", "created_at")
CLIENT_FIELDS = _changeable(ClientRecord, "id", "federation_id", "created_at")
ENROLLMENT_TOKEN_FIELDS = _changeable(
    EnrollmentTokenRecord, "token_hash", "federation_id", "created_at"
)
ADMIN_TOKEN_FIELDS = _changeable(AdminTokenRecord, "token_hash", "created_at")
ROUND_FIELDS = _changeable(RoundRecord, "federation_id", "number")


@dataclasses.dataclass(slots=True)
class _Tables:
    """The rows, and per-parent indexes (ordered sets) for the `list_*` calls."""

    federations: dict[str, FederationRecord] = dataclasses.field(default_factory=dict)
    clients: dict[str, ClientRecord] = dataclasses.field(default_factory=dict)
    client_by_token: dict[str, str] = dataclasses.field(default_factory=dict)
    enrollment_tokens: dict[str, EnrollmentTokenRecord] = dataclasses.field(default_factory=dict)
    admin_tokens: dict[str, AdminTokenRecord] = dataclasses.field(default_factory=dict)
    rounds: dict[tuple[str, int], RoundRecord] = dataclasses.field(default_factory=dict)
    updates: dict[tuple[str, int, str], UpdateRecord] = dataclasses.field(default_factory=dict)
    models: dict[tuple[str, str], ModelRecord] = dataclasses.field(default_factory=dict)
    secagg: dict[tuple[str, int, int], SecAggMessageRecord] = dataclasses.field(
        default_factory=dict
    )
    clients_of: dict[str, dict[str, None]] = dataclasses.field(default_factory=dict)
    tokens_of: dict[str, dict[str, None]] = dataclasses.field(default_factory=dict)
    rounds_of: dict[str, dict[int, None]] = dataclasses.field(default_factory=dict)
    updates_of: dict[tuple[str, int], dict[str, None]] = dataclasses.field(default_factory=dict)
    secagg_of: dict[tuple[str, int], dict[int, None]] = dataclasses.field(default_factory=dict)
    models_of: dict[str, dict[str, None]] = dataclasses.field(default_factory=dict)


class MemoryTransaction:
    """A `Transaction` on the dictionaries of a `MemoryStore`, with an undo log."""

    __slots__ = ("_t", "_undo", "read_only")

    def __init__(self, tables: _Tables) -> None:
        self._t = tables
        self._undo: list[tuple[dict[Any, Any], Any, Any]] = []
        # Set by `MemoryStore.read`: writes and locks raise, as on SQLite.
        self.read_only = False

    def lock_federation(self, federation_id: str) -> FederationRecord | None:
        """Return the federation: the store's lock is already held."""
        self._check_writable()
        return self._t.federations.get(federation_id)

    def add_federation(self, record: FederationRecord) -> None:
        """Insert a federation."""
        t = self._t
        _require_free(t.federations, record.id, "federation")
        self._set(t.federations, record.id, record)
        for index in (t.clients_of, t.tokens_of, t.rounds_of, t.models_of):
            self._set(index, record.id, {})

    def get_federation(self, federation_id: str) -> FederationRecord | None:
        """Return a federation by id."""
        return self._t.federations.get(federation_id)

    def list_federations(self) -> Sequence[FederationRecord]:
        """Return all federations, oldest first (ties by id)."""
        return sorted(self._t.federations.values(), key=lambda r: (r.created_at, r.id))

    def update_federation(self, federation_id: str, **changes: Any) -> FederationRecord:
        """Change fields of a federation."""
        old = _existing(self._t.federations, federation_id, f"federation {federation_id!r}")
        if "status" in changes:
            changes["status"] = FederationStatus(changes["status"])
        new = _replace(old, changes, FEDERATION_FIELDS)
        self._set(self._t.federations, federation_id, new)
        return new

    def add_client(self, record: ClientRecord) -> None:
        """Insert a client."""
        t = self._t
        _require_free(t.clients, record.id, "client")
        _require_free(t.client_by_token, record.token_hash, "client token hash")
        index = _parent(t.clients_of, record.federation_id, "federation")
        self._set(t.clients, record.id, record)
        self._set(t.client_by_token, record.token_hash, record.id)
        self._set(index, record.id, None)

    def get_client(self, client_id: str) -> ClientRecord | None:
        """Return a client by id."""
        return self._t.clients.get(client_id)

    def find_client_by_token(self, token_hash: str) -> ClientRecord | None:
        """Return the client whose credential hashes to `token_hash`."""
        client_id = self._t.client_by_token.get(token_hash)
        return None if client_id is None else self._t.clients[client_id]

    def list_clients(self, federation_id: str) -> Sequence[ClientRecord]:
        """Return a federation's clients, oldest first (ties by id)."""
        clients = self._t.clients
        rows = [clients[i] for i in self._t.clients_of.get(federation_id, ())]
        return sorted(rows, key=lambda r: (r.created_at, r.id))

    def update_client(self, client_id: str, **changes: Any) -> ClientRecord:
        """Change fields of a client."""
        t = self._t
        old = _existing(t.clients, client_id, f"client {client_id!r}")
        new = _replace(old, changes, CLIENT_FIELDS)
        if new.token_hash != old.token_hash:
            _require_free(t.client_by_token, new.token_hash, "client token hash")
            self._pop(t.client_by_token, old.token_hash)
            self._set(t.client_by_token, new.token_hash, client_id)
        self._set(t.clients, client_id, new)
        return new

    def add_enrollment_token(self, record: EnrollmentTokenRecord) -> None:
        """Insert an enrollment token."""
        t = self._t
        _require_free(t.enrollment_tokens, record.token_hash, "enrollment token")
        index = _parent(t.tokens_of, record.federation_id, "federation")
        _require_client(t, record.client_id)
        self._set(t.enrollment_tokens, record.token_hash, record)
        self._set(index, record.token_hash, None)

    def get_enrollment_token(self, token_hash: str) -> EnrollmentTokenRecord | None:
        """Return an enrollment token by hash."""
        return self._t.enrollment_tokens.get(token_hash)

    def list_enrollment_tokens(self, federation_id: str) -> Sequence[EnrollmentTokenRecord]:
        """Return a federation's enrollment tokens, oldest first (ties by hash)."""
        tokens = self._t.enrollment_tokens
        rows = [tokens[h] for h in self._t.tokens_of.get(federation_id, ())]
        return sorted(rows, key=lambda r: (r.created_at, r.token_hash))

    def update_enrollment_token(self, token_hash: str, **changes: Any) -> EnrollmentTokenRecord:
        """Change fields of an enrollment token."""
        t = self._t
        old = _existing(t.enrollment_tokens, token_hash, "enrollment token")
        new = _replace(old, changes, ENROLLMENT_TOKEN_FIELDS)
        _require_client(t, new.client_id)
        self._set(t.enrollment_tokens, token_hash, new)
        return new

    def add_admin_token(self, record: AdminTokenRecord) -> None:
        """Insert an admin token."""
        _require_free(self._t.admin_tokens, record.token_hash, "admin token")
        self._set(self._t.admin_tokens, record.token_hash, record)

    def get_admin_token(self, token_hash: str) -> AdminTokenRecord | None:
        """Return an admin token by hash."""
        return self._t.admin_tokens.get(token_hash)

    def count_admin_tokens(self) -> int:
        """Return how many admin tokens exist (revoked ones included)."""
        return len(self._t.admin_tokens)

    def update_admin_token(self, token_hash: str, **changes: Any) -> AdminTokenRecord:
        """Change fields of an admin token."""
        old = _existing(self._t.admin_tokens, token_hash, "admin token")
        new = _replace(old, changes, ADMIN_TOKEN_FIELDS)
        self._set(self._t.admin_tokens, token_hash, new)
        return new

    def add_round(self, record: RoundRecord) -> None:
        """Insert a round."""
        t = self._t
        key = (record.federation_id, record.number)
        _require_free(t.rounds, key, "round")
        _require_finite(record.metrics)
        index = _parent(t.rounds_of, record.federation_id, "federation")
        self._set(t.rounds, key, record)
        self._set(index, record.number, None)
        self._set(t.updates_of, key, {})
        self._set(t.secagg_of, key, {})

    def get_round(self, federation_id: str, number: int) -> RoundRecord | None:
        """Return a round by federation and number."""
        return self._t.rounds.get((federation_id, number))

    def list_rounds(self, federation_id: str) -> Sequence[RoundRecord]:
        """Return a federation's rounds by number."""
        rounds = self._t.rounds
        numbers = sorted(self._t.rounds_of.get(federation_id, ()))
        return [rounds[federation_id, n] for n in numbers]

    def count_rounds(self, federation_id: str, status: RoundStatus) -> int:
        """Return how many of a federation's rounds have `status`."""
        rounds = self._t.rounds
        return sum(
            1
            for n in self._t.rounds_of.get(federation_id, ())
            if rounds[federation_id, n].status is status
        )

    def update_round(self, federation_id: str, number: int, **changes: Any) -> RoundRecord:
        """Change fields of a round."""
        key = (federation_id, number)
        old = _existing(self._t.rounds, key, f"round {number} of federation {federation_id!r}")
        # Same value types as the SQL store hands back.
        if "status" in changes:
            changes["status"] = RoundStatus(changes["status"])
        if "cohort" in changes:
            changes["cohort"] = tuple(changes["cohort"])
        if "metrics" in changes:
            _require_finite(changes["metrics"])
        new = _replace(old, changes, ROUND_FIELDS)
        self._set(self._t.rounds, key, new)
        return new

    def add_update(self, record: UpdateRecord) -> None:
        """Insert an accepted update."""
        t = self._t
        key = (record.federation_id, record.round, record.client_id)
        _require_free(t.updates, key, "update")
        _require_finite(record.metrics)
        index = _parent(t.updates_of, (record.federation_id, record.round), "round")
        _require_client(t, record.client_id)
        self._set(t.updates, key, record)
        self._set(index, record.client_id, None)

    def get_update(
        self, federation_id: str, round_number: int, client_id: str
    ) -> UpdateRecord | None:
        """Return a client's update for a round."""
        return self._t.updates.get((federation_id, round_number, client_id))

    def list_updates(self, federation_id: str, round_number: int) -> Sequence[UpdateRecord]:
        """Return a round's updates in order of arrival (ties by client id)."""
        updates = self._t.updates
        clients = self._t.updates_of.get((federation_id, round_number), ())
        rows = [updates[federation_id, round_number, c] for c in clients]
        return sorted(rows, key=lambda r: (r.received_at, r.client_id))

    def count_updates(self, federation_id: str, round_number: int) -> int:
        """Return how many updates a round holds."""
        return len(self._t.updates_of.get((federation_id, round_number), ()))

    def add_secagg_message(self, record: SecAggMessageRecord) -> None:
        """Append an entry to a secure round's stage log (its `seq` must be free)."""
        t = self._t
        key = (record.federation_id, record.round, record.seq)
        _require_free(t.secagg, key, "secure aggregation log entry")
        index = _parent(t.secagg_of, (record.federation_id, record.round), "round")
        _require_client(t, record.sender)
        self._set(t.secagg, key, dataclasses.replace(record, entry=SecAggEntry(record.entry)))
        self._set(index, record.seq, None)

    def list_secagg_messages(
        self, federation_id: str, round_number: int, *, since: int = 0
    ) -> Sequence[SecAggMessageRecord]:
        """Return a secure round's stage log in `seq` order, from `seq` `since` on."""
        index = self._t.secagg_of.get((federation_id, round_number), ())
        numbers = sorted(n for n in index if n >= since)
        return [self._t.secagg[federation_id, round_number, n] for n in numbers]

    def add_model(self, record: ModelRecord) -> None:
        """Insert a model version."""
        t = self._t
        key = (record.federation_id, record.version)
        _require_free(t.models, key, "model version")
        index = _parent(t.models_of, record.federation_id, "federation")
        self._set(t.models, key, record)
        self._set(index, record.version, None)

    def get_model(self, federation_id: str, version: str) -> ModelRecord | None:
        """Return a model version of a federation."""
        return self._t.models.get((federation_id, version))

    def list_models(self, federation_id: str) -> Sequence[ModelRecord]:
        """Return a federation's model versions, oldest first (ties by round, version)."""
        models = self._t.models
        rows = [models[federation_id, v] for v in self._t.models_of.get(federation_id, ())]
        return sorted(rows, key=lambda r: (r.created_at, r.round, r.version))

    def rollback(self) -> None:
        """Undo every write of this transaction, newest first."""
        for table, key, old in reversed(self._undo):
            if old is _MISSING:
                del table[key]
            else:
                table[key] = old
        self._undo.clear()

    def _check_writable(self) -> None:
        if self.read_only:
            raise RuntimeError("a read transaction (Store.read) cannot write or lock")

    def _set(self, table: dict[Any, Any], key: Any, value: Any) -> None:
        self._check_writable()
        self._undo.append((table, key, table.get(key, _MISSING)))
        table[key] = value

    def _pop(self, table: dict[Any, Any], key: Any) -> None:
        self._check_writable()
        self._undo.append((table, key, table.pop(key)))


class MemoryStore:
    """A `Store` in process memory: atomic and thread-safe, but not durable."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._tables = _Tables()
        self._open = False

    @contextmanager
    def transaction(self) -> Iterator[MemoryTransaction]:
        """Open a transaction that commits on normal exit and rolls back on error.

        Raises:
            RuntimeError: This thread already has a transaction open (the SQL
                stores would wait on their own lock).
        """
        with self._lock:
            if self._open:
                raise RuntimeError("a store transaction is already open in this thread")
            self._open = True
            transaction = MemoryTransaction(self._tables)
            try:
                yield transaction
            except BaseException:
                transaction.rollback()
                raise
            finally:
                self._open = False

    @contextmanager
    def read(self) -> Iterator[MemoryTransaction]:
        """Open a transaction that only reads; a write or `lock_federation` in it raises.

        Raises:
            RuntimeError: This thread already has a transaction open.
        """
        with self.transaction() as transaction:
            transaction.read_only = True
            yield transaction

    def close(self) -> None:
        """Do nothing: there are no connections to release."""


def _replace(record: R, changes: dict[str, Any], changeable: frozenset[str]) -> R:
    if not changes.keys() <= changeable:
        refused = sorted(changes.keys() - changeable)
        kind = type(record).__name__
        allowed = ", ".join(sorted(changeable))
        raise TypeError(f"cannot change {refused} of a {kind}; changeable fields: {allowed}")
    return dataclasses.replace(record, **changes)  # type: ignore[type-var]


def _existing(table: dict[Any, R], key: Any, what: str) -> R:
    record = table.get(key)
    if record is None:
        raise NotFound(f"{what} does not exist; create it before changing it")
    return record


def _require_free(table: dict[Any, Any], key: Any, what: str) -> None:
    if key in table:
        # Keys of tokens are hashes of credentials: keep them out of messages.
        raise ValueError(f"{what} already exists: its key is taken")


def _parent(index: dict[Any, dict[Any, None]], key: Any, what: str) -> dict[Any, None]:
    children = index.get(key)
    if children is None:
        raise ValueError(f"{what} {key!r} does not exist; create it first")
    return children


def _require_client(tables: _Tables, client_id: str | None) -> None:
    if client_id is not None and client_id not in tables.clients:
        raise ValueError(f"client {client_id!r} does not exist; create it first")


def _require_finite(metrics: dict[str, float]) -> None:
    # The SQL stores refuse these too: JSON has no NaN or Infinity.
    bad = sorted(name for name, value in metrics.items() if not math.isfinite(value))
    if bad:
        raise ValueError(f"metrics must be finite numbers; not finite: {bad}")
