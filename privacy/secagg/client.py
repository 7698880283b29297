"""The client half of SecAgg+ as a pure state machine.

One `SecAggClient` per client and round. Each stage is one call that takes
the server's message for that stage and returns the client's reply; it does
no I/O, reads no clock and draws randomness only from the `entropy` it was
given (OS randomness by default) and, for stochastic rounding, the numpy
generator passed to `masked_input`. The SDK sends and receives the bytes.

The client checks everything the server tells it against what it saw before
and raises `ProtocolViolation` (then refuses every later call) when:

- a message belongs to another federation, round or stage, or to another
  receiver (a replay);
- a neighbour's advertised keys are not signed by the identity key
  registered for it, are reused, or come from a client that is not its
  neighbour in the round's graph (the server cannot substitute keys);
- fewer than t neighbours take part at a stage (the threshold);
- an unmask request lists a client that is not among the neighbours whose
  shares it was delivered in the masked-input stage (the only confirmation
  SecAgg+ gives a client that a neighbour took part; it masked with exactly
  those), lists a neighbour as both survived and dropped, misses one, leaves
  fewer than t survivors, or contradicts an earlier request: for each
  neighbour it reveals the share of its seed (survived) or of its mask key
  (dropped), never both over the whole round.

Why refusing is enough against a server that lies about who dropped: the
round's threshold satisfies 2t > k + (corrupt neighbours) (`graph`), and each
honest neighbour reveals at most one share per client, so the server can
never gather t shares of both a client's seed and its mask key.

A repeated call with the same message returns the same reply (safe retries).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import numpy as np

from fedcore import Array, RoundStateError
from privacy.secagg.cipher import NONCE_BYTES, decrypt, encrypt, share_context
from privacy.secagg.commitments import ShareKind, seed_commitment, share_commitment
from privacy.secagg.errors import ProtocolViolation
from privacy.secagg.keys import (
    SECRET_BYTES,
    SIGNATURE_BYTES,
    ClientIdentity,
    Entropy,
    KeyPurpose,
    RoundKeys,
    agree,
    derive_key,
    verify_signature,
)
from privacy.secagg.messages import (
    SHARE_BYTES,
    SHARE_LIMBS,
    AdvertiseKeys,
    EncryptedShare,
    ForwardedShare,
    KeyRoster,
    MaskedInput,
    RevealedShare,
    RoundSetup,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from privacy.secagg.prg import Mask, apply_masks, pairwise_sign, ring_dtype
from privacy.secagg.shamir import decode_shares, encode_share, split

__all__ = ["SecAggClient"]


class SecAggClient:
    """The client half of one SecAgg+ round (see the module docstring)."""

    __slots__ = (
        "_aborted",
        "_advertised",
        "_cipher_keys",
        "_delivered",
        "_entropy",
        "_graph",
        "_held",
        "_id",
        "_identity",
        "_keys",
        "_masked",
        "_neighbours",
        "_peers",
        "_registry",
        "_revealed",
        "_seed",
        "_setup",
        "_shared",
        "_unmasked",
    )

    def __init__(
        self,
        identity: ClientIdentity,
        *,
        setup: RoundSetup,
        registry: Mapping[str, bytes],
        entropy: Entropy = os.urandom,
    ) -> None:
        """Prepare for one round.

        Args:
            identity: the client's id and Ed25519 signing key.
            setup: the round's public parameters.
            registry: client id -> raw Ed25519 public key, as registered at
                enrollment and published by the aggregator.
            entropy: source of secret randomness; keep the default outside tests.

        Raises:
            ValueError: the client is not in the round's cohort.
        """
        if identity.client_id not in setup.cohort:
            raise ValueError(f"client {identity.client_id!r} is not in the round's cohort")
        self._id = identity.client_id
        self._identity = identity
        self._setup = setup
        self._registry = dict(registry)
        self._entropy = entropy
        self._graph = setup.graph()
        self._neighbours = self._graph.neighbours(self._id)
        self._keys = RoundKeys.generate(entropy)
        self._seed = b""
        self._advertised: AdvertiseKeys | None = None
        self._shared: tuple[KeyRoster, ShareKeys] | None = None
        self._masked: tuple[ShareDelivery, MaskedInput] | None = None
        self._unmasked: tuple[UnmaskRequest, UnmaskResponse] | None = None
        self._peers: dict[str, AdvertiseKeys] = {}
        self._cipher_keys: dict[str, bytes] = {}
        self._held: dict[str, tuple[bytes, bytes]] = {}
        self._delivered: frozenset[str] = frozenset()
        self._revealed: dict[str, ShareKind] = {}
        self._aborted: str | None = None

    @property
    def client_id(self) -> str:
        """The client's id."""
        return self._id

    @property
    def aborted(self) -> str | None:
        """Why the client aborted the round, or None."""
        return self._aborted

    @contextmanager
    def _guard(self) -> Iterator[None]:
        if self._aborted is not None:
            raise ProtocolViolation(f"the round was aborted: {self._aborted}")
        try:
            yield
        except ProtocolViolation as exc:
            self._aborted = str(exc)
            raise

    def _check_envelope(self, message: KeyRoster | ShareDelivery | UnmaskRequest) -> None:
        setup = self._setup
        if (message.federation_id, message.round) != (setup.federation_id, setup.round):
            raise ProtocolViolation(
                f"a {message.KIND} for federation {message.federation_id!r} round "
                f"{message.round}, not this round: a replay"
            )
        if message.receiver != self._id:
            raise ProtocolViolation(f"a {message.KIND} addressed to {message.receiver!r}")

    def _check_count(self, count: int, what: str) -> None:
        if count < self._setup.threshold:
            raise ProtocolViolation(
                f"only {count} {what}, below the threshold {self._setup.threshold}"
            )

    def advertise_keys(self) -> AdvertiseKeys:
        """Return this round's two public keys, signed (advertise-keys stage)."""
        with self._guard():
            if self._advertised is None:
                setup, keys = self._setup, self._keys
                fields = (setup.federation_id, setup.round, self._id)
                unsigned = AdvertiseKeys(
                    *fields, keys.cipher_public, keys.mask_public, bytes(SIGNATURE_BYTES)
                )
                signature = self._identity.sign(unsigned.signed_payload())
                self._advertised = AdvertiseKeys(
                    *fields, keys.cipher_public, keys.mask_public, signature
                )
            return self._advertised

    def share_keys(self, roster: KeyRoster) -> ShareKeys:
        """Check the neighbours' signed keys and return encrypted shares for each.

        Raises:
            ProtocolViolation: a replayed or misaddressed roster, a key not
                signed by the neighbour's registered identity, a non-neighbour,
                a reused key, fewer than t neighbours, or a second roster.
            RoundStateError: called before `advertise_keys`.
        """
        with self._guard():
            if self._advertised is None:
                raise RoundStateError("advertise_keys must come before share_keys")
            if self._shared is not None:
                if self._shared[0] != roster:
                    raise ProtocolViolation("a second, different key roster from the server")
                return self._shared[1]
            self._check_roster(roster)
            self._peers = {entry.sender: entry for entry in roster.keys}
            message = self._deal()
            self._shared = (roster, message)
            return message

    def _check_roster(self, roster: KeyRoster) -> None:
        self._check_envelope(roster)
        seen: set[str] = set()
        keys = {self._keys.cipher_public, self._keys.mask_public}
        for entry in roster.keys:
            # The roster's round is checked above and every entry shares it;
            # the signature then proves the keys were made for this round.
            if entry.sender not in self._neighbours or entry.sender in seen:
                raise ProtocolViolation(f"{entry.sender!r} is not a neighbour, or is listed twice")
            registered = self._registry.get(entry.sender)
            if registered is None or not verify_signature(
                registered, entry.signed_payload(), entry.signature
            ):
                raise ProtocolViolation(
                    f"the keys of {entry.sender!r} are not signed by its registered identity"
                )
            if (
                entry.cipher_key in keys
                or entry.mask_key in keys
                or entry.cipher_key == entry.mask_key
            ):
                raise ProtocolViolation(f"{entry.sender!r} advertised a key already in use")
            seen.add(entry.sender)
            keys |= {entry.cipher_key, entry.mask_key}
        self._check_count(len(seen), "neighbours advertised keys")

    def _deal(self) -> ShareKeys:
        setup, keys = self._setup, self._keys
        self._seed = self._entropy(SECRET_BYTES)
        holders = sorted(self._peers, key=self._graph.index)
        rows = split(
            keys.mask_secret + self._seed,
            holders=[self._graph.index(v) for v in holders],
            threshold=setup.threshold,
            entropy=self._entropy,
        )
        # Row i holds the key share then the seed share of holders[i]: encoded
        # at once, each pair is one slice of 2 * SHARE_BYTES.
        encoded, width = encode_share(rows), 2 * SHARE_BYTES
        shares = []
        for at, holder in zip(range(0, len(encoded), width), holders, strict=True):
            middle = at + SHARE_BYTES
            shares.append(self._seal(holder, encoded[at:middle], encoded[middle : at + width]))
        commitment = seed_commitment(
            federation_id=setup.federation_id, round=setup.round, owner=self._id, seed=self._seed
        )
        return ShareKeys(setup.federation_id, setup.round, self._id, commitment, tuple(shares))

    def _cipher_key(self, neighbour: str) -> bytes:
        if neighbour not in self._cipher_keys:
            secret = agree(self._keys.cipher, self._peers[neighbour].cipher_key)
            self._cipher_keys[neighbour] = derive_key(
                secret,
                purpose=KeyPurpose.SHARE_CIPHER,
                federation_id=self._setup.federation_id,
                round=self._setup.round,
                pair=(self._id, neighbour),
            )
        return self._cipher_keys[neighbour]

    def _commit(self, kind: ShareKind, dealer: str, holder: str, share: bytes) -> bytes:
        return share_commitment(
            kind,
            federation_id=self._setup.federation_id,
            round=self._setup.round,
            parties=(dealer, holder),
            share=share,
        )

    def _seal(self, holder: str, key_share: bytes, seed_share: bytes) -> EncryptedShare:
        context = share_context(
            federation_id=self._setup.federation_id,
            round=self._setup.round,
            sender=self._id,
            receiver=holder,
        )
        ciphertext = encrypt(
            self._cipher_key(holder),
            key_share + seed_share,
            associated_data=context,
            nonce=self._entropy(NONCE_BYTES),
        )
        return EncryptedShare(
            holder,
            ciphertext,
            self._commit(ShareKind.KEY, self._id, holder, key_share),
            self._commit(ShareKind.SEED, self._id, holder, seed_share),
        )

    def masked_input(
        self,
        delivery: ShareDelivery,
        update: Array,
        *,
        weight: float,
        rng: np.random.Generator | None = None,
    ) -> MaskedInput:
        """Keep the neighbours' shares and return the masked, quantized update.

        Args:
            delivery: the shares the neighbours sent this client.
            update: the flat float update (e.g. `quantize.flatten` of the delta).
            weight: the client's weight, in [0, max_weight].
            rng: generator for stochastic rounding; a fresh OS-seeded one if None.

        Raises:
            ProtocolViolation: a replayed or misaddressed delivery, a sender that
                was not in this client's roster, fewer than t senders, or a
                second, different delivery.
            RoundStateError: called before `share_keys`, or the round takes
                ring vectors (`masked_ring_input`).
            ValueError: the update has the wrong length or weight is out of range.
        """
        quantization = self._setup.quantization
        if quantization is None:
            raise RoundStateError("this round takes ring vectors: use masked_ring_input")

        def encode() -> Array:
            generator = rng if rng is not None else np.random.default_rng()
            return quantization.encode(update, weight=weight, rng=generator)

        return self._mask(delivery, np.shape(update), encode)

    def masked_ring_input(self, delivery: ShareDelivery, codes: Array) -> MaskedInput:
        """Keep the neighbours' shares and mask a vector already encoded in the ring.

        For rounds without quantization (`RoundSetup.quantization` is None),
        whose inputs the caller encoded itself, e.g. with the distributed
        discrete Gaussian of `privacy.dp.distributed`.

        Args:
            delivery: the shares the neighbours sent this client.
            codes: `vector_length` integers in [0, 2^ring_bits).

        Raises:
            ProtocolViolation: as `masked_input`.
            RoundStateError: called before `share_keys`, or the round quantizes.
            ValueError: the vector has the wrong length, or values outside the ring.
        """
        setup = self._setup
        if setup.quantization is not None:
            raise RoundStateError("this round quantizes updates: use masked_input")

        def encode() -> Array:
            values = np.asarray(codes)
            if values.dtype.kind not in "iu" or (
                values.size and (values.min() < 0 or int(values.max()) >> setup.ring_bits)
            ):
                raise ValueError(f"the vector must hold integers in [0, 2^{setup.ring_bits})")
            # A copy: the masks are added in place, and the caller keeps its codes.
            ring: Array = values.astype(ring_dtype(setup.ring_bits))
            return ring

        return self._mask(delivery, np.shape(codes), encode)

    def _mask(
        self, delivery: ShareDelivery, shape: tuple[int, ...], encode: Callable[[], Array]
    ) -> MaskedInput:
        """Check the delivery, keep its shares and mask `encode()`, a fresh vector it may own."""
        with self._guard():
            if self._shared is None:
                raise RoundStateError("share_keys must come before masked_input")
            if self._masked is not None:
                if self._masked[0] != delivery:
                    raise ProtocolViolation("a second, different share delivery from the server")
                return self._masked[1]
            setup = self._setup
            if shape != (setup.vector_length,):
                raise ValueError(
                    f"the update has shape {shape}; the round expects ({setup.vector_length},)"
                )
            self._check_delivery(delivery)
            codes = encode()
            self._held = {s.sender: pair for s in delivery.shares if (pair := self._open(s))}
            self._delivered = frozenset(s.sender for s in delivery.shares)
            # `encode` returns a fresh vector: uint32 codes already are the
            # ring vector of a ring of at most 32 bits (no copy).
            vector = np.asarray(codes, dtype=ring_dtype(setup.ring_bits))
            apply_masks(vector, self._masks(), ring_bits=setup.ring_bits)
            data = vector.astype(vector.dtype.newbyteorder("<"), copy=False).tobytes()
            message = MaskedInput(setup.federation_id, setup.round, self._id, setup.ring_bits, data)
            self._masked = (delivery, message)
            return message

    def _check_delivery(self, delivery: ShareDelivery) -> None:
        self._check_envelope(delivery)
        senders = [s.sender for s in delivery.shares]
        if len(set(senders)) != len(senders):
            raise ProtocolViolation("the share delivery lists a sender twice")
        unknown = sorted(set(senders) - set(self._peers))
        if unknown:
            raise ProtocolViolation(f"shares from clients outside this client's roster: {unknown}")
        self._check_count(len(senders), "neighbours sent shares")

    def _open(self, forwarded: ForwardedShare) -> tuple[bytes, bytes] | None:
        """Decrypt and check one neighbour's shares; None if they are unusable.

        An unusable share (forged ciphertext, or shares that do not match the
        dealer's commitments) is simply never revealed: the dealer's secrets
        are then recovered from the other neighbours' shares.
        """
        context = share_context(
            federation_id=self._setup.federation_id,
            round=self._setup.round,
            sender=forwarded.sender,
            receiver=self._id,
        )
        try:
            plain = decrypt(
                self._cipher_key(forwarded.sender), forwarded.ciphertext, associated_data=context
            )
            if len(plain) != 2 * SHARE_BYTES:
                return None
            decode_shares(plain, SHARE_LIMBS)
        except (ProtocolViolation, ValueError):
            return None
        key_share, seed_share = plain[:SHARE_BYTES], plain[SHARE_BYTES:]
        dealer = forwarded.sender
        if (
            self._commit(ShareKind.KEY, dealer, self._id, key_share)
            != forwarded.key_share_commitment
            or self._commit(ShareKind.SEED, dealer, self._id, seed_share)
            != forwarded.seed_share_commitment
        ):
            return None
        return key_share, seed_share

    def _masks(self) -> list[Mask]:
        masks = [Mask(self._seed, 1)]
        for neighbour in sorted(self._delivered):
            secret = agree(self._keys.mask, self._peers[neighbour].mask_key)
            seed = derive_key(
                secret,
                purpose=KeyPurpose.PAIRWISE_MASK,
                federation_id=self._setup.federation_id,
                round=self._setup.round,
                pair=(self._id, neighbour),
            )
            masks.append(Mask(seed, pairwise_sign(self._id, neighbour)))
        return masks

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Reveal seed shares of surviving neighbours and key shares of dropped ones.

        Raises:
            ProtocolViolation: the request is replayed or misaddressed, lists an
                unknown client or a neighbour both ways, misses a neighbour,
                leaves fewer than t survivors, asks for the other share of a
                neighbour than an earlier request, or differs from an earlier
                request in any way.
            RoundStateError: called before `masked_input`.
        """
        with self._guard():
            if self._masked is None:
                raise RoundStateError("masked_input must come before unmask")
            self._check_unmask(request)
            if self._unmasked is not None:
                if self._unmasked[0] != request:
                    raise ProtocolViolation("a second, different unmask request from the server")
                return self._unmasked[1]
            response = self._reveal(request)
            self._unmasked = (request, response)
            return response

    def _check_unmask(self, request: UnmaskRequest) -> None:
        self._check_envelope(request)
        survivors, dropped = set(request.survivors), set(request.dropped)
        if len(survivors) != len(request.survivors) or len(dropped) != len(request.dropped):
            raise ProtocolViolation("the unmask request lists a client twice")
        both = sorted(survivors & dropped)
        if both:
            raise ProtocolViolation(f"the unmask request lists {both} as survived and dropped")
        for neighbour in survivors | dropped:
            wanted = ShareKind.SEED if neighbour in survivors else ShareKind.KEY
            if self._revealed.get(neighbour, wanted) != wanted:
                raise ProtocolViolation(
                    f"the {self._revealed[neighbour]} share of {neighbour!r} was already "
                    "revealed; refusing to reveal the other one"
                )
        unknown = sorted((survivors | dropped) - self._delivered)
        if unknown:
            raise ProtocolViolation(f"the unmask request lists clients it never saw: {unknown}")
        missing = sorted(self._delivered - survivors - dropped)
        if missing:
            raise ProtocolViolation(f"the unmask request does not say what became of {missing}")
        self._check_count(len(survivors), "neighbours survived")

    def _reveal(self, request: UnmaskRequest) -> UnmaskResponse:
        seed_shares = []
        for neighbour in request.survivors:
            self._revealed[neighbour] = ShareKind.SEED
            if neighbour in self._held:
                seed_shares.append(RevealedShare(neighbour, self._held[neighbour][1]))
        key_shares = []
        for neighbour in request.dropped:
            self._revealed[neighbour] = ShareKind.KEY
            if neighbour in self._held:
                key_shares.append(RevealedShare(neighbour, self._held[neighbour][0]))
        setup = self._setup
        return UnmaskResponse(
            setup.federation_id, setup.round, self._id, tuple(seed_shares), tuple(key_shares)
        )
