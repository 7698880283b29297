"""Central differential privacy in the service: Poisson cohorts, the budget, noisy rounds.

The mechanism itself is `privacy.dp` (DP-FedAvg, McMahan et al., ICLR 2018);
this module applies it to the aggregator's records, in functions the service
calls under the federation's lock (values in, values out, except
`select_private` and `enrolled_clients`, which use the transaction they are
given). A DP federation runs its rounds as the accountant assumes them:

- Budget first. Before a round opens (before its cohort is even sampled),
  the ε of the released rounds plus the round to come is compared with the
  target; a round that would overshoot never opens, and the federation ends
  as `budget_exhausted`.
- Cohort. Every enrolled, non-revoked client is in the round independently
  with probability q (`dp.sampling_rate`), whether it checked in or not: no
  over-selection, no waiting for check-ins. N, the population sampled from,
  is stored with the round; the noisy sum is divided by q·N.
- Close. A round closes once every sampled client reported, or at
  `round_timeout_s` with whatever arrived, even nothing: the noise is
  released anyway, which is what the accountant composes. Sampled clients
  that drop out are fine. `min_clients` and `clients_per_round` do not apply,
  and a round whose Poisson sample is empty closes at once, releasing noise
  only. Only a stopped federation fails a DP round, and a failed round
  releases and spends nothing.
- Accounting. A closed round stores the event it released in its
  `RoundPrivacy`, in the same transaction as the model it released, and its
  ε (all released rounds so far) in `metrics["epsilon"]`. The ε spent is
  always recomputed from the stored events, never kept in memory, so it is
  the same after a restart.

Distributed DP (`dp.mode = "distributed"`, with secure aggregation) runs the
same Poisson cohorts, budget and accounting, but the noise comes from the
clients: each encodes its update with the distributed discrete Gaussian of
`privacy.dp.distributed` before masking it, and the aggregator only decodes
the unmasked sum (`release_distributed`). The round's parameters follow from
the settings, N, the model and the round's public graph seed
(`distributed_noise`), so they are recomputed, never stored. A round with
fewer survivors than `dp.min_survivors` releases nothing: its sum would hold
less noise than accounted for.

Randomness comes from the OS CSPRNG (`NoiseSource.secure()`). With
`dp.noise_seed` set (tests and simulation only; the run is flagged `seeded`
and is NOT private), round r samples its cohort from
`SeedSequence([noise_seed, r, 0])` and draws its noise from
`SeedSequence([noise_seed, r, 1])`, so no two rounds reuse a stream.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from aggregator.config import FederationSettings
from aggregator.records import (
    FederationRecord,
    FederationStatus,
    RoundPrivacy,
    RoundRecord,
    RoundStatus,
)
from aggregator.rounds import Closing, RoundProgress
from aggregator.store import Transaction
from fedcore import ConfigError, DistributedNoise, ParameterSet, TensorSpec, as_dtype
from privacy.dp import (
    DistributedDp,
    DpConfig,
    DpFedAvg,
    DpMode,
    GaussianEvent,
    NoiseSource,
    PrivacyEvent,
    central_strategy,
    check_budget,
    decode,
    distributed_params,
    epsilon,
    poisson_sample,
    sum_norm_bound,
    validate,
)
from privacy.secagg import RoundSetup, SecAggResult

__all__ = [
    "PrivacyReport",
    "Release",
    "RoundEpsilon",
    "budget_allows",
    "check_population",
    "close_private",
    "distributed_noise",
    "enrolled_clients",
    "next_distributed_event",
    "noise_message",
    "privacy_report",
    "release_distributed",
    "release_round",
    "released_events",
    "sample_cohort_poisson",
    "select_private",
    "spent_epsilon",
]


class _Stream(IntEnum):
    """The independent seeded streams of one round (see the module docstring)."""

    SAMPLING = 0
    NOISE = 1


@dataclass(frozen=True, slots=True)
class RoundEpsilon:
    """The ε spent by a federation once a round was released, and that round's clip norm."""

    round: int
    epsilon: float
    clip_norm: float


@dataclass(frozen=True, slots=True)
class Release:
    """What a DP round releases: the next model, its privacy state, and the ε spent with it."""

    model: ParameterSet
    privacy: RoundPrivacy
    epsilon: float


