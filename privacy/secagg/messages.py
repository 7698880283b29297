"""The SecAgg+ messages and their canonical byte encoding.

Every message is a frozen value that names its federation, round and stage,
its sender (client messages) or receiver (server messages), so that a message
replayed from another round, stage or client is detected. Stages, in order:

==============  =====================  =====================================
stage           client -> server       server -> client (opens the stage)
==============  =====================  =====================================
advertise-keys  `AdvertiseKeys`        `RoundSetup` (with the task)
share-keys      `ShareKeys`            `KeyRoster`
masked-input    `MaskedInput`          `ShareDelivery`
unmask          `UnmaskResponse`       `UnmaskRequest`
==============  =====================  =====================================

Encoding (never pickle): the 4-byte magic ``FSA1``, a 4-byte big-endian
header length, a canonical JSON header (sorted keys, no spaces, ASCII) with
the ids, numbers and lists, then a binary body with the fixed-size byte
fields (keys, signatures, ciphertexts, commitments, shares, the masked
vector) concatenated in the order the header lists them. Decoding accepts
only the canonical form of a message, with exactly its fields, each of the
right type and size, and a body of exactly the right length, and raises
`MalformedMessage` otherwise: one message has exactly one encoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Self

import numpy as np

from fedcore import Array
from privacy.secagg.cipher import NONCE_BYTES, TAG_BYTES
from privacy.secagg.codec import (
    BodyReader,
    FieldReader,
    Message,
    b64,
    build,
    build_records,
    check_id,
    check_size,
    done,
    envelope,
    read_envelope,
)
from privacy.secagg.errors import MalformedMessage
from privacy.secagg.graph import NeighbourGraph
from privacy.secagg.keys import (
    PUBLIC_KEY_BYTES,
    SECRET_BYTES,
    SIGNATURE_BYTES,
    advertisement_payload,
)
from privacy.secagg.prg import ring_dtype
from privacy.secagg.quantize import Quantization
from privacy.secagg.shamir import LIMB_BYTES

__all__ = [
    "DIGEST_BYTES",
    "SEALED_SHARE_BYTES",
    "SHARE_BYTES",
    "SHARE_LIMBS",
    "AdvertiseKeys",
    "ClientMessage",
    "EncryptedShare",
    "ForwardedShare",
    "KeyRoster",
    "MaskedInput",
    "RevealedShare",
    "RoundSetup",
    "ServerMessage",
    "ShareDelivery",
    "ShareKeys",
    "Stage",
    "UnmaskRequest",
    "UnmaskResponse",
]

DIGEST_BYTES = 32
SHARE_LIMBS = SECRET_BYTES // LIMB_BYTES
SHARE_BYTES = 4 * SHARE_LIMBS
# nonce || (key share || seed share) || tag
SEALED_SHARE_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + TAG_BYTES


class Stage(StrEnum):
    """The four SecAgg+ stages, in order."""

    ADVERTISE_KEYS = "advertise-keys"
    SHARE_KEYS = "share-keys"
    MASKED_INPUT = "masked-input"
    UNMASK = "unmask"


@dataclass(frozen=True, slots=True)
class RoundSetup(Message):
    """The public parameters of one round, sent to every client of the cohort.

    Attributes:
        federation_id: the federation.
        round: the round number.
        cohort: the sorted ids of the clients selected for the round.
        degree: k, each client's number of neighbours (n - 1: complete graph).
        threshold: t, the Shamir threshold; 2t > k so that no server can
            collect both shares of a client from honest neighbours.
        graph_seed: the public 32-byte seed of the neighbour graph.
        vector_length: P, the number of update values.
        quantization: how updates are clipped, weighted and rounded; None
            when clients send vectors already encoded in the ring (e.g. the
            distributed discrete Gaussian of `privacy.dp.distributed`), whose
            encoder then answers for overflow.
        ring_bits: b; sums are taken in Z_(2^b), checked for overflow when
            the round quantizes.
    """

    federation_id: str
    round: int
    cohort: tuple[str, ...]
    degree: int
    threshold: int
    graph_seed: bytes
    vector_length: int
    quantization: Quantization | None
    ring_bits: int
    KIND: ClassVar[str] = "RoundSetup"

    def __post_init__(self) -> None:
        check_id(self.federation_id, "federation_id")
        for client in self.cohort:
            check_id(client, "a client id")
        if list(self.cohort) != sorted(set(self.cohort)):
            raise ValueError("the cohort must be sorted and without duplicates")
        check_size(self.graph_seed, SECRET_BYTES, "graph_seed")
        NeighbourGraph(self.cohort, degree=self.degree, seed=self.graph_seed)
        if not (2 <= self.threshold <= self.degree and 2 * self.threshold > self.degree):
            raise ValueError(
                f"threshold {self.threshold} must be in 2..{self.degree} and more than half "
                f"the degree {self.degree}"
            )
        if self.round < 0 or self.vector_length < 1:
            raise ValueError("round must be >= 0 and vector_length >= 1")
        if self.quantization is not None:
            self.quantization.check_ring(self.ring_bits, len(self.cohort))
        elif not 2 <= self.ring_bits <= 64:
            raise ValueError(f"ring_bits {self.ring_bits} must be in 2..64")

    @property
    def input_length(self) -> int:
        """The number of ring elements in a masked input: P, plus the weight when quantized."""
        return self.vector_length + (1 if self.quantization is not None else 0)

    def graph(self) -> NeighbourGraph:
        """Build the round's neighbour graph."""
        return NeighbourGraph(self.cohort, degree=self.degree, seed=self.graph_seed)

    def _header(self) -> dict[str, Any]:
        header = envelope(self.KIND, None, self.federation_id, self.round)
        q = self.quantization
        quantization = (
            None
            if q is None
            else {"clip": q.clip, "value_bits": q.value_bits, "max_weight": q.max_weight}
        )
        header |= {
            "cohort": list(self.cohort),
            "degree": self.degree,
            "threshold": self.threshold,
            "graph_seed": b64(self.graph_seed),
            "vector_length": self.vector_length,
            "quantization": quantization,
            "ring_bits": self.ring_bits,
        }
        return header

    @classmethod
    def _parse(cls, reader: FieldReader, body: bytes) -> Self:
        federation_id, round = read_envelope(reader, None)
        quantization = None
        if not reader.absent("quantization"):
            q = reader.record("quantization")
            quantization = build(
                Quantization,
                clip=q.number("clip"),
                value_bits=q.integer("value_bits", 1, 32),
                max_weight=q.number("max_weight"),
            )
            q.finish()
        setup = build(
            cls,
            federation_id=federation_id,
            round=round,
            cohort=reader.texts("cohort"),
            degree=reader.integer("degree"),
            threshold=reader.integer("threshold"),
            graph_seed=reader.blob("graph_seed", SECRET_BYTES),
            vector_length=reader.integer("vector_length", 1),
            quantization=quantization,
            ring_bits=reader.integer("ring_bits", 1, 64),
        )
        done(reader, body)
        return setup


