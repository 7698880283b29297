"""SecAgg+ graph parameters (Bell et al. 2020) and the seeded Harary neighbour graph."""

from __future__ import annotations

import hashlib
import math

import pytest

from privacy.secagg import GraphParameters, NeighbourGraph, ThreatModel, choose_parameters


@pytest.mark.parametrize(
    ("clients", "corrupt", "dropout", "degree", "threshold"),
    [
        # Published by Google's SecAgg+ parameter finder for a semi-malicious
        # server, sigma = 40, eta = 20 (federated-compute,
        # fcp/secagg/server/graph_parameter_finder_test.cc).
        (100, 0.05, 0.33, 72, 39),
        (1000, 0.05, 0.33, 398, 223),
        (10000, 0.05, 0.33, 746, 420),
        (100, 0.33, 0.05, 42, 37),
        (1000, 0.33, 0.05, 132, 109),
        (100, 0.3, 0.3, 92, 62),
        (1000, 0.3, 0.3, 872, 584),
    ],
)
def test_parameters_match_the_published_semi_malicious_values(
    clients: int, corrupt: float, dropout: float, degree: int, threshold: int
) -> None:
    threat = ThreatModel(corrupt_fraction=corrupt, dropout_fraction=dropout)
    assert choose_parameters(clients, threat) == GraphParameters(degree, threshold)


def test_small_cohorts_are_built_to_survive_a_dropout() -> None:
    # Rounding delta * n down (as Google's finder) would give 8 clients with
    # delta = 0.1 the graph k = t = 2, which fails at the first dropout.
    threat = ThreatModel(corrupt_fraction=0.05, dropout_fraction=0.1)
    for clients in range(5, 41):
        p = choose_parameters(clients, threat)
        assert p.degree - p.threshold >= 1, clients


def test_degree_grows_logarithmically_and_threshold_is_a_majority() -> None:
    threat = ThreatModel(corrupt_fraction=0.05, dropout_fraction=0.1)
    degrees = {}
    for clients in (3, 4, 5, 8, 13, 40, 100, 500, 1000, 10000, 100000):
        p = choose_parameters(clients, threat)
        assert 2 * p.threshold > p.degree, clients
        assert 2 <= p.threshold <= p.degree <= clients - 1
        assert p.degree == clients - 1 or p.degree % 2 == 0
        degrees[clients] = p.degree
    assert degrees[3] == 2  # complete graph for tiny cohorts
    assert degrees[100000] < 150  # O(log n), not O(n)
    assert degrees[10000] - degrees[1000] < 40


def test_complete_graph_threshold_outvotes_the_corrupt_clients() -> None:
    threat = ThreatModel(corrupt_fraction=0.2, dropout_fraction=0.1)
    complete = 0
    for clients in range(3, 30):
        p = choose_parameters(clients, threat)
        if p.degree == clients - 1:
            complete += 1
            assert 2 * p.threshold > p.degree + math.ceil(0.2 * clients)
    assert complete >= 2


def test_invalid_threat_models_and_cohorts_are_refused() -> None:
    with pytest.raises(ValueError, match=r"at most 0\.9"):
        ThreatModel(corrupt_fraction=0.3, dropout_fraction=0.4)
    with pytest.raises(ValueError, match="corrupt_fraction"):
        ThreatModel(corrupt_fraction=-0.1)
    with pytest.raises(ValueError, match="at least 3"):
        choose_parameters(2)


def graph(n: int, degree: int, seed: bytes = b"s" * 32) -> NeighbourGraph:
    return NeighbourGraph([f"c{i:03d}" for i in range(n)], degree=degree, seed=seed)


@pytest.mark.parametrize(("n", "degree"), [(3, 2), (10, 4), (40, 10), (41, 40), (101, 26)])
def test_neighbourhoods_are_symmetric_of_the_degree_and_exclude_self(n: int, degree: int) -> None:
    g = graph(n, degree)
    for i in range(n):
        client = f"c{i:03d}"
        neighbours = g.neighbours(client)
        assert len(neighbours) == degree
        assert client not in neighbours
        assert all(client in g.neighbours(v) for v in neighbours)


def test_graph_is_a_function_of_the_public_seed() -> None:
    first, again, other = graph(50, 6), graph(50, 6), graph(50, 6, seed=b"t" * 32)
    ids = [f"c{i:03d}" for i in range(50)]
    assert all(first.neighbours(c) == again.neighbours(c) for c in ids)
    assert any(first.neighbours(c) != other.neighbours(c) for c in ids)
    assert [first.index(c) for c in ids] == list(range(1, 51))


def test_permutation_places_a_client_uniformly_on_the_ring() -> None:
    # Over 2000 seeds, client c000's neighbourhood in H(10, 2) should be each
    # pair of others about equally often: chi-square over the 9 neighbours.
    counts = dict.fromkeys([f"c{i:03d}" for i in range(1, 10)], 0)
    for s in range(2000):
        seed = hashlib.sha256(s.to_bytes(4, "big")).digest()
        for v in graph(10, 2, seed).neighbours("c000"):
            counts[v] += 1
    expected = 2000 * 2 / 9
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 26.1  # chi-square, 8 degrees of freedom, p = 0.001


def test_graph_rejects_bad_degrees_and_duplicates() -> None:
    with pytest.raises(ValueError, match="degree"):
        graph(10, 3)
    with pytest.raises(ValueError, match="degree"):
        graph(10, 10)
    with pytest.raises(ValueError, match="distinct"):
        NeighbourGraph(["a", "a", "b"], degree=2, seed=bytes(32))
