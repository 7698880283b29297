"""The `Store` contract, run against every implementation (memory, SQLite, PostgreSQL).

The last part checks what only the SQL stores promise: durability across a
killed process, SQLite's settings, and row locks across processes.
"""

from __future__ import annotations

import dataclasses
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy.exc import IntegrityError

from aggregator import MemoryStore, SqlStore
from aggregator.records import (
    AdminTokenRecord,
    ClientRecord,
    EnrollmentTokenRecord,
    FederationRecord,
    FederationStatus,
    ModelRecord,
    RoundPrivacy,
    RoundRecord,
    RoundStatus,
    SecAggEntry,
    SecAggMessageRecord,
    UpdateRecord,
)
from aggregator.store import Store, Transaction
from fedcore.errors import NotFound
from privacy.dp import GaussianEvent

AnyStore = MemoryStore | SqlStore

# Stand-ins for hashes of credentials.
ROTATED = "hash-rotated"
FRESH = "hash-fresh"


def federation(fid: str = "f1", created_at: float = 100.0, **fields: Any) -> FederationRecord:
    values: dict[str, Any] = {
        "name": f"federation {fid}",
        "config_json": '{"rounds": 3}',
        "status": FederationStatus.CREATED,
        "model_version": "m0",
        "current_round": 0,
    }
    return FederationRecord(id=fid, created_at=created_at, **(values | fields))


def client(cid: str = "c1", fid: str = "f1", created_at: float = 101.0) -> ClientRecord:
    return ClientRecord(
        id=cid, federation_id=fid, token_hash=f"hash-{cid}", created_at=created_at, last_seen=0.0
    )


def round_(number: int = 1, fid: str = "f1", **fields: Any) -> RoundRecord:
    values: dict[str, Any] = {
        "status": RoundStatus.TRAINING,
        "model_version": "m0",
        "opened_at": 200.0 + number,
        "deadline": 260.0 + number,
    }
    return RoundRecord(federation_id=fid, number=number, **(values | fields))


def update(cid: str = "c1", received_at: float = 210.0, number: int = 1) -> UpdateRecord:
    return UpdateRecord(
        federation_id="f1",
        round=number,
        client_id=cid,
        sha256=f"sha-{cid}",
        num_examples=32,
        received_at=received_at,
        metrics={"loss": 0.25, "accuracy": 0.5},
    )


def model(version: str = "m0", round_number: int = 0, created_at: float = 100.0) -> ModelRecord:
    return ModelRecord(
        federation_id="f1",
        version=version,
        round=round_number,
        size_bytes=3_000_000_000,
        created_at=created_at,
    )


def entry(
    seq: int, sender: str | None = "c0", number: int = 1, **fields: Any
) -> SecAggMessageRecord:
    values: dict[str, Any] = {
        "stage": "advertise-keys",
        "entry": SecAggEntry.ACCEPTED if sender is not None else SecAggEntry.CLOSE,
        "received_at": 300.0 + seq,
        "payload": None if sender is None else bytes([seq, 0, 255]),
    }
    return SecAggMessageRecord(
        federation_id="f1", round=number, seq=seq, sender=sender, **(values | fields)
    )


def enrollment(key: str = "e1", created_at: float = 102.0) -> EnrollmentTokenRecord:
    return EnrollmentTokenRecord(
        token_hash=key, federation_id="f1", expires_at=900.0, created_at=created_at
    )


def admin(key: str = "a1", name: str = "ops", created_at: float = 1.0) -> AdminTokenRecord:
    return AdminTokenRecord(token_hash=key, name=name, created_at=created_at)


def seed(store: Store, *, clients: int = 0, rounds: int = 0) -> None:
    with store.transaction() as tx:
        tx.add_federation(federation())
        for i in range(clients):
            tx.add_client(client(f"c{i}"))
        for number in range(1, rounds + 1):
            tx.add_round(round_(number))


def integrity_error(store: AnyStore) -> type[Exception]:
    """Return what the store raises for a taken key or a missing parent."""
    return ValueError if isinstance(store, MemoryStore) else IntegrityError


# --- records round-trip -------------------------------------------------------


def test_stores_satisfy_the_store_protocol(store: AnyStore) -> None:
    typed: Store = store
    with typed.transaction() as tx:
        checked: Transaction = tx
        assert checked.list_federations() == []