@dataclass(frozen=True, slots=True)
class AdvertiseKeys(Message):
    """A client's two public round keys, signed with its identity key."""

    federation_id: str
    round: int
    sender: str
    cipher_key: bytes
    mask_key: bytes
    signature: bytes
    KIND: ClassVar[str] = "AdvertiseKeys"
    STAGE: ClassVar[Stage] = Stage.ADVERTISE_KEYS
    BODY: ClassVar[int] = 2 * PUBLIC_KEY_BYTES + SIGNATURE_BYTES

    def __post_init__(self) -> None:
        check_id(self.federation_id, "federation_id")
        check_id(self.sender, "sender")
        check_size(self.cipher_key, PUBLIC_KEY_BYTES, "cipher_key")
        check_size(self.mask_key, PUBLIC_KEY_BYTES, "mask_key")
        check_size(self.signature, SIGNATURE_BYTES, "signature")

    def signed_payload(self) -> bytes:
        """Return the bytes the signature covers."""
        return advertisement_payload(
            federation_id=self.federation_id,
            round=self.round,
            client_id=self.sender,
            cipher_key=self.cipher_key,
            mask_key=self.mask_key,
        )

    def _header(self) -> dict[str, Any]:
        return envelope(self.KIND, self.STAGE.value, self.federation_id, self.round) | {
            "sender": self.sender
        }

    def _body(self) -> bytes:
        return self.cipher_key + self.mask_key + self.signature

    @classmethod
    def _parse(cls, reader: FieldReader, body: bytes) -> Self:
        federation_id, round = read_envelope(reader, cls.STAGE.value)
        blocks = BodyReader(body, cls.BODY, cls.KIND)
        message = build(
            cls,
            federation_id=federation_id,
            round=round,
            sender=reader.text("sender"),
            cipher_key=blocks.take(PUBLIC_KEY_BYTES),
            mask_key=blocks.take(PUBLIC_KEY_BYTES),
            signature=blocks.take(SIGNATURE_BYTES),
        )
        reader.finish()
        return message


