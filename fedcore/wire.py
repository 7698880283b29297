"""The wire format: parameter sets as safetensors, never pickle.

The safetensors layout (an 8-byte little-endian header length, a JSON header,
then the raw data) is written and parsed here rather than by the
`safetensors` library: its numpy reader neither memory-maps files nor knows
bfloat16 (the server must read 400 MB uploads without copying them), and its
writer orders metadata differently from call to call (identical uploads must
have identical digests). Tests check that the library reads what we write.
The header is validated as strictly as the reference implementation does:
known dtypes, shapes and offsets that are JSON integers, shapes that match
the byte ranges, ranges that are sorted, contiguous and cover the data
exactly. Every defect raises `WireFormatError`, never another exception.
"""

from __future__ import annotations

import functools
import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.errors import NonFiniteUpdate, TensorMismatch, WireFormatError
from fedcore.parameters import Array, ParameterSet, TensorSpec, as_dtype

__all__ = [
    "MEDIA_TYPE",
    "check_finite",
    "conform",
    "decode",
    "encode",
    "encode_views",
    "read",
    "write",
]

MEDIA_TYPE = "application/vnd.fedcore.safetensors"

# Metadata key holding the tensor order: safetensors stores tensors sorted by
# alignment and name, while a model's state_dict order is meaningful.
_ORDER_KEY = "fedcore.names"
# The reference implementation refuses headers over 100 MB; so do we.
_MAX_HEADER = 100_000_000
_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
# Keyed by dtype objects: formatting a dtype as a string costs microseconds,
# which adds up over thousands of small updates in a simulation.
_NUMPY = {code: as_dtype(name) for code, name in _DTYPES.items()}
_CODES = {dtype: code for code, dtype in _NUMPY.items()}
_BFLOAT16 = as_dtype("bfloat16")
_FINITE_CHUNK = 1 << 20
# Files up to this size are read whole rather than memory-mapped (see `read`).
_READ_WHOLE_BYTES = 1 << 20
# Tensor layouts kept (by names, dtypes and shapes): a server sees few models.
_CACHED_LAYOUTS = 64
# Tensor entries of headers up to this size are kept parsed (by their
# text), `_CACHED_LAYOUTS` of them.
_CACHED_HEADER_BYTES = 1 << 14
# `json.dumps` with separators builds an encoder per call; this one is reused.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class _Entry:
    """One validated tensor entry of a safetensors header."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    begin: int
    end: int


def encode(params: Mapping[str, Array], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize `params` (and string `metadata`) to safetensors bytes.

    The encoding is deterministic: the same tensors and metadata always give
    the same bytes, so a retried upload has the same digest as the original.
    """
    head, arrays, _ = _prepare(params, metadata)
    return b"".join([head, *map(_buffer, arrays)])


def encode_views(
    params: Mapping[str, Array], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, ParameterSet]:
    """Serialize `params` like `encode` and return read-only views of the tensors in the bytes.

    The views equal `decode(data)[0]` without parsing the header back: the
    layout is the one just written. A caller that hands both on (the
    in-process transport) thus passes tensors that are, bit for bit, the
    bytes that get stored and hashed, whatever later happens to `params`.
    """
    head, arrays, layout = _prepare(params, metadata)
    data = b"".join([head, *map(_buffer, arrays)])
    start = len(head)
    views = {
        e.name: np.ndarray(e.shape, e.dtype, buffer=data, offset=start + e.begin)
        for e in layout.entries
    }
    return data, ParameterSet(views)