def test_added_federation_reads_back_equal_in_a_later_transaction(store: AnyStore) -> None:
    record = federation()
    with store.transaction() as tx:
        tx.add_federation(record)
    with store.transaction() as tx:
        got = tx.get_federation("f1")
        locked = tx.lock_federation("f1")
    assert got == record
    assert locked == record
    assert got is not None
    assert got.status is FederationStatus.CREATED


def test_get_and_lock_return_none_for_missing_rows(store: AnyStore) -> None:
    seed(store)
    with store.transaction() as tx:
        assert tx.lock_federation("nope") is None
        assert tx.get_federation("nope") is None
        assert tx.get_client("nope") is None
        assert tx.find_client_by_token("nope") is None
        assert tx.get_enrollment_token("nope") is None
        assert tx.get_admin_token("nope") is None
        assert tx.get_round("f1", 7) is None
        assert tx.get_update("f1", 1, "c1") is None
        assert tx.get_model("f1", "nope") is None
        assert tx.list_clients("nope") == []
        assert tx.list_rounds("nope") == []
        assert tx.list_updates("f1", 7) == []
        assert tx.list_models("nope") == []
        assert tx.list_enrollment_tokens("nope") == []


def test_list_federations_is_oldest_first(store: AnyStore) -> None:
    with store.transaction() as tx:
        tx.add_federation(federation("b", created_at=3.0))
        tx.add_federation(federation("a", created_at=5.0))
        tx.add_federation(federation("c", created_at=1.0))
    with store.transaction() as tx:
        assert [f.id for f in tx.list_federations()] == ["c", "b", "a"]


def test_update_federation_changes_only_the_named_fields(store: AnyStore) -> None:
    seed(store)
    with store.transaction() as tx:
        changed = tx.update_federation("f1", status="running", current_round=4)
    expected = federation(status=FederationStatus.RUNNING, current_round=4)
    assert changed == expected
    assert changed.status is FederationStatus.RUNNING
    with store.transaction() as tx:
        assert tx.get_federation("f1") == expected


def test_clients_are_found_by_id_and_token_and_listed_oldest_first(store: AnyStore) -> None:
    seed(store)
    with store.transaction() as tx:
        tx.add_federation(federation("f2"))
        tx.add_client(client("late", created_at=300.0))
        tx.add_client(client("early", created_at=100.0))
        tx.add_client(client("tie-b", created_at=200.0))
        tx.add_client(client("tie-a", created_at=200.0))
        tx.add_client(client("other", fid="f2"))
    with store.transaction() as tx:
        assert tx.get_client("early") == client("early", created_at=100.0)
        assert tx.find_client_by_token("hash-late") == client("late", created_at=300.0)
        listed = [c.id for c in tx.list_clients("f1")]
    assert listed == ["early", "tie-a", "tie-b", "late"]


def test_update_client_revokes_and_rotates_its_token(store: AnyStore) -> None:
    seed(store, clients=1)
    with store.transaction() as tx:
        changed = tx.update_client("c0", revoked=True, token_hash=ROTATED, last_seen=5.0)
    assert (changed.revoked, changed.token_hash, changed.last_seen) == (True, ROTATED, 5.0)
    with store.transaction() as tx:
        assert tx.find_client_by_token("hash-c0") is None
        assert tx.find_client_by_token(ROTATED) == changed


def test_a_client_token_hash_is_unique(store: AnyStore) -> None:
    seed(store, clients=1)
    taken = client("c0").token_hash
    duplicate = ClientRecord(
        id="c9", federation_id="f1", token_hash=taken, created_at=1.0, last_seen=1.0
    )
    with pytest.raises(integrity_error(store)), store.transaction() as tx:
        tx.add_client(duplicate)
    with store.transaction() as tx:
        tx.add_client(client("c1"))
    with pytest.raises(integrity_error(store)), store.transaction() as tx:
        tx.update_client("c1", token_hash=taken)
    with store.transaction() as tx:
        assert tx.get_client("c9") is None
        assert tx.find_client_by_token("hash-c0") == client("c0")