@dataclass(frozen=True, slots=True)
class KeyRoster(Message):
    """The advertised keys of a client's neighbours that reached the server.

    Every entry belongs to the roster's federation and round; an entry
    replayed from another round cannot be re-labelled, because its signature
    covers the round it was made for.
    """

    federation_id: str
    round: int
    receiver: str
    keys: tuple[AdvertiseKeys, ...]
    KIND: ClassVar[str] = "KeyRoster"
    STAGE: ClassVar[Stage] = Stage.SHARE_KEYS

    def __post_init__(self) -> None:
        check_id(self.federation_id, "federation_id")
        check_id(self.receiver, "receiver")
        for key in self.keys:
            if (key.federation_id, key.round) != (self.federation_id, self.round):
                raise ValueError(f"the keys of {key.sender!r} belong to another round")

    def _header(self) -> dict[str, Any]:
        return envelope(self.KIND, self.STAGE.value, self.federation_id, self.round) | {
            "receiver": self.receiver,
            "senders": [key.sender for key in self.keys],
        }

    def _body(self) -> bytes:
        return b"".join(key._body() for key in self.keys)

    @classmethod
    def _parse(cls, reader: FieldReader, body: bytes) -> Self:
        federation_id, round = read_envelope(reader, cls.STAGE.value)
        senders = reader.texts("senders")
        blocks = BodyReader(body, len(senders) * AdvertiseKeys.BODY, cls.KIND)
        keys = build_records(
            AdvertiseKeys,
            senders,
            blocks,
            (PUBLIC_KEY_BYTES, PUBLIC_KEY_BYTES, SIGNATURE_BYTES),
            lead=(federation_id, round),
        )
        message = build(
            cls,
            federation_id=federation_id,
            round=round,
            receiver=reader.text("receiver"),
            keys=keys,
        )
        reader.finish()
        return message


@dataclass(frozen=True, slots=True)
class EncryptedShare:
    """One neighbour's shares of the sender's secrets, encrypted to it, and commitments.

    The commitments (`commitments.share_commitment`) let the holder check the
    shares it decrypts and the server check the shares revealed at unmask.
    """

    receiver: str
    ciphertext: bytes
    key_share_commitment: bytes
    seed_share_commitment: bytes

    def __post_init__(self) -> None:
        check_id(self.receiver, "receiver")
        check_size(self.ciphertext, SEALED_SHARE_BYTES, "ciphertext")
        check_size(self.key_share_commitment, DIGEST_BYTES, "key_share_commitment")
        check_size(self.seed_share_commitment, DIGEST_BYTES, "seed_share_commitment")

    def _body(self) -> bytes:
        return self.ciphertext + self.key_share_commitment + self.seed_share_commitment


# ciphertext, key share commitment, seed share commitment
_SEALED_FIELDS = (SEALED_SHARE_BYTES, DIGEST_BYTES, DIGEST_BYTES)
_SEALED_RECORD = sum(_SEALED_FIELDS)


