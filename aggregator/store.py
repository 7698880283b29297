"""The `Store` protocol: transactional persistence of the aggregator's records.

Every method runs inside a transaction opened with `Store.transaction()`; the
transaction commits (durably) when the block exits normally and rolls back
when it raises, so nothing is ever half-written. `lock_federation` serializes
round transitions across processes: on PostgreSQL it takes a row lock
(`SELECT ... FOR UPDATE`), on SQLite the transaction is already exclusive.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

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

__all__ = ["Store", "Transaction"]


class Transaction(Protocol):
    """The operations available inside one store transaction.

    `get_*` return None when the row does not exist; `add_*` raise
    `fedcore.errors.FedcoreError` subclasses never, but the database's
    integrity error propagates if a primary key is taken (a programming error).
    `update_*` take the changed fields as keyword arguments, named as in the
    record, and return the updated record.
    """

    def lock_federation(self, federation_id: str) -> FederationRecord | None:
        """Lock the federation row until the transaction ends, and return it."""
        ...

    def add_federation(self, record: FederationRecord) -> None:
        """Insert a federation."""
        ...

    def get_federation(self, federation_id: str) -> FederationRecord | None:
        """Return a federation by id."""
        ...

    def list_federations(self) -> Sequence[FederationRecord]:
        """Return all federations, oldest first."""
        ...

    def update_federation(self, federation_id: str, **changes: Any) -> FederationRecord:
        """Change fields of a federation."""
        ...

    def add_client(self, record: ClientRecord) -> None:
        """Insert a client."""
        ...

    def get_client(self, client_id: str) -> ClientRecord | None:
        """Return a client by id."""
        ...

    def find_client_by_token(self, token_hash: str) -> ClientRecord | None:
        """Return the client whose credential hashes to `token_hash`."""
        ...

    def list_clients(self, federation_id: str) -> Sequence[ClientRecord]:
        """Return a federation's clients, oldest first."""
        ...

    def update_client(self, client_id: str, **changes: Any) -> ClientRecord:
        """Change fields of a client."""
        ...

    def add_enrollment_token(self, record: EnrollmentTokenRecord) -> None:
        """Insert an enrollment token."""
        ...

    def get_enrollment_token(self, token_hash: str) -> EnrollmentTokenRecord | None:
        """Return an enrollment token by hash."""
        ...

    def list_enrollment_tokens(self, federation_id: str) -> Sequence[EnrollmentTokenRecord]:
        """Return a federation's enrollment tokens, oldest first."""
        ...

    def update_enrollment_token(self, token_hash: str, **changes: Any) -> EnrollmentTokenRecord:
        """Change fields of an enrollment token."""
        ...

    def add_admin_token(self, record: AdminTokenRecord) -> None:
        """Insert an admin token."""
        ...

    def get_admin_token(self, token_hash: str) -> AdminTokenRecord | None:
        """Return an admin token by hash."""
        ...

    def count_admin_tokens(self) -> int:
        """Return how many admin tokens exist (revoked ones included)."""
        ...

    def update_admin_token(self, token_hash: str, **changes: Any) -> AdminTokenRecord:
        """Change fields of an admin token."""
        ...

    def add_round(self, record: RoundRecord) -> None:
        """Insert a round."""
        ...

    def get_round(self, federation_id: str, number: int) -> RoundRecord | None:
        """Return a round by federation and number."""
        ...

    def list_rounds(self, federation_id: str) -> Sequence[RoundRecord]:
        """Return a federation's rounds in order."""
        ...

    def count_rounds(self, federation_id: str, status: RoundStatus) -> int:
        """Return how many of a federation's rounds have `status`."""
        ...

    def update_round(self, federation_id: str, number: int, **changes: Any) -> RoundRecord:
        """Change fields of a round."""
        ...

    def add_update(self, record: UpdateRecord) -> None:
        """Insert an accepted update."""
        ...

    def get_update(
        self, federation_id: str, round_number: int, client_id: str
    ) -> UpdateRecord | None:
        """Return a client's update for a round."""
        ...

    def list_updates(self, federation_id: str, round_number: int) -> Sequence[UpdateRecord]:
        """Return a round's updates in order of arrival."""
        ...

    def count_updates(self, federation_id: str, round_number: int) -> int:
        """Return how many updates a round holds."""
        ...

    def add_secagg_message(self, record: SecAggMessageRecord) -> None:
        """Append an entry to a secure round's stage log (its `seq` must be free)."""
        ...

    def list_secagg_messages(
        self, federation_id: str, round_number: int, *, since: int = 0
    ) -> Sequence[SecAggMessageRecord]:
        """Return a secure round's stage log in `seq` order, from `seq` `since` on."""
        ...

    def add_model(self, record: ModelRecord) -> None:
        """Insert a model version."""
        ...

    def get_model(self, federation_id: str, version: str) -> ModelRecord | None:
        """Return a model version of a federation."""
        ...

    def list_models(self, federation_id: str) -> Sequence[ModelRecord]:
        """Return a federation's model versions, oldest first."""
        ...


class Store(Protocol):
    """Durable storage of the aggregator's records."""

    def transaction(self) -> AbstractContextManager[Transaction]:
        """Open a transaction that commits on normal exit and rolls back on error."""
        ...

    def read(self) -> AbstractContextManager[Transaction]:
        """Open a transaction that only reads (a write or a row lock in it raises).

        It waits for no writer where the database lets readers run beside
        one (SQLite in WAL mode, PostgreSQL), so requests that only look
        records up (authentication, round and model lookups) do not queue
        behind a round's close.
        """
        ...

    def close(self) -> None:
        """Release connections."""
        ...