def test_enrollment_tokens_are_listed_oldest_first_and_bind_to_a_client(store: AnyStore) -> None:
    seed(store, clients=1)
    with store.transaction() as tx:
        tx.add_enrollment_token(enrollment("e-late", created_at=500.0))
        tx.add_enrollment_token(enrollment("e-early", created_at=50.0))
    with store.transaction() as tx:
        used = tx.update_enrollment_token("e-early", client_id="c0")
        assert [t.token_hash for t in tx.list_enrollment_tokens("f1")] == ["e-early", "e-late"]
    assert used == dataclasses.replace(enrollment("e-early", created_at=50.0), client_id="c0")
    with store.transaction() as tx:
        assert tx.get_enrollment_token("e-early") == used


def test_admin_tokens_are_counted_including_revoked_ones(store: AnyStore) -> None:
    with store.transaction() as tx:
        assert tx.count_admin_tokens() == 0
        tx.add_admin_token(admin("a1"))
        tx.add_admin_token(admin("a2", name="ci", created_at=2.0))
    with store.transaction() as tx:
        revoked = tx.update_admin_token("a1", revoked=True)
        assert tx.count_admin_tokens() == 2
        assert tx.get_admin_token("a1") == revoked
    assert revoked == dataclasses.replace(admin("a1"), revoked=True)


def test_rounds_round_trip_cohort_and_metrics_and_list_by_number(store: AnyStore) -> None:
    seed(store)
    cohort = ("c3", "c1", "c2")
    with store.transaction() as tx:
        tx.add_round(round_(3))
        tx.add_round(round_(1, cohort=cohort))
        tx.add_round(round_(2))
    with store.transaction() as tx:
        got = tx.get_round("f1", 1)
        numbers = [r.number for r in tx.list_rounds("f1")]
    assert got == round_(1, cohort=cohort)
    assert got is not None
    assert got.cohort == cohort
    assert isinstance(got.cohort, tuple)
    assert numbers == [1, 2, 3]


def test_count_rounds_counts_a_federations_rounds_by_status(store: AnyStore) -> None:
    seed(store, rounds=4)
    with store.transaction() as tx:
        tx.add_federation(federation("f2"))
        tx.add_round(round_(1, fid="f2", status=RoundStatus.CLOSED))
        tx.update_round("f1", 1, status="closed")
        tx.update_round("f1", 2, status=RoundStatus.FAILED)
        tx.update_round("f1", 3, status=RoundStatus.CLOSED)
    with store.read() as tx:
        counts = {status: tx.count_rounds("f1", status) for status in RoundStatus}
        other = tx.count_rounds("f2", RoundStatus.CLOSED)
        unknown = tx.count_rounds("nope", RoundStatus.CLOSED)
    assert counts[RoundStatus.CLOSED] == 2
    assert counts[RoundStatus.FAILED] == 1
    assert counts[RoundStatus.TRAINING] == 1
    assert sum(counts.values()) == 4
    assert (other, unknown) == (1, 0)


def test_update_round_closes_it_with_metrics_and_normalized_values(store: AnyStore) -> None:
    seed(store, rounds=1)
    metrics = {"loss": 0.125, "accuracy": 0.875, "clients": 3.0}
    with store.transaction() as tx:
        closed = tx.update_round(
            "f1",
            1,
            status="closed",
            cohort=["c2", "c1"],
            closed_at=250.5,
            result_version="m1",
            metrics=metrics,
        )
    assert closed.status is RoundStatus.CLOSED
    assert closed.cohort == ("c2", "c1")
    with store.transaction() as tx:
        got = tx.get_round("f1", 1)
    assert got == closed
    assert got is not None
    assert (got.metrics, got.closed_at, got.result_version) == (metrics, 250.5, "m1")


def test_round_privacy_round_trips_with_its_events_exactly(store: AnyStore) -> None:
    seed(store)
    opened = RoundPrivacy(population=7, clip_norm=0.1 + 0.2, seeded=False)
    released = dataclasses.replace(
        opened,
        # Floats that JSON must carry to the last bit.
        events=(GaussianEvent(sampling_rate=1 / 3, noise_multiplier=1.0000000000000002),),
        next_clip_norm=0.30000000000000004 * 1.1,
        noisy_fraction=-0.25,
        seeded=True,
    )
    with store.transaction() as tx:
        tx.add_round(round_(1, privacy=opened))
        tx.add_round(round_(2))
    with store.transaction() as tx:
        assert tx.get_round("f1", 1) == round_(1, privacy=opened)
        closed = tx.update_round("f1", 1, status="closed", privacy=released)
    with store.transaction() as tx:
        got = tx.get_round("f1", 1)
        plain = tx.get_round("f1", 2)
    assert got == closed
    assert got is not None
    assert got.privacy == released
    assert got.privacy is not None
    assert got.privacy.events == released.events
    assert isinstance(got.privacy.events, tuple)
    assert plain is not None
    assert plain.privacy is None