@dataclass(frozen=True, slots=True)
class ShareKeys(Message):
    """A client's encrypted shares for each neighbour in its roster."""

    federation_id: str
    round: int
    sender: str
    seed_commitment: bytes
    shares: tuple[EncryptedShare, ...]
    KIND: ClassVar[str] = "ShareKeys"
    STAGE: ClassVar[Stage] = Stage.SHARE_KEYS

    def __post_init__(self) -> None:
        check_id(self.federation_id, "federation_id")
        check_id(self.sender, "sender")
        check_size(self.seed_commitment, DIGEST_BYTES, "seed_commitment")

    def _header(self) -> dict[str, Any]:
        return envelope(self.KIND, self.STAGE.value, self.federation_id, self.round) | {
            "sender": self.sender,
            "receivers": [share.receiver for share in self.shares],
        }

    def _body(self) -> bytes:
        return self.seed_commitment + b"".join(share._body() for share in self.shares)

    @classmethod
    def _parse(cls, reader: FieldReader, body: bytes) -> Self:
        federation_id, round = read_envelope(reader, cls.STAGE.value)
        receivers = reader.texts("receivers")
        blocks = BodyReader(body, DIGEST_BYTES + len(receivers) * _SEALED_RECORD, cls.KIND)
        seed_commitment = blocks.take(DIGEST_BYTES)
        shares = build_records(EncryptedShare, receivers, blocks, _SEALED_FIELDS)
        message = build(
            cls,
            federation_id=federation_id,
            round=round,
            sender=reader.text("sender"),
            seed_commitment=seed_commitment,
            shares=shares,
        )
        reader.finish()
        return message


@dataclass(frozen=True, slots=True)
class ForwardedShare:
    """A neighbour's encrypted shares for the receiver, with their commitments."""

    sender: str
    ciphertext: bytes
    key_share_commitment: bytes
    seed_share_commitment: bytes

    def __post_init__(self) -> None:
        check_id(self.sender, "sender")
        check_size(self.ciphertext, SEALED_SHARE_BYTES, "ciphertext")
        check_size(self.key_share_commitment, DIGEST_BYTES, "key_share_commitment")
        check_size(self.seed_share_commitment, DIGEST_BYTES, "seed_share_commitment")

    def _body(self) -> bytes:
        return self.ciphertext + self.key_share_commitment + self.seed_share_commitment


@dataclass(frozen=True, slots=True)
class ShareDelivery(Message):
    """The shares that the receiver's neighbours sent it (they completed share-keys)."""

    federation_id: str
    round: int
    receiver: str
    shares: tuple[ForwardedShare, ...]
    KIND: ClassVar[str] = "ShareDelivery"
    STAGE: ClassVar[Stage] = Stage.MASKED_INPUT

    def __post_init__(self) -> None:
        check_id(self.federation_id, "federation_id")
        check_id(self.receiver, "receiver")

    def _header(self) -> dict[str, Any]:
        return envelope(self.KIND, self.STAGE.value, self.federation_id, self.round) | {
            "receiver": self.receiver,
            "senders": [share.sender for share in self.shares],
        }

    def _body(self) -> bytes:
        return b"".join(share._body() for share in self.shares)

    @classmethod
    def _parse(cls, reader: FieldReader, body: bytes) -> Self:
        federation_id, round = read_envelope(reader, cls.STAGE.value)
        senders = reader.texts("senders")
        blocks = BodyReader(body, len(senders) * _SEALED_RECORD, cls.KIND)
        shares = build_records(ForwardedShare, senders, blocks, _SEALED_FIELDS)
        message = build(
            cls,
            federation_id=federation_id,
            round=round,
            receiver=reader.text("receiver"),
            shares=shares,
        )
        reader.finish()
        return message


@dataclass(frozen=True, slots=True)
class MaskedInput(Message):
    """A client's masked input: `RoundSetup.input_length` ring elements, little-endian.

    The vector is uint32 when the ring has at most 32 bits (4 bytes per value),
    uint64 otherwise; `values()` views it without a copy.
    """

    federation_id: str
    round: int
    sender: str
    ring_bits: int
    data: bytes
    KIND: ClassVar[str] = "MaskedInput"
    STAGE: ClassVar[Stage] = Stage.MASKED_INPUT

    def __post_init__(self) -> None:
        check_id(self.federation_id, "federation_id")
        check_id(self.sender, "sender")
        itemsize = ring_dtype(self.ring_bits).itemsize
        if not isinstance(self.data, bytes) or not self.data or len(self.data) % itemsize:
            raise ValueError(f"data must be a non-empty whole number of {itemsize}-byte values")

    @property
    def length(self) -> int:
        """The number of ring elements."""
        return len(self.data) // ring_dtype(self.ring_bits).itemsize

    def values(self) -> Array:
        """Return the vector as a read-only array of the ring's dtype."""
        dtype = ring_dtype(self.ring_bits).newbyteorder("<")
        return np.frombuffer(self.data, dtype=dtype)

    def _header(self) -> dict[str, Any]:
        return envelope(self.KIND, self.STAGE.value, self.federation_id, self.round) | {
            "sender": self.sender,
            "ring_bits": self.ring_bits,
            "length": self.length,
        }

    def _body(self) -> bytes:
        return self.data

    @classmethod
    def _parse(cls, reader: FieldReader, body: bytes) -> Self:
        federation_id, round = read_envelope(reader, cls.STAGE.value)
        ring_bits = reader.integer("ring_bits", 1, 64)
        length = reader.integer("length", 1)
        if len(body) != length * ring_dtype(ring_bits).itemsize:
            raise MalformedMessage(f"the vector holds {len(body)} bytes, not {length} values")
        message = build(
            cls,
            federation_id=federation_id,
            round=round,
            sender=reader.text("sender"),
            ring_bits=ring_bits,
            data=body,
        )
        reader.finish()
        return message


