"""The canonical byte encoding shared by every SecAgg+ message (see `messages`).

The 4-byte magic ``FSA1``, a 4-byte big-endian header length, a canonical
JSON header (sorted keys, no spaces, ASCII) and a binary body of fixed-size
fields. The readers here accept nothing but that form: exactly the expected
fields, of the expected types and sizes, and raise `MalformedMessage`
otherwise, so that one message has exactly one encoding.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import operator
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Self, TypeVar

from privacy.secagg.errors import MalformedMessage

__all__ = [
    "HEADER_LIMIT",
    "ID_LIMIT",
    "MAGIC",
    "BodyReader",
    "FieldReader",
    "Message",
    "b64",
    "build",
    "build_records",
    "check_id",
    "check_size",
    "done",
    "dumps",
    "envelope",
    "pack",
    "read_envelope",
    "unpack",
]

_T = TypeVar("_T")

MAGIC = b"FSA1"
# A roster or delivery for a degree of a few thousand stays far below this.
HEADER_LIMIT = 1 << 26
ID_LIMIT = 256


def dumps(header: dict[str, Any]) -> bytes:
    """Encode a header as canonical JSON."""
    return json.dumps(
        header, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def pack(header: dict[str, Any], body: bytes = b"") -> bytes:
    """Frame a header and a body as one message."""
    text = dumps(header)
    return MAGIC + len(text).to_bytes(4, "big") + text + body


def b64(data: bytes) -> str:
    """Encode bytes as standard base64 text."""
    return base64.b64encode(data).decode("ascii")


class FieldReader:
    """Reads the fields of one decoded JSON object, strictly."""

    __slots__ = ("_data", "_seen", "_where")

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, dict):
            raise MalformedMessage(f"{where} is not a JSON object")
        self._data: dict[str, Any] = data
        self._seen: set[str] = set()
        self._where = where

    def _get(self, key: str) -> Any:
        if key not in self._data:
            raise MalformedMessage(f"{self._where} lacks the field {key!r}")
        self._seen.add(key)
        return self._data[key]

    def constant(self, key: str, value: str) -> None:
        """Check that `key` holds exactly `value`."""
        found = self._get(key)
        if found != value:
            raise MalformedMessage(f"{self._where}: {key} is {found!r}, expected {value!r}")

    def text(self, key: str) -> str:
        """Read a non-empty string of at most ID_LIMIT characters."""
        value = self._get(key)
        if not isinstance(value, str) or not 0 < len(value) <= ID_LIMIT:
            raise MalformedMessage(f"{self._where}: {key} must be a string of 1..{ID_LIMIT}")
        return value

    def integer(self, key: str, low: int = 0, high: int = (1 << 63) - 1) -> int:
        """Read an integer (not a bool) in low..high."""
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise MalformedMessage(f"{self._where}: {key} must be an integer in {low}..{high}")
        return value

    def number(self, key: str) -> float:
        """Read a JSON number (not a bool)."""
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MalformedMessage(f"{self._where}: {key} must be a number")
        return float(value)

    def blob(self, key: str, size: int) -> bytes:
        """Read `size` bytes written as canonical base64."""
        value = self._get(key)
        if not isinstance(value, str):
            raise MalformedMessage(f"{self._where}: {key} must be base64 text")
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MalformedMessage(f"{self._where}: {key} is not valid base64") from exc
        if b64(data) != value or len(data) != size:
            raise MalformedMessage(f"{self._where}: {key} must be {size} bytes in canonical base64")
        return data

    def texts(self, key: str) -> tuple[str, ...]:
        """Read a list of strings, each as `text`."""
        values = self._get(key)
        if not isinstance(values, list):
            raise MalformedMessage(f"{self._where}: {key} must be a list")
        for i, value in enumerate(values):
            if not isinstance(value, str) or not 0 < len(value) <= ID_LIMIT:
                raise MalformedMessage(
                    f"{self._where}.{key}: {i} must be a string of 1..{ID_LIMIT}"
                )
        return tuple(values)

    def absent(self, key: str) -> bool:
        """Return whether `key` holds null (an optional field left out), marking it read."""
        if self._get(key) is None:
            return True
        self._seen.discard(key)
        return False

    def record(self, key: str) -> FieldReader:
        """Return a reader for the JSON object under `key`."""
        return FieldReader(self._get(key), f"{self._where}.{key}")

    def finish(self) -> None:
        """Refuse any field that was not read."""
        extra = sorted(set(self._data) - self._seen)
        if extra:
            raise MalformedMessage(f"{self._where} has unexpected fields {extra}")


def unpack(data: bytes, kind: str) -> tuple[FieldReader, bytes]:
    """Split a `kind` message into a reader of its header and its body."""
    if not isinstance(data, bytes):
        raise MalformedMessage(f"a {kind} message must be bytes")
    if len(data) < 8 or data[:4] != MAGIC:
        raise MalformedMessage(f"not a secure aggregation message (expected a {kind})")
    size = int.from_bytes(data[4:8], "big")
    if size > min(len(data) - 8, HEADER_LIMIT):
        raise MalformedMessage(f"the {kind} header length {size} exceeds the message")
    text = data[8 : 8 + size]
    try:
        header = json.loads(text)
        canonical = dumps(header) == text
    except (ValueError, RecursionError) as exc:
        raise MalformedMessage(f"the {kind} header is not valid JSON") from exc
    if not canonical:
        raise MalformedMessage(f"the {kind} header is not in canonical form")
    reader = FieldReader(header, kind)
    reader.constant("type", kind)
    return reader, data[8 + size :]


def done(reader: FieldReader, body: bytes) -> None:
    """Finish a message that has no body."""
    reader.finish()
    if body:
        raise MalformedMessage("unexpected bytes after the header")


class BodyReader:
    """Reads fixed-size fields off a message body; the size is checked up front."""

    __slots__ = ("_data", "_offset")

    def __init__(self, data: bytes, size: int, where: str) -> None:
        if len(data) != size:
            raise MalformedMessage(f"the {where} body has {len(data)} bytes, not {size}")
        self._data = data
        self._offset = 0

    def take(self, size: int) -> bytes:
        """Return the next `size` bytes."""
        self._offset += size
        return self._data[self._offset - size : self._offset]

    def take_records(self, count: int, sizes: Sequence[int]) -> list[tuple[bytes, ...]]:
        """Return the next `count` records, each split into fields of `sizes` bytes."""
        bounds = list(itertools.pairwise(itertools.accumulate(sizes, initial=0)))
        split = operator.itemgetter(*(slice(low, high) for low, high in bounds))
        width = bounds[-1][1]
        start, data = self._offset, self._data
        self._offset += count * width
        records = [data[at : at + width] for at in range(start, start + count * width, width)]
        if len(bounds) == 1:
            return [(record,) for record in records]
        return [split(record) for record in records]


def envelope(kind: str, stage: str | None, federation_id: str, round: int) -> dict[str, Any]:
    """Start a header with the fields every message carries."""
    header: dict[str, Any] = {"type": kind, "federation_id": federation_id, "round": round}
    if stage is not None:
        header["stage"] = stage
    return header


def read_envelope(reader: FieldReader, stage: str | None) -> tuple[str, int]:
    """Check the stage and return the federation id and round."""
    if stage is not None:
        reader.constant("stage", stage)
    return reader.text("federation_id"), reader.integer("round")


def check_id(value: str, what: str) -> None:
    """Raise ValueError unless `value` is a valid id."""
    if not isinstance(value, str) or not 0 < len(value) <= ID_LIMIT:
        raise ValueError(f"{what} must be a string of 1..{ID_LIMIT} characters")


def check_size(value: bytes, size: int, what: str) -> None:
    """Raise ValueError unless `value` is `size` bytes."""
    if not isinstance(value, bytes) or len(value) != size:
        raise ValueError(f"{what} must be {size} bytes")


def build(cls: type[_T], **fields: Any) -> _T:
    """Construct a message from decoded fields; its own checks become MalformedMessage."""
    try:
        return cls(**fields)
    except ValueError as exc:
        raise MalformedMessage(f"invalid {cls.__name__}: {exc}") from exc


def build_records(
    cls: Callable[..., _T],
    keys: Sequence[str],
    blocks: BodyReader,
    sizes: Sequence[int],
    *,
    lead: tuple[Any, ...] = (),
) -> tuple[_T, ...]:
    """Construct `cls(*lead, key, *fields)` for each key, its fields read off `blocks`.

    For the lists of fixed-size records that rosters, shares and deliveries
    carry (up to the degree k each): the fields are sliced at precomputed
    offsets and the records' own checks become MalformedMessage, as `build`.
    """
    records = blocks.take_records(len(keys), sizes)
    try:
        return tuple(cls(*lead, key, *fields) for key, fields in zip(keys, records, strict=True))
    except ValueError as exc:
        name = getattr(cls, "__name__", "record")
        raise MalformedMessage(f"invalid {name}: {exc}") from exc


class Message:
    """Shared encoding of the message classes: a header and, rarely, a body."""

    __slots__ = ()
    KIND: ClassVar[str]

    def _header(self) -> dict[str, Any]:
        raise NotImplementedError

    def _body(self) -> bytes:
        return b""

    @classmethod
    def _parse(cls, reader: FieldReader, body: bytes) -> Self:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        """Encode canonically."""
        return pack(self._header(), self._body())

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Decode, accepting only a valid message in canonical form.

        Raises:
            MalformedMessage: anything else, with what was wrong.
        """
        reader, body = unpack(data, cls.KIND)
        return cls._parse(reader, body)