def test_round_privacy_refuses_values_json_cannot_hold() -> None:
    with pytest.raises(ValueError, match="finite"):
        RoundPrivacy(population=3, clip_norm=float("nan"), seeded=False)
    with pytest.raises(ValueError, match="finite"):
        RoundPrivacy(population=3, clip_norm=1.0, seeded=False, noisy_fraction=float("inf"))
    with pytest.raises(ValueError, match="population"):
        RoundPrivacy(population=-1, clip_norm=1.0, seeded=False)


def test_client_identity_key_and_round_setup_round_trip_as_bytes(store: AnyStore) -> None:
    seed(store)
    key = bytes(range(32))
    setup = b"\x00setup\xff" * 50
    with store.transaction() as tx:
        tx.add_client(dataclasses.replace(client("c0"), identity_key=key))
        tx.add_client(client("c1"))
        tx.add_round(round_(1, secagg_setup=setup))
        tx.add_round(round_(2))
    with store.transaction() as tx:
        got, plain = tx.get_client("c0"), tx.get_client("c1")
        secure, other = tx.get_round("f1", 1), tx.get_round("f1", 2)
    assert got is not None
    assert plain is not None
    assert (got.identity_key, plain.identity_key) == (key, None)
    assert isinstance(got.identity_key, bytes)
    assert secure is not None
    assert other is not None
    assert (secure.secagg_setup, other.secagg_setup) == (setup, None)
    assert isinstance(secure.secagg_setup, bytes)


def test_secagg_log_lists_entries_of_one_round_in_seq_order(store: AnyStore) -> None:
    seed(store, clients=2, rounds=2)
    written = [
        entry(2, sender=None, stage="advertise-keys"),
        entry(0, sender="c0"),
        entry(1, sender="c1", entry=SecAggEntry.EXCLUDED, reason="bad signature"),
        entry(3, sender="c0", stage="share-keys", payload=None, blob="ab" * 32),
    ]
    with store.transaction() as tx:
        for record in written:
            tx.add_secagg_message(record)
        tx.add_secagg_message(entry(0, number=2))
    with store.transaction() as tx:
        got = tx.list_secagg_messages("f1", 1)
        other = tx.list_secagg_messages("f1", 2)
        none = tx.list_secagg_messages("f1", 7)
    assert got == sorted(written, key=lambda r: r.seq)
    assert [type(r.entry) for r in got] == [SecAggEntry] * 4
    assert other == [entry(0, number=2)]
    assert none == []


def test_secagg_log_lists_the_entries_from_a_seq_on(store: AnyStore) -> None:
    seed(store, clients=2, rounds=1)
    written = [entry(n, sender=f"c{n % 2}") for n in range(5)]
    with store.transaction() as tx:
        for record in reversed(written):
            tx.add_secagg_message(record)
    with store.read() as tx:
        tail = tx.list_secagg_messages("f1", 1, since=3)
        everything = tx.list_secagg_messages("f1", 1, since=0)
        beyond = tx.list_secagg_messages("f1", 1, since=5)
    assert tail == written[3:]
    assert everything == written
    assert beyond == []


def test_secagg_log_entries_refuse_inconsistent_fields() -> None:
    with pytest.raises(ValueError, match="close entry"):
        entry(0, sender=None, payload=b"x")
    with pytest.raises(ValueError, match="exactly one"):
        entry(0, blob="ab")
    with pytest.raises(ValueError, match="exactly one"):
        entry(0, payload=None)


def test_every_federation_status_round_trips(store: AnyStore) -> None:
    seed(store)
    for status in FederationStatus:
        with store.transaction() as tx:
            changed = tx.update_federation("f1", status=status.value)
        with store.transaction() as tx:
            assert tx.get_federation("f1") == changed
        assert changed.status is status


