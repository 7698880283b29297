"""Central differential privacy in the service: Poisson cohorts, noisy rounds, the budget.

ε is checked against dp-accounting itself, with the events built here by
hand, never against the project's own accountant.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dp_accounting as dpa
import numpy as np
import pytest
from settable_clock import Clock

from aggregator import (
    Aggregator,
    FederationSettings,
    FederationStatus,
    FileBlobStore,
    InProcessTransport,
    MemoryBlobStore,
    MemoryStore,
    RoundStatus,
    SqlStore,
    parse_settings,
)
from aggregator.privacy import sample_cohort_poisson
from fedcore import (
    ConfigError,
    FederationStateError,
    ParameterSet,
    RoundStateError,
    TaskAction,
    UpdateMeta,
    wire,
)
from privacy.dp import DpConfig, calibrate_noise_multiplier


def model() -> ParameterSet:
    return ParameterSet(
        {
            "w": np.arange(6, dtype=np.float32).reshape(2, 3) / 10,
            "b": np.array([0.5, -0.5], dtype=np.float32),
            "steps": np.array(4, dtype=np.int64),
        }
    )


def delta(scale: float) -> ParameterSet:
    return ParameterSet(
        {
            "w": np.full((2, 3), scale, dtype=np.float32),
            "b": np.array([scale, -scale], dtype=np.float32),
            "steps": np.array(1, dtype=np.int64),
        }
    )


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def make_aggregator(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[Clock], Aggregator]]:
    """Return a factory; with a SQL store, each call is a fresh process on the same database."""
    stores: list[MemoryStore | SqlStore] = []
    url = None if request.param == "memory" else request.getfixturevalue(f"{request.param}_url")

    def make(clock: Clock) -> Aggregator:
        if url is None:
            return Aggregator(MemoryStore(), MemoryBlobStore(), clock=clock)
        store = SqlStore.open(url)
        stores.append(store)
        return Aggregator(store, FileBlobStore(tmp_path / "blobs"), clock=clock)

    yield make
    for store in stores:
        store.close()


def dp_section(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "mode": "central",
        "epsilon": 50.0,
        "delta": 1e-3,
        "clip_norm": 1.0,
        "noise_multiplier": 0.8,
        "sampling_rate": 1.0,
        "noise_seed": 11,
    }
    return base | overrides


def create(agg: Aggregator, dp: dict[str, Any] | None, **overrides: Any) -> str:
    fields: dict[str, Any] = {
        "name": "dp",
        "rounds": 3,
        "clients_per_round": 3,
        "min_clients": 2,
        "round_timeout_s": 30,
        "checkin_wait_s": 10,
        "seed": 5,
        "dp": dp,
    }
    data = wire.encode(model())
    staged = agg.blobs.stage(len(data))
    staged.write(data)
    return agg.create_federation(parse_settings(fields | overrides), staged).id


def enroll(agg: Aggregator, federation_id: str, count: int) -> list[str]:
    tokens, _ = agg.access.create_enrollment_tokens(federation_id, count, 60)
    return [agg.access.enroll(t).client_id for t in tokens]


def train_round(agg: Aggregator, fid: str, clients: list[str], scale: float) -> int:
    """Let every client check in and, when sampled, upload; return how many trained."""
    trained = 0
    for index, client in enumerate(clients):
        transport = InProcessTransport(agg, client)
        task = transport.fetch_task(fid)
        if task.action is TaskAction.TRAIN and task.round is not None:
            meta = UpdateMeta(num_examples=10 + index)
            transport.submit_update(fid, task.round, delta(scale * (index + 1)), meta)
            trained += 1
    return trained


def library_epsilon(rounds: int, q: float, z: float, delta_: float) -> float:
    """ε of `rounds` Poisson-sampled Gaussian rounds, composed one by one in dp-accounting."""
    accountant = dpa.rdp.RdpAccountant()
    for _ in range(rounds):
        accountant.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)))
    return float(accountant.get_epsilon(delta_))


def clip(update: ParameterSet, norm: float) -> dict[str, np.ndarray]:
    floats = {n: np.asarray(a, np.float64) for n, a in update.items() if n != "steps"}
    total = np.sqrt(sum(float(np.sum(a * a)) for a in floats.values()))
    factor = min(1.0, norm / total)
    return {n: a * factor for n, a in floats.items()}


# --- the released model ----------------------------------------------------------


def test_dp_round_releases_clipped_sum_plus_noise_over_q_times_n(
    make_aggregator: Callable[[Clock], Aggregator],
) -> None:
    agg = make_aggregator(Clock(start=2_000_000.0))
    fid = create(agg, dp_section(clip_norm=0.5), rounds=1)
    clients = enroll(agg, fid, 3)
    agg.start(fid)
    assert train_round(agg, fid, clients, 0.1) == 3

    fed = agg.get_federation(fid)
    assert fed.status is FederationStatus.FINISHED
    released = agg.load_model(fid, fed.model_version)
    # The noise of round 1, as documented in aggregator.privacy: seed [noise_seed, round, 1],
    # one draw per float tensor in model order, std z·C.
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([11, 1, 1])))
    clipped = [clip(delta(0.1 * (i + 1)), 0.5) for i in range(3)]
    for name in ("w", "b"):
        noisy_sum = sum(c[name] for c in clipped) + rng.normal(0.0, 0.8 * 0.5, model()[name].shape)
        expected = model()[name].astype(np.float64) + noisy_sum / (1.0 * 3)
        np.testing.assert_allclose(released[name], expected, rtol=1e-6, atol=1e-7)
    assert int(released["steps"]) == 4  # integer buffers are never read from DP updates


def test_secure_noise_is_not_flagged_seeded(
    make_aggregator: Callable[[Clock], Aggregator],
) -> None:
    agg = make_aggregator(Clock(start=2_000_000.0))
    fid = create(agg, dp_section(noise_seed=None), rounds=1)
    clients = enroll(agg, fid, 3)
    agg.start(fid)
    train_round(agg, fid, clients, 0.2)
    rnd = agg.get_round(fid, 1)
    assert rnd.status is RoundStatus.CLOSED
    assert rnd.privacy is not None
    assert not rnd.privacy.seeded
    with agg.open_model(fid, agg.get_federation(fid).model_version) as blob:
        _, metadata = wire.decode(blob.read())
    assert "fedcore.dp_seeded" not in metadata


def test_seeded_runs_are_reproducible_and_flagged(
    make_aggregator: Callable[[Clock], Aggregator],
) -> None:
    agg = make_aggregator(Clock(start=2_000_000.0))
    released = []
    for _ in range(2):
        fid = create(agg, dp_section(), rounds=1)
        clients = enroll(agg, fid, 3)
        agg.start(fid)
        train_round(agg, fid, clients, 0.2)
        version = agg.get_federation(fid).model_version
        released.append(agg.load_model(fid, version))
        with agg.open_model(fid, version) as blob:
            _, metadata = wire.decode(blob.read())
        assert metadata["fedcore.dp_seeded"] == "true"
        rnd = agg.get_round(fid, 1)
        assert rnd.privacy is not None
        assert rnd.privacy.seeded
        assert agg.privacy(fid).dp is not None
    for name in ("w", "b"):
        np.testing.assert_array_equal(released[0][name], released[1][name])


# --- ε ---------------------------------------------------------------------------


def test_reported_epsilon_equals_dp_accounting_for_the_same_rounds(
    make_aggregator: Callable[[Clock], Aggregator],
) -> None:
    q, z, delta_ = 0.5, 1.3, 1e-3
    agg = make_aggregator(Clock(start=2_000_000.0))
    fid = create(agg, dp_section(sampling_rate=q, noise_multiplier=z, delta=delta_), rounds=4)
    clients = enroll(agg, fid, 6)
    agg.start(fid)
    for _ in range(4):
        train_round(agg, fid, clients, 0.05)
    assert agg.get_federation(fid).status is FederationStatus.FINISHED

    rounds = agg.list_rounds(fid)
    assert [r.status for r in rounds] == [RoundStatus.CLOSED] * 4
    for number, rnd in enumerate(rounds, start=1):
        assert rnd.metrics["epsilon"] == pytest.approx(
            library_epsilon(number, q, z, delta_), abs=1e-9
        )
    report = agg.privacy(fid)
    assert report.epsilon_spent == pytest.approx(library_epsilon(4, q, z, delta_), abs=1e-9)
    assert [r.round for r in report.rounds] == [1, 2, 3, 4]
    assert report.dp is not None
    assert report.dp.noise_multiplier == z


def test_poisson_cohorts_sample_every_enrolled_client_without_check_ins(
    make_aggregator: Callable[[Clock], Aggregator],
) -> None:
    agg = make_aggregator(Clock(start=2_000_000.0))
    fid = create(agg, dp_section(sampling_rate=1.0), rounds=1)
    enroll(agg, fid, 4)
    clients = [c.id for c in agg.list_clients(fid)]  # enrollment order, ties by id
    agg.access.revoke_client(fid, clients[3])
    agg.start(fid)  # nobody has checked in
    rnd = agg.get_round(fid, 1)
    assert rnd.status is RoundStatus.TRAINING
    assert rnd.cohort == tuple(clients[:3])
    assert rnd.privacy is not None
    assert rnd.privacy.population == 3


def test_the_cohort_is_the_documented_poisson_sample(
    make_aggregator: Callable[[Clock], Aggregator],
) -> None:
    agg = make_aggregator(Clock(start=2_000_000.0))
    fid = create(agg, dp_section(sampling_rate=0.4, noise_seed=3), rounds=1)
    enroll(agg, fid, 12)
    clients = [c.id for c in agg.list_clients(fid)]
    agg.start(fid)
    cohort = agg.get_round(fid, 1).cohort
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([3, 1, 0])))
    keep = rng.random(12) < 0.4
    assert cohort == tuple(c for c, kept in zip(clients, keep, strict=True) if kept)
    assert 0 < len(cohort) < 12


def test_an_empty_poisson_cohort_closes_at_once_releasing_noise_only(
    make_aggregator: Callable[[Clock], Aggregator],
) -> None:
    settings = parse_settings(
        {"name": "x", "rounds": 1, "clients_per_round": 1, "dp": dp_section(sampling_rate=0.05)}
    )
    assert settings.dp is not None
    seed = next(
        s
        for s in range(100)
        if not sample_cohort_poisson(settings.dp.model_copy(update={"noise_seed": s}), ["a"],
                                     round_number=1)
    )  # fmt: skip
    agg = make_aggregator(Clock(start=2_000_000.0))
    fid = create(agg, dp_section(sampling_rate=0.05, noise_seed=seed), rounds=1)
    enroll(agg, fid, 1)
    agg.start(fid)
    rnd = agg.get_round(fid, 1)
    assert rnd.status is RoundStatus.CLOSED
    assert rnd.cohort == ()
    assert rnd.metrics["clients"] == 0
    assert rnd.metrics["epsilon"] > 0
    fed = agg.get_federation(fid)
    assert fed.status is FederationStatus.FINISHED
    released = agg.load_model(fid, fed.model_version)
    assert not np.array_equal(released["w"], model()["w"])


def test_dp_round_closes_at_its_deadline_with_fewer_updates_than_min_clients(
    make_aggregator: Callable[[Clock], Aggregator],
) -> None:
    clock = Clock(start=2_000_000.0)
    agg = make_aggregator(clock)
    fid = create(agg, dp_section(), rounds=1, min_clients=3)
    clients = enroll(agg, fid, 3)
    agg.start(fid)
    train_round(agg, fid, clients[:1], 0.1)
    assert agg.get_round(fid, 1).status is RoundStatus.TRAINING
    clock.now += 31
    agg.tick()
    rnd = agg.get_round(fid, 1)
    assert rnd.status is RoundStatus.CLOSED
    assert rnd.metrics["clients"] == 1
    with pytest.raises(RoundStateError):
        train_round_of(agg, fid, clients[1])


def train_round_of(agg: Aggregator, fid: str, client: str) -> None:
    InProcessTransport(agg, client).submit_update(fid, 1, delta(0.1), UpdateMeta(num_examples=1))


def test_a_stopped_round_releases_and_spends_nothing(
    make_aggregator: Callable[[Clock], Aggregator],
) -> None:
    agg = make_aggregator(Clock(start=2_000_000.0))
    fid = create(agg, dp_section(), rounds=2)
    clients = enroll(agg, fid, 3)
    agg.start(fid)
    train_round(agg, fid, clients[:2], 0.1)
    agg.stop(fid)
    rnd = agg.get_round(fid, 1)
    assert rnd.status is RoundStatus.FAILED
    assert rnd.privacy is not None
    assert rnd.privacy.events == ()
    report = agg.privacy(fid)
    assert report.epsilon_spent == 0.0
    assert report.rounds == ()


def test_adaptive_clip_norm_moves_and_the_next_round_uses_the_stored_one(
    make_aggregator: Callable[[Clock], Aggregator],
) -> None:
    agg = make_aggregator(Clock(start=2_000_000.0))
    adaptive = dp_section(clipping="adaptive", clip_norm=0.01, count_noise_std=2.0)
    fid = create(agg, adaptive, rounds=2)
    clients = enroll(agg, fid, 3)
    agg.start(fid)
    train_round(agg, fid, clients, 0.3)
    first = agg.get_round(fid, 1).privacy
    second = agg.get_round(fid, 2).privacy
    assert first is not None
    assert second is not None
    assert first.clip_norm == 0.01
    assert first.noisy_fraction is not None
    assert first.next_clip_norm is not None
    assert first.next_clip_norm != 0.01
    assert second.clip_norm == first.next_clip_norm


# --- the budget --------------------------------------------------------------------


def test_federation_stops_with_budget_exhausted_where_the_accountant_says(
    make_aggregator: Callable[[Clock], Aggregator],
) -> None:
    q, z, delta_, target = 1.0, 2.0, 1e-3, 4.0
    fits = next(k for k in range(1, 100) if library_epsilon(k + 1, q, z, delta_) > target)
    assert fits >= 2
    agg = make_aggregator(Clock(start=2_000_000.0))
    dp = dp_section(sampling_rate=q, noise_multiplier=z, delta=delta_, epsilon=target)
    fid = create(agg, dp, rounds=50)
    clients = enroll(agg, fid, 3)
    agg.start(fid)
    for _ in range(fits + 2):
        train_round(agg, fid, clients, 0.1)

    fed = agg.get_federation(fid)
    assert fed.status is FederationStatus.BUDGET_EXHAUSTED
    rounds = agg.list_rounds(fid)
    assert [r.status for r in rounds] == [RoundStatus.CLOSED] * fits
    spent = agg.privacy(fid).epsilon_spent
    assert spent == pytest.approx(library_epsilon(fits, q, z, delta_), abs=1e-9)
    assert spent is not None
    assert spent <= target
    task = InProcessTransport(agg, clients[0]).fetch_task(fid)
    assert task.action is TaskAction.FINISHED
    with pytest.raises(FederationStateError, match="budget_exhausted"):
        agg.start(fid)
    assert agg.stop(fid).status is FederationStatus.BUDGET_EXHAUSTED

    again = make_aggregator(Clock(start=2_000_000.0))  # a new process on the same database
    if isinstance(again.store, SqlStore):
        assert again.privacy(fid).epsilon_spent == spent
        assert again.get_federation(fid).status is FederationStatus.BUDGET_EXHAUSTED
        assert len(again.list_rounds(fid)) == fits


# --- configuration ---------------------------------------------------------------


def test_invalid_dp_settings_are_refused_with_every_problem_listed() -> None:
    bad = dp_section(mode="distributed", epsilon=-1.0, delta=2.0, sampling_rate=None)
    with pytest.raises(ConfigError) as caught:
        parse_settings({"name": "x", "rounds": 0, "clients_per_round": 1, "dp": bad})
    problems = caught.value.problems
    assert any(p.startswith("rounds:") for p in problems), problems
    for fragment in (
        "dp: distributed mode needs min_survivors",
        "dp: epsilon must be",
        "dp: delta must be",
        "dp: sampling_rate is required",
        "dp: distributed mode needs secure aggregation",
    ):
        assert any(p.startswith(fragment) for p in problems), (fragment, problems)

    with pytest.raises(ConfigError) as caught:
        parse_settings(
            {"name": "", "rounds": 1, "clients_per_round": 1, "dp": {"mode": "x", "extra": 1}}
        )
    problems = caught.value.problems
    for fragment in ("name:", "dp.mode:", "dp.extra:", "dp.epsilon:", "dp.clip_norm:"):
        assert any(p.startswith(fragment) for p in problems), (fragment, problems)


def test_a_budget_too_small_for_one_round_is_refused_at_creation() -> None:
    agg = Aggregator(MemoryStore(), MemoryBlobStore())
    with pytest.raises(ConfigError, match="one round spends"):
        create(agg, dp_section(epsilon=0.01, noise_multiplier=0.5))
    with pytest.raises(ConfigError, match="no noise multiplier"):
        # δ tiny: otherwise dp-accounting's conversion rounds ε down to 0 for a huge z.
        create(agg, dp_section(epsilon=1e-3, delta=1e-12, noise_multiplier=None, rounds=10))
    assert agg.list_federations() == []


def test_noise_multiplier_is_calibrated_once_and_stored(tmp_path: Path) -> None:
    store = SqlStore.open(f"sqlite:///{tmp_path / 'db.sqlite'}")
    agg = Aggregator(store, MemoryBlobStore())
    fid = create(agg, dp_section(noise_multiplier=None, sampling_rate=0.5, epsilon=3.0), rounds=7)
    expected = calibrate_noise_multiplier(
        DpConfig(mode="central", epsilon=3.0, delta=1e-3, clip_norm=1.0).budget(),
        sampling_rate=0.5,
        rounds=7,
    )
    stored = FederationSettings.model_validate_json(agg.get_federation(fid).config_json)
    store.close()
    assert stored.dp is not None
    assert stored.dp.noise_multiplier == expected
    assert stored.dp.rounds == 7  # calibrated for the federation's rounds


def test_start_checks_the_dp_settings_against_the_enrolled_clients(
    make_aggregator: Callable[[Clock], Aggregator],
) -> None:
    agg = make_aggregator(Clock(start=2_000_000.0))
    fid = create(agg, dp_section(delta=0.3))
    with pytest.raises(ConfigError, match="no enrolled clients"):
        agg.start(fid)
    clients = enroll(agg, fid, 4)
    with pytest.raises(ConfigError, match=r"below 1/num_clients \(1/4\)"):
        agg.start(fid)
    assert agg.get_federation(fid).status is FederationStatus.CREATED
    assert agg.list_rounds(fid) == []
    agg.access.revoke_client(fid, clients[0])  # δ = 0.3 < 1/3
    assert agg.start(fid).status is FederationStatus.RUNNING


def test_federations_without_dp_report_no_privacy() -> None:
    agg = Aggregator(MemoryStore(), MemoryBlobStore())
    fid = create(agg, None)
    report = agg.privacy(fid)
    assert report.dp is None
    assert report.epsilon_spent is None
    assert report.status is FederationStatus.CREATED


def test_dp_sgd_is_configured_through_dp_only() -> None:
    dpsgd = {"max_grad_norm": 1.0, "noise_multiplier": 1.0, "target_epsilon": 1.0, "delta": 1e-5}
    with pytest.raises(ConfigError) as caught:
        parse_settings(
            {"name": "x", "rounds": 1, "clients_per_round": 1, "train": {"dpsgd": dpsgd}}
        )
    assert any(
        p.startswith("train.dpsgd: turn DP-SGD on with dp.mode") for p in caught.value.problems
    )
    local = parse_settings(
        {
            "name": "x",
            "rounds": 2,
            "clients_per_round": 1,
            "dp": {"mode": "local", "epsilon": 2.0, "delta": 1e-5, "clip_norm": 1.0},
        }
    )
    assert local.client_level_dp is None  # the clients run and account it