def write(
    params: Mapping[str, Array], path: Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Serialize `params` to the file `path` without building the bytes in memory."""
    head, arrays, _ = _prepare(params, metadata)
    with path.open("wb") as fh:
        fh.write(head)
        for array in arrays:
            fh.write(_buffer(array))


def decode(data: bytes | bytearray | memoryview) -> tuple[ParameterSet, dict[str, str]]:
    """Parse safetensors bytes into a parameter set and its metadata.

    The arrays are read-only views of `data`.

    Raises:
        WireFormatError: the bytes are malformed or truncated.
    """
    buf = memoryview(data).cast("B")
    # Copy only the header: a 400 MB upload must not be copied to read 1 KB of JSON.
    header_len = _header_length(bytes(buf[:8]), len(buf))
    entries, metadata = _parse_header(bytes(buf[8 : 8 + header_len]), len(buf) - 8 - header_len)
    body = np.frombuffer(buf, dtype=np.uint8, offset=8 + header_len)
    return _arrays_from(entries, body), metadata


def read(path: Path) -> tuple[ParameterSet, dict[str, str]]:
    """Open a safetensors file as read-only arrays: memory-mapped, or read if small.

    A file of at most `_READ_WHOLE_BYTES` is read into memory: mapping a
    file costs more system calls than reading a small one whole. A larger
    file is memory-mapped, so that reading it takes no memory up front.

    Raises:
        WireFormatError: the file is malformed or truncated.
    """
    size = path.stat().st_size
    if size <= _READ_WHOLE_BYTES:
        return decode(path.read_bytes())
    with path.open("rb") as fh:
        header_len = _header_length(fh.read(8), size)
        entries, metadata = _parse_header(fh.read(header_len), size - 8 - header_len)
    data_len = size - 8 - header_len
    if data_len == 0:
        body = np.zeros(0, dtype=np.uint8)
    else:
        body = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len, shape=(data_len,))
    return _arrays_from(entries, body), metadata


def conform(params: Mapping[str, Array], spec: Mapping[str, TensorSpec]) -> None:
    """Check that `params` has exactly the names, shapes and dtypes of `spec`.

    Raises:
        TensorMismatch: listing every missing, extra or mismatched tensor.
    """
    if _conforms(params, spec):
        return
    problems = [f"missing tensor {n!r}" for n in spec if n not in params]
    problems += [f"unexpected tensor {n!r}" for n in params if n not in spec]
    for name, want in spec.items():
        got = params.get(name)
        if got is None:
            continue
        if tuple(got.shape) != want.shape:
            problems.append(f"tensor {name!r} has shape {tuple(got.shape)}, expected {want.shape}")
        if got.dtype != as_dtype(want.dtype):
            problems.append(f"tensor {name!r} has dtype {got.dtype}, expected {want.dtype}")
    if problems:
        raise TensorMismatch("; ".join(problems))


def _conforms(params: Mapping[str, Array], spec: Mapping[str, TensorSpec]) -> bool:
    """Whether `params` matches `spec` exactly: the common case, checked without a report."""
    if len(params) != len(spec):
        return False
    for name, want in spec.items():
        got = params.get(name)
        if got is None or got.shape != want.shape or got.dtype != as_dtype(want.dtype):
            return False
    return True


def check_finite(params: Mapping[str, Array]) -> None:
    """Check that no floating-point tensor holds NaN or Inf, in bounded memory.

    Raises:
        NonFiniteUpdate: naming the first offending tensor.
    """
    for name, array in params.items():
        if array.dtype.kind != "f" and array.dtype != _BFLOAT16:
            continue
        # isfinite in the tensor's own dtype: casting float64 to float32 first
        # would turn large finite values into Inf.
        if array.size <= _FINITE_CHUNK:
            if not np.isfinite(array).all():
                raise NonFiniteUpdate(f"tensor {name!r} holds NaN or Inf values")
            continue
        flat = array.reshape(-1)
        for start in range(0, flat.size, _FINITE_CHUNK):
            if not np.isfinite(flat[start : start + _FINITE_CHUNK]).all():
                raise NonFiniteUpdate(f"tensor {name!r} holds NaN or Inf values")


@dataclass(frozen=True, slots=True)
class _Layout:
    """What a header holds that depends only on the tensors' names, dtypes and shapes.

    `names` is the JSON list of names in the caller's order (the value of the
    order metadata), `fragment` the header's tensor entries in data order,
    each after a comma, `data_order` the positions of the tensors in data
    order, and `entries` the tensors' byte ranges in the caller's order.
    """

    names: str
    fragment: str
    data_order: tuple[int, ...]
    entries: tuple[_Entry, ...]


_Key = tuple[tuple[str, np.dtype[Any], tuple[int, ...]], ...]


def _prepare(
    params: Mapping[str, Array], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[Array], _Layout]:
    """Return the length-prefixed header, the arrays in data order and their layout.

    Written here rather than by the `safetensors` library because the library
    keeps metadata in a hash map: its header order, and so the bytes, change
    from call to call. The header is the compact JSON of `{"__metadata__":
    sorted metadata, tensor entries in data order}`; only the metadata part
    changes between updates of one model, so the rest is built once per
    layout and cached (formatting it took longer than copying a small model's
    data).
    """
    values = list(params.values())
    key: _Key = tuple((name, a.dtype, a.shape) for name, a in zip(params, values, strict=True))
    layout = _layout(key)
    meta = dict(metadata or {})
    meta[_ORDER_KEY] = layout.names
    meta_json = _COMPACT_JSON.encode(dict(sorted(meta.items())))
    raw = f'{{"__metadata__":{meta_json}{layout.fragment}}}'.encode()
    # The reference implementation pads the header with spaces to 8 bytes.
    raw += b" " * (-len(raw) % 8)
    arrays = [np.ascontiguousarray(values[i]) for i in layout.data_order]
    return struct.pack("<Q", len(raw)) + raw, arrays, layout


@functools.lru_cache(maxsize=_CACHED_LAYOUTS)
def _layout(key: _Key) -> _Layout:
    """Return the layout of tensors named, typed and shaped as `key`, in its order.

    Data is ordered by decreasing item size, as the `safetensors` library
    does, so every tensor starts aligned to its own item size; the caller's
    order travels in the metadata.
    """
    entries: dict[int, _Entry] = {}
    fragment: list[str] = []
    cursor = 0
    ranked = sorted(range(len(key)), key=lambda i: (-key[i][1].itemsize, i))
    for i in ranked:
        name, dtype, shape = key[i]
        code = _CODES.get(dtype)
        if code is None:
            raise TypeError(f"tensor {name!r}: dtype {dtype} has no safetensors code")
        if name == "__metadata__":
            raise ValueError("the tensor name '__metadata__' is reserved by safetensors; rename it")
        end = cursor + math.prod(shape) * dtype.itemsize
        entry = {"dtype": code, "shape": [int(d) for d in shape], "data_offsets": [cursor, end]}
        fragment.append(f",{json.dumps(name)}:{_COMPACT_JSON.encode(entry)}")
        entries[i] = _Entry(name=name, dtype=dtype, shape=tuple(shape), begin=cursor, end=end)
        cursor = end
    return _Layout(
        names=json.dumps([name for name, _, _ in key]),
        fragment="".join(fragment),
        data_order=tuple(ranked),
        entries=tuple(entries[i] for i in range(len(key))),
    )


def _buffer(array: Array) -> memoryview:
    """Return the bytes of C-contiguous `array` without copying them."""
    # numpy exports no buffer for bfloat16 (an ml_dtypes type): its bits as uint16 do.
    return (array.view(np.uint16) if array.dtype == _BFLOAT16 else array).data


def _header_length(prefix: bytes, total: int) -> int:
    if len(prefix) < 8:
        raise WireFormatError("truncated safetensors: fewer than 8 bytes")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > _MAX_HEADER or 8 + header_len > total:
        raise WireFormatError(
            f"truncated or malformed safetensors: header of {header_len} bytes "
            f"does not fit a payload of {total} bytes"
        )
    return int(header_len)


def _parse_header(raw: bytes, data_len: int) -> tuple[list[_Entry], dict[str, str]]:
    """Return the tensor entries, in the sender's order, and the other metadata."""
    if raw.startswith(_METADATA_FIRST):
        parsed = _parse_metadata_first(raw, data_len)
        if parsed is not None:
            return parsed
    return _parse_new_header(raw, data_len)