def test_updates_round_trip_metrics_and_list_in_order_of_arrival(store: AnyStore) -> None:
    seed(store, clients=3, rounds=2)
    with store.transaction() as tx:
        tx.add_update(update("c2", received_at=230.0))
        tx.add_update(update("c0", received_at=210.0))
        tx.add_update(update("c1", received_at=220.0))
        tx.add_update(update("c1", received_at=221.0, number=2))
    with store.transaction() as tx:
        got = tx.get_update("f1", 1, "c0")
        arrivals = [u.client_id for u in tx.list_updates("f1", 1)]
        second = tx.list_updates("f1", 2)
        counts = [tx.count_updates("f1", n) for n in (1, 2, 3)]
    assert got == update("c0", received_at=210.0)
    assert counts == [3, 1, 0]
    assert got is not None
    assert got.metrics == {"loss": 0.25, "accuracy": 0.5}
    assert arrivals == ["c0", "c1", "c2"]
    assert second == [update("c1", received_at=221.0, number=2)]


def test_models_are_listed_oldest_first_and_keep_large_sizes(store: AnyStore) -> None:
    seed(store)
    with store.transaction() as tx:
        tx.add_model(model("m2", round_number=2, created_at=300.0))
        tx.add_model(model("m0", round_number=0, created_at=100.0))
        tx.add_model(model("m1", round_number=1, created_at=200.0))
    with store.transaction() as tx:
        assert tx.get_model("f1", "m2") == model("m2", round_number=2, created_at=300.0)
        assert [m.version for m in tx.list_models("f1")] == ["m0", "m1", "m2"]


def test_timestamps_keep_full_float_precision(store: AnyStore) -> None:
    moment = 1_767_225_600.123456
    with store.transaction() as tx:
        tx.add_federation(federation(created_at=moment))
    with store.transaction() as tx:
        got = tx.get_federation("f1")
    assert got is not None
    assert got.created_at == moment


NON_FINITE: dict[str, Callable[[Transaction], object]] = {
    "round update": lambda tx: tx.update_round("f1", 1, metrics={"loss": float("nan")}),
    "new round": lambda tx: tx.add_round(round_(2, metrics={"loss": float("inf")})),
    "new update": lambda tx: tx.add_update(
        dataclasses.replace(update("c0"), metrics={"loss": float("-inf")})
    ),
}


@pytest.mark.parametrize("case", sorted(NON_FINITE))
def test_non_finite_metrics_are_refused(store: AnyStore, case: str) -> None:
    seed(store, clients=1, rounds=1)
    with pytest.raises(ValueError, match="finite"), store.transaction() as tx:
        NON_FINITE[case](tx)
    with store.transaction() as tx:
        assert tx.list_rounds("f1") == [round_(1)]
        assert tx.list_updates("f1", 1) == []


# --- errors ---------------------------------------------------------------------

UPDATES: dict[str, Callable[[Transaction], object]] = {
    "federation": lambda tx: tx.update_federation("nope", name="x"),
    "client": lambda tx: tx.update_client("nope", revoked=True),
    "enrollment_token": lambda tx: tx.update_enrollment_token("nope", revoked=True),
    "admin_token": lambda tx: tx.update_admin_token("nope", revoked=True),
    "round": lambda tx: tx.update_round("f1", 99, reason="x"),
}


@pytest.mark.parametrize("kind", sorted(UPDATES))
def test_update_of_a_missing_row_raises_not_found(store: AnyStore, kind: str) -> None:
    seed(store)
    with pytest.raises(NotFound, match="does not exist"), store.transaction() as tx:
        UPDATES[kind](tx)


BAD_CHANGES: dict[str, Callable[[Transaction], object]] = {
    "federation unknown": lambda tx: tx.update_federation("f1", colour="red"),
    "federation key": lambda tx: tx.update_federation("f1", id="f2"),
    "federation birth": lambda tx: tx.update_federation("f1", created_at=1.0),
    "client unknown": lambda tx: tx.update_client("c0", nickname="x"),
    "client key": lambda tx: tx.update_client("c0", id="c9"),
    "client owner": lambda tx: tx.update_client("c0", federation_id="f2"),
    "enrollment token owner": lambda tx: tx.update_enrollment_token("e1", federation_id="f2"),
    "admin token unknown": lambda tx: tx.update_admin_token("a1", role="root"),
    "admin token birth": lambda tx: tx.update_admin_token("a1", created_at=5.0),
    "round unknown": lambda tx: tx.update_round("f1", 1, stage="x"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHANGES))