@dataclass(frozen=True, slots=True)
class UnmaskRequest(Message):
    """Which of the receiver's neighbours survived and which dropped.

    Both lists hold only neighbours whose shares the receiver was delivered;
    it answers with seed shares for survivors and key shares for the dropped.
    """

    federation_id: str
    round: int
    receiver: str
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    KIND: ClassVar[str] = "UnmaskRequest"
    STAGE: ClassVar[Stage] = Stage.UNMASK

    def __post_init__(self) -> None:
        check_id(self.federation_id, "federation_id")
        check_id(self.receiver, "receiver")

    def _header(self) -> dict[str, Any]:
        return envelope(self.KIND, self.STAGE.value, self.federation_id, self.round) | {
            "receiver": self.receiver,
            "survivors": list(self.survivors),
            "dropped": list(self.dropped),
        }

    @classmethod
    def _parse(cls, reader: FieldReader, body: bytes) -> Self:
        federation_id, round = read_envelope(reader, cls.STAGE.value)
        message = build(
            cls,
            federation_id=federation_id,
            round=round,
            receiver=reader.text("receiver"),
            survivors=reader.texts("survivors"),
            dropped=reader.texts("dropped"),
        )
        done(reader, body)
        return message


@dataclass(frozen=True, slots=True)
class RevealedShare:
    """One share of `owner`'s secret, revealed to the server."""

    owner: str
    share: bytes

    def __post_init__(self) -> None:
        check_id(self.owner, "owner")
        check_size(self.share, SHARE_BYTES, "share")


@dataclass(frozen=True, slots=True)
class UnmaskResponse(Message):
    """Seed shares of surviving neighbours and key shares of dropped ones."""

    federation_id: str
    round: int
    sender: str
    seed_shares: tuple[RevealedShare, ...]
    key_shares: tuple[RevealedShare, ...]
    KIND: ClassVar[str] = "UnmaskResponse"
    STAGE: ClassVar[Stage] = Stage.UNMASK

    def __post_init__(self) -> None:
        check_id(self.federation_id, "federation_id")
        check_id(self.sender, "sender")

    def _header(self) -> dict[str, Any]:
        return envelope(self.KIND, self.STAGE.value, self.federation_id, self.round) | {
            "sender": self.sender,
            "seed_owners": [share.owner for share in self.seed_shares],
            "key_owners": [share.owner for share in self.key_shares],
        }

    def _body(self) -> bytes:
        return b"".join(share.share for share in (*self.seed_shares, *self.key_shares))

    @classmethod
    def _parse(cls, reader: FieldReader, body: bytes) -> Self:
        federation_id, round = read_envelope(reader, cls.STAGE.value)
        seed_owners, key_owners = reader.texts("seed_owners"), reader.texts("key_owners")
        blocks = BodyReader(body, (len(seed_owners) + len(key_owners)) * SHARE_BYTES, cls.KIND)
        seed_shares = build_records(RevealedShare, seed_owners, blocks, (SHARE_BYTES,))
        key_shares = build_records(RevealedShare, key_owners, blocks, (SHARE_BYTES,))
        message = build(
            cls,
            federation_id=federation_id,
            round=round,
            sender=reader.text("sender"),
            seed_shares=seed_shares,
            key_shares=key_shares,
        )
        reader.finish()
        return message


ClientMessage = AdvertiseKeys | ShareKeys | MaskedInput | UnmaskResponse
ServerMessage = KeyRoster | ShareDelivery | UnmaskRequest
