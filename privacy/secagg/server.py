"""The server half of SecAgg+ as a pure state machine.

One `SecAggServer` per round. The aggregator feeds it the bytes each client
sends (`receive`, with the client id its transport authenticated) and, when a
stage's deadline passes or every participant has answered, closes the stage
(`close_stage`), which returns the messages to hand to each client for the
next stage. Clients that sent nothing by then have dropped at that stage. No
I/O, no clock, no randomness: replaying the same calls rebuilds the same
state, which is how the aggregator recovers a round after a crash.

A client whose message is malformed or breaks the protocol (bad signature,
wrong receiver set, wrong length, a round or stage replay, a forged share) is
excluded with a reason (`excluded`), logged; `receive` never raises for it.
Each message is accepted or rejected as a whole, so a stage never holds half
a message. A client excluded after a message of the current stage was
accepted keeps that message (its contribution is complete and valid) and
takes no part in later stages, exactly like a client that dropped after it.

The server holds only what the protocol lets it see: signed public keys,
ciphertexts and commitments, the running sum of the masked inputs (each
masked input is uniform in the ring and is folded into the sum as it
arrives), the revealed shares, and finally the unmasked sum.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedcore import Array, RoundStateError
from privacy.secagg.commitments import ShareKind, seed_commitment, share_commitment
from privacy.secagg.errors import ProtocolViolation, RoundFailed
from privacy.secagg.keys import (
    KeyPurpose,
    agree,
    check_public_key,
    derive_key,
    load_public_key,
    verify_signature,
)
from privacy.secagg.messages import (
    SHARE_LIMBS,
    AdvertiseKeys,
    EncryptedShare,
    ForwardedShare,
    KeyRoster,
    MaskedInput,
    RevealedShare,
    RoundSetup,
    ServerMessage,
    ShareDelivery,
    ShareKeys,
    Stage,
    UnmaskRequest,
    UnmaskResponse,
)
from privacy.secagg.prg import Mask, apply_masks, pairwise_sign, ring_dtype
from privacy.secagg.shamir import combine, decode_shares

__all__ = [
    "SecAggResult",
    "SecAggServer",
    "StageOutcome",
    "Verdict",
]

_log = logging.getLogger(__name__)
# Threads that remove the masks at the end of a round: the server expands
# thousands of masks there (one per survivor, and one per survivor and
# vanished neighbour; 22,662 at N = 500 with 30% dropouts), while a client
# uses one thread, since the clients of a simulation already share the
# cores. At most 4, because 10 to 18 us of a mask's 95 to 120 (P = 1e5)
# hold the GIL (its cipher context and the calls around the keystream),
# which bounds the gain from more threads, and the server shares its host
# with the service.
_MAX_UNMASK_THREADS = 4

_NEXT = {
    Stage.ADVERTISE_KEYS: Stage.SHARE_KEYS,
    Stage.SHARE_KEYS: Stage.MASKED_INPUT,
    Stage.MASKED_INPUT: Stage.UNMASK,
}


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the server did with one message.

    Attributes:
        accepted: the message is part of the round (or repeats one that is).
        reason: why it was rejected, or a note.
        excluded: this message excluded its sender. The server's state
            changed only if `accepted` (and it was not a repeat) or `excluded`:
            those are the messages to persist and replay after a crash.
    """

    accepted: bool
    reason: str = ""
    excluded: bool = False


@dataclass(frozen=True, slots=True)
class StageOutcome:
    """The result of closing a stage.

    Attributes:
        stage: the stage that was closed.
        outbox: client id -> the message that opens the next stage for it
            (empty after the unmask stage, or when the round failed).
        dropped: the clients that sent nothing in this stage.
        failure: why the round failed, or None.
    """

    stage: Stage
    outbox: Mapping[str, ServerMessage]
    dropped: frozenset[str]
    failure: str | None