@dataclass(frozen=True, slots=True)
class PrivacyReport:
    """A federation's privacy: its DP settings, the ε spent, and ε after each round.

    Attributes:
        federation_id: the federation.
        status: the federation's status.
        dp: the DP settings (z resolved), or None for a federation without DP.
        epsilon_spent: ε of every released round, recomputed from the stored
            events; None without DP.
        clip_norm: the clip norm of the next round; None without DP.
        rounds: ε after each released round, in order.
    """

    federation_id: str
    status: FederationStatus
    dp: DpConfig | None = None
    epsilon_spent: float | None = None
    clip_norm: float | None = None
    rounds: tuple[RoundEpsilon, ...] = ()


def enrolled_clients(tx: Transaction, federation_id: str, *, secure: bool = False) -> list[str]:
    """Return the population of a federation: its non-revoked clients, in enrollment order.

    With `secure`, only clients that registered an identity key: no other
    client can sign its round keys.
    """
    return [
        c.id
        for c in tx.list_clients(federation_id)
        if not c.revoked and (not secure or c.identity_key is not None)
    ]


def check_population(dp: DpConfig, population: int, *, secure: bool = False) -> None:
    """Check `dp` against the N clients a DP federation is about to sample from.

    Raises:
        ConfigError: no client is enrolled, or a check that needs N fails
            (δ must be below 1/N).
    """
    if population < 1:
        raise ConfigError(
            ["dp: no enrolled clients; a DP federation samples its cohorts from its "
             "enrolled clients, so enroll them before starting it"]
        )  # fmt: skip
    try:
        validate(dp, num_clients=population, secure_aggregation=secure)
    except ConfigError as exc:
        raise ConfigError([f"dp: {problem}" for problem in exc.problems]) from None


def released_events(rounds: Sequence[RoundRecord]) -> list[PrivacyEvent]:
    """Return the accounting events of every released (closed) round, in order."""
    return [
        event
        for rnd in rounds
        if rnd.status is RoundStatus.CLOSED and rnd.privacy is not None
        for event in rnd.privacy.events
    ]


def spent_epsilon(dp: DpConfig, rounds: Sequence[RoundRecord]) -> float:
    """Return the ε that the released rounds spent, at the federation's δ."""
    return epsilon(released_events(rounds), dp.delta, dp.make_accountant())


def budget_allows(
    dp: DpConfig, rounds: Sequence[RoundRecord], next_event: PrivacyEvent | None = None
) -> bool:
    """Return whether one more round fits in the federation's budget.

    Args:
        dp: the DP settings (z resolved).
        rounds: the federation's rounds; the released ones count.
        next_event: what the next round would release; by default the
            Gaussian event of central DP-FedAvg (distributed rounds pass
            theirs, which depends on N and the model: `distributed_noise`).
    """
    event = next_event if next_event is not None else _event(dp)
    check = check_budget(released_events(rounds), event, dp.budget(), dp.make_accountant())
    return check.allowed


def sample_cohort_poisson(
    dp: DpConfig, client_ids: Sequence[str], *, round_number: int
) -> tuple[str, ...]:
    """Poisson-sample a round's cohort at rate q from the whole population `client_ids`."""
    source = _source(dp, round_number, _Stream.SAMPLING)
    return tuple(poisson_sample(client_ids, dp.sampling_rate or 1.0, source.generator))


def select_private(
    tx: Transaction, rnd: RoundRecord, dp: DpConfig, *, deadline: float, secure: bool = False
) -> bool:
    """Sample a selecting DP round's cohort and start its training stage.

    The round keeps N and its clip norm (the one the last released round
    left: adaptive clipping moves it). Returns False, leaving the round as
    it is, while no client is enrolled (with `secure`: no client with an
    identity key).
    """
    population = enrolled_clients(tx, rnd.federation_id, secure=secure)
    if not population:
        return False
    privacy = RoundPrivacy(
        population=len(population),
        clip_norm=_current_clip_norm(dp, tx.list_rounds(rnd.federation_id)),
        seeded=dp.noise_seed is not None,
    )
    tx.update_round(
        rnd.federation_id,
        rnd.number,
        status=RoundStatus.TRAINING,
        cohort=sample_cohort_poisson(dp, population, round_number=rnd.number),
        deadline=deadline,
        privacy=privacy,
    )
    return True


def close_private(progress: RoundProgress) -> Closing:
    """Decide whether a DP round closes: every sampled client reported, or time is up."""
    if progress.received >= progress.cohort or progress.expired:
        return Closing.CLOSE
    return Closing.KEEP_OPEN