# Every header this module writes starts so (the metadata first, then the
# tensor entries), and so do most writers'; others are parsed whole.
_METADATA_FIRST = b'{"__metadata__":'
_DECODER = json.JSONDecoder()
_JSON_SPACE = re.compile(r"[ \t\n\r]+")


def _skip_space(text: str, at: int) -> int:
    """Return the index of the first character at or after `at` that is not JSON whitespace."""
    space = _JSON_SPACE.match(text, at)
    return at if space is None else space.end()


def _parse_metadata_first(raw: bytes, data_len: int) -> tuple[list[_Entry], dict[str, str]] | None:
    """Parse a header that starts with its metadata; None: parse it whole instead.

    Updates of one model differ in their metadata only (each carries its
    own `UpdateMeta`), so the metadata object is decoded alone and the
    tensor entries after it, the same for every update of the model, are
    parsed and checked once (`_parse_cached_entries`). Anything unusual
    (invalid UTF-8 or JSON, entries too long to cache) goes to the full
    parse, which gives the error.
    """
    try:
        text = raw.decode()
        found, end = _DECODER.raw_decode(text, _skip_space(text, len(_METADATA_FIRST)))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    # Without the padding at the end, which varies with the metadata's length.
    rest = text[_skip_space(text, end) :].rstrip(" \t\n\r")
    if len(rest) > _CACHED_HEADER_BYTES or not rest.startswith((",", "}")):
        return None
    metadata = _check_metadata(found)
    order = metadata.pop(_ORDER_KEY, None)
    # `{` followed by what came after the metadata: `,"name":{...},...}` or `}`.
    entries_json = "{" + (rest[1:] if rest.startswith(",") else rest)
    entries = _parse_cached_entries(entries_json, order, data_len)
    return list(entries), metadata


