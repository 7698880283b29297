"""Canonical, strict, pickle-free encoding of every SecAgg+ message."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.secagg import (
    AdvertiseKeys,
    EncryptedShare,
    ForwardedShare,
    KeyRoster,
    MalformedMessage,
    MaskedInput,
    Quantization,
    RevealedShare,
    RoundSetup,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from privacy.secagg.messages import SEALED_SHARE_BYTES, SHARE_BYTES

ids = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12)


def blob(size: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=size, max_size=size)


advertisements = st.builds(
    AdvertiseKeys, ids, st.integers(0, 2**40), ids, blob(32), blob(32), blob(64)
)
encrypted = st.builds(EncryptedShare, ids, blob(SEALED_SHARE_BYTES), blob(32), blob(32))
forwarded = st.builds(ForwardedShare, ids, blob(SEALED_SHARE_BYTES), blob(32), blob(32))
revealed = st.builds(RevealedShare, ids, blob(SHARE_BYTES))
messages = st.one_of(
    advertisements,
    st.builds(
        lambda receiver, keys: KeyRoster("fed", 3, receiver, keys),
        ids,
        st.lists(
            st.builds(AdvertiseKeys, st.just("fed"), st.just(3), ids, blob(32), blob(32), blob(64)),
            max_size=3,
        ).map(tuple),
    ),
    st.builds(
        ShareKeys,
        ids,
        st.integers(0, 99),
        ids,
        blob(32),
        st.lists(encrypted, max_size=3).map(tuple),
    ),
    st.builds(
        ShareDelivery, ids, st.integers(0, 99), ids, st.lists(forwarded, max_size=3).map(tuple)
    ),
    st.builds(
        MaskedInput,
        ids,
        st.integers(0, 99),
        ids,
        st.integers(1, 32),
        st.binary(min_size=1, max_size=40).map(lambda b: b * 4),
    ),
    st.builds(
        UnmaskRequest,
        ids,
        st.integers(0, 99),
        ids,
        st.lists(ids, max_size=4).map(tuple),
        st.lists(ids, max_size=4).map(tuple),
    ),
    st.builds(
        UnmaskResponse,
        ids,
        st.integers(0, 99),
        ids,
        st.lists(revealed, max_size=3).map(tuple),
        st.lists(revealed, max_size=3).map(tuple),
    ),
)


@settings(max_examples=150, derandomize=True)
@given(message=messages)
def test_every_message_round_trips_through_its_bytes(message: object) -> None:
    data = message.to_bytes()  # type: ignore[attr-defined]
    again = type(message).from_bytes(data)  # type: ignore[attr-defined]
    assert again == message
    assert again.to_bytes() == data


def setup(**changes: object) -> RoundSetup:
    fields: dict[str, object] = {
        "federation_id": "fed",
        "round": 4,
        "cohort": ("a", "b", "c", "d", "e"),
        "degree": 4,
        "threshold": 3,
        "graph_seed": bytes(range(32)),
        "vector_length": 10,
        "quantization": Quantization(clip=0.5, value_bits=12, max_weight=3.0),
        "ring_bits": 15,
    }
    fields.update(changes)
    return RoundSetup(**fields)  # type: ignore[arg-type]


def test_round_setup_round_trips_and_validates_its_parameters() -> None:
    original = setup()
    assert RoundSetup.from_bytes(original.to_bytes()) == original
    with pytest.raises(ValueError, match="more than half"):
        setup(threshold=2)
    with pytest.raises(ValueError, match="exceed a ring"):
        setup(ring_bits=14)
    with pytest.raises(ValueError, match="sorted"):
        setup(cohort=("b", "a", "c", "d", "e"))
    header = json.loads(original.to_bytes()[8:])
    header["threshold"] = 2
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(MalformedMessage, match="more than half"):
        RoundSetup.from_bytes(b"FSA1" + len(text).to_bytes(4, "big") + text)


def advert() -> AdvertiseKeys:
    return AdvertiseKeys("fed", 4, "a", bytes(32), bytes(range(32)), bytes(64))


def reencode(data: bytes, change: dict[str, object], *, canonical: bool = True) -> bytes:
    """Re-encode the header of `data` with `change`, without its body."""
    size = int.from_bytes(data[4:8], "big")
    header = json.loads(data[8 : 8 + size])
    header.update(change)
    header = {k: v for k, v in header.items() if v is not None}
    if canonical:
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    else:
        text = json.dumps(header, indent=1).encode()
    return b"FSA1" + len(text).to_bytes(4, "big") + text


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"stage": "share-keys"}, "stage"),
        ({"type": "ShareKeys"}, "expected 'AdvertiseKeys'"),
        ({"round": True}, "round must be an integer"),
        ({"round": -1}, "round must be an integer"),
        ({"round": 1.0}, "round must be an integer"),
        ({"sender": ""}, "sender must be a string"),
        ({"sender": 7}, "sender must be a string"),
        ({"sender": None}, "lacks the field 'sender'"),
        ({"extra": 1}, "unexpected fields"),
    ],
)
def test_malformed_fields_are_refused(change: dict[str, object], match: str) -> None:
    data = advert().to_bytes()
    with pytest.raises(MalformedMessage, match=match):
        AdvertiseKeys.from_bytes(reencode(data, change) + data[-128:])


def test_only_the_canonical_encoding_is_accepted() -> None:
    data = advert().to_bytes()
    with pytest.raises(MalformedMessage, match="canonical"):
        AdvertiseKeys.from_bytes(reencode(data, {}, canonical=False) + data[-128:])
    # Base64 with non-zero padding bits decodes to the same bytes: refused.
    seed = setup().to_bytes()
    text = json.loads(seed[8:])["graph_seed"]
    assert text.endswith("8=")
    with pytest.raises(MalformedMessage, match="canonical base64"):
        RoundSetup.from_bytes(reencode(seed, {"graph_seed": text[:-2] + "9="}))


@pytest.mark.parametrize(
    "data",
    [b"", b"FSA1", b"XXXX\x00\x00\x00\x02{}", b"FSA1\xff\xff\xff\xff{}", b"FSA1\x00\x00\x00\x02[}"],
)
def test_garbage_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        AdvertiseKeys.from_bytes(data)


def test_truncated_and_trailing_bytes_are_refused() -> None:
    data = advert().to_bytes()
    with pytest.raises(MalformedMessage, match="body has 127 bytes, not 128"):
        AdvertiseKeys.from_bytes(data[:-1])
    with pytest.raises(MalformedMessage, match="body has 129 bytes"):
        AdvertiseKeys.from_bytes(data + b"x")
    request = UnmaskRequest("fed", 4, "a", ("b",), ()).to_bytes()
    with pytest.raises(MalformedMessage, match="after the header"):
        UnmaskRequest.from_bytes(request + b"x")
    roster = KeyRoster("fed", 4, "b", (advert(),)).to_bytes()
    with pytest.raises(MalformedMessage, match="body has 256 bytes, not 128"):
        KeyRoster.from_bytes(roster + roster[-128:])
    masked = MaskedInput("fed", 4, "a", 20, np.arange(5, dtype="<u4").tobytes()).to_bytes()
    with pytest.raises(MalformedMessage, match="not 5 values"):
        MaskedInput.from_bytes(masked[:-1])
    with pytest.raises(MalformedMessage, match="not 5 values"):
        MaskedInput.from_bytes(masked + b"\x00" * 4)


def test_a_roster_holds_only_keys_of_its_own_round() -> None:
    with pytest.raises(ValueError, match="another round"):
        KeyRoster("fed", 5, "b", (advert(),))


def test_masked_input_travels_as_four_bytes_per_value_up_to_32_bits() -> None:
    values = np.arange(1000, dtype=np.uint32)
    message = MaskedInput("fed", 4, "a", 32, values.tobytes())
    data = message.to_bytes()
    assert len(data) < 4 * 1000 + 200
    np.testing.assert_array_equal(MaskedInput.from_bytes(data).values(), values)
    wide = MaskedInput("fed", 4, "a", 40, np.arange(10, dtype="<u8").tobytes())
    assert wide.length == 10
    assert wide.values().dtype.itemsize == 8


def test_an_invalid_id_in_a_list_of_records_is_refused_with_its_position() -> None:
    roster = KeyRoster("fed", 4, "b", (advert(), advert())).to_bytes()
    size = int.from_bytes(roster[4:8], "big")
    for senders, position in ((["a", ""], 1), ([7, "a"], 0)):
        data = reencode(roster, {"senders": senders}) + roster[8 + size :]
        with pytest.raises(MalformedMessage, match=rf"senders: {position} must be a string"):
            KeyRoster.from_bytes(data)
    share = RevealedShare("a", bytes(SHARE_BYTES))
    response = UnmaskResponse.from_bytes(UnmaskResponse("fed", 4, "b", (share,), ()).to_bytes())
    assert response.seed_shares == (share,)
    assert response.key_shares == ()