@dataclass(frozen=True, slots=True, eq=False)
class SecAggResult:
    """The unmasked sum of a round and who contributed to it.

    Attributes:
        weighted_sum: sum over survivors of w * clip(delta), float64; None
            when the round took ring vectors (no quantization).
        total_weight: sum over survivors of w; None as `weighted_sum`.
        ring_sum: the exact sum of the survivors' codes in Z_(2^b).
        survivors: the clients whose masked inputs are in the sum.
        dropped: client id -> the stage at which it dropped.
        excluded: client id -> why it was excluded.
    """

    weighted_sum: Array | None
    total_weight: float | None
    ring_sum: Array
    survivors: tuple[str, ...]
    dropped: Mapping[str, Stage]
    excluded: Mapping[str, str]

    def mean(self) -> Array:
        """Return the weighted mean update, sum(w * delta) / sum(w).

        Raises:
            ValueError: the total weight is zero, or the round took ring vectors.
        """
        if self.weighted_sum is None or self.total_weight is None:
            raise ValueError("the round took ring vectors: decode `ring_sum` instead")
        if self.total_weight <= 0:
            raise ValueError("the survivors' total weight is zero; there is no mean")
        mean: Array = self.weighted_sum / self.total_weight
        return mean


class SecAggServer:
    """The server half of one SecAgg+ round (see the module docstring)."""

    __slots__ = (
        "_accepted",
        "_advertised",
        "_completed",
        "_deliveries",
        "_dropped",
        "_excluded",
        "_failure",
        "_graph",
        "_handlers",
        "_participants",
        "_registry",
        "_requests",
        "_responses",
        "_result",
        "_rosters",
        "_setup",
        "_share_index",
        "_shares",
        "_stage",
        "_sum",
        "_used_keys",
    )

    def __init__(self, setup: RoundSetup, registry: Mapping[str, bytes]) -> None:
        """Open the advertise-keys stage of a round.

        Args:
            setup: the round's public parameters, as sent to the clients.
            registry: client id -> raw Ed25519 public key registered at enrollment.
        """
        self._setup = setup
        self._graph = setup.graph()
        self._registry = {c: bytes(registry[c]) for c in setup.cohort if c in registry}
        self._stage: Stage | None = Stage.ADVERTISE_KEYS
        self._participants: set[str] = set(setup.cohort)
        self._accepted: dict[str, bytes] = {}
        self._completed: dict[Stage, frozenset[str]] = {}
        self._advertised: dict[str, AdvertiseKeys] = {}
        self._used_keys: set[bytes] = set()
        self._rosters: dict[str, frozenset[str]] = {}
        self._shares: dict[str, ShareKeys] = {}
        self._share_index: dict[tuple[str, str], EncryptedShare] = {}
        self._deliveries: dict[str, frozenset[str]] = {}
        self._sum = np.zeros(setup.input_length, dtype=ring_dtype(setup.ring_bits))
        self._requests: dict[str, UnmaskRequest] = {}
        self._responses: dict[str, UnmaskResponse] = {}
        self._excluded: dict[str, str] = {}
        self._dropped: dict[str, Stage] = {}
        self._failure: str | None = None
        self._result: SecAggResult | None = None
        self._handlers: dict[Stage, Callable[[str, bytes], None]] = {
            Stage.ADVERTISE_KEYS: self._on_advertise,
            Stage.SHARE_KEYS: self._on_share_keys,
            Stage.MASKED_INPUT: self._on_masked_input,
            Stage.UNMASK: self._on_unmask,
        }

    @property
    def setup(self) -> RoundSetup:
        """The round's public parameters."""
        return self._setup

    @property
    def stage(self) -> Stage | None:
        """The open stage, or None once the round finished or failed."""
        return self._stage

    @property
    def pending(self) -> frozenset[str]:
        """The participants of the open stage that have not yet been accepted."""
        return frozenset(self._participants - set(self._accepted))

    @property
    def failure(self) -> str | None:
        """Why the round failed, or None."""
        return self._failure

    @property
    def excluded(self) -> Mapping[str, str]:
        """Client id -> why it was excluded."""
        return dict(self._excluded)

    @property
    def dropped(self) -> Mapping[str, Stage]:
        """Client id -> the stage at which it sent nothing."""
        return dict(self._dropped)

    def receive(self, sender: str, data: bytes) -> Verdict:
        """Take one message from `sender` (the id its transport authenticated).

        Never raises for the message's content: a bad message excludes its
        sender and the verdict says why. An exact repeat of an accepted
        message is accepted again (safe retries).
        """
        stage, refusal = self._stage, self._refusal(sender)
        if refusal is not None or stage is None:
            return Verdict(False, refusal or "the round is over")
        digest = hashlib.sha256(data).digest() if isinstance(data, bytes) else b""
        earlier = self._accepted.get(sender)
        if earlier is not None:
            if earlier == digest:
                return Verdict(True, "a repeat of the accepted message")
            return self._exclude(sender, f"sent a second, different {stage} message")
        try:
            self._handlers[stage](sender, data)
        except ProtocolViolation as exc:
            return self._exclude(sender, str(exc))
        self._accepted[sender] = digest
        return Verdict(True)

    def _refusal(self, sender: str) -> str | None:
        """Why no message from `sender` can be taken now, or None."""
        if self._stage is None:
            return self._failure or "the round is over"
        if sender in self._excluded:
            return f"the client is excluded: {self._excluded[sender]}"
        if sender in self._dropped:
            return f"the client dropped at {self._dropped[sender]}; too late"
        if sender not in self._participants:
            return f"{sender!r} takes no part in the {self._stage} stage"
        return None

    def _exclude(self, sender: str, reason: str) -> Verdict:
        self._excluded[sender] = reason
        if sender not in self._accepted:
            self._participants.discard(sender)
        _log.warning(
            "secure aggregation %s round %d: excluded client %r at %s: %s",
            self._setup.federation_id,
            self._setup.round,
            sender,
            self._stage,
            reason,
        )
        return Verdict(False, reason, excluded=True)

    def _check_envelope(
        self, message: AdvertiseKeys | ShareKeys | MaskedInput | UnmaskResponse, sender: str
    ) -> None:
        setup = self._setup
        if (message.federation_id, message.round) != (setup.federation_id, setup.round):
            raise ProtocolViolation(
                f"a message for federation {message.federation_id!r} round {message.round}, "
                "not this round: a replay"
            )
        if message.sender != sender:
            raise ProtocolViolation(f"a message signed as {message.sender!r} from {sender!r}")

    def _on_advertise(self, sender: str, data: bytes) -> None:
        message = AdvertiseKeys.from_bytes(data)
        self._check_envelope(message, sender)
        registered = self._registry.get(sender)
        if registered is None:
            raise ProtocolViolation("no identity key is registered for the client")
        if not verify_signature(registered, message.signed_payload(), message.signature):
            raise ProtocolViolation("the keys are not signed by the client's registered identity")
        for key in (message.cipher_key, message.mask_key):
            problem = check_public_key(key)
            if problem is not None:
                raise ProtocolViolation(problem)
        keys = {message.cipher_key, message.mask_key}
        if len(keys) < 2 or keys & self._used_keys:
            raise ProtocolViolation("the client advertised a public key already in use")
        self._advertised[sender] = message
        self._used_keys |= keys

    def _on_share_keys(self, sender: str, data: bytes) -> None:
        message = ShareKeys.from_bytes(data)
        self._check_envelope(message, sender)
        receivers = [share.receiver for share in message.shares]
        expected = self._rosters[sender]
        if len(set(receivers)) != len(receivers) or set(receivers) != expected:
            raise ProtocolViolation(
                "the shares must go to exactly the client's roster: missing "
                f"{sorted(expected - set(receivers))}, unexpected "
                f"{sorted(set(receivers) - expected)}, or a receiver twice"
            )
        self._shares[sender] = message
        for share in message.shares:
            self._share_index[sender, share.receiver] = share

    def _on_masked_input(self, sender: str, data: bytes) -> None:
        message = MaskedInput.from_bytes(data)
        self._check_envelope(message, sender)
        setup = self._setup
        if message.ring_bits != setup.ring_bits or message.length != self._sum.size:
            raise ProtocolViolation(
                f"a masked input of {message.length} values in {message.ring_bits} bits; the "
                f"round expects {self._sum.size} values in {setup.ring_bits} bits"
            )
        values = message.values()
        width = 8 * values.dtype.itemsize
        if setup.ring_bits < width and int(values.max()) >> setup.ring_bits:
            raise ProtocolViolation("the masked input holds values outside the ring")
        np.add(self._sum, values, out=self._sum)

    def _on_unmask(self, sender: str, data: bytes) -> None:
        message = UnmaskResponse.from_bytes(data)
        self._check_envelope(message, sender)
        request = self._requests[sender]
        for kind, shares, allowed in (
            (ShareKind.SEED, message.seed_shares, request.survivors),
            (ShareKind.KEY, message.key_shares, request.dropped),
        ):
            owners = [share.owner for share in shares]
            if len(set(owners)) != len(owners) or not set(owners) <= set(allowed):
                raise ProtocolViolation(f"{kind} shares of clients the request did not ask for")
            for share in shares:
                self._check_revealed(kind, share, holder=sender)
        self._responses[sender] = message

    def _check_revealed(self, kind: ShareKind, share: RevealedShare, *, holder: str) -> None:
        dealt = self._share_index[share.owner, holder]
        expected = (
            dealt.seed_share_commitment if kind is ShareKind.SEED else dealt.key_share_commitment
        )
        actual = share_commitment(
            kind,
            federation_id=self._setup.federation_id,
            round=self._setup.round,
            parties=(share.owner, holder),
            share=share.share,
        )
        if actual != expected:
            raise ProtocolViolation(
                f"a {kind} share of {share.owner!r} does not match what {share.owner!r} dealt"
            )

    def close_stage(self) -> StageOutcome:
        """Close the open stage: whoever has not been accepted has dropped.

        Returns:
            The messages that open the next stage, or the round's failure when
            fewer than t clients completed the stage or the sum cannot be
            recovered. After the unmask stage, `result()` holds the sum.

        Raises:
            RoundStateError: the round is already over.
        """
        stage = self._stage
        if stage is None:
            raise RoundStateError("the round is over; no stage is open")
        accepted = frozenset(self._accepted)
        dropped = frozenset(self._participants - accepted)
        self._dropped |= dict.fromkeys(dropped, stage)
        self._completed[stage] = accepted
        onward = accepted - set(self._excluded)
        self._accepted = {}
        self._participants = set(onward)
        if len(accepted) < self._setup.threshold:
            self._fail(
                f"only {len(accepted)} clients completed the {stage} stage; the threshold "
                f"is {self._setup.threshold}"
            )
            return StageOutcome(stage, {}, dropped, self._failure)
        outbox = self._open_next(stage, accepted, sorted(onward))
        self._stage = _NEXT.get(stage)
        return StageOutcome(stage, outbox, dropped, self._failure)

    def _open_next(
        self, stage: Stage, accepted: frozenset[str], onward: Sequence[str]
    ) -> dict[str, ServerMessage]:
        if stage is Stage.ADVERTISE_KEYS:
            return {client: self._roster(client, accepted) for client in onward}
        if stage is Stage.SHARE_KEYS:
            return {client: self._delivery(client, accepted) for client in onward}
        if stage is Stage.MASKED_INPUT:
            return {client: self._request(client, accepted) for client in onward}
        self._finish(accepted)
        return {}

    def _roster(self, client: str, advertised: frozenset[str]) -> KeyRoster:
        neighbours = sorted(self._graph.neighbours(client) & advertised)
        self._rosters[client] = frozenset(neighbours)
        setup = self._setup
        keys = tuple(self._advertised[v] for v in neighbours)
        return KeyRoster(setup.federation_id, setup.round, client, keys)

    def _delivery(self, client: str, shared: frozenset[str]) -> ShareDelivery:
        senders = sorted(self._graph.neighbours(client) & shared)
        self._deliveries[client] = frozenset(senders)
        forwarded = []
        for sender in senders:
            dealt = self._share_index[sender, client]
            forwarded.append(
                ForwardedShare(
                    sender,
                    dealt.ciphertext,
                    dealt.key_share_commitment,
                    dealt.seed_share_commitment,
                )
            )
        setup = self._setup
        return ShareDelivery(setup.federation_id, setup.round, client, tuple(forwarded))

    def _request(self, client: str, survived: frozenset[str]) -> UnmaskRequest:
        delivered = self._deliveries[client]
        request = UnmaskRequest(
            self._setup.federation_id,
            self._setup.round,
            client,
            tuple(sorted(delivered & survived)),
            tuple(sorted(delivered - survived)),
        )
        self._requests[client] = request
        return request

    def _fail(self, reason: str) -> None:
        self._failure = reason
        self._stage = None
        _log.warning(
            "secure aggregation %s round %d failed: %s",
            self._setup.federation_id,
            self._setup.round,
            reason,
        )

    def _finish(self, responders: frozenset[str]) -> None:
        survivors = self._completed[Stage.MASKED_INPUT]
        shared = self._completed[Stage.SHARE_KEYS]
        # A client that dropped after sharing keys matters only if a survivor
        # masked with it; its mask key is recovered to remove those masks.
        vanished = sorted(
            u for u in shared - survivors if any(u in self._deliveries[v] for v in survivors)
        )
        try:
            seeds = self._recover(ShareKind.SEED, sorted(survivors), responders)
            keys = self._recover(ShareKind.KEY, vanished, responders)
        except RoundFailed as exc:
            self._fail(str(exc))
            return
        total = self._sum.copy()
        masks = [Mask(seeds[u], -1) for u in sorted(survivors)]
        # Survivors' mask keys, each loaded once for all its vanished neighbours.
        loaded: dict[str, X25519PublicKey] = {}
        for u in vanished:
            masks.extend(self._pairwise_masks(u, keys[u], survivors, loaded))
        threads = min(_MAX_UNMASK_THREADS, os.cpu_count() or 1)
        apply_masks(total, masks, ring_bits=self._setup.ring_bits, threads=threads)
        weighted, weight = None, None
        if self._setup.quantization is not None:
            weighted, weight = self._setup.quantization.decode(total, clients=len(survivors))
        self._result = SecAggResult(
            weighted_sum=weighted,
            total_weight=weight,
            ring_sum=total,
            survivors=tuple(sorted(survivors)),
            dropped=dict(self._dropped),
            excluded=dict(self._excluded),
        )
        self._stage = None

    def _pairwise_masks(
        self,
        vanished: str,
        key: bytes,
        survivors: frozenset[str],
        loaded: dict[str, X25519PublicKey],
    ) -> list[Mask]:
        private = X25519PrivateKey.from_private_bytes(key)
        masks = []
        for v in sorted(survivors):
            if vanished not in self._deliveries[v]:
                continue
            if v not in loaded:
                loaded[v] = load_public_key(self._advertised[v].mask_key)
            secret = agree(private, loaded[v])
            seed = derive_key(
                secret,
                purpose=KeyPurpose.PAIRWISE_MASK,
                federation_id=self._setup.federation_id,
                round=self._setup.round,
                pair=(vanished, v),
            )
            masks.append(Mask(seed, -pairwise_sign(v, vanished)))
        return masks

    def _recover(
        self, kind: ShareKind, owners: Sequence[str], responders: frozenset[str]
    ) -> dict[str, bytes]:
        """Reconstruct each owner's `kind` secret from the responders' shares.

        Raises:
            RoundFailed: an owner has fewer than t shares, or its shares
                reconstruct a secret that does not match its commitment.
        """
        collected: dict[str, list[tuple[int, bytes]]] = {u: [] for u in owners}
        for holder in sorted(responders):
            response = self._responses[holder]
            revealed = response.seed_shares if kind is ShareKind.SEED else response.key_shares
            x = self._graph.index(holder)
            for share in revealed:
                if share.owner in collected:
                    collected[share.owner].append((x, share.share))
        t = self._setup.threshold
        secrets = {}
        for owner, shares in collected.items():
            if len(shares) < t:
                raise RoundFailed(
                    f"only {len(shares)} {kind} shares of {owner!r} were revealed; "
                    f"the threshold is {t}"
                )
            shares.sort(key=lambda item: item[0])
            chosen = shares[:t]
            try:
                rows = decode_shares(b"".join(share for _, share in chosen), SHARE_LIMBS)
                secret = combine([x for x, _ in chosen], rows, threshold=t)
            except ValueError as exc:
                raise RoundFailed(f"the {kind} shares of {owner!r} are inconsistent") from exc
            self._verify(kind, owner, secret)
            secrets[owner] = secret
        return secrets

    def _verify(self, kind: ShareKind, owner: str, secret: bytes) -> None:
        setup = self._setup
        if kind is ShareKind.SEED:
            expected = self._shares[owner].seed_commitment
            actual = seed_commitment(
                federation_id=setup.federation_id, round=setup.round, owner=owner, seed=secret
            )
        else:
            expected = self._advertised[owner].mask_key
            private = X25519PrivateKey.from_private_bytes(secret)
            actual = private.public_key().public_bytes_raw()
        if actual != expected:
            raise RoundFailed(f"{owner!r} dealt inconsistent {kind} shares; its sum is lost")

    def result(self) -> SecAggResult:
        """Return the round's unmasked sum.

        Raises:
            RoundFailed: the round failed (the reason says why).
            RoundStateError: the unmask stage is not closed yet.
        """
        if self._failure is not None:
            raise RoundFailed(self._failure)
        if self._result is None:
            raise RoundStateError("the round has not closed its unmask stage yet")
        return self._result
