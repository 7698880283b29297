"""What the server sees: uniform masked inputs, uncorrelated with updates, never an update."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from privacy.secagg import (
    ClientIdentity,
    KeyRoster,
    MaskedInput,
    Quantization,
    RoundSetup,
    SecAggClient,
    SecAggServer,
    ShareDelivery,
    UnmaskRequest,
)

CLIENTS = 8
LENGTH = 20_000
BUCKETS = 64
# Chi-square critical value, 63 degrees of freedom, p = 1e-4 (scipy.stats.chi2.ppf).
CHI2_CRITICAL = 113.5


def seeded_entropy(label: str) -> Callable[[int], bytes]:
    key = hashlib.sha256(label.encode()).digest()
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return lambda size: stream.update(bytes(size))


def run_to_masked_input() -> tuple[
    SecAggServer, dict[str, SecAggClient], dict[str, np.ndarray], dict[str, MaskedInput]
]:
    quantization = Quantization(clip=1.0, value_bits=10)
    cohort = tuple(f"c{i}" for i in range(CLIENTS))
    setup = RoundSetup(
        federation_id="fed",
        round=1,
        cohort=cohort,
        degree=CLIENTS - 1,
        threshold=5,
        graph_seed=bytes(32),
        vector_length=LENGTH,
        quantization=quantization,
        ring_bits=quantization.ring_bits(CLIENTS),
    )
    identities = {
        c: ClientIdentity(
            c, Ed25519PrivateKey.from_private_bytes(hashlib.sha256(c.encode()).digest())
        )
        for c in cohort
    }
    registry = {c: i.public_key for c, i in identities.items()}
    clients = {
        c: SecAggClient(identities[c], setup=setup, registry=registry, entropy=seeded_entropy(c))
        for c in cohort
    }
    server = SecAggServer(setup, registry)
    for c, client in clients.items():
        assert server.receive(c, client.advertise_keys().to_bytes()).accepted
    rosters = server.close_stage().outbox
    for c, client in clients.items():
        roster = rosters[c]
        assert isinstance(roster, KeyRoster)
        assert server.receive(c, client.share_keys(roster).to_bytes()).accepted
    deliveries = server.close_stage().outbox
    # Structured updates, far from uniform: a ramp, a constant, a sparse spike train.
    ramp = np.linspace(-1, 1, LENGTH)
    updates = {
        c: [ramp, np.full(LENGTH, 0.25), (np.arange(LENGTH) % 97 == 0) * 0.9][i % 3]
        for i, c in enumerate(cohort)
    }
    masked = {}
    for i, (c, client) in enumerate(clients.items()):
        delivery = deliveries[c]
        assert isinstance(delivery, ShareDelivery)
        masked[c] = client.masked_input(
            delivery, updates[c], weight=1.0, rng=np.random.default_rng(i)
        )
        assert server.receive(c, masked[c].to_bytes()).accepted
    return server, clients, updates, masked


def test_each_masked_input_is_uniform_in_the_ring_and_uncorrelated_with_its_update() -> None:
    server, _, updates, masked = run_to_masked_input()
    bits = server.setup.ring_bits
    for client, message in masked.items():
        values = message.values()[:-1]
        assert values.max() < 1 << bits
        counts = np.bincount((values >> (bits - 6)).astype(np.int64), minlength=BUCKETS)
        expected = values.size / BUCKETS
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < CHI2_CRITICAL, (client, chi2)
        if np.ptp(updates[client]) > 0:  # a constant update correlates with nothing
            correlation = np.corrcoef(values.astype(np.float64), updates[client])[0, 1]
            assert abs(correlation) < 4 / np.sqrt(values.size), (client, correlation)


def test_unmasked_codes_would_fail_the_uniformity_test() -> None:
    # The statistics above can fail: the same test on the codes themselves.
    quantization = Quantization(clip=1.0, value_bits=10)
    bits = quantization.ring_bits(CLIENTS)
    codes = quantization.encode(
        np.linspace(-1, 1, LENGTH), weight=1.0, rng=np.random.default_rng(0)
    )
    counts = np.bincount((codes[:-1] >> (bits - 6)).astype(np.int64), minlength=BUCKETS)
    expected = LENGTH / BUCKETS
    assert float(((counts - expected) ** 2 / expected).sum()) > CHI2_CRITICAL
    ramp = np.linspace(-1, 1, LENGTH)
    assert np.corrcoef(codes[:-1].astype(np.float64), ramp)[0, 1] > 0.99


def arrays_in(value: object, seen: set[int] | None = None) -> Iterator[np.ndarray | bytes]:
    """Every array and byte string reachable from `value` (containers, slotted objects)."""
    seen = set() if seen is None else seen
    if id(value) in seen or callable(value):
        return
    seen.add(id(value))
    if isinstance(value, np.ndarray | bytes):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from arrays_in(key, seen)
            yield from arrays_in(item, seen)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from arrays_in(item, seen)
    else:
        for cls in type(value).__mro__:
            for name in getattr(cls, "__slots__", ()):
                if hasattr(value, name):
                    yield from arrays_in(getattr(value, name), seen)


def test_the_server_never_holds_an_unmasked_individual_update() -> None:
    server, clients, updates, masked = run_to_masked_input()
    setup = server.setup
    codes = {
        c: setup.quantization.encode(updates[c], weight=1.0, rng=np.random.default_rng(i))
        for i, c in enumerate(clients)
    }
    held = list(arrays_in(server))
    assert held, "the walk must see the server's state"
    # The masked inputs were folded into one running sum as they arrived.
    vectors = [a for a in held if isinstance(a, np.ndarray) and a.size == LENGTH + 1]
    assert len(vectors) == 1
    for c in clients:
        raw = codes[c].astype(np.uint32).tobytes()
        assert not any(isinstance(a, bytes) and raw in a for a in held)
        assert not any(np.array_equal(v, codes[c]) for v in vectors)
        assert not any(isinstance(a, bytes) and a == masked[c].data for a in held)
    # Finish the round: then the server holds the sum, still no individual update.
    requests = server.close_stage().outbox
    for c, client in clients.items():
        request = requests[c]
        assert isinstance(request, UnmaskRequest)
        assert server.receive(c, client.unmask(request).to_bytes()).accepted
    server.close_stage()
    total = sum(codes[c].astype(np.uint64) for c in clients) % (1 << setup.ring_bits)
    np.testing.assert_array_equal(server.result().ring_sum, total)
    held = [a for a in arrays_in(server) if isinstance(a, np.ndarray) and a.size == LENGTH + 1]
    assert not any(np.array_equal(a, codes[c]) for a in held for c in clients)
