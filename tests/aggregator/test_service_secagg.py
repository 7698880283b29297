"""Secure aggregation in the aggregator core: settings, enrollment, and rounds."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from settable_clock import Clock

from aggregator import (
    Aggregator,
    FileBlobStore,
    InProcessTransport,
    MemoryBlobStore,
    MemoryStore,
    RoundStatus,
    SqlStore,
    parse_settings,
)
from aggregator.secagg import SecureRounds
from aggregator.sqlstore import SqlTransaction
from aggregator.tables import Base
from clients.secagg import Progress, SecureParticipant
from fedcore import (
    ConfigError,
    Forbidden,
    NotFound,
    ParameterSet,
    RoundStateError,
    UpdateMeta,
    wire,
)
from privacy.secagg import ClientIdentity, Stage, flatten

BASE = {"name": "s", "rounds": 2, "clients_per_round": 4, "min_clients": 3}


def model() -> ParameterSet:
    return ParameterSet({"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)})


def create(agg: Aggregator, **overrides: object) -> str:
    data = wire.encode(model())
    staged = agg.blobs.stage(len(data))
    staged.write(data)
    return agg.create_federation(parse_settings(BASE | overrides), staged).id


def test_secure_settings_default_off_and_parse_their_section() -> None:
    assert parse_settings(BASE).secure_aggregation is False
    settings = parse_settings(
        BASE
        | {
            "secure_aggregation": True,
            "secagg": {"clip": 0.25, "value_bits": 20, "stage_timeout_s": 5},
        }
    )
    assert settings.secure_aggregation is True
    assert (settings.secagg.clip, settings.secagg.value_bits) == (0.25, 20)
    assert settings.stage_timeout_s() == 5.0
    protocol = settings.secagg.protocol(9)
    assert protocol.vector_length == 9
    assert protocol.quantization.clip == 0.25


def test_secure_settings_list_every_problem_at_once() -> None:
    bad = BASE | {
        "min_clients": 2,
        "secure_aggregation": True,
        "dp": {"mode": "central", "epsilon": 1.0, "delta": 1e-5, "clip_norm": 1.0},
        "secagg": {"corrupt_fraction": 0.5, "dropout_fraction": 0.3},
    }
    with pytest.raises(ConfigError) as caught:
        parse_settings(bad)
    text = "; ".join(caught.value.problems)
    assert "central DP" in text
    assert "min_clients" in text
    assert "corrupt_fraction + 2 * dropout_fraction" in text
    with pytest.raises(ConfigError, match="value_bits"):
        parse_settings(BASE | {"secure_aggregation": True, "secagg": {"value_bits": 40}})


def test_enrollment_in_a_secure_federation_needs_an_identity_key() -> None:
    agg = Aggregator(MemoryStore(), MemoryBlobStore())
    fid = create(agg, secure_aggregation=True)
    tokens, _ = agg.access.create_enrollment_tokens(fid, 3, 60)
    with pytest.raises(Forbidden, match="identity_key"):
        agg.access.enroll(tokens[0])
    with pytest.raises(Forbidden, match="32-byte"):
        agg.access.enroll(tokens[0], identity_key=b"short")
    key = ClientIdentity.generate("x").public_key
    enrollment = agg.access.enroll(tokens[0], identity_key=key)  # the token was not spent
    assert enrollment.identity_key == key.hex()
    (client,) = agg.list_clients(fid)
    assert client.identity_key == key


def test_plain_federations_enroll_with_or_without_an_identity_key() -> None:
    agg = Aggregator(MemoryStore(), MemoryBlobStore())
    fid = create(agg)
    tokens, _ = agg.access.create_enrollment_tokens(fid, 2, 60)
    assert agg.access.enroll(tokens[0]).identity_key is None
    key = ClientIdentity.generate("x").public_key
    assert agg.access.enroll(tokens[1], identity_key=key).identity_key == key.hex()


# --- secure rounds, end to end in process -------------------------------------

CLIP = 1.0
MAX_WEIGHT = 64.0
VALUE_BITS = 20
SECURE = {
    "secure_aggregation": True,
    "clients_per_round": 5,
    "min_clients": 3,
    "rounds": 2,
    "round_timeout_s": 30,
    "checkin_wait_s": 10,
    "seed": 3,
    "secagg": {"clip": CLIP, "value_bits": VALUE_BITS, "max_weight": MAX_WEIGHT},
}


@dataclass
class Member:
    identity: ClientIdentity
    transport: InProcessTransport
    participant: SecureParticipant
    delta: ParameterSet
    weight: int


def delta_of(index: int) -> ParameterSet:
    rng = np.random.default_rng(index)
    return ParameterSet(
        {
            "w": rng.uniform(-0.5, 0.5, (2, 3)).astype(np.float32),
            "b": rng.uniform(-0.5, 0.5, 3).astype(np.float32),
        }
    )


def members(agg: Aggregator, fid: str, count: int) -> list[Member]:
    tokens, _ = agg.access.create_enrollment_tokens(fid, count, 60)
    out = []
    for index, token in enumerate(tokens):
        key = Ed25519PrivateKey.generate()
        enrollment = agg.access.enroll(token, identity_key=key.public_key().public_bytes_raw())
        identity = ClientIdentity(enrollment.client_id, key)
        transport = InProcessTransport(agg, enrollment.client_id)
        participant = SecureParticipant(identity, transport, fid)
        out.append(Member(identity, transport, participant, delta_of(index), 8 * (index + 1)))
    return out


def answer(member: Member, fid: str) -> Progress | None:
    task = member.transport.fetch_task(fid)
    if not task.secure:
        return None
    meta = UpdateMeta(num_examples=member.weight)
    return member.participant.answer(task, lambda: (member.delta, meta))


def run_stage(agg: Aggregator, fid: str, active: list[Member], clock: Clock) -> None:
    """Let `active` answer the open stage, then let its deadline pass for the silent rest."""
    for member in active:
        answer(member, fid)
    clock.now += 31
    agg.tick()


def stage_index(stage: Stage) -> int:
    return list(Stage).index(stage)


def expected_mean(group: list[Member]) -> np.ndarray:
    total = sum(m.weight for m in group)
    return sum(m.weight * flatten(m.delta) for m in group) / total


def tolerance(group: list[Member]) -> float:
    # Each client's code carries at most one quantization step of w/W * delta.
    step = 2 * CLIP / ((1 << VALUE_BITS) - 1) * MAX_WEIGHT
    return 2 * len(group) * step / sum(m.weight for m in group)


def start(agg: Aggregator, count: int = 5) -> tuple[str, list[Member]]:
    fid = create(agg, **SECURE)
    group = members(agg, fid, count)
    agg.start(fid)
    for member in group:
        member.transport.fetch_task(fid)
    return fid, group


def test_secure_round_releases_the_weighted_mean_and_no_plain_update_is_taken() -> None:
    clock = Clock()
    agg = Aggregator(MemoryStore(), MemoryBlobStore(), clock=clock)
    fid, group = start(agg)
    rnd = agg.get_round(fid, 1)
    assert rnd.secagg_setup is not None
    assert sorted(rnd.cohort) == sorted(m.identity.client_id for m in group)
    with pytest.raises(RoundStateError, match="secure aggregation"):
        group[0].transport.submit_update(fid, 1, group[0].delta, UpdateMeta(num_examples=1))
    for _ in Stage:
        assert [answer(m, fid) for m in group].count(Progress.WAITING) == 0
    closed = agg.get_round(fid, 1)
    assert closed.status is RoundStatus.CLOSED, closed.reason
    assert closed.metrics["clients"] == 5
    # The weights are summed securely too, in fixed point: one rounding step
    # of W / (2^b - 1) per client.
    weight_step = MAX_WEIGHT / ((1 << VALUE_BITS) - 1)
    total = sum(m.weight for m in group)
    assert closed.metrics["examples"] == pytest.approx(total, abs=len(group) * weight_step)
    new = agg.load_model(fid, agg.get_federation(fid).model_version)
    np.testing.assert_allclose(flatten(new), expected_mean(group), atol=tolerance(group))
    assert agg.get_round(fid, 2).status in (RoundStatus.SELECTING, RoundStatus.TRAINING)


def test_only_the_message_that_closes_a_stage_wakes_waiting_check_ins() -> None:
    agg = Aggregator(MemoryStore(), MemoryBlobStore(), clock=Clock())
    fid, group = start(agg)
    before = agg.generation
    for member in group[:-1]:
        answer(member, fid)
    unchanged = agg.generation
    answer(group[-1], fid)  # the last advertise-keys message closes the stage
    assert unchanged == before
    assert agg.generation > unchanged


@pytest.mark.parametrize("stage", list(Stage))
def test_a_dropout_at_any_stage_still_gives_the_survivors_exact_mean(stage: Stage) -> None:
    clock = Clock()
    agg = Aggregator(MemoryStore(), MemoryBlobStore(), clock=clock)
    fid, group = start(agg)
    quitter = group[2]
    stayers = [m for m in group if m is not quitter]
    for current in Stage:
        if current is stage:  # the quitter is silent: the stage closes at its deadline
            run_stage(agg, fid, stayers, clock)
            continue
        # Everyone still in answers, so the stage closes at once.
        for member in group if stage_index(current) < stage_index(stage) else stayers:
            answer(member, fid)
    closed = agg.get_round(fid, 1)
    assert closed.status is RoundStatus.CLOSED, closed.reason
    survivors = group if stage is Stage.UNMASK else [m for m in group if m is not quitter]
    assert closed.metrics["clients"] == len(survivors)
    assert closed.metrics["dropped"] == 1
    new = agg.load_model(fid, agg.get_federation(fid).model_version)
    np.testing.assert_allclose(flatten(new), expected_mean(survivors), atol=tolerance(survivors))


def test_too_many_dropouts_fail_the_round_cleanly_and_the_next_one_starts() -> None:
    clock = Clock()
    agg = Aggregator(MemoryStore(), MemoryBlobStore(), clock=clock)
    fid, group = start(agg)
    for member in group:  # every client advertises keys
        assert answer(member, fid) is Progress.SENT
    run_stage(agg, fid, group[:2], clock)  # 2 share keys: fewer than t = 3
    failed = agg.get_round(fid, 1)
    assert failed.status is RoundStatus.FAILED
    assert failed.reason is not None
    assert "secure aggregation failed" in failed.reason
    assert agg.get_federation(fid).model_version == agg.list_models(fid)[0].version
    for member in group:
        member.transport.fetch_task(fid)
    second = agg.get_round(fid, 2)
    assert second.status is RoundStatus.TRAINING
    assert second.secagg_setup is not None
    with pytest.raises(RoundStateError, match="failed"):
        group[0].transport.fetch_secagg(fid, 1, "share-keys")


def test_a_bad_message_excludes_its_sender_and_is_logged_without_crashing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    agg = Aggregator(MemoryStore(), MemoryBlobStore(), clock=clock)
    fid, group = start(agg)
    bad = group[0].transport
    with pytest.raises(RoundStateError, match="refused"):
        bad.send_secagg(fid, 1, "advertise-keys", b"\x00garbage")
    with pytest.raises(RoundStateError, match="advertise-keys stage, not unmask"):
        group[1].transport.send_secagg(fid, 1, "unmask", b"x")
    with pytest.raises(NotFound, match="no secure aggregation stage"):
        group[1].transport.send_secagg(fid, 1, "nonsense", b"x")
    assert any("excluded client" in r.getMessage() for r in caplog.records)
    for _ in Stage:
        for member in group[1:]:
            answer(member, fid)
    closed = agg.get_round(fid, 1)
    assert closed.status is RoundStatus.CLOSED, closed.reason
    assert closed.metrics["excluded"] == 1
    new = agg.load_model(fid, agg.get_federation(fid).model_version)
    np.testing.assert_allclose(flatten(new), expected_mean(group[1:]), atol=tolerance(group[1:]))


def reopen(tmp_path: Path) -> Aggregator:
    """An aggregator on the SQLite database and blobs under `tmp_path`."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    return Aggregator(SqlStore.open(url), FileBlobStore(tmp_path / "blobs"), clock=Clock())