def test_update_of_an_unknown_or_key_field_raises_type_error(store: AnyStore, case: str) -> None:
    seed(store, clients=1, rounds=1)
    with store.transaction() as tx:
        tx.add_enrollment_token(enrollment())
        tx.add_admin_token(admin())
    with pytest.raises(TypeError, match="cannot change"), store.transaction() as tx:
        BAD_CHANGES[case](tx)


DUPLICATES: dict[str, Callable[[Transaction], None]] = {
    "federation": lambda tx: tx.add_federation(federation(name="again")),
    "client": lambda tx: tx.add_client(dataclasses.replace(client("c0"), token_hash=FRESH)),
    "enrollment_token": lambda tx: tx.add_enrollment_token(enrollment()),
    "admin_token": lambda tx: tx.add_admin_token(admin("a1", name="again", created_at=9.0)),
    "round": lambda tx: tx.add_round(round_(1, model_version="other")),
    "update": lambda tx: tx.add_update(update("c0", received_at=999.0)),
    "model": lambda tx: tx.add_model(model("m0", round_number=5)),
    "secagg entry": lambda tx: tx.add_secagg_message(entry(0, sender=None)),
}


@pytest.fixture
def populated(store: AnyStore) -> AnyStore:
    seed(store, clients=1, rounds=1)
    with store.transaction() as tx:
        tx.add_enrollment_token(enrollment())
        tx.add_admin_token(admin())
        tx.add_update(update("c0"))
        tx.add_model(model("m0"))
        tx.add_secagg_message(entry(0))
    return store


@pytest.mark.parametrize("kind", sorted(DUPLICATES))
def test_adding_a_taken_primary_key_raises(populated: AnyStore, kind: str) -> None:
    with pytest.raises(integrity_error(populated)), populated.transaction() as tx:
        DUPLICATES[kind](tx)


def add_one_of_each(tx: Transaction) -> None:
    tx.add_federation(federation())
    tx.add_client(client("c0"))
    tx.add_round(round_(1))
    tx.add_enrollment_token(enrollment())
    tx.add_admin_token(admin())
    tx.add_update(update("c0"))
    tx.add_model(model("m0"))
    tx.add_secagg_message(entry(0))


@pytest.mark.parametrize("kind", sorted(DUPLICATES))
def test_adding_a_taken_key_twice_in_one_transaction_raises(store: AnyStore, kind: str) -> None:
    def add_twice(tx: Transaction) -> None:
        add_one_of_each(tx)
        DUPLICATES[kind](tx)

    with pytest.raises(integrity_error(store)), store.transaction() as tx:
        add_twice(tx)
    with store.transaction() as tx:
        assert tx.list_federations() == []


ORPHANS: dict[str, Callable[[Transaction], None]] = {
    "client": lambda tx: tx.add_client(client("c5", fid="nope")),
    "enrollment_token": lambda tx: tx.add_enrollment_token(
        dataclasses.replace(enrollment("e5"), client_id="nope")
    ),
    "round": lambda tx: tx.add_round(round_(1, fid="nope")),
    "update of a missing round": lambda tx: tx.add_update(update("c0", number=42)),
    "update of a missing client": lambda tx: tx.add_update(update("nope")),
    "model": lambda tx: tx.add_model(
        ModelRecord(federation_id="nope", version="m", round=0, size_bytes=1, created_at=1)
    ),
    "secagg entry of a missing round": lambda tx: tx.add_secagg_message(entry(0, number=42)),
    "secagg entry of a missing client": lambda tx: tx.add_secagg_message(entry(0, sender="nope")),
}


@pytest.mark.parametrize("kind", sorted(ORPHANS))
def test_adding_a_row_whose_parent_is_missing_raises(store: AnyStore, kind: str) -> None:
    seed(store, clients=1, rounds=1)
    with pytest.raises(integrity_error(store)), store.transaction() as tx:
        ORPHANS[kind](tx)


# --- atomicity ------------------------------------------------------------------


class Boom(Exception):
    pass