def release_round(
    config: FederationSettings,
    model: ParameterSet,
    updates: Iterable[tuple[ParameterSet, float]],
    *,
    rnd: RoundRecord,
    rounds: Sequence[RoundRecord],
) -> Release:
    """Clip and sum a DP round's updates, add the noise, and return what it releases.

    Args:
        config: the federation's settings (`dp` with z resolved, `server_lr`).
        model: the round's model.
        updates: each update's delta and number of examples, streamed.
        rnd: the round; its `privacy` says N and the clip norm.
        rounds: the federation's rounds (released ones count towards ε).

    Raises:
        ValueError: the federation or the round has no DP state.
    """
    dp, privacy = config.dp, rnd.privacy
    if dp is None or privacy is None:
        raise ValueError(f"round {rnd.number} is not a round of a DP federation")
    strategy = _strategy(dp, privacy, rnd.number, config.server_lr)
    aggregate = strategy.begin(model)
    for delta, weight in updates:
        aggregate.add(delta, weight)
    release = strategy.release(model, aggregate)
    privacy = dataclasses.replace(
        privacy,
        events=(release.event,),
        next_clip_norm=release.clipping.clip_norm,
        noisy_fraction=release.noisy_fraction,
        seeded=release.seeded,
    )
    released = dataclasses.replace(rnd, status=RoundStatus.CLOSED, privacy=privacy)
    history = [r for r in rounds if r.number != rnd.number]
    return Release(release.model, privacy, spent_epsilon(dp, [*history, released]))


def distributed_noise(
    dp: DpConfig, privacy: RoundPrivacy, spec: Mapping[str, TensorSpec], graph_seed: bytes
) -> DistributedDp:
    """Return the distributed discrete Gaussian parameters of one secure DP round.

    Args:
        dp: distributed DP settings (z resolved).
        privacy: the round's privacy state (N, its clip norm).
        spec: the round model's tensors; integer tensors are not noised.
        graph_seed: the round's public graph seed; the Hadamard rotation's
            seed is derived from it, so it is fresh and public every round.

    Raises:
        ValueError: the settings do not fit this population or model
            (`DistributedDp` lists why).
    """
    digest = hashlib.sha256(b"fedcore/distributed-dp/rotation\0" + graph_seed).digest()
    settings = dp.model_copy(update={"clip_norm": privacy.clip_norm})
    return distributed_params(
        settings,
        num_clients=max(privacy.population, 1),
        num_parameters=_float_parameters(spec),
        rotation_seed=int.from_bytes(digest[:8], "big") >> 1,
    )


def next_distributed_event(
    dp: DpConfig, population: int, spec: Mapping[str, TensorSpec]
) -> PrivacyEvent:
    """Return the event a distributed round over `population` clients would release."""
    privacy = RoundPrivacy(population=population, clip_norm=dp.clip_norm, seeded=False)
    return distributed_noise(dp, privacy, spec, b"").event(dp.sampling_rate or 1.0)


def noise_message(params: DistributedDp) -> DistributedNoise:
    """Return `params` as the message that tells each client how to encode."""
    # The message has exactly the dataclass's fields (a test checks both ways).
    return DistributedNoise(**dataclasses.asdict(params))