@functools.lru_cache(maxsize=_CACHED_LAYOUTS)
def _parse_cached_entries(
    entries_json: str, order: str | None, data_len: int
) -> tuple[_Entry, ...]:
    try:
        header = json.loads(entries_json)
    except json.JSONDecodeError as exc:
        raise WireFormatError(f"safetensors header is not valid JSON: {exc}") from exc
    if "__metadata__" in header:
        raise WireFormatError("safetensors header has two __metadata__ entries")
    entries = {name: _check_entry(name, entry) for name, entry in header.items()}
    _check_layout(list(entries.values()), data_len)
    return tuple(entries[name] for name in _names_order(order, list(entries)))


def _parse_new_header(raw: bytes, data_len: int) -> tuple[list[_Entry], dict[str, str]]:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireFormatError(f"safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise WireFormatError("safetensors header must be a JSON object")
    metadata = _check_metadata(header.pop("__metadata__", {}))
    entries = {name: _check_entry(name, entry) for name, entry in header.items()}
    _check_layout(list(entries.values()), data_len)
    order = _names_order(metadata.pop(_ORDER_KEY, None), list(entries))
    return [entries[name] for name in order], metadata


def _check_metadata(entry: Any) -> dict[str, str]:
    if not isinstance(entry, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in entry.items()
    ):
        raise WireFormatError("safetensors __metadata__ must map strings to strings")
    return dict(entry)


def _is_int(value: Any) -> bool:
    # JSON true/false parse as bool, a subclass of int; a shape of [true] is malformed.
    return type(value) is int


def _check_entry(name: str, entry: Any) -> _Entry:
    if not name:
        raise WireFormatError("safetensors tensor names must be non-empty")
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        raise WireFormatError(f"tensor {name!r} has a malformed header entry")
    if entry["dtype"] not in _DTYPES:
        raise WireFormatError(f"tensor {name!r} has unknown dtype {entry['dtype']!r}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise WireFormatError(f"tensor {name!r}: shape must be a list of integers >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets)):
        raise WireFormatError(f"tensor {name!r}: data_offsets must be two integers")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise WireFormatError(f"tensor {name!r} has invalid data_offsets [{begin}, {end}]")
    dtype = _NUMPY[entry["dtype"]]
    # Python integers: an int64 product could wrap around and match a small range.
    if math.prod(shape) * dtype.itemsize != end - begin:
        raise WireFormatError(f"tensor {name!r}: shape {shape} does not match its byte range")
    return _Entry(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _check_layout(entries: list[_Entry], data_len: int) -> None:
    cursor = 0
    for entry in sorted(entries, key=lambda e: (e.begin, e.end, e.name)):
        if entry.begin != cursor:
            raise WireFormatError(
                f"tensor {entry.name!r} does not start where the previous one ended "
                "(overlapping or gapped data_offsets)"
            )
        cursor = entry.end
    if cursor != data_len:
        raise WireFormatError(
            f"truncated or malformed safetensors: tensors cover {cursor} bytes, "
            f"payload holds {data_len}"
        )


def _names_order(order: str | None, names: list[str]) -> list[str]:
    if order is None:
        return names
    try:
        listed = json.loads(order)
    except json.JSONDecodeError as exc:
        raise WireFormatError(f"metadata {_ORDER_KEY!r} is not a JSON list") from exc
    if (
        not isinstance(listed, list)
        or not all(isinstance(n, str) for n in listed)
        or len(listed) != len(names)
        or set(listed) != set(names)
    ):
        raise WireFormatError(f"metadata {_ORDER_KEY!r} does not list the tensors exactly once")
    return listed


def _arrays_from(entries: list[_Entry], body: Array) -> ParameterSet:
    return ParameterSet(
        {e.name: body[e.begin : e.end].view(e.dtype).reshape(e.shape) for e in entries}
    )