def add_then_fail(tx: Transaction) -> None:
    tx.add_federation(federation())
    tx.add_client(client("c0"))
    assert tx.get_client("c0") == client("c0")
    raise Boom


def change_then_fail(tx: Transaction) -> None:
    tx.update_federation("f1", current_round=1, status="running")
    tx.update_client("c0", token_hash=ROTATED)
    tx.update_round("f1", 1, status="closed", metrics={"loss": 1.0})
    tx.add_round(round_(2))
    raise Boom


def test_an_exception_rolls_back_every_write_of_the_transaction(store: AnyStore) -> None:
    with pytest.raises(Boom), store.transaction() as tx:
        add_then_fail(tx)
    with store.transaction() as tx:
        assert tx.get_federation("f1") is None
        assert tx.get_client("c0") is None
        assert tx.find_client_by_token("hash-c0") is None
        assert tx.list_federations() == []


def test_an_exception_rolls_back_updates_to_existing_rows(store: AnyStore) -> None:
    seed(store, clients=1, rounds=1)
    with pytest.raises(Boom), store.transaction() as tx:
        change_then_fail(tx)
    with store.transaction() as tx:
        assert tx.get_federation("f1") == federation()
        assert tx.find_client_by_token("hash-c0") == client("c0")
        assert tx.find_client_by_token(ROTATED) is None
        assert tx.list_rounds("f1") == [round_(1)]
    with store.transaction() as tx:
        tx.add_round(round_(2))


def test_memory_store_refuses_a_nested_transaction() -> None:
    store = MemoryStore()
    with store.transaction(), pytest.raises(RuntimeError, match="already open"):
        store.transaction().__enter__()
    with store.transaction() as tx:
        assert tx.list_federations() == []


# --- concurrency ----------------------------------------------------------------

INCREMENTS = 50


def increment_round(store: Store, barrier: threading.Barrier) -> None:
    barrier.wait()
    for _ in range(INCREMENTS):
        with store.transaction() as tx:
            current = tx.lock_federation("f1")
            assert current is not None
            time.sleep(0.0005)  # without the lock, the other thread would write here
            tx.update_federation("f1", current_round=current.current_round + 1)


def test_locked_read_modify_write_loses_no_update_across_threads(store: AnyStore) -> None:
    seed(store)
    barrier = threading.Barrier(2)
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = [pool.submit(increment_round, store, barrier) for _ in range(2)]
        for run in runs:
            run.result(timeout=60)  # re-raises a worker's error here
    with store.transaction() as tx:
        current = tx.get_federation("f1")
    assert current is not None
    assert current.current_round == 2 * INCREMENTS


# A worker process: it waits for "go" on stdin so that both start together, and
# sleeps between read and write to make a lost update near certain without
# the lock.
INCREMENT_WORKER = """
import sys, time
from aggregator import SqlStore
store = SqlStore(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
for _ in range(int(sys.argv[2])):
    with store.transaction() as tx:
        current = tx.lock_federation("f1")
        time.sleep(0.001)
        tx.update_federation("f1", current_round=current.current_round + 1)
store.close()
"""


def test_locked_read_modify_write_loses_no_update_across_processes(
    database_url: str, run_together: Callable[[list[str]], list[int]]
) -> None:
    store = SqlStore.open(database_url)
    seed(store)
    command = [sys.executable, "-c", INCREMENT_WORKER, database_url, str(INCREMENTS)]
    assert run_together(command) == [0, 0]
    with store.transaction() as tx:
        current = tx.get_federation("f1")
    store.close()
    assert current is not None
    assert current.current_round == 2 * INCREMENTS


# --- what only the SQL stores promise -------------------------------------------