def release_distributed(
    config: FederationSettings,
    model: ParameterSet,
    result: SecAggResult,
    *,
    rnd: RoundRecord,
    rounds: Sequence[RoundRecord],
) -> Release:
    """Decode a distributed DP round's unmasked sum and return what it releases.

    The decoded sum holds every survivor's clipped update and noise; it is
    divided by the expected cohort q·N, as in DP-FedAvg, and applied with
    the server learning rate. Integer tensors are left as they are.

    Raises:
        ValueError: not a distributed DP round; fewer survivors than
            `min_survivors` (the sum holds less noise than accounted for); or
            a sum too large for honest clients (a client bypassed the
            encoder, or the ring wrapped around): nothing is released.
    """
    dp, privacy = config.dp, rnd.privacy
    if (
        dp is None
        or dp.mode is not DpMode.DISTRIBUTED
        or privacy is None
        or rnd.secagg_setup is None
    ):
        raise ValueError(f"round {rnd.number} is not a round of a distributed DP federation")
    graph_seed = RoundSetup.from_bytes(rnd.secagg_setup).graph_seed
    params = distributed_noise(dp, privacy, model.spec(), graph_seed)
    survivors = len(result.survivors)
    sums = decode(result.ring_sum, params, model.spec(), survivors=survivors)
    norm = math.sqrt(sum(float(np.dot(v.ravel(), v.ravel())) for v in sums.values()))
    bound = sum_norm_bound(params, survivors)
    if norm > bound:
        raise ValueError(
            f"the decoded sum has norm {norm:.4g}, above the bound {bound:.4g} that "
            f"{survivors} honest clients stay under: a client bypassed the encoder or "
            "the ring wrapped around"
        )
    divisor = (dp.sampling_rate or 1.0) * max(privacy.population, 1)
    arrays = {}
    for name, current in model.items():
        if name not in sums:
            arrays[name] = current
            continue
        value = np.asarray(current, dtype=np.float64) + (config.server_lr / divisor) * sums[name]
        arrays[name] = value.astype(as_dtype(str(current.dtype)))
    privacy = dataclasses.replace(
        privacy, events=(params.event(dp.sampling_rate or 1.0),), next_clip_norm=params.clip_norm
    )
    released = dataclasses.replace(rnd, status=RoundStatus.CLOSED, privacy=privacy)
    history = [r for r in rounds if r.number != rnd.number]
    return Release(ParameterSet(arrays), privacy, spent_epsilon(dp, [*history, released]))


def privacy_report(
    fed: FederationRecord, dp: DpConfig | None, rounds: Sequence[RoundRecord]
) -> PrivacyReport:
    """Describe a federation's privacy from its settings and its stored rounds."""
    if dp is None:
        return PrivacyReport(fed.id, fed.status)
    if dp.mode is DpMode.LOCAL:
        # Each DP-SGD client accounts its own examples; a round's metrics
        # hold the largest client ε reported so far.
        per_round = tuple(
            RoundEpsilon(r.number, r.metrics["epsilon"], dp.clip_norm)
            for r in rounds
            if r.status is RoundStatus.CLOSED and "epsilon" in r.metrics
        )
        return PrivacyReport(
            federation_id=fed.id,
            status=fed.status,
            dp=dp,
            epsilon_spent=max((r.epsilon for r in per_round), default=0.0),
            clip_norm=dp.clip_norm,
            rounds=per_round,
        )
    released = tuple(
        RoundEpsilon(r.number, r.metrics.get("epsilon", math.nan), r.privacy.clip_norm)
        for r in rounds
        if r.status is RoundStatus.CLOSED and r.privacy is not None
    )
    return PrivacyReport(
        federation_id=fed.id,
        status=fed.status,
        dp=dp,
        epsilon_spent=spent_epsilon(dp, rounds),
        clip_norm=_current_clip_norm(dp, rounds),
        rounds=released,
    )


def _event(dp: DpConfig) -> GaussianEvent:
    # What `DpFedAvg.event()` returns for these settings: the event of a
    # round depends on q and z only, not on N or the clip norm.
    return GaussianEvent(dp.sampling_rate or 1.0, dp.resolved_noise_multiplier())


def _float_parameters(spec: Mapping[str, TensorSpec]) -> int:
    return sum(s.size for s in spec.values() if not s.is_integer)


def _current_clip_norm(dp: DpConfig, rounds: Sequence[RoundRecord]) -> float:
    for rnd in reversed(rounds):
        if rnd.status is RoundStatus.CLOSED and rnd.privacy is not None:
            return rnd.privacy.next_clip_norm or rnd.privacy.clip_norm
    return dp.clip_norm


def _strategy(dp: DpConfig, privacy: RoundPrivacy, number: int, server_lr: float) -> DpFedAvg:
    # N >= 1 always: a round is never sampled from an empty population.
    base = central_strategy(dp, num_clients=max(privacy.population, 1), server_lr=server_lr)
    clipping = dataclasses.replace(base.clipping, clip_norm=privacy.clip_norm)
    return dataclasses.replace(base, clipping=clipping, source=_source(dp, number, _Stream.NOISE))


def _source(dp: DpConfig, round_number: int, stream: _Stream) -> NoiseSource:
    if dp.noise_seed is None:
        return NoiseSource.secure()
    # `DpConfig.noise_source()` would restart one stream every round, adding
    # the same noise each time; each round and use gets its own stream here.
    sequence = np.random.SeedSequence([dp.noise_seed, round_number, int(stream)])
    return NoiseSource(np.random.Generator(np.random.PCG64(sequence)), seeded=True)
