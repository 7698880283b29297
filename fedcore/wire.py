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

import json
import math
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
    head, arrays = _layout(params, metadata)
    out = bytearray(len(head) + sum(a.nbytes for a in arrays))
    out[: len(head)] = head
    cursor = len(head)
    for array in arrays:
        out[cursor : cursor + array.nbytes] = array.reshape(-1).view(np.uint8).data
        cursor += array.nbytes
    return bytes(out)


def write(
    params: Mapping[str, Array], path: Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Serialize `params` to the file `path` without building the bytes in memory."""
    head, arrays = _layout(params, metadata)
    with path.open("wb") as fh:
        fh.write(head)
        for array in arrays:
            fh.write(array.reshape(-1).view(np.uint8).data)


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
    """Open a safetensors file as read-only memory-mapped arrays.

    Raises:
        WireFormatError: the file is malformed or truncated.
    """
    size = path.stat().st_size
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
        flat = array.reshape(-1)
        for start in range(0, flat.size, _FINITE_CHUNK):
            if not np.isfinite(flat[start : start + _FINITE_CHUNK]).all():
                raise NonFiniteUpdate(f"tensor {name!r} holds NaN or Inf values")


def _layout(
    params: Mapping[str, Array], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[Array]]:
    """Return the length-prefixed header and the arrays in data order.

    Written here rather than by the `safetensors` library because the library
    keeps metadata in a hash map: its header order, and so the bytes, change
    from call to call. Data is ordered by decreasing item size, as the library
    does, so every tensor starts aligned to its own item size; the model's
    order travels in the metadata.
    """
    meta = dict(metadata or {})
    meta[_ORDER_KEY] = json.dumps(list(params))
    header: dict[str, Any] = {"__metadata__": dict(sorted(meta.items()))}
    arrays: list[Array] = []
    cursor = 0
    ranked = sorted(enumerate(params.items()), key=lambda item: (-item[1][1].itemsize, item[0]))
    for _, (name, array) in ranked:
        contiguous = np.ascontiguousarray(array)
        code = _CODES.get(array.dtype)
        if code is None:
            raise TypeError(f"tensor {name!r}: dtype {array.dtype} has no safetensors code")
        header[name] = {
            "dtype": code,
            "shape": [int(d) for d in array.shape],
            "data_offsets": [cursor, cursor + contiguous.nbytes],
        }
        arrays.append(contiguous)
        cursor += contiguous.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # The reference implementation pads the header with spaces to 8 bytes.
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, arrays


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
