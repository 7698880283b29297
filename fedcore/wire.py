"""The wire format: parameter sets as safetensors, never pickle.

Writing uses the `safetensors` library. Reading parses the safetensors layout
(an 8-byte little-endian header length, a JSON header, then the raw data) here
because the library's numpy reader neither memory-maps files nor knows
bfloat16; the server must read 400 MB uploads without copying them into
memory. The header is validated as strictly as the reference implementation
does: known dtypes, shapes that match the byte ranges, ranges that are sorted,
contiguous and cover the data exactly.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

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
_FINITE_CHUNK = 1 << 20


def encode(params: Mapping[str, Array], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize `params` (and string `metadata`) to safetensors bytes."""
    arrays, meta = _prepare(params, metadata)
    return bytes(safetensors.numpy.save(arrays, metadata=meta))


def write(
    params: Mapping[str, Array], path: Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Serialize `params` to the file `path` without building the bytes in memory."""
    arrays, meta = _prepare(params, metadata)
    safetensors.numpy.save_file(arrays, str(path), metadata=meta)


def decode(data: bytes | bytearray | memoryview) -> tuple[ParameterSet, dict[str, str]]:
    """Parse safetensors bytes into a parameter set and its metadata.

    The arrays are read-only views of `data`.

    Raises:
        WireFormatError: the bytes are malformed or truncated.
    """
    buf = memoryview(data).cast("B")
    header_len, header = _parse_header(bytes(buf[: min(len(buf), 8 + _MAX_HEADER)]), len(buf))
    body = np.frombuffer(buf, dtype=np.uint8, offset=8 + header_len)
    return _arrays_from(header, body)


def read(path: Path) -> tuple[ParameterSet, dict[str, str]]:
    """Open a safetensors file as read-only memory-mapped arrays.

    Raises:
        WireFormatError: the file is malformed or truncated.
    """
    size = path.stat().st_size
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise WireFormatError("truncated safetensors: fewer than 8 bytes")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER:
            raise WireFormatError(f"safetensors header of {header_len} bytes exceeds 100 MB")
        head = prefix + fh.read(header_len)
    header_len, header = _parse_header(head, size)
    data_len = size - 8 - header_len
    if data_len == 0:
        body = np.zeros(0, dtype=np.uint8)
    else:
        body = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len, shape=(data_len,))
    return _arrays_from(header, body)


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
        if str(got.dtype) != want.dtype:
            problems.append(f"tensor {name!r} has dtype {got.dtype}, expected {want.dtype}")
    if problems:
        raise TensorMismatch("; ".join(problems))


def check_finite(params: Mapping[str, Array]) -> None:
    """Check that no floating-point tensor holds NaN or Inf, in bounded memory.

    Raises:
        NonFiniteUpdate: naming the first offending tensor.
    """
    for name, array in params.items():
        if array.dtype.kind != "f" and str(array.dtype) != "bfloat16":
            continue
        flat = array.reshape(-1)
        for start in range(0, flat.size, _FINITE_CHUNK):
            chunk = flat[start : start + _FINITE_CHUNK].astype(np.float32, copy=False)
            if not np.isfinite(chunk).all():
                raise NonFiniteUpdate(f"tensor {name!r} holds NaN or Inf values")


def _prepare(
    params: Mapping[str, Array], metadata: Mapping[str, str] | None
) -> tuple[dict[str, Array], dict[str, str]]:
    meta = dict(metadata or {})
    meta[_ORDER_KEY] = json.dumps(list(params))
    return {n: np.ascontiguousarray(a) for n, a in params.items()}, meta


def _parse_header(head: bytes, total: int) -> tuple[int, dict[str, Any]]:
    if total < 8 or len(head) < 8:
        raise WireFormatError("truncated safetensors: fewer than 8 bytes")
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > _MAX_HEADER or 8 + header_len > total:
        raise WireFormatError(
            f"truncated or malformed safetensors: header of {header_len} bytes "
            f"does not fit a payload of {total} bytes"
        )
    try:
        header = json.loads(head[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireFormatError(f"safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise WireFormatError("safetensors header must be a JSON object")
    _check_layout(header, total - 8 - header_len)
    return header_len, header


def _check_layout(header: dict[str, Any], data_len: int) -> None:
    entries = []
    for name, entry in header.items():
        if name == "__metadata__":
            _check_metadata(entry)
            continue
        entries.append(_check_entry(name, entry))
    cursor = 0
    for begin, end, name in sorted(entries):
        if begin != cursor:
            raise WireFormatError(f"tensor {name!r} does not start where the previous one ended")
        cursor = end
    if cursor != data_len:
        raise WireFormatError(
            f"truncated or malformed safetensors: tensors cover {cursor} bytes, "
            f"payload holds {data_len}"
        )


def _check_metadata(entry: Any) -> None:
    if not isinstance(entry, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in entry.items()
    ):
        raise WireFormatError("safetensors __metadata__ must map strings to strings")


def _check_entry(name: str, entry: Any) -> tuple[int, int, str]:
    try:
        dtype = as_dtype(_DTYPES[entry["dtype"]])
        shape = [int(d) for d in entry["shape"]]
        begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WireFormatError(f"tensor {name!r} has a malformed header entry") from exc
    if any(d < 0 for d in shape) or begin < 0 or end < begin:
        raise WireFormatError(f"tensor {name!r} has a negative shape or offset")
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != end - begin:
        raise WireFormatError(f"tensor {name!r}: shape {shape} does not match its byte range")
    return begin, end, name


def _arrays_from(header: dict[str, Any], body: Array) -> tuple[ParameterSet, dict[str, str]]:
    metadata = dict(header.get("__metadata__") or {})
    names = [n for n in header if n != "__metadata__"]
    order = metadata.pop(_ORDER_KEY, None)
    if order is not None:
        try:
            listed = json.loads(order)
        except json.JSONDecodeError as exc:
            raise WireFormatError("metadata 'fedcore.names' is not a JSON list") from exc
        if not isinstance(listed, list) or sorted(listed) != sorted(names):
            raise WireFormatError("metadata 'fedcore.names' does not list the tensors")
        names = listed
    arrays: dict[str, Array] = {}
    for name in names:
        entry = header[name]
        dtype = as_dtype(_DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        arrays[name] = body[begin:end].view(dtype).reshape(entry["shape"])
    return ParameterSet(arrays), metadata
