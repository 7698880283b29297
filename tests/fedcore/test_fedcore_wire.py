"""The safetensors wire format: round trips, strict parsing, conformance checks."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedcore import (
    FedAvg,
    NonFiniteUpdate,
    ParameterSet,
    TensorMismatch,
    TensorSpec,
    WireFormatError,
    wire,
)
from fedcore.parameters import Array

PROPERTY = settings(max_examples=50, deadline=None, derandomize=True, database=None)
BF16 = np.dtype(ml_dtypes.bfloat16)

names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12
).filter(lambda n: n != "__metadata__")
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
dtypes = st.sampled_from(
    [np.float32, np.float64, np.float16, BF16, np.int64, np.int32, np.uint8, np.int8, np.bool_]
)


@st.composite
def parameter_sets(draw: st.DrawFn) -> dict[str, Array]:
    keys = draw(st.lists(names, min_size=0, max_size=6, unique=True))
    out: dict[str, Array] = {}
    for key in keys:
        dtype = np.dtype(draw(dtypes))
        shape = draw(shapes)
        # Random bytes cover every bit pattern (NaN payloads, -0.0, subnormals).
        raw = draw(
            st.binary(
                min_size=int(np.prod(shape)) * dtype.itemsize,
                max_size=int(np.prod(shape)) * dtype.itemsize,
            )
        )
        if dtype == np.bool_:
            out[key] = np.frombuffer(raw, np.uint8).astype(np.bool_).reshape(shape)
        else:
            out[key] = np.frombuffer(raw, dtype).reshape(shape)
    return out


@st.composite
def bf16_sets(draw: st.DrawFn) -> dict[str, Array]:
    keys = draw(st.lists(names, min_size=1, max_size=4, unique=True))
    out = {}
    for key in keys:
        bits = draw(hnp.arrays(np.uint16, draw(shapes)))
        out[key] = bits.view(BF16)
    return out


def assert_same_bits(got: ParameterSet, want: dict[str, Array]) -> None:
    assert list(got) == list(want)
    for name, a in want.items():
        assert got[name].dtype == a.dtype, name
        assert got[name].shape == a.shape, name
        assert got[name].tobytes() == a.tobytes(), name


@PROPERTY
@given(parameter_sets(), st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
def test_encode_decode_round_trips_bits_names_order_and_metadata(
    params: dict[str, Array], metadata: dict[str, str]
) -> None:
    metadata.pop("fedcore.names", None)
    got, meta = wire.decode(wire.encode(params, metadata))
    assert_same_bits(got, params)
    assert meta == metadata


@PROPERTY
@given(bf16_sets())
def test_bfloat16_round_trips_bit_exactly_through_encode_and_decode(
    params: dict[str, Array],
) -> None:
    got, _ = wire.decode(wire.encode(params))
    assert_same_bits(got, params)


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(bf16_sets())
def test_bfloat16_round_trips_bit_exactly_through_write_and_read(
    tmp_path_factory: pytest.TempPathFactory, params: dict[str, Array]
) -> None:
    path = tmp_path_factory.mktemp("wire") / "update.safetensors"
    wire.write(params, path, {"k": "v"})
    got, meta = wire.read(path)
    assert_same_bits(got, params)
    assert meta == {"k": "v"}


def test_bfloat16_model_round_trips_through_the_wire_and_a_fedavg_round(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    model = {"w": rng.standard_normal((16, 8)).astype(BF16), "b": np.zeros(8, BF16)}
    model["b"][:2] = np.array([-0.0, 1e-39], dtype=BF16)
    wire.write(model, tmp_path / "model.safetensors")
    received, _ = wire.read(tmp_path / "model.safetensors")
    delta = ParameterSet(received).subtract(received)
    update, _ = wire.decode(wire.encode(delta))
    strategy = FedAvg()
    agg = strategy.begin(received)
    agg.add(update, 12.0)
    nxt = strategy.finish(received, agg)
    assert_same_bits(nxt, model)


_REFERENCE_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
    "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip


def reference_encode(params: dict[str, Array], metadata: dict[str, str]) -> bytes:
    """Encode as the format says, slowly and obviously: one JSON header, data by item size."""
    header: dict[str, Any] = {
        "__metadata__": dict(
            sorted({**metadata, "fedcore.names": json.dumps(list(params))}.items())
        )
    }
    ranked = sorted(enumerate(params.items()), key=lambda item: (-item[1][1].itemsize, item[0]))
    body = b""
    for _, (name, array) in ranked:
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {
            "dtype": _REFERENCE_CODES[str(array.dtype)],
            "shape": list(array.shape),
            "data_offsets": [len(body), len(body) + len(data)],
        }
        body += data
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + body


@PROPERTY
@given(parameter_sets(), st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
def test_encode_gives_the_bytes_of_the_slow_reference_encoder(
    params: dict[str, Array], metadata: dict[str, str]
) -> None:
    metadata.pop("fedcore.names", None)
    assert wire.encode(params, metadata) == reference_encode(params, metadata)
    # A second call takes the cached layout, with other metadata.
    assert wire.encode(params, {"k": "2"}) == reference_encode(params, {"k": "2"})


@PROPERTY
@given(bf16_sets())
def test_encode_of_bfloat16_gives_the_bytes_of_the_slow_reference_encoder(
    params: dict[str, Array],
) -> None:
    assert wire.encode(params) == reference_encode(params, {})


def test_encode_takes_non_contiguous_arrays_as_their_values() -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    params = {"t": base.T, "s": base[:, ::2], "n": np.array(5, np.int64)}
    assert wire.encode(params, {"k": "v"}) == reference_encode(params, {"k": "v"})
    got, _ = wire.decode(wire.encode(params))
    assert_same_bits(got, params)


@PROPERTY
@given(parameter_sets(), st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
def test_encode_views_returns_the_encoding_and_what_decoding_it_gives(
    params: dict[str, Array], metadata: dict[str, str]
) -> None:
    metadata.pop("fedcore.names", None)
    data, views = wire.encode_views(params, metadata)
    assert data == wire.encode(params, metadata)
    decoded, _ = wire.decode(data)
    assert_same_bits(views, params)
    for name, view in views.items():
        assert view.dtype == decoded[name].dtype
        assert view.shape == decoded[name].shape
        assert not view.flags.writeable
        assert np.shares_memory(view, np.frombuffer(data, np.uint8)) or view.nbytes == 0


def test_encode_views_are_unaffected_by_later_changes_to_the_source() -> None:
    source = {"w": np.arange(6, dtype=np.float32)}
    _, views = wire.encode_views(source)
    source["w"][:] = -1
    np.testing.assert_array_equal(views["w"], np.arange(6, dtype=np.float32))


def test_encode_refuses_the_reserved_tensor_name_and_unknown_dtypes() -> None:
    with pytest.raises(ValueError, match="__metadata__"):
        wire.encode({"__metadata__": np.zeros(1, np.float32)})
    with pytest.raises(TypeError, match="complex64"):
        wire.encode({"c": np.zeros(2, np.complex64)})


def test_names_keep_the_model_order_not_the_sorted_order() -> None:
    params = {n: np.zeros(2, np.float32) for n in ["z.weight", "a.bias", "m", "B", "_x"]}
    got, _ = wire.decode(wire.encode(params))
    assert list(got) == ["z.weight", "a.bias", "m", "B", "_x"]


@pytest.mark.parametrize(("elements", "mapped"), [(1000, False), (300_000, True)])
def test_read_maps_a_large_file_and_reads_a_small_one_both_read_only(
    tmp_path: Path, elements: int, mapped: bool
) -> None:
    params = {"w": np.arange(elements, dtype=np.float32), "n": np.array(7, np.int64)}
    wire.write(params, tmp_path / "u.safetensors")
    got, _ = wire.read(tmp_path / "u.safetensors")
    assert isinstance(got["w"], np.memmap) is mapped
    assert not got["w"].flags.writeable
    assert got["n"].shape == ()
    np.testing.assert_array_equal(got["w"], params["w"])
    np.testing.assert_array_equal(got["n"], params["n"])


def test_decode_returns_views_of_the_payload_without_copying() -> None:
    payload = bytearray(wire.encode({"w": np.arange(64, dtype=np.float32)}))
    got, _ = wire.decode(payload)
    assert np.shares_memory(got["w"], np.frombuffer(payload, np.uint8))


def test_empty_parameter_set_round_trips(tmp_path: Path) -> None:
    got, meta = wire.decode(wire.encode({}, {"a": "b"}))
    assert len(got) == 0
    assert meta == {"a": "b"}
    wire.write({}, tmp_path / "e.safetensors")
    assert len(wire.read(tmp_path / "e.safetensors")[0]) == 0


@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_official_safetensors_reader_loads_our_encoding(dtype: type) -> None:
    params = {"layer.w": np.arange(12, dtype=dtype).reshape(3, 4), "z": np.array([-5], dtype)}
    loaded = safetensors.numpy.load(wire.encode(params))
    assert set(loaded) == set(params)
    for name, a in params.items():
        assert loaded[name].dtype == a.dtype
        np.testing.assert_array_equal(loaded[name], a)


@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_we_decode_the_official_safetensors_encoding(dtype: type) -> None:
    params = {"b": np.arange(6, dtype=dtype).reshape(2, 3), "a": np.array([9], dtype)}
    got, meta = wire.decode(safetensors.numpy.save(params, metadata={"x": "y"}))
    assert meta == {"x": "y"}
    assert set(got) == {"a", "b"}
    for name, a in params.items():
        np.testing.assert_array_equal(got[name], a)


def small_payload() -> bytes:
    return wire.encode(
        {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(3, np.int64)},
        {"k": "v"},
    )


def test_every_truncation_of_a_payload_is_refused() -> None:
    payload = small_payload()
    for length in range(len(payload)):
        with pytest.raises(WireFormatError):
            wire.decode(payload[:length])


def test_every_truncation_of_a_file_is_refused(tmp_path: Path) -> None:
    payload = small_payload()
    path = tmp_path / "t.safetensors"
    for length in range(len(payload)):
        path.write_bytes(payload[:length])
        with pytest.raises(WireFormatError):
            wire.read(path)


def raw(header: Any, body: bytes = b"") -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + body


def f32(offsets: list[int], shape: Any = None) -> dict[str, Any]:
    count = (offsets[1] - offsets[0]) // 4
    return {"dtype": "F32", "shape": [count] if shape is None else shape, "data_offsets": offsets}


F32_1 = json.dumps(f32([0, 4])).encode()

MALFORMED = {
    "header is not JSON": raw(b"{not json", b""),
    "header is not UTF-8": raw(b"\xff\xfe", b""),
    "header is a JSON list": raw([1, 2]),
    "header length beyond the end": struct.pack("<Q", 1000) + b"{}",
    "header length over 100 MB": struct.pack("<Q", 2**40) + b"{}",
    "overlapping offsets": raw({"a": f32([0, 8]), "b": f32([4, 12])}, bytes(12)),
    "gap between tensors": raw({"a": f32([0, 4]), "b": f32([8, 12])}, bytes(12)),
    "data beyond the tensors": raw({"a": f32([0, 4])}, bytes(8)),
    "unknown dtype": raw({"a": {"dtype": "F8", "shape": [4], "data_offsets": [0, 4]}}, bytes(4)),
    "dtype not a string": raw({"a": {"dtype": 4, "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
    "shape not matching the byte range": raw({"a": f32([0, 8], shape=[3])}, bytes(8)),
    "shape that overflows int64": raw({"a": f32([0, 0], shape=[2**32, 2**32])}),
    "shape as a string": raw({"a": f32([0, 8], shape="2")}, bytes(8)),
    "shape with a boolean": raw({"a": f32([0, 4], shape=[True])}, bytes(4)),
    "shape with a float": raw({"a": f32([0, 4], shape=[1.0])}, bytes(4)),
    "negative shape": raw({"a": f32([0, 4], shape=[-1, -1])}, bytes(4)),
    "offsets as a string": raw({"a": {"dtype": "U8", "shape": [1], "data_offsets": "01"}}, b"x"),
    "three offsets": raw({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 1]}}, b"x"),
    "offsets reversed": raw({"a": {"dtype": "U8", "shape": [0], "data_offsets": [1, 0]}}, b"x"),
    "entry not an object": raw({"a": [0, 4]}, bytes(4)),
    "empty tensor name": raw({"": f32([0, 4])}, bytes(4)),
    "metadata value not a string": raw({"__metadata__": {"k": 1}, "a": f32([0, 4])}, bytes(4)),
    "metadata not an object": raw({"__metadata__": ["k"], "a": f32([0, 4])}, bytes(4)),
    "order not JSON": raw({"__metadata__": {"fedcore.names": "[a"}, "a": f32([0, 4])}, bytes(4)),
    "order with a number": raw(
        {"__metadata__": {"fedcore.names": '[1, "a"]'}, "a": f32([0, 4])}, bytes(4)
    ),
    "order listing a name twice": raw(
        {"__metadata__": {"fedcore.names": '["a", "a"]'}, "a": f32([0, 4])}, bytes(4)
    ),
    "metadata twice": raw(b'{"__metadata__":{},"__metadata__":{},"a":' + F32_1 + b"}", bytes(4)),
    "metadata not closed": raw(b'{"__metadata__":{"k":"v","a":' + F32_1 + b"}", bytes(4)),
    "junk after the metadata": raw(b'{"__metadata__":{} x,"a":' + F32_1 + b"}", bytes(4)),
    "junk after the header": raw(b'{"__metadata__":{},"a":' + F32_1 + b"} x", bytes(4)),
    "entries not closed": raw(b'{"__metadata__":{},"a":' + F32_1, bytes(4)),
    "order missing a tensor": raw(
        {"__metadata__": {"fedcore.names": '["a"]'}, "a": f32([0, 4]), "b": f32([4, 8])},
        bytes(8),
    ),
}


@pytest.mark.parametrize("payload", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_payload_is_refused_with_wire_format_error(
    payload: bytes, tmp_path: Path
) -> None:
    with pytest.raises(WireFormatError):
        wire.decode(payload)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(payload)
    with pytest.raises(WireFormatError):
        wire.read(path)


@pytest.mark.parametrize("space", ["", " ", "\n\t "])
def test_updates_differing_in_metadata_only_parse_their_tensor_entries_once(space: str) -> None:
    params = ParameterSet(
        {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.int64)}
    )
    payloads = [wire.encode(params, {"loss": str(i / 7)}) for i in range(20)]
    if space:  # hand-spaced headers (any JSON writer's) take the same path
        payloads = [_respaced(p, space) for p in payloads]
    before = wire._parse_cached_entries.cache_info()
    for index, payload in enumerate(payloads):
        decoded, metadata = wire.decode(payload)
        assert list(decoded) == ["w", "b"]
        np.testing.assert_array_equal(decoded["w"], params["w"])
        np.testing.assert_array_equal(decoded["b"], params["b"])
        assert metadata == {"loss": str(index / 7)}
        # The same answer as parsing the whole header.
        size = struct.unpack_from("<Q", payload)[0]
        header = payload[8 : 8 + size]
        assert wire._parse_header(header, len(payload) - 8 - size) == wire._parse_new_header(
            header, len(payload) - 8 - size
        )
    after = wire._parse_cached_entries.cache_info()
    assert after.misses - before.misses <= 1
    assert after.hits - before.hits >= 19


def _respaced(payload: bytes, space: str) -> bytes:
    size = struct.unpack_from("<Q", payload)[0]
    header = json.loads(payload[8 : 8 + size])
    text = json.dumps(header, separators=(",", ":" + space))
    assert text.startswith('{"__metadata__":')
    return raw(text.encode(), payload[8 + size :])


def test_hand_built_payload_with_zero_sized_and_scalar_tensors_is_accepted() -> None:
    header = {
        "empty": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
        "scalar": {"dtype": "I64", "shape": [], "data_offsets": [0, 8]},
    }
    got, _ = wire.decode(raw(header, struct.pack("<q", -42)))
    assert got["empty"].shape == (0, 3)
    assert got["scalar"].shape == ()
    assert int(got["scalar"]) == -42


def test_conform_lists_every_problem_in_one_error() -> None:
    spec = {
        "kept": TensorSpec("float32", (2,)),
        "missing": TensorSpec("float32", (1,)),
        "reshaped": TensorSpec("float32", (2, 3)),
        "retyped": TensorSpec("bfloat16", (4,)),
    }
    params = {
        "kept": np.zeros(2, np.float32),
        "reshaped": np.zeros((3, 2), np.float32),
        "retyped": np.zeros(4, np.float32),
        "extra": np.zeros(1, np.float32),
    }
    with pytest.raises(TensorMismatch) as info:
        wire.conform(params, spec)
    message = str(info.value)
    assert "missing tensor 'missing'" in message
    assert "unexpected tensor 'extra'" in message
    assert "'reshaped' has shape (3, 2), expected (2, 3)" in message
    assert "'retyped' has dtype float32, expected bfloat16" in message
    assert "kept" not in message


def test_conform_accepts_a_matching_set() -> None:
    model = ParameterSet({"w": np.zeros((2, 2), BF16), "n": np.array(1, np.int64)})
    wire.conform(wire.decode(wire.encode(model))[0], model.spec())


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_finite_catches_nan_and_inf(dtype: np.dtype[Any], bad: float) -> None:
    values = np.ones(10, dtype=dtype)
    values[7] = bad
    with pytest.raises(NonFiniteUpdate, match="'w'"):
        wire.check_finite({"ok": np.zeros(3, np.float32), "w": values})


def test_check_finite_scans_tensors_longer_than_one_chunk() -> None:
    values = np.zeros((1 << 20) + 5, np.float32)
    values[-1] = np.nan
    with pytest.raises(NonFiniteUpdate):
        wire.check_finite({"w": values})


def test_check_finite_ignores_integer_tensors_and_large_finite_float64() -> None:
    wire.check_finite(
        {
            "n": np.array([np.iinfo(np.int64).max, -1], np.int64),
            "u": np.array([255], np.uint8),
            "b": np.array([True]),
            "big": np.array([1e300, -1e308]),
            "bf": np.array([3e38], BF16),
        }
    )