def crash_mid_masked_input(tmp_path: Path) -> tuple[str, list[Member]]:
    """Run a secure round up to three of five masked inputs, then close the store."""
    first = reopen(tmp_path)
    fid, group = start(first)
    for _ in range(2):  # advertise-keys and share-keys complete
        for member in group:
            answer(member, fid)
    for member in group[:3]:  # three masked inputs, then the process dies
        answer(member, fid)
    first.store.close()
    return fid, group


@pytest.fixture
def log_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The `seq` of every stage-log entry that SQL stores read from now on."""
    read: list[int] = []
    listing = SqlTransaction.list_secagg_messages

    def counted(self: SqlTransaction, *args: Any, **kwargs: Any) -> Any:
        records = listing(self, *args, **kwargs)
        read.extend(record.seq for record in records)
        return records

    monkeypatch.setattr(SqlTransaction, "list_secagg_messages", counted)
    return read


def bind(member: Member, agg: Aggregator) -> None:
    """Send `member`'s calls to `agg` from now on."""
    member.transport = InProcessTransport(agg, member.identity.client_id)
    member.participant._transport = member.transport


def finish_round(agg: Aggregator, fid: str, group: list[Member]) -> None:
    """Point every member at `agg` and let them answer the rest of the round."""
    for member in group:
        bind(member, agg)
    for member in group[3:]:
        answer(member, fid)
    for member in group:
        answer(member, fid)