COMMIT_THEN_DIE = """
import os, signal, sys
from aggregator.records import FederationRecord, FederationStatus
from aggregator import SqlStore
store = SqlStore(sys.argv[1])
with store.transaction() as tx:
    tx.add_federation(FederationRecord(
        id="durable", name="d", config_json="{}", status=FederationStatus.CREATED,
        model_version="m0", current_round=0, created_at=1.0,
    ))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sqlite_commit_survives_the_process_being_killed_right_after(sqlite_url: str) -> None:
    SqlStore.open(sqlite_url).close()
    died = subprocess.run([sys.executable, "-c", COMMIT_THEN_DIE, sqlite_url], check=False)
    assert died.returncode == -signal.SIGKILL
    store = SqlStore(sqlite_url)
    with store.transaction() as tx:
        survivor = tx.get_federation("durable")
    store.close()
    assert survivor is not None
    assert survivor.model_version == "m0"


def test_sqlite_runs_in_wal_mode_with_full_sync_foreign_keys_and_busy_timeout(
    sqlite_url: str,
) -> None:
    store = SqlStore.open(sqlite_url)
    with store.engine.connect() as connection:
        pragmas = {
            name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
        }
    store.close()
    assert pragmas == {
        "journal_mode": "wal",
        "synchronous": 2,  # FULL
        "foreign_keys": 1,
        "busy_timeout": 10_000,
    }


def test_sqlite_transaction_holds_the_write_lock_from_its_start(
    sqlite_url: str, tmp_path: Any
) -> None:
    store = SqlStore.open(sqlite_url)
    other = sqlite3.connect(tmp_path / "fedcore.db", timeout=0, isolation_level=None)
    try:
        with store.transaction() as tx:
            tx.list_federations()
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    finally:
        other.close()
        store.close()


def test_sqlite_store_listens_to_no_connection_event(sqlite_url: str) -> None:
    # One connection event listened to makes SQLAlchemy dispatch all of them
    # around every statement (about a sixth of a server's CPU per round):
    # the store begins SQLite's transactions itself instead.
    store = SqlStore.open(sqlite_url)
    try:
        assert not store.engine._has_events
        with store.read() as tx:
            tx.list_federations()
        with store.transaction() as tx:
            tx.list_federations()
    finally:
        store.close()


def test_sql_stores_see_rows_committed_by_another_store_on_the_same_database(
    database_url: str,
) -> None:
    first = SqlStore.open(database_url)
    second = SqlStore(database_url)
    with first.transaction() as tx:
        tx.add_federation(federation())
    with second.transaction() as tx:
        assert tx.get_federation("f1") == federation()
    first.close()
    second.close()


def test_sql_stores_check_counts_are_not_negative(database_url: str) -> None:
    store = SqlStore.open(database_url)
    seed(store, clients=1, rounds=1)
    negative = UpdateRecord(
        federation_id="f1", round=1, client_id="c0", sha256="s", num_examples=-1, received_at=1.0
    )
    with pytest.raises(IntegrityError), store.transaction() as tx:
        tx.add_update(negative)
    store.close()


# --- read transactions --------------------------------------------------------


def test_a_read_transaction_sees_commits_and_refuses_writes_and_locks(store: AnyStore) -> None:
    seed(store, clients=1)
    with store.read() as tx:
        assert tx.get_federation("f1") == federation()
        assert [c.id for c in tx.list_clients("f1")] == ["c0"]
    with pytest.raises(Exception, match="read"), store.read() as tx:
        tx.add_client(client("c1"))
    with pytest.raises(RuntimeError, match="cannot write or lock"), store.read() as tx:
        tx.lock_federation("f1")
    # Nothing of the refused write is left, and writes work again afterwards.
    with store.transaction() as tx:
        assert tx.get_client("c1") is None
        tx.add_client(client("c2"))
    with store.read() as tx:
        assert [c.id for c in tx.list_clients("f1")] == ["c0", "c2"]


def test_a_read_transaction_does_not_wait_for_an_open_writer(store: AnyStore) -> None:
    if isinstance(store, MemoryStore):
        pytest.skip("the in-memory store runs one transaction at a time by design")
    seed(store)
    writing, release = threading.Event(), threading.Event()

    def writer() -> None:
        with store.transaction() as tx:
            tx.lock_federation("f1")
            tx.add_client(client("c9"))
            writing.set()
            release.wait(10)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert writing.wait(10)
        started = time.monotonic()
        with store.read() as tx:
            seen = tx.get_federation("f1")
            uncommitted = tx.get_client("c9")
        waited = time.monotonic() - started
    finally:
        release.set()
        thread.join()
    assert seen == federation()
    assert uncommitted is None
    # The writer holds its lock for up to 10 s: a reader that queued behind
    # it would have waited that long.
    assert waited < 2.0
    with store.read() as tx:
        assert tx.get_client("c9") is not None
