"""A malicious server, and malicious or broken clients, against the SecAgg+ state machines."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privacy.secagg import (
    AdvertiseKeys,
    ClientIdentity,
    ForwardedShare,
    KeyRoster,
    MalformedMessage,
    MaskedInput,
    ProtocolViolation,
    Quantization,
    RevealedShare,
    RoundSetup,
    SecAggClient,
    SecAggServer,
    ServerMessage,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)

N = 7
LENGTH = 12


def identity(client_id: str) -> ClientIdentity:
    seed = hashlib.sha256(b"id/" + client_id.encode()).digest()
    return ClientIdentity(client_id, Ed25519PrivateKey.from_private_bytes(seed))


def seeded_entropy(label: str) -> Callable[[int], bytes]:
    """A reproducible stand-in for os.urandom (a ChaCha20 keystream)."""
    key = hashlib.sha256(label.encode()).digest()
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return lambda size: stream.update(bytes(size))


def make_setup(round: int = 1, degree: int = N - 1, threshold: int = 4) -> RoundSetup:
    quantization = Quantization(clip=1.0, value_bits=8)
    return RoundSetup(
        federation_id="fed",
        round=round,
        cohort=tuple(f"c{i}" for i in range(N)),
        degree=degree,
        threshold=threshold,
        graph_seed=bytes(32),
        vector_length=LENGTH,
        quantization=quantization,
        ring_bits=quantization.ring_bits(N),
    )


class World:
    """An honest round driven stage by stage, with places to interfere."""

    def __init__(self, setup: RoundSetup | None = None) -> None:
        self.setup = setup or make_setup()
        self.identities = {c: identity(c) for c in self.setup.cohort}
        self.registry = {c: i.public_key for c, i in self.identities.items()}
        self.clients = {
            c: SecAggClient(
                self.identities[c],
                setup=self.setup,
                registry=self.registry,
                entropy=seeded_entropy(f"{self.setup.round}/{c}"),
            )
            for c in self.setup.cohort
        }
        self.server = SecAggServer(self.setup, self.registry)
        rng = np.random.default_rng(0)
        self.updates = {c: rng.uniform(-1, 1, LENGTH) for c in self.setup.cohort}
        self.outbox: Mapping[str, ServerMessage] = {}

    def codes(self, client: str) -> np.ndarray:
        i = self.setup.cohort.index(client)
        return self.setup.quantization.encode(
            self.updates[client], weight=1.0, rng=np.random.default_rng(i)
        )

    def reply(self, client: str) -> bytes:
        machine, message = self.clients[client], self.outbox.get(client)
        if isinstance(message, KeyRoster):
            return machine.share_keys(message).to_bytes()
        if isinstance(message, ShareDelivery):
            i = self.setup.cohort.index(client)
            rng = np.random.default_rng(i)
            return machine.masked_input(
                message, self.updates[client], weight=1.0, rng=rng
            ).to_bytes()
        if isinstance(message, UnmaskRequest):
            return machine.unmask(message).to_bytes()
        return machine.advertise_keys().to_bytes()

    def stage(self, skip: tuple[str, ...] = ()) -> None:
        """Every client (but `skip`) answers honestly, then the stage closes."""
        for client in sorted(set(self.outbox) | (set() if self.outbox else set(self.clients))):
            if client not in skip:
                verdict = self.server.receive(client, self.reply(client))
                assert verdict.accepted, (client, verdict.reason)
        outcome = self.server.close_stage()
        assert outcome.failure is None, outcome.failure
        self.outbox = outcome.outbox

    def finish(self, skip: tuple[str, ...] = (), *, exact: bool = True) -> None:
        self.stage(skip)
        if not exact:
            return
        survivors = self.server.result().survivors
        total = sum(self.codes(c).astype(np.uint64) for c in survivors) % (
            1 << self.setup.ring_bits
        )
        np.testing.assert_array_equal(self.server.result().ring_sum, total)


# A malicious server against an honest client.


def test_a_substituted_neighbour_key_is_rejected_by_its_signature() -> None:
    world = World()
    world.stage()
    roster = world.outbox["c0"]
    assert isinstance(roster, KeyRoster)
    mallory = ClientIdentity.generate("c1")  # the server's own key, posing as c1
    entry = roster.keys[0]
    fake = dataclasses.replace(entry, mask_key=bytes(range(32)))
    resigned = dataclasses.replace(fake, signature=mallory.sign(fake.signed_payload()))
    for forged in (fake, resigned, dataclasses.replace(fake, signature=bytes(64))):
        client = SecAggClient(world.identities["c0"], setup=world.setup, registry=world.registry)
        client.advertise_keys()
        keys = (forged, *roster.keys[1:])
        with pytest.raises(ProtocolViolation, match="not signed by its registered identity"):
            client.share_keys(dataclasses.replace(roster, keys=keys))
        assert client.aborted is not None
        with pytest.raises(ProtocolViolation, match="aborted"):
            client.advertise_keys()


def test_a_neighbour_listed_as_survived_and_dropped_gets_neither_share_twice() -> None:
    world = World()
    world.stage()
    world.stage()
    world.stage()
    request = world.outbox["c0"]
    assert isinstance(request, UnmaskRequest)
    both = dataclasses.replace(request, dropped=(*request.dropped, request.survivors[0]))
    with pytest.raises(ProtocolViolation, match="as survived and dropped"):
        world.clients["c0"].unmask(both)


def test_a_second_request_for_the_other_share_of_a_neighbour_is_refused() -> None:
    world = World()
    world.stage()
    world.stage()
    world.stage(skip=("c6",))  # c6 dropped before its masked input
    request = world.outbox["c0"]
    assert isinstance(request, UnmaskRequest)
    assert request.dropped == ("c6",)
    first = world.clients["c0"].unmask(request)
    assert [s.owner for s in first.key_shares] == ["c6"]
    assert world.clients["c0"].unmask(request) == first  # a retry gets the same answer
    # Now claim c6 survived after all, and c1 dropped: c6's seed share would
    # unmask c6 together with its key share.
    survivors = tuple(sorted({*request.survivors, "c6"} - {"c1"}))
    flipped = dataclasses.replace(request, survivors=survivors, dropped=("c1",))
    with pytest.raises(ProtocolViolation, match="already revealed; refusing"):
        world.clients["c0"].unmask(flipped)
    with pytest.raises(ProtocolViolation, match="aborted"):
        world.clients["c0"].unmask(request)


def test_any_different_second_unmask_request_is_refused() -> None:
    world = World()
    world.stage()
    world.stage()
    world.stage()
    request = world.outbox["c0"]
    assert isinstance(request, UnmaskRequest)
    world.clients["c0"].unmask(request)
    # Same sets, different order of survivors: still a different request.
    again = dataclasses.replace(request, survivors=tuple(reversed(request.survivors)))
    with pytest.raises(ProtocolViolation, match="second, different unmask request"):
        world.clients["c0"].unmask(again)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda r: dataclasses.replace(r, survivors=(*r.survivors, "stranger")), "never saw"),
        (lambda r: dataclasses.replace(r, survivors=r.survivors[1:]), "does not say what became"),
        (
            lambda r: dataclasses.replace(r, survivors=r.survivors[:3], dropped=r.survivors[3:]),
            "below",
        ),
        (lambda r: dataclasses.replace(r, survivors=(*r.survivors, r.survivors[0])), "twice"),
        (lambda r: dataclasses.replace(r, survivors=(*r.survivors, "c0")), "never saw"),
        (lambda r: dataclasses.replace(r, receiver="c1"), "addressed to 'c1'"),
        (lambda r: dataclasses.replace(r, round=2), "a replay"),
        (lambda r: dataclasses.replace(r, federation_id="other"), "a replay"),
    ],
)
def test_inconsistent_unmask_requests_are_refused(change: object, match: str) -> None:
    world = World()
    world.stage()
    world.stage()
    world.stage()
    request = world.outbox["c0"]
    with pytest.raises(ProtocolViolation, match=match):
        world.clients["c0"].unmask(change(request))  # type: ignore[operator]


def test_replayed_or_misaddressed_server_messages_are_refused() -> None:
    world = World()
    world.stage()
    roster = world.outbox["c0"]
    assert isinstance(roster, KeyRoster)
    old_round = World(make_setup(round=0))
    old_round.stage()
    for replay, match in (
        (old_round.outbox["c0"], "a replay"),
        (world.outbox["c1"], "addressed to 'c1'"),
        (dataclasses.replace(roster, keys=roster.keys[:3]), "below the threshold"),
        (dataclasses.replace(roster, keys=(*roster.keys, roster.keys[0])), "listed twice"),
    ):
        client = SecAggClient(world.identities["c0"], setup=world.setup, registry=world.registry)
        client.advertise_keys()
        with pytest.raises(ProtocolViolation, match=match):
            client.share_keys(replay)  # type: ignore[arg-type]
    # A message of another stage does not even decode as a roster.
    with pytest.raises(MalformedMessage, match="expected 'KeyRoster'"):
        KeyRoster.from_bytes(world.clients["c0"].advertise_keys().to_bytes())


def test_keys_replayed_from_another_round_inside_a_roster_are_refused() -> None:
    world, old = World(), World(make_setup(round=0))
    world.stage()
    old.stage()
    roster, stale = world.outbox["c0"], old.outbox["c0"]
    assert isinstance(roster, KeyRoster)
    assert isinstance(stale, KeyRoster)
    # Last round's keys and signature of a neighbour, relabelled as this round's.
    relabelled = dataclasses.replace(stale.keys[0], round=world.setup.round)
    mixed = dataclasses.replace(roster, keys=(relabelled, *roster.keys[1:]))
    with pytest.raises(ProtocolViolation, match="not signed by its registered identity"):
        world.clients["c0"].share_keys(mixed)


def test_a_tampered_share_is_never_revealed_and_the_round_still_succeeds() -> None:
    world = World()
    world.stage()
    world.stage()
    delivery = world.outbox["c0"]
    assert isinstance(delivery, ShareDelivery)
    first = delivery.shares[0]
    ciphertext = bytes([first.ciphertext[0] ^ 1]) + first.ciphertext[1:]
    tampered = (
        ForwardedShare(
            first.sender, ciphertext, first.key_share_commitment, first.seed_share_commitment
        ),
        *delivery.shares[1:],
    )
    world.outbox = {**world.outbox, "c0": dataclasses.replace(delivery, shares=tampered)}
    world.stage()
    request = world.outbox["c0"]
    assert isinstance(request, UnmaskRequest)
    response = world.clients["c0"].unmask(request)
    assert first.sender not in {s.owner for s in response.seed_shares}
    world.finish()


# Malicious or broken clients against the server.


def test_an_advertisement_with_a_swapped_key_is_excluded_and_the_round_continues() -> None:
    world = World()
    honest = AdvertiseKeys.from_bytes(world.reply("c3"))
    forged = dataclasses.replace(honest, mask_key=bytes(range(32)))
    verdict = world.server.receive("c3", forged.to_bytes())
    assert not verdict.accepted
    assert "not signed" in verdict.reason
    assert "not signed" in world.server.excluded["c3"]
    assert not world.server.receive("c3", honest.to_bytes()).accepted  # excluded for good
    world.stage(skip=("c3",))
    world.stage()
    world.stage()
    world.finish()
    assert "c3" not in world.server.result().survivors


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        (lambda m: dataclasses.replace(m, signature=bytes(64)), "not signed"),
        (lambda m: dataclasses.replace(m, round=0), "a replay"),
        (lambda m: dataclasses.replace(m, sender="c2"), "signed as 'c2'"),
        (lambda m: dataclasses.replace(m, cipher_key=bytes(32)), "not signed"),
        (lambda m: b"garbage", "not a secure aggregation message"),
    ],
)
def test_forged_advertisements_are_excluded_with_a_reason(forge: object, reason: str) -> None:
    world = World()
    message = AdvertiseKeys.from_bytes(world.reply("c1"))
    forged = forge(message)  # type: ignore[operator]
    data = forged if isinstance(forged, bytes) else forged.to_bytes()
    verdict = world.server.receive("c1", data)
    assert not verdict.accepted
    assert reason in verdict.reason
    assert world.server.excluded == {"c1": verdict.reason}


def test_a_reused_public_key_is_excluded() -> None:
    world = World()
    assert world.server.receive("c0", world.reply("c0")).accepted
    theirs = AdvertiseKeys.from_bytes(world.reply("c0"))
    mine = AdvertiseKeys.from_bytes(world.reply("c1"))
    copied = dataclasses.replace(mine, mask_key=theirs.mask_key, signature=bytes(64))
    copied = dataclasses.replace(
        copied, signature=world.identities["c1"].sign(copied.signed_payload())
    )
    verdict = world.server.receive("c1", copied.to_bytes())
    assert "already in use" in verdict.reason


def test_replaying_an_earlier_stage_message_excludes_the_client() -> None:
    world = World()
    adverts = {c: world.reply(c) for c in world.clients}
    world.stage()
    verdict = world.server.receive("c2", adverts["c2"])
    assert not verdict.accepted
    assert "expected 'ShareKeys'" in verdict.reason
    world.stage(skip=("c2",))
    world.stage()
    world.finish()


def test_shares_for_the_wrong_receivers_are_excluded() -> None:
    world = World()
    world.stage()
    message = ShareKeys.from_bytes(world.reply("c4"))
    moved = dataclasses.replace(message.shares[0], receiver="c4")
    bad = dataclasses.replace(message, shares=(moved, *message.shares[1:]))
    verdict = world.server.receive("c4", bad.to_bytes())
    assert "exactly the client's roster" in verdict.reason
    world.stage(skip=("c4",))
    world.stage()
    world.finish()


def test_malformed_masked_inputs_are_excluded_and_the_sum_stays_exact() -> None:
    world = World()
    world.stage()
    world.stage()
    good = MaskedInput.from_bytes(world.reply("c5"))
    short = dataclasses.replace(good, data=good.data[:-4])
    verdict = world.server.receive("c5", short.to_bytes())
    assert "expects 13 values" in verdict.reason
    world.stage(skip=("c5",))  # c5 excluded: treated as dropped after sharing keys
    world.finish()
    assert "c5" not in world.server.result().survivors


def test_masked_values_outside_the_ring_are_excluded() -> None:
    world = World()
    world.stage()
    world.stage()
    good = MaskedInput.from_bytes(world.reply("c5"))
    values = good.values().copy()
    values[0] = 1 << 31
    verdict = world.server.receive(
        "c5", dataclasses.replace(good, data=values.tobytes()).to_bytes()
    )
    assert "outside the ring" in verdict.reason


def test_a_forged_revealed_share_is_caught_by_the_dealer_commitment() -> None:
    world = World()
    world.stage()
    world.stage()
    world.stage()
    response = UnmaskResponse.from_bytes(world.reply("c0"))
    share = response.seed_shares[0]
    forged = RevealedShare(share.owner, bytes(len(share.share)))
    bad = dataclasses.replace(response, seed_shares=(forged, *response.seed_shares[1:]))
    verdict = world.server.receive("c0", bad.to_bytes())
    assert "does not match what" in verdict.reason
    world.finish(skip=("c0",))  # six honest responders are enough (t = 4)


def test_an_accepted_client_that_equivocates_keeps_its_input_and_leaves_the_round() -> None:
    world = World()
    world.stage()
    world.stage()
    for client in world.clients:
        assert world.server.receive(client, world.reply(client)).accepted
    other = MaskedInput.from_bytes(world.reply("c3"))
    changed = dataclasses.replace(other, data=bytes(len(other.data)))
    verdict = world.server.receive("c3", changed.to_bytes())
    assert "second, different" in verdict.reason
    assert world.server.receive("c3", world.reply("c3")).accepted is False
    world.outbox = world.server.close_stage().outbox
    assert "c3" not in world.outbox  # not asked to unmask
    world.finish()
    assert "c3" in world.server.result().survivors  # its masked input is in the sum


def test_exact_retries_are_accepted_idempotently() -> None:
    world = World()
    data = world.reply("c0")
    assert world.server.receive("c0", data).accepted
    assert world.server.receive("c0", data) == world.server.receive("c0", data)
    assert world.server.receive("c0", data).reason == "a repeat of the accepted message"
    assert not world.server.excluded


def test_messages_from_outside_the_cohort_are_refused_without_side_effects() -> None:
    world = World()
    verdict = world.server.receive("stranger", world.reply("c0"))
    assert not verdict.accepted
    assert not world.server.excluded


@settings(
    max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    stage=st.integers(0, 3),
    position=st.integers(0, 10_000),
    flip=st.integers(1, 255),
    cut=st.integers(0, 3),
)
def test_the_server_never_raises_on_mangled_bytes(
    stage: int, position: int, flip: int, cut: int
) -> None:
    world = World()
    for _ in range(stage):
        world.stage()
    data = bytearray(world.reply("c0"))
    data[position % len(data)] ^= flip
    mangled = bytes(data[: len(data) - cut])
    verdict = world.server.receive("c0", mangled)
    if not verdict.accepted:
        assert world.server.excluded["c0"] == verdict.reason
    # Whatever happened to c0, the others finish the round. A bit flipped in
    # an accepted masked input or ciphertext is undetectable by design (both
    # are uniformly random to the server); otherwise the sum is exact.
    for _ in range(stage, 3):
        world.stage(skip=("c0",))
    world.finish(skip=("c0",), exact=not (verdict.accepted and stage == 2))


def test_an_exclusion_is_logged_with_its_reason_and_no_key_material(
    caplog: pytest.LogCaptureFixture,
) -> None:
    world = World()
    message = AdvertiseKeys.from_bytes(world.reply("c1"))
    forged = dataclasses.replace(message, signature=bytes(64))
    with caplog.at_level("WARNING", logger="privacy.secagg.server"):
        verdict = world.server.receive("c1", forged.to_bytes())
    assert verdict.excluded
    assert "excluded client 'c1'" in caplog.text
    assert verdict.reason in caplog.text
    for secret in (message.cipher_key, message.mask_key, message.signature):
        assert secret.hex() not in caplog.text
        assert repr(secret) not in caplog.text


def test_replaying_the_messages_that_changed_the_state_rebuilds_the_server() -> None:
    world = World()
    log: list[tuple[str, bytes] | None] = []  # None marks a stage close

    def send(client: str, data: bytes) -> None:
        verdict = world.server.receive(client, data)
        if (verdict.accepted and not verdict.reason) or verdict.excluded:
            log.append((client, data))

    for stage in range(4):
        for client in sorted(world.outbox or world.clients):
            if (stage, client) == (1, "c2"):
                send(client, b"garbage")  # excluded: must be replayed too
                continue
            if (stage, client) == (2, "c5"):
                continue  # dropped
            data = world.reply(client)
            send(client, data)
            send(client, data)  # a retry: changes nothing, not logged
        world.outbox = world.server.close_stage().outbox
        log.append(None)
    original = world.server.result()

    rebuilt = SecAggServer(world.setup, world.registry)
    for entry in log:
        if entry is None:
            rebuilt.close_stage()
        else:
            rebuilt.receive(*entry)
    again = rebuilt.result()
    np.testing.assert_array_equal(again.ring_sum, original.ring_sum)
    assert again.survivors == original.survivors
    assert again.excluded == original.excluded == {"c2": rebuilt.excluded["c2"]}
    assert again.dropped == original.dropped