def test_a_restart_mid_stage_rebuilds_the_round_from_its_log(tmp_path: Path) -> None:
    fid, group = crash_mid_masked_input(tmp_path)
    second = reopen(tmp_path)
    finish_round(second, fid, group)
    closed = second.get_round(fid, 1)
    assert closed.status is RoundStatus.CLOSED, closed.reason
    new = second.load_model(fid, second.get_federation(fid).model_version)
    np.testing.assert_allclose(flatten(new), expected_mean(group), atol=tolerance(group))
    second.store.close()


def test_the_round_server_reads_only_the_log_entries_it_lacks(
    tmp_path: Path, log_reads: list[int]
) -> None:
    # Every check-in and stage message used to read the round's whole log:
    # quadratic in the cohort. Now a server in memory reads nothing it wrote
    # itself, and one rebuilt after a restart reads each entry once.
    fid, group = crash_mid_masked_input(tmp_path)
    assert log_reads == []
    second = reopen(tmp_path)
    with second.store.read() as tx:
        logged = len(tx.list_secagg_messages(fid, 1))
    log_reads.clear()
    finish_round(second, fid, group)
    assert second.get_round(fid, 1).status is RoundStatus.CLOSED
    assert sorted(log_reads) == list(range(logged))
    second.store.close()


def test_two_workers_on_one_database_each_replay_what_the_other_logged(
    database_url: str, tmp_path: Path
) -> None:
    # Every message goes to the other worker than the one before, so each
    # worker's round server catches up on the entries the other wrote.
    clock = Clock()
    workers = [
        Aggregator(SqlStore.open(database_url), FileBlobStore(tmp_path / "blobs"), clock=clock)
        for _ in range(2)
    ]
    fid, group = start(workers[0])
    turn = 0
    for _ in Stage:
        for member in group:
            turn += 1
            bind(member, workers[turn % 2])
            answer(member, fid)
    closed = workers[1].get_round(fid, 1)
    assert closed.status is RoundStatus.CLOSED, closed.reason
    new = workers[0].load_model(fid, workers[0].get_federation(fid).model_version)
    np.testing.assert_allclose(flatten(new), expected_mean(group), atol=tolerance(group))
    # Round 2 through both workers: neither keeps its server of round 1,
    # whichever of them ended it.
    for _ in range(2):
        for member in group:
            turn += 1
            bind(member, workers[turn % 2])
            answer(member, fid)
    assert workers[0].get_round(fid, 2).secagg_setup is not None
    assert [w._engine.secure.held() for w in workers] == [[(fid, 2)], [(fid, 2)]]
    for worker in workers:
        worker.store.close()


