"""Whole SecAgg+ rounds with dropouts at every stage: the exact sum, or a clean failure."""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import os
from collections.abc import Callable

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from privacy.secagg import (
    ClientIdentity,
    Dropouts,
    Quantization,
    RoundFailed,
    RoundSetup,
    SecAggConfig,
    SimulatedClient,
    Stage,
    ThreatModel,
    choose_parameters,
    plan_round,
    simulate_round,
)


def seeded_entropy(label: str) -> Callable[[int], bytes]:
    """A reproducible stand-in for os.urandom (a ChaCha20 keystream)."""
    key = hashlib.sha256(label.encode()).digest()
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return lambda size: stream.update(bytes(size))


def identity(client_id: str) -> ClientIdentity:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    seed = hashlib.sha256(b"identity/" + client_id.encode()).digest()
    return ClientIdentity(client_id, Ed25519PrivateKey.from_private_bytes(seed))


def fleet(setup: RoundSetup, seed: int) -> tuple[list[SimulatedClient], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    clients, codes = [], {}
    q = setup.quantization
    for i, cid in enumerate(setup.cohort):
        update = rng.normal(0, q.clip, setup.vector_length)
        weight = float(rng.uniform(0, q.max_weight))
        codes[cid] = q.encode(update, weight=weight, rng=np.random.default_rng([seed, i]))
        clients.append(
            SimulatedClient(
                identity(cid),
                update,
                weight,
                rng=np.random.default_rng([seed, i]),
                entropy=seeded_entropy(f"{seed}/{cid}"),
            )
        )
    return clients, codes


def expected_outcome(setup: RoundSetup, dropouts: Dropouts) -> tuple[set[str] | None, set[str]]:
    """Predict the survivors (None: the round must fail) and the clients that refuse.

    A client refuses a stage's message when it names fewer than t neighbours
    (its roster, its delivered shares, its surviving neighbours); the server
    fails a stage that fewer than t clients complete, and the unmask stage
    when a needed secret has fewer than t revealed shares.
    """
    graph, t = setup.graph(), setup.threshold
    n = {c: graph.neighbours(c) for c in setup.cohort}
    silent = set(dropouts.advertise_keys)
    done = set(setup.cohort) - silent
    refused: set[str] = set()
    if len(done) < t:
        return None, refused
    for stage in (Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASK):
        silent |= dropouts.at(stage)
        senders = done - silent
        kept = {u for u in senders if len(n[u] & done) >= t}
        refused |= senders - kept
        if len(kept) < t:
            return None, refused
        if stage is Stage.SHARE_KEYS:
            shared = kept
        elif stage is Stage.MASKED_INPUT:
            survivors = kept
        else:
            responders = kept
        done = kept
    vanished = {u for u in shared - survivors if n[u] & survivors}
    recoverable = all(len(n[u] & responders) >= t for u in survivors | vanished)
    return (survivors if recoverable else None), refused


def check_round(setup: RoundSetup, dropouts: Dropouts, seed: int) -> bool:
    clients, codes = fleet(setup, seed)
    report = simulate_round(setup, clients, dropouts=dropouts)
    survivors, refused = expected_outcome(setup, dropouts)
    assert set(report.aborted) == refused
    assert not report.excluded  # every client here is honest
    if survivors is None:
        assert report.result is None
        assert report.failure
        return False
    assert report.failure is None, report.failure
    result = report.result
    assert result is not None
    assert set(result.survivors) == survivors
    expected = sum(codes[c].astype(np.uint64) for c in survivors) % (1 << setup.ring_bits)
    np.testing.assert_array_equal(result.ring_sum, expected)
    return True


def setup_for(n: int, degree: int, threshold: int, seed: int) -> RoundSetup:
    quantization = Quantization(clip=1.0, value_bits=10, max_weight=5.0)
    return RoundSetup(
        federation_id="fed",
        round=seed,
        cohort=tuple(f"client-{i:02d}" for i in range(n)),
        degree=degree,
        threshold=threshold,
        graph_seed=hashlib.sha256(seed.to_bytes(8, "big")).digest(),
        vector_length=7,
        quantization=quantization,
        ring_bits=quantization.ring_bits(n),
    )


@st.composite
def rounds(draw: st.DrawFn) -> tuple[RoundSetup, Dropouts, int]:
    n = draw(st.integers(3, 40))
    if draw(st.booleans()):
        threat = ThreatModel(
            corrupt_fraction=draw(st.sampled_from([0.0, 0.05, 0.1])),
            dropout_fraction=draw(st.sampled_from([0.1, 0.2, 0.3])),
        )
        p = choose_parameters(n, threat)
        degree, threshold = p.degree, p.threshold
    else:
        degree = draw(st.sampled_from([n - 1, *range(2, n - 1, 2)]))
        threshold = draw(st.integers(degree // 2 + 1, degree))
    seed = draw(st.integers(0, 2**32))
    setup = setup_for(n, degree, threshold, seed)
    ids = list(setup.cohort)
    cap = max(1, n // 3)
    stages = [
        frozenset(draw(st.lists(st.sampled_from(ids), max_size=cap // (2 if i != 2 else 1))))
        for i in range(4)
    ]
    return setup, Dropouts(*stages), seed


@settings(
    max_examples=45,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=rounds())
def test_dropouts_at_any_stage_give_the_exact_sum_or_the_predicted_failure(
    case: tuple[RoundSetup, Dropouts, int],
) -> None:
    setup, dropouts, seed = case
    succeeded = check_round(setup, dropouts, seed)
    event("exact sum" if succeeded else "clean failure")
    event("complete graph" if setup.degree == len(setup.cohort) - 1 else "sparse graph")
    if dropouts.masked_input:
        event("dropouts after share-keys")


def test_dropouts_between_share_keys_and_masked_input_are_unmasked_exactly() -> None:
    # The costly case: the server must rebuild the dropped clients' mask keys
    # and remove their pairwise masks from their survivors' inputs.
    setup = plan_round(
        SecAggConfig(64, Quantization(clip=1.0), ThreatModel(0.05, 0.3)),
        federation_id="fed",
        round=1,
        cohort=[f"c{i:02d}" for i in range(40)],
        graph_seed=bytes(32),
    )
    assert setup.degree < 39  # a sparse SecAgg+ graph, not a complete one
    vanished = frozenset(setup.cohort[::5])  # 8 of 40 clients
    assert check_round(setup, Dropouts(masked_input=vanished), seed=3)


def test_too_many_dropouts_fail_the_round_with_a_reason() -> None:
    setup = setup_for(12, 11, 7, seed=5)
    clients, _ = fleet(setup, 5)
    report = simulate_round(
        setup, clients, dropouts=Dropouts(masked_input=frozenset(setup.cohort[:6]))
    )
    assert report.result is None
    assert report.failure == "only 6 clients completed the masked-input stage; the threshold is 7"


def test_a_failed_round_raises_round_failed_from_the_server() -> None:
    from privacy.secagg import SecAggServer

    setup = setup_for(5, 4, 3, seed=6)
    server = SecAggServer(setup, {c: identity(c).public_key for c in setup.cohort})
    outcome = server.close_stage()
    assert outcome.failure is not None
    assert outcome.dropped == frozenset(setup.cohort)
    with pytest.raises(RoundFailed, match="only 0 clients"):
        server.result()
    assert not server.receive("client-00", b"late").accepted


def test_weighted_mean_of_a_round_approximates_plain_weighted_fedavg() -> None:
    setup = setup_for(10, 9, 6, seed=8)
    clients, _ = fleet(setup, 8)
    report = simulate_round(setup, clients)
    assert report.result is not None
    weights = np.array([c.weight for c in clients])
    plain = sum(w * np.clip(c.update, -1, 1) for w, c in zip(weights, clients, strict=True))
    step = 2 / setup.quantization.levels * setup.quantization.max_weight
    assert np.abs(report.result.weighted_sum - plain).max() <= 10 * step
    assert abs(report.result.total_weight - weights.sum()) <= 10 * 5.0 / 1023
    np.testing.assert_allclose(
        report.result.mean(), plain / weights.sum(), atol=20 * step / weights.sum()
    )


@pytest.mark.parametrize(
    "pool",
    [
        {"workers": 3},
        pytest.param(
            {"processes": 2},
            marks=pytest.mark.skipif(
                "fork" not in multiprocessing.get_all_start_methods(), reason="needs fork"
            ),
        ),
    ],
    ids=["threads", "processes"],
)
def test_a_round_on_a_pool_gives_the_same_outcome_as_on_one_thread(pool: dict[str, int]) -> None:
    setup = plan_round(
        SecAggConfig(300, Quantization(clip=1.0), ThreatModel(0.05, 0.3)),
        federation_id="fed",
        round=2,
        cohort=[f"c{i:02d}" for i in range(30)],
        graph_seed=bytes(range(32)),
    )
    # Some clients vanish after sharing keys: the server rebuilds their mask
    # keys and removes their pairwise masks.
    dropouts = Dropouts(masked_input=frozenset(setup.cohort[::6]))
    reports = []
    for options in ({}, pool):
        clients, _ = fleet(setup, 9)  # the same seeded randomness for both
        reports.append(simulate_round(setup, clients, dropouts=dropouts, **options))
    one, pooled = reports
    assert one.result is not None
    assert pooled.result is not None
    np.testing.assert_array_equal(one.result.ring_sum, pooled.result.ring_sum)
    assert one.result.survivors == pooled.result.survivors
    assert (one.failure, one.aborted, one.excluded) == (
        pooled.failure,
        pooled.aborted,
        pooled.excluded,
    )
    assert check_round(setup, dropouts, seed=9)
    assert pooled.client_seconds > 0
    assert pooled.server_seconds > 0


def test_a_pool_needs_at_least_one_worker_and_threads_or_processes_not_both() -> None:
    setup = setup_for(5, 4, 3, seed=1)
    clients, _ = fleet(setup, 1)
    with pytest.raises(ValueError, match="workers is 0"):
        simulate_round(setup, clients, workers=0)
    with pytest.raises(ValueError, match="processes is 0"):
        simulate_round(setup, clients, processes=0)
    with pytest.raises(ValueError, match="not both"):
        simulate_round(setup, clients, workers=2, processes=2)


def _exit_three(size: int) -> bytes:
    os._exit(3)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_worker_process_that_dies_is_reported() -> None:
    setup = setup_for(5, 4, 3, seed=1)
    clients, _ = fleet(setup, 1)
    # Client 1 lives in worker 1, which exits when the client draws its keys.
    dying = [clients[0], dataclasses.replace(clients[1], entropy=_exit_three), *clients[2:]]
    with pytest.raises(RuntimeError, match=r"secagg client worker 1 died \(exit code 3\)"):
        simulate_round(setup, dying, processes=2)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_client_that_fails_outside_the_protocol_in_a_worker_process_is_reported() -> None:
    setup = setup_for(5, 4, 3, seed=1)
    clients, _ = fleet(setup, 1)
    # A NaN update is a programming error, not a protocol refusal: the worker
    # reports it and the parent raises, naming the worker.
    broken = [
        *clients[:-1],
        dataclasses.replace(clients[-1], update=np.full_like(clients[-1].update, np.nan)),
    ]
    with pytest.raises(RuntimeError, match=r"secagg client worker 0 failed: .*"):
        simulate_round(setup, broken, processes=2)
