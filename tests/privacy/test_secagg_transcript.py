"""Transcripts: the bytes that are signed, hashed and derived, against a slow reference."""

from __future__ import annotations

import hashlib
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.secagg import ShareKind
from privacy.secagg.cipher import share_context
from privacy.secagg.commitments import seed_commitment, share_commitment
from privacy.secagg.keys import KeyPurpose, advertisement_payload, derive_key
from privacy.secagg.transcript import PROTOCOL, extend, frame, prefix

Field = bytes | str | int


def reference_frame(label: str, *fields: Field) -> bytes:
    """Each field as a type tag, a 4-byte big-endian length and its bytes, in order."""
    out = b""
    for field in (PROTOCOL, label, *fields):
        if isinstance(field, bytes):
            tag, data = b"b", field
        elif isinstance(field, str):
            tag, data = b"s", field.encode("utf-8")
        else:
            tag, data = b"i", str(field).encode("ascii")
        out += tag + struct.pack(">I", len(data)) + data
    return out


fields = st.lists(st.binary(max_size=40) | st.text(max_size=12) | st.integers(0, 2**40))


@settings(max_examples=100, derandomize=True)
@given(label=st.text(min_size=1, max_size=12), head=fields, tail=fields)
def test_frames_match_the_reference_and_extend_appends_fields(
    label: str, head: list[Field], tail: list[Field]
) -> None:
    assert frame(label, *head, *tail) == reference_frame(label, *head, *tail)
    assert extend(frame(label, *head), *tail) == frame(label, *head, *tail)


def test_round_prefixes_are_cached_frames() -> None:
    start = prefix("share-ciphertext", "fed", 3)
    assert start == frame("share-ciphertext", "fed", 3)
    assert prefix("share-ciphertext", "fed", 3) is start


def test_the_protocol_transcripts_are_the_reference_frames() -> None:
    share = bytes(range(64))
    for kind in ShareKind:
        expected = hashlib.sha256(
            reference_frame("share", kind.value, "fed", 3, "dealer", "holder", share)
        ).digest()
        commitment = share_commitment(
            kind, federation_id="fed", round=3, parties=("dealer", "holder"), share=share
        )
        assert commitment == expected
    seed = bytes(32)
    assert seed_commitment(federation_id="fed", round=3, owner="o", seed=seed) == (
        hashlib.sha256(reference_frame("seed", "fed", 3, "o", seed)).digest()
    )
    assert share_context(federation_id="fed", round=3, sender="a", receiver="b") == (
        reference_frame("share-ciphertext", "fed", 3, "a", "b")
    )
    keys = (bytes(32), bytes(range(32)))
    assert advertisement_payload(
        federation_id="fed", round=3, client_id="a", cipher_key=keys[0], mask_key=keys[1]
    ) == reference_frame("advertise-keys", "fed", 3, "a", *keys)
    secret = bytes(range(1, 33))
    expected_key = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=reference_frame("hkdf-salt"),
        info=reference_frame("pairwise-mask", "fed", 3, "a", "b"),
    ).derive(secret)
    # The pair is sorted, so both ends derive the same key.
    for pair in (("a", "b"), ("b", "a")):
        key = derive_key(
            secret, purpose=KeyPurpose.PAIRWISE_MASK, federation_id="fed", round=3, pair=pair
        )
        assert key == expected_key


def test_a_share_context_is_pinned_byte_for_byte() -> None:
    # The associated data of every share ciphertext: a change here breaks
    # every client of an older version, so it is pinned, not recomputed.
    expected = (
        b"s\x00\x00\x00\x12fedcore/secagg+/v2"
        b"s\x00\x00\x00\x10share-ciphertext"
        b"s\x00\x00\x00\x03fed"
        b"i\x00\x00\x00\x017"
        b"s\x00\x00\x00\x01a"
        b"s\x00\x00\x00\x01b"
    )
    assert share_context(federation_id="fed", round=7, sender="a", receiver="b") == expected
