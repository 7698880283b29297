"""The aggregator core runs rounds correctly, in process, on every store."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from settable_clock import Clock

from aggregator import (
    Aggregator,
    FederationStatus,
    FileBlobStore,
    InProcessTransport,
    MemoryBlobStore,
    MemoryStore,
    RoundStatus,
    SqlStore,
    Submission,
)
from fedcore import (
    UPDATE_META_KEY,
    FederationConfig,
    Forbidden,
    NonFiniteUpdate,
    ParameterSet,
    RoundStateError,
    TaskAction,
    TensorMismatch,
    UpdateConflict,
    UpdateMeta,
    WireFormatError,
    wire,
)


def model() -> ParameterSet:
    return ParameterSet(
        {
            "w": np.arange(6, dtype=np.float32).reshape(2, 3),
            "steps": np.array(10, dtype=np.int64),
        }
    )


def delta_for(client_index: int, round_number: int) -> ParameterSet:
    value = float(client_index + 1) * 0.1 * round_number
    return ParameterSet(
        {"w": np.full((2, 3), value, dtype=np.float32), "steps": np.array(2, dtype=np.int64)}
    )


@pytest.fixture(params=["memory", "sqlite"])
def make_aggregator(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[Clock], Aggregator]]:
    stores: list[MemoryStore | SqlStore] = []

    def make(clock: Clock) -> Aggregator:
        if request.param == "memory":
            store: MemoryStore | SqlStore = stores[0] if stores else MemoryStore()
            blobs: MemoryBlobStore | FileBlobStore = MemoryBlobStore()
        else:
            store = SqlStore.open(f"sqlite:///{tmp_path / 'db.sqlite'}")
            blobs = FileBlobStore(tmp_path / "blobs")
        stores.append(store)
        return Aggregator(store, blobs, clock=clock)

    yield make
    for store in stores:
        store.close()


def create(agg: Aggregator, **overrides: object) -> str:
    fields: dict[str, object] = {
        "name": "t",
        "rounds": 2,
        "clients_per_round": 3,
        "min_clients": 2,
        "round_timeout_s": 30,
        "checkin_wait_s": 10,
        "seed": 7,
    }
    fields.update(overrides)
    data = wire.encode(model())
    staged = agg.blobs.stage(len(data))
    staged.write(data)
    fed = agg.create_federation(FederationConfig.model_validate(fields), staged)
    return fed.id


def enroll(agg: Aggregator, federation_id: str, count: int) -> list[str]:
    tokens, _ = agg.access.create_enrollment_tokens(federation_id, count, 60)
    return [agg.access.enroll(t).client_id for t in tokens]


def running_round(agg: Aggregator, count: int, **overrides: object) -> tuple[str, list[str]]:
    """Create, enroll `count` clients, start, and check everyone in: round 1 is training."""
    fid = create(agg, **overrides)
    clients = enroll(agg, fid, count)
    agg.start(fid)
    for c in clients:
        InProcessTransport(agg, c).fetch_task(fid)
    return fid, clients


def submit(agg: Aggregator, fid: str, client: str, number: int, delta: ParameterSet) -> None:
    meta = UpdateMeta(num_examples=10, metrics={"train_loss": 1.0})
    InProcessTransport(agg, client).submit_update(fid, number, delta, meta)


def test_federation_runs_all_rounds_and_averages_by_example_count(
    make_aggregator: Callable[[Clock], Aggregator],
) -> None:
    agg = make_aggregator(Clock())
    fid = create(agg)
    clients = enroll(agg, fid, 3)
    agg.start(fid)
    weights = {c: 5 * (i + 1) for i, c in enumerate(clients)}
    expected = model()["w"].astype(np.float64)
    for number in (1, 2):
        # The first pass checks everyone in (the cohort is sampled once all
        # are present); the second hands every client its task.
        for c in clients:
            InProcessTransport(agg, c).fetch_task(fid)
        tasks = {c: InProcessTransport(agg, c).fetch_task(fid) for c in clients}
        assert all(t.action is TaskAction.TRAIN and t.round == number for t in tasks.values())
        total = sum(weights.values())
        step = sum(weights[c] * (i + 1) * 0.1 * number for i, c in enumerate(clients)) / total
        expected = expected + step
        for i, c in enumerate(clients):
            meta = UpdateMeta(num_examples=weights[c])
            InProcessTransport(agg, c).submit_update(fid, number, delta_for(i, number), meta)
    fed = agg.get_federation(fid)
    assert fed.status is FederationStatus.FINISHED
    final = agg.load_model(fid, fed.model_version)
    np.testing.assert_allclose(final["w"], expected, rtol=1e-6)
    assert int(final["steps"]) == 14
    assert [r.status for r in agg.list_rounds(fid)] == [RoundStatus.CLOSED] * 2
    assert InProcessTransport(agg, clients[0]).fetch_task(fid).action is TaskAction.FINISHED


def test_only_an_upload_that_moves_the_round_wakes_waiting_check_ins(
    make_aggregator: Callable[[Clock], Aggregator],
) -> None:
    # Held long-polls wake when `generation` changes: an upload that leaves
    # the round open must not wake them, or every client checks in again
    # for every other client's upload.
    agg = make_aggregator(Clock())
    fid, clients = running_round(agg, 3)
    before = agg.generation
    submit(agg, fid, clients[0], 1, delta_for(0, 1))
    submit(agg, fid, clients[1], 1, delta_for(1, 1))
    unchanged = agg.generation
    submit(agg, fid, clients[2], 1, delta_for(2, 1))
    assert unchanged == before
    assert agg.generation > unchanged
    assert agg.get_round(fid, 1).status is RoundStatus.CLOSED


def test_repeat_upload_returns_original_receipt_and_different_content_conflicts(
    make_aggregator: Callable[[Clock], Aggregator],
) -> None:
    agg = make_aggregator(Clock())
    fid, clients = running_round(agg, 3)
    transport = InProcessTransport(agg, clients[0])
    meta = UpdateMeta(num_examples=4)
    first = transport.submit_update(fid, 1, delta_for(0, 1), meta)
    again = transport.submit_update(fid, 1, delta_for(0, 1), meta)
    assert again == first
    with pytest.raises(UpdateConflict):
        transport.submit_update(fid, 1, delta_for(1, 1), meta)
    with agg.store.transaction() as tx:
        assert [u.sha256 for u in tx.list_updates(fid, 1)] == [first.sha256]


def test_round_fails_at_deadline_without_minimum_and_next_round_opens(
    make_aggregator: Callable[[Clock], Aggregator],
) -> None:
    clock = Clock()
    agg = make_aggregator(clock)
    fid, clients = running_round(agg, 3, rounds=1)
    submit(agg, fid, clients[0], 1, delta_for(0, 1))
    clock.now += 31
    agg.tick()
    rounds = agg.list_rounds(fid)
    assert rounds[0].status is RoundStatus.FAILED
    assert "1 updates" in (rounds[0].reason or "")
    assert rounds[1].number == 2
    with pytest.raises(RoundStateError):
        submit(agg, fid, clients[1], 1, delta_for(1, 1))


def test_round_closes_at_deadline_with_minimum(
    make_aggregator: Callable[[Clock], Aggregator],
) -> None:
    clock = Clock()
    agg = make_aggregator(clock)
    fid, clients = running_round(agg, 3, rounds=1)
    submit(agg, fid, clients[0], 1, delta_for(0, 1))
    submit(agg, fid, clients[1], 1, delta_for(1, 1))
    assert agg.get_round(fid, 1).status is RoundStatus.TRAINING
    clock.now += 31
    agg.tick()
    assert agg.get_round(fid, 1).status is RoundStatus.CLOSED
    assert agg.get_round(fid, 1).metrics["clients"] == 2
    assert agg.get_federation(fid).status is FederationStatus.FINISHED


def test_over_selection_closes_after_enough_updates_and_refuses_stragglers(
    make_aggregator: Callable[[Clock], Aggregator],
) -> None:
    agg = make_aggregator(Clock())
    fid, _ = running_round(agg, 5, rounds=1, clients_per_round=2, min_clients=1, over_selection=0.5)
    cohort = agg.get_round(fid, 1).cohort
    assert len(cohort) == 3
    assert len(set(cohort)) == 3
    submit(agg, fid, cohort[0], 1, delta_for(0, 1))
    submit(agg, fid, cohort[1], 1, delta_for(1, 1))
    assert agg.get_round(fid, 1).status is RoundStatus.CLOSED
    with pytest.raises(RoundStateError):
        submit(agg, fid, cohort[2], 1, delta_for(2, 1))


def test_client_outside_cohort_and_other_federation_are_refused(
    make_aggregator: Callable[[Clock], Aggregator],
) -> None:
    agg = make_aggregator(Clock())
    fid = create(agg, rounds=1, clients_per_round=1, min_clients=1)
    other = create(agg, rounds=1, clients_per_round=1, min_clients=1)
    clients = enroll(agg, fid, 2)
    stranger = enroll(agg, other, 1)[0]
    agg.start(fid)
    for c in clients:
        InProcessTransport(agg, c).fetch_task(fid)
    cohort = agg.get_round(fid, 1).cohort
    outsider = next(c for c in clients if c not in cohort)
    with pytest.raises(RoundStateError, match="not selected"):
        submit(agg, fid, outsider, 1, delta_for(0, 1))
    with pytest.raises(Forbidden):
        InProcessTransport(agg, stranger).fetch_task(fid)


def test_zero_example_updates_are_counted_with_weight_zero(
    make_aggregator: Callable[[Clock], Aggregator],
) -> None:
    agg = make_aggregator(Clock())
    fid, clients = running_round(agg, 2, rounds=1, clients_per_round=2)
    zero = ParameterSet({"w": np.zeros((2, 3), np.float32), "steps": np.array(0, np.int64)})
    InProcessTransport(agg, clients[0]).submit_update(fid, 1, zero, UpdateMeta(num_examples=0))
    InProcessTransport(agg, clients[1]).submit_update(fid, 1, zero, UpdateMeta(num_examples=0))
    fed = agg.get_federation(fid)
    assert fed.status is FederationStatus.FINISHED
    final = agg.load_model(fid, fed.model_version)
    np.testing.assert_array_equal(final["w"], model()["w"])
    assert int(final["steps"]) == 10


def test_paused_federation_hands_out_no_tasks_until_resumed(
    make_aggregator: Callable[[Clock], Aggregator],
) -> None:
    agg = make_aggregator(Clock())
    fid = create(agg, rounds=1, clients_per_round=1, min_clients=1)
    client = enroll(agg, fid, 1)[0]
    transport = InProcessTransport(agg, client)
    assert transport.fetch_task(fid).action is TaskAction.WAIT
    agg.start(fid)
    agg.pause(fid)
    assert transport.fetch_task(fid).action is TaskAction.WAIT
    agg.start(fid)
    assert transport.fetch_task(fid).action is TaskAction.TRAIN
    agg.stop(fid)
    assert transport.fetch_task(fid).action is TaskAction.FINISHED
    assert agg.get_round(fid, 1).status is RoundStatus.FAILED


def test_restart_mid_round_counts_every_acknowledged_update_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    clock = Clock()
    store = SqlStore.open(url)
    agg = Aggregator(store, FileBlobStore(tmp_path / "blobs"), clock=clock)
    fid, clients = running_round(agg, 3, rounds=1)
    submit(agg, fid, clients[0], 1, delta_for(0, 1))
    submit(agg, fid, clients[1], 1, delta_for(1, 1))
    store.close()

    store = SqlStore.open(url)
    agg = Aggregator(store, FileBlobStore(tmp_path / "blobs"), clock=clock)
    submit(agg, fid, clients[1], 1, delta_for(1, 1))
    submit(agg, fid, clients[2], 1, delta_for(2, 1))
    rnd = agg.get_round(fid, 1)
    assert rnd.status is RoundStatus.CLOSED
    assert rnd.metrics["clients"] == 3
    final = agg.load_model(fid, agg.get_federation(fid).model_version)
    expected = model()["w"] + (0.1 + 0.2 + 0.3) / 3
    np.testing.assert_allclose(final["w"], expected, rtol=1e-6)
    store.close()


def test_bfloat16_state_dict_and_int_buffers_survive_a_round_through_the_wire(
    make_aggregator: Callable[[Clock], Aggregator],
) -> None:
    torch = pytest.importorskip("torch")
    from clients import to_parameters, to_state_dict

    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).to(torch.bfloat16)
    initial = to_parameters(module.state_dict(), copy=True)
    agg = make_aggregator(Clock())
    data = wire.encode(initial)
    staged = agg.blobs.stage(len(data))
    staged.write(data)
    config = FederationConfig(name="bf16", rounds=1, clients_per_round=2, min_clients=2, seed=1)
    fid = agg.create_federation(config, staged).id
    clients = enroll(agg, fid, 2)
    agg.start(fid)
    for c in clients:
        InProcessTransport(agg, c).fetch_task(fid)
    step = {n: np.ones_like(a) for n, a in initial.items()}
    for c in clients:
        InProcessTransport(agg, c).submit_update(
            fid, 1, ParameterSet(step), UpdateMeta(num_examples=3)
        )
    final = agg.load_model(fid, agg.get_federation(fid).model_version)
    state = to_state_dict(final)
    assert state["0.weight"].dtype == torch.bfloat16
    assert state["1.num_batches_tracked"].dtype == torch.int64
    assert int(state["1.num_batches_tracked"]) == int(initial["1.num_batches_tracked"]) + 1
    expected = initial["0.weight"].astype(np.float64) + 1.0
    np.testing.assert_allclose(final["0.weight"].astype(np.float64), expected, rtol=1e-2)


def upload_directly(
    agg: Aggregator, fid: str, client: str, delta: ParameterSet, meta: UpdateMeta
) -> Submission:
    """Submit as the HTTP route does: staged safetensors bytes, parsed by the service."""
    data = wire.encode(delta, {UPDATE_META_KEY: meta.model_dump_json()})
    staged = agg.blobs.stage(len(data))
    staged.write(data)
    return agg.submit_update(client, fid, 1, staged)


def test_an_identical_upload_is_marked_repeated_and_gets_the_original_receipt(
    make_aggregator: Callable[[Clock], Aggregator],
) -> None:
    agg = make_aggregator(Clock())
    fid, clients = running_round(agg, 2, clients_per_round=2)
    meta = UpdateMeta(num_examples=6)

    first = upload_directly(agg, fid, clients[0], delta_for(0, 1), meta)
    again = upload_directly(agg, fid, clients[0], delta_for(0, 1), meta)

    assert (first.repeated, again.repeated) == (False, True)
    assert again.receipt == first.receipt
    with pytest.raises(UpdateConflict):
        upload_directly(agg, fid, clients[0], delta_for(1, 1), meta)


def test_in_process_upload_stores_and_acknowledges_what_the_wire_upload_does(
    make_aggregator: Callable[[Clock], Aggregator],
) -> None:
    agg = make_aggregator(Clock())
    fid, clients = running_round(agg, 4, clients_per_round=4)
    meta = UpdateMeta(num_examples=6, metrics={"train_loss": 0.25})
    delta = delta_for(0, 1)
    data = wire.encode(delta, {UPDATE_META_KEY: meta.model_dump_json()})
    in_process = InProcessTransport(agg, clients[0]).submit_update(fid, 1, delta, meta)
    direct = upload_directly(agg, fid, clients[1], delta, meta).receipt
    # Already encoded (as a simulation's training worker sends it), from a view.
    encoded = InProcessTransport(agg, clients[2]).submit_encoded(fid, 1, memoryview(data))
    assert in_process.sha256 == direct.sha256 == encoded.sha256 == hashlib.sha256(data).hexdigest()
    for other in (direct, encoded):
        assert in_process.model_dump(exclude={"client_id"}) == other.model_dump(
            exclude={"client_id"}
        )
    with agg.blobs.open(in_process.sha256) as fh:
        assert fh.read() == data
    with agg.store.transaction() as tx:
        rows = {u.client_id: u for u in tx.list_updates(fid, 1)}
    assert [rows[c].metrics for c in clients[:3]] == [{"train_loss": 0.25}] * 3
    assert [rows[c].num_examples for c in clients[:3]] == [6] * 3


def bad_delta(kind: str) -> ParameterSet:
    good = dict(delta_for(0, 1))
    if kind == "nan":
        good["w"] = np.full((2, 3), np.nan, dtype=np.float32)
    elif kind == "shape":
        good["w"] = np.zeros((3, 2), dtype=np.float32)
    elif kind == "dtype":
        good["w"] = np.zeros((2, 3), dtype=np.float64)
    elif kind == "missing":
        del good["steps"]
    else:
        good["extra"] = np.zeros(1, dtype=np.float32)
    return ParameterSet(good)


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("nan", NonFiniteUpdate),
        ("shape", TensorMismatch),
        ("dtype", TensorMismatch),
        ("missing", TensorMismatch),
        ("extra", TensorMismatch),
    ],
)
def test_in_process_uploads_are_refused_like_wire_uploads_and_leave_nothing(
    make_aggregator: Callable[[Clock], Aggregator], kind: str, error: type[Exception]
) -> None:
    agg = make_aggregator(Clock())
    fid, clients = running_round(agg, 3)
    meta = UpdateMeta(num_examples=2)
    with pytest.raises(error):
        InProcessTransport(agg, clients[0]).submit_update(fid, 1, bad_delta(kind), meta)
    with pytest.raises(error):
        upload_directly(agg, fid, clients[1], bad_delta(kind), meta)
    data = wire.encode(bad_delta(kind), {UPDATE_META_KEY: meta.model_dump_json()})
    with pytest.raises(error):
        InProcessTransport(agg, clients[2]).submit_encoded(fid, 1, data)
    assert not agg.blobs.exists(hashlib.sha256(data).hexdigest())
    with agg.store.transaction() as tx:
        assert tx.count_updates(fid, 1) == 0


def test_in_process_upload_with_a_metric_json_cannot_carry_is_refused_like_a_wire_upload(
    make_aggregator: Callable[[Clock], Aggregator],
) -> None:
    agg = make_aggregator(Clock())
    fid, clients = running_round(agg, 3)
    # JSON has no NaN: the metadata says null, which is not a number.
    meta = UpdateMeta(num_examples=2, metrics={"train_loss": float("nan")})
    with pytest.raises(WireFormatError, match=r"fedcore\.update"):
        InProcessTransport(agg, clients[0]).submit_update(fid, 1, delta_for(0, 1), meta)
    with pytest.raises(WireFormatError, match=r"fedcore\.update"):
        upload_directly(agg, fid, clients[1], delta_for(0, 1), meta)


def test_in_process_upload_folds_the_stored_bytes_not_the_callers_arrays(
    make_aggregator: Callable[[Clock], Aggregator],
) -> None:
    agg = make_aggregator(Clock())
    fid, clients = running_round(agg, 2, rounds=1, clients_per_round=2)
    deltas = [delta_for(i, 1) for i in range(2)]
    for client, delta in zip(clients, deltas, strict=True):
        InProcessTransport(agg, client).submit_update(fid, 1, delta, UpdateMeta(num_examples=1))
        delta["w"][...] = 1e6  # the caller reuses its buffer after the upload
    final = agg.load_model(fid, agg.get_federation(fid).model_version)
    np.testing.assert_allclose(final["w"], model()["w"] + (0.1 + 0.2) / 2, rtol=1e-6)
