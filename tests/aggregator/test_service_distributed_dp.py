"""Distributed DP under secure aggregation in the aggregator core.

Clients run the SDK's `SecureParticipant` over the in-process transport, so
each encodes its delta with the distributed discrete Gaussian before masking
it; the service only ever sees masked vectors and the unmasked noisy sum.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from settable_clock import Clock

import clients.secagg
from aggregator import (
    Aggregator,
    FederationStatus,
    InProcessTransport,
    MemoryBlobStore,
    MemoryStore,
    RoundStatus,
    parse_settings,
)
from aggregator.privacy import noise_message
from clients.secagg import SecureParticipant
from fedcore import ConfigError, ParameterSet, UpdateMeta, wire
from privacy.dp import (
    DistributedDp,
    DistributedGaussianEvent,
    DpConfig,
    NoiseSource,
    RdpAccountant,
    distributed_params,
    epsilon,
)
from privacy.secagg import ClientIdentity, Stage

SIZE = 4096  # a power of two: no padding, every coordinate of the sum is noise
NOISE = 1.0
CLIP = 1.0
DELTA = 1e-3


def model() -> ParameterSet:
    return ParameterSet({"w": np.zeros(SIZE, np.float32), "steps": np.array([7], dtype=np.int64)})


def settings(clients: int, min_survivors: int, **dp: Any) -> dict[str, Any]:
    return {
        "name": "ddp",
        "rounds": 3,
        "clients_per_round": clients,  # ignored: DP cohorts are Poisson samples
        "round_timeout_s": 30,
        "min_clients": 3,
        "secure_aggregation": True,
        # A complete graph and a low threshold: only the DP rule decides below.
        "secagg": {"corrupt_fraction": 0.0, "dropout_fraction": 0.3},
        "dp": {
            "mode": "distributed",
            "epsilon": 50.0,
            "delta": DELTA,
            "clip_norm": CLIP,
            "noise_multiplier": NOISE,
            "sampling_rate": 1.0,
            "min_survivors": min_survivors,
        }
        | dp,
    }


@dataclass
class Member:
    transport: InProcessTransport
    participant: SecureParticipant


def federation(
    clients: int, min_survivors: int, **dp: Any
) -> tuple[Aggregator, Clock, str, list[Member]]:
    clock = Clock()
    agg = Aggregator(MemoryStore(), MemoryBlobStore(), clock=clock)
    data = wire.encode(model())
    staged = agg.blobs.stage(len(data))
    staged.write(data)
    fid = agg.create_federation(parse_settings(settings(clients, min_survivors, **dp)), staged).id
    tokens, _ = agg.access.create_enrollment_tokens(fid, clients, 60)
    group = []
    for token in tokens:
        key = Ed25519PrivateKey.generate()
        enrollment = agg.access.enroll(token, identity_key=key.public_key().public_bytes_raw())
        identity = ClientIdentity(enrollment.client_id, key)
        transport = InProcessTransport(agg, enrollment.client_id)
        group.append(Member(transport, SecureParticipant(identity, transport, fid)))
    agg.start(fid)
    return agg, clock, fid, group


def zero_delta() -> tuple[ParameterSet, UpdateMeta]:
    return model(), UpdateMeta(num_examples=10)


def run_round(
    agg: Aggregator, clock: Clock, fid: str, group: list[Member], quit_at: dict[int, Stage]
) -> None:
    """Run one secure round; member i stays silent from stage `quit_at[i]` on."""
    for member in group:  # check in: the round samples its cohort
        member.transport.fetch_task(fid)
    for stage in Stage:
        stage_index = list(Stage).index(stage)
        active = [
            m for i, m in enumerate(group)
            if i not in quit_at or list(Stage).index(quit_at[i]) > stage_index
        ]  # fmt: skip
        for member in active:
            task = member.transport.fetch_task(fid)
            if task.secure:
                member.participant.answer(task, zero_delta)
        if stage in quit_at.values():  # the silent ones close it at its deadline
            clock.now += 31
            agg.tick()


def params_for(clients: int, min_survivors: int) -> DistributedDp:
    config = DpConfig.model_validate(settings(clients, min_survivors)["dp"])
    return distributed_params(config, num_clients=clients, num_parameters=SIZE, rotation_seed=0)


def test_distributed_mode_needs_secure_aggregation_and_central_refuses_it() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(settings(5, 5) | {"secure_aggregation": False})
    assert any("needs secure aggregation" in p for p in caught.value.problems)
    central = settings(5, 5)
    central["dp"] = central["dp"] | {"mode": "central", "min_survivors": None}
    with pytest.raises(ConfigError, match="central DP needs each update in the clear"):
        parse_settings(central)
    assert parse_settings(settings(5, 5)).client_level_dp is not None


def test_the_released_sum_holds_the_target_noise_and_the_accountants_epsilon() -> None:
    clients = 5
    agg, clock, fid, group = federation(clients, min_survivors=clients)
    run_round(agg, clock, fid, group, quit_at={})
    rnd = agg.get_round(fid, 1)
    assert rnd.status is RoundStatus.CLOSED, rnd.reason
    assert rnd.metrics["clients"] == clients
    new = agg.load_model(fid, agg.get_federation(fid).model_version)
    # Every delta was zero, so the model moved by the noise alone, divided by q·N.
    noise_sum = new["w"].astype(np.float64) * clients
    assert abs(noise_sum.std() / (NOISE * CLIP) - 1) < 0.05
    assert abs(noise_sum.mean()) < 5 * NOISE * CLIP / np.sqrt(SIZE)
    assert new["steps"].tolist() == [7]  # integer buffers are not noised
    # The same event built independently, accounted by the RDP accountant.
    event = params_for(clients, clients).event(1.0)
    assert isinstance(rnd.privacy.events[0], DistributedGaussianEvent)
    expected = epsilon([event], DELTA, RdpAccountant())
    assert rnd.metrics["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert agg.privacy(fid).epsilon_spent == pytest.approx(expected, rel=1e-9)


def test_dropouts_down_to_min_survivors_keep_the_epsilon_and_fewer_release_nothing() -> None:
    clients, min_survivors = 6, 5
    agg, clock, fid, group = federation(clients, min_survivors)
    # Round 1: one client drops after sharing keys; 5 survivors are enough.
    run_round(agg, clock, fid, group, quit_at={0: Stage.MASKED_INPUT})
    first = agg.get_round(fid, 1)
    assert first.status is RoundStatus.CLOSED, first.reason
    assert (first.metrics["clients"], first.metrics["dropped"]) == (5, 1)
    # The accounting assumes exactly min_survivors noise shares, whatever survived.
    expected = epsilon([params_for(clients, min_survivors).event(1.0)], DELTA, RdpAccountant())
    assert first.metrics["epsilon"] == pytest.approx(expected, rel=1e-9)
    model_after_first = agg.get_federation(fid).model_version
    # Round 2: two drop; 4 survivors would hold less noise than accounted for.
    run_round(agg, clock, fid, group, quit_at={0: Stage.MASKED_INPUT, 1: Stage.MASKED_INPUT})
    second = agg.get_round(fid, 2)
    assert second.status is RoundStatus.FAILED
    assert "only 4 survivors" in second.reason
    assert agg.get_federation(fid).model_version == model_after_first
    assert agg.privacy(fid).epsilon_spent == pytest.approx(expected, rel=1e-9)


def test_the_budget_stops_a_distributed_federation_before_an_overshooting_round() -> None:
    clients = 4
    event = params_for(clients, clients).event(1.0)
    two, three = (epsilon([event] * k, DELTA, RdpAccountant()) for k in (2, 3))
    agg, clock, fid, group = federation(clients, clients, epsilon=(two + three) / 2)
    for _ in range(2):
        run_round(agg, clock, fid, group, quit_at={})
    assert agg.get_federation(fid).status is FederationStatus.BUDGET_EXHAUSTED
    rounds = agg.list_rounds(fid)
    assert [r.status for r in rounds] == [RoundStatus.CLOSED] * 2
    assert agg.privacy(fid).epsilon_spent == pytest.approx(two, rel=1e-9)


def test_a_client_that_bypasses_the_encoder_fails_the_round_and_spends_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Secure aggregation hides who sent what: the implausible sum is refused whole."""
    real_encode = clients.secagg.encode
    calls = []

    def forged(delta: ParameterSet, params: DistributedDp, source: NoiseSource) -> np.ndarray:
        codes = real_encode(delta, params, source)
        calls.append(1)
        if len(calls) == 1:  # one client adds a quarter of the ring to every coordinate
            codes = (codes + (params.modulus // 4)) % params.modulus
        return codes

    monkeypatch.setattr(clients.secagg, "encode", forged)
    agg, clock, fid, group = federation(5, 5)
    run_round(agg, clock, fid, group, quit_at={})
    rnd = agg.get_round(fid, 1)
    assert rnd.status is RoundStatus.FAILED
    assert "above the bound" in rnd.reason
    assert agg.get_federation(fid).model_version == rnd.model_version
    assert agg.privacy(fid).epsilon_spent == 0.0


def test_the_noise_message_carries_every_parameter_both_ways() -> None:
    params = params_for(5, 4)
    message = noise_message(params)
    assert set(type(message).model_fields) == {f.name for f in dataclasses.fields(params)}
    assert DistributedDp(**message.model_dump()) == params
