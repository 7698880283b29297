"""The SecAgg+ neighbour graph and its degree and threshold.

SecAgg+ (Bell, Bonawitz, Gascón, Lepoint, Raykova, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", CCS 2020) replaces the complete
graph of SecAgg (Bonawitz et al., CCS 2017) with a sparse random graph: each
client masks with, and secret-shares its seeds among, only its k neighbours,
with k = O(log n). The graph is a Harary graph H(n, k) (a ring in which each
node is joined to the k/2 nearest nodes on either side) laid over a uniformly
random permutation of the cohort, as in Bell et al. and in Google's
implementation (federated-compute, `fcp/secagg/server/graph_parameter_finder.cc`).
The permutation comes from a public per-round seed, so every client computes
the same graph and checks its neighbour lists against it.

`choose_parameters` searches the smallest even k, and a threshold t, that
meet Bell et al.'s three conditions for n clients of which at most
gamma*n are corrupt and at most delta*n drop out (Bell et al.'s analyses
for a semi-honest and a semi-malicious server; the same search as Google's):

1. Security (sigma bits, split over two events, 2^-(sigma+1) each). The
   graph of honest, surviving clients stays connected: otherwise the server
   learns the sum of a component. Removing nodes disconnects H(n, k) only if
   two disjoint runs of k/2 ring-consecutive nodes are all removed; a union
   bound over the n(n-k-1)/2 pairs of runs gives the probability with the
   hypergeometric factor C(B, k) / C(n, k), B = gamma*n + delta*n.
2. Security. No client has too many corrupt neighbours: with the number of
   corrupt neighbours X ~ Hypergeometric(n, gamma*n, k) and t1 the smallest
   value with P[X > t1] <= 2^-(sigma+1)/n (union over clients), a curious
   server needs t > t1. A semi-malicious server may tell some neighbours of
   a client that it dropped and others that it survived, to collect both
   its seed shares and its key shares. The X corrupt neighbours give it both
   kinds; the k - X honest ones give one each, split between the kinds as
   the server likes; so it gets t of both only if 2t <= k + X. Hence
   2t > k + t1, i.e. t >= ceil((t1 + k - 1.25) / 2) + 1 (Google's rounding).
3. Correctness (eta bits). Each client keeps at least t surviving
   neighbours, so its secrets can be recovered: with the survivors
   S ~ Hypergeometric(n, (1-delta)*n, k), P[S < t] <= 2^-eta / n.

One deliberate difference from Google's finder, a conservative
approximation: the numbers of corrupt and dropped clients are gamma*n and
delta*n rounded up, not down, so that a small cohort with delta > 0 is built
to survive at least one dropout (rounding down, a cohort of 8 with delta =
0.1 would assume none and get k = t = 2, failing at the first dropout). When
gamma*n and delta*n are whole numbers, as in every published value the tests
pin, both give the same parameters.

When no k < n - 1 qualifies (small cohorts), the graph is complete
(k = n - 1) and t is the smallest value with 2t > k + gamma*n, the same
semi-malicious bound with the corrupt count taken at its worst.
Defaults: sigma = 40 and eta = 20, the values Bell et al. and Google use.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from privacy.secagg.transcript import frame

__all__ = ["GraphParameters", "NeighbourGraph", "ThreatModel", "choose_parameters"]

# Keeps floating-point error in gamma*n and delta*n from rounding a whole
# number up to the next one (as Google's kSmall).
_EPSILON = 1e-14


@dataclass(frozen=True, slots=True)
class ThreatModel:
    """Who may misbehave, and how sure the parameters must be.

    Attributes:
        corrupt_fraction: gamma, the largest fraction of the cohort that may
            collude with the server.
        dropout_fraction: delta, the largest fraction that may drop out.
        security_bits: sigma; privacy fails with probability at most 2^-sigma.
        correctness_bits: eta; the round fails with probability at most 2^-eta.
    """

    corrupt_fraction: float = 0.05
    dropout_fraction: float = 0.1
    security_bits: float = 40.0
    correctness_bits: float = 20.0

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.corrupt_fraction < 1:
            problems.append(f"corrupt_fraction {self.corrupt_fraction} is not in [0, 1)")
        if not 0 <= self.dropout_fraction < 1:
            problems.append(f"dropout_fraction {self.dropout_fraction} is not in [0, 1)")
        # Bell et al. (and Google) require gamma + 2 delta < 1 against a
        # semi-malicious server; 0.9 keeps a margin that makes k finite.
        if self.corrupt_fraction + 2 * self.dropout_fraction > 0.9:
            problems.append("corrupt_fraction + 2 * dropout_fraction must be at most 0.9")
        if self.security_bits <= 0 or self.correctness_bits <= 0:
            problems.append("security_bits and correctness_bits must be positive")
        if problems:
            raise ValueError("invalid threat model: " + "; ".join(problems))


@dataclass(frozen=True, slots=True)
class GraphParameters:
    """A neighbour degree k and a Shamir threshold t."""

    degree: int
    threshold: int


def _log_choose(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _hypergeometric_pmf(total: int, marked: int, sampled: int) -> list[float]:
    """P[X = x] for x = 0..sampled, X the marked items in a sample without replacement."""
    log_all = _log_choose(total, sampled)
    low, high = max(0, sampled - (total - marked)), min(sampled, marked)
    return [
        math.exp(_log_choose(marked, x) + _log_choose(total - marked, sampled - x) - log_all)
        if low <= x <= high
        else 0.0
        for x in range(sampled + 1)
    ]


def _disconnected_log_probability(n: int, k: int, removed: int) -> float:
    if k > removed:
        return -math.inf
    pairs = math.log(n) + math.log(n - k - 1) - math.log(2)
    return pairs + _log_choose(removed, k) - _log_choose(n, k)


def _security_quantile(n: int, corrupt: int, k: int, epsilon: float) -> int:
    """Smallest t1 with P[corrupt neighbours > t1] <= epsilon."""
    pmf = _hypergeometric_pmf(n, corrupt, k)
    tail = 0.0
    for x in range(k, -1, -1):
        tail += pmf[x]
        if tail > epsilon:
            return x
    return -1


def _correctness_limit(n: int, surviving: int, k: int, epsilon: float) -> int:
    """Largest t with P[surviving neighbours < t] < epsilon."""
    pmf = _hypergeometric_pmf(n, surviving, k)
    below = 0.0
    for x in range(k + 1):
        below += pmf[x]
        if below >= epsilon:
            return x
    return k


def _at_least(fraction: float, n: int) -> int:
    """The number of clients a fraction stands for, rounded up (see the module docstring)."""
    return math.ceil(fraction * n - _EPSILON)


def _harary_threshold(n: int, k: int, threat: ThreatModel) -> int | None:
    corrupt = _at_least(threat.corrupt_fraction, n)
    dropped = _at_least(threat.dropout_fraction, n)
    per_event = threat.security_bits + 1
    if _disconnected_log_probability(n, k, corrupt + dropped) >= -per_event * math.log(2):
        return None
    t1 = _security_quantile(n, corrupt, k, 2.0**-per_event / n)
    t1 = math.ceil((t1 + k - 1.25) / 2)
    surviving = n - dropped
    t2 = _correctness_limit(n, surviving, k, 2.0**-threat.correctness_bits / n)
    return max(t1 + 1, 2) if t2 > t1 else None


def choose_parameters(clients: int, threat: ThreatModel | None = None) -> GraphParameters:
    """Return the smallest SecAgg+ degree and its threshold for `clients` clients.

    Raises:
        ValueError: fewer than 3 clients (two clients learn each other's input
            from the sum), or a complete graph cannot reach the threshold.
    """
    threat = threat or ThreatModel()
    if clients < 3:
        raise ValueError(f"secure aggregation needs at least 3 clients, not {clients}")
    for degree in range(2, clients - 1, 2):
        threshold = _harary_threshold(clients, degree, threat)
        if threshold is not None:
            return GraphParameters(degree, threshold)
    degree = clients - 1
    corrupt = _at_least(threat.corrupt_fraction, clients)
    threshold = max((degree + corrupt) // 2 + 1, 2)
    if threshold > degree:
        raise ValueError(
            f"{clients} clients with corrupt_fraction {threat.corrupt_fraction} leave no "
            "safe threshold; sample more clients per round"
        )
    return GraphParameters(degree, threshold)


class NeighbourGraph:
    """The round's neighbour graph: H(n, k) over a seeded permutation of the cohort.

    With k = n - 1 the graph is complete. Client x-coordinates for Shamir
    sharing are the positions in the sorted cohort plus one.
    """

    __slots__ = ("_degree", "_index", "_position", "_ring")

    def __init__(self, cohort: Sequence[str], *, degree: int, seed: bytes) -> None:
        ordered = sorted(cohort)
        n = len(ordered)
        if len(set(ordered)) != n or n < 3:
            raise ValueError("the cohort must hold at least 3 distinct client ids")
        if not (degree == n - 1 or (degree % 2 == 0 and 2 <= degree < n - 1)):
            raise ValueError(f"degree {degree} is neither even in 2..{n - 2} nor {n - 1}")
        self._degree = degree
        self._index = {client: i + 1 for i, client in enumerate(ordered)}
        self._ring = _permute(ordered, seed)
        self._position = {client: p for p, client in enumerate(self._ring)}

    @property
    def degree(self) -> int:
        """The number of neighbours of every client."""
        return self._degree

    def index(self, client_id: str) -> int:
        """Return the Shamir x-coordinate of `client_id` (1..n)."""
        return self._index[client_id]

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._index

    def neighbours(self, client_id: str) -> frozenset[str]:
        """Return the neighbours of `client_id` (never the client itself)."""
        n = len(self._ring)
        if self._degree == n - 1:
            return frozenset(self._ring) - {client_id}
        p = self._position[client_id]
        half = self._degree // 2
        offsets = [d for step in range(1, half + 1) for d in (step, -step)]
        return frozenset(self._ring[(p + d) % n] for d in offsets)


def _permute(items: list[str], seed: bytes) -> list[str]:
    """Fisher-Yates shuffle driven by a ChaCha20 keystream keyed from `seed`.

    Each index is drawn exactly uniformly by rejection sampling 64-bit words
    (the biased top of the word range is redrawn), so the permutation is
    uniform up to the keystream's indistinguishability from random.
    """
    key = hashlib.sha256(frame("graph-permutation", seed)).digest()
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    order = list(items)
    for i in range(len(order) - 1, 0, -1):
        bound = i + 1
        limit = (1 << 64) - (1 << 64) % bound
        while True:
            word = int.from_bytes(stream.update(bytes(8)), "little")
            if word < limit:
                break
        j = word % bound
        order[i], order[j] = order[j], order[i]
    return order