def test_a_stage_message_whose_transaction_fails_is_logged_when_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The round's server took the message in memory, then the transaction
    # that logged it rolled back. The server must not keep what the log
    # lacks: the client's retry is then logged, and a restart sees it.
    agg = reopen(tmp_path)
    fid, group = start(agg)
    engine = agg._engine
    advance = engine.advance
    failures = [RuntimeError("the database went away")]

    def failing(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return advance(*args, **kwargs)

    monkeypatch.setattr(engine, "advance", failing)
    with pytest.raises(RuntimeError, match="went away"):
        answer(group[0], fid)
    answer(group[0], fid)
    with agg.store.read() as tx:
        logged = [m.sender for m in tx.list_secagg_messages(fid, 1)]
    assert logged == [group[0].identity.client_id]
    for member in group[1:]:
        answer(member, fid)
    agg.store.close()
    finish = reopen(tmp_path)
    for member in group:
        bind(member, finish)
    for _ in range(3):
        for member in group:
            answer(member, fid)
    closed = finish.get_round(fid, 1)
    assert closed.status is RoundStatus.CLOSED, closed.reason
    assert closed.metrics["clients"] == 5
    finish.store.close()


def test_a_late_stage_message_leaves_the_round_server_in_memory(
    tmp_path: Path, log_reads: list[int]
) -> None:
    # Refusing it changes nothing, so nothing needs rebuilding from the log.
    agg = reopen(tmp_path)
    fid, group = start(agg)
    for member in group:
        answer(member, fid)  # advertise-keys closes
    log_reads.clear()
    late = group[0].identity.client_id
    with pytest.raises(RoundStateError, match="stage"):
        agg.send_secagg(late, fid, 1, "advertise-keys", b"late")
    for _ in range(3):
        for member in group:
            answer(member, fid)
    assert agg.get_round(fid, 1).status is RoundStatus.CLOSED
    assert log_reads == []
    agg.store.close()


def test_the_advertise_keys_opening_is_built_once_per_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # It lists the whole cohort's identity keys: built per request, it cost
    # every client of the round O(cohort) database rows.
    agg = Aggregator(MemoryStore(), MemoryBlobStore(), clock=Clock())
    fid, group = start(agg)
    built: list[int] = []
    registry = SecureRounds._registry

    def counted(*args: Any) -> dict[str, bytes]:
        built.append(1)
        return registry(*args)

    monkeypatch.setattr(SecureRounds, "_registry", staticmethod(counted))
    openings = {m.transport.fetch_secagg(fid, 1, "advertise-keys") for m in group}
    assert len(openings) == 1
    assert len(built) == 1


def test_no_row_blob_or_log_line_of_a_secure_round_holds_a_raw_update(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    clock = Clock()
    store = SqlStore.open(f"sqlite:///{tmp_path / 'db.sqlite'}")
    agg = Aggregator(store, FileBlobStore(tmp_path / "blobs"), clock=clock)
    fid, group = start(agg)
    for index, member in enumerate(group):  # distinctive values, easy to spot
        member.delta = ParameterSet(
            {
                "w": np.full((2, 3), 0.123456 + index / 1000, np.float32),
                "b": np.full(3, -0.4321 - index / 1000, np.float32),
            }
        )
    for _ in Stage:
        for member in group:
            answer(member, fid)
    assert agg.get_round(fid, 1).status is RoundStatus.CLOSED
    raw = [m.delta[name].tobytes() for m in group for name in ("w", "b")]
    raw += [flatten(m.delta).tobytes() for m in group]
    raw += [(flatten(m.delta) * m.weight).tobytes() for m in group]
    dumps = [p.read_bytes() for p in (tmp_path / "blobs").rglob("*") if p.is_file()]
    with store.engine.connect() as connection:
        for table in Base.metadata.sorted_tables:
            for row in connection.execute(table.select()):
                dumps.append(
                    repr(tuple(row)).encode() + b"".join(v for v in row if isinstance(v, bytes))
                )
    dumps += [p.read_bytes() for p in tmp_path.glob("db.sqlite*")]
    logs = caplog.text
    assert dumps
    assert all(pattern not in dump for pattern in raw for dump in dumps)
    for member in group:
        for value in np.unique(member.delta["w"]).tolist() + np.unique(member.delta["b"]).tolist():
            assert f"{value:.5f}" not in logs
    assert "closed masked-input" in logs
    store.close()
