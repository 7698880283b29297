"""Content-addressed blob stores for models and updates.

A blob is named by the SHA-256 of its bytes, so identical uploads share one
file and a name always means the same content. `FileBlobStore` writes to a
temporary file, fsyncs it, renames it into place and fsyncs the directory:
once `commit` returns, the blob survives a crash, and a crash before that
leaves no partial blob under its final name. `MemoryBlobStore` keeps bytes in
a dict for in-process simulation.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import time
from pathlib import Path
from typing import IO, Protocol

from fedcore import ParameterSet, PayloadTooLarge, wire

__all__ = ["BlobStore", "FileBlobStore", "MemoryBlobStore", "StagedBlob"]

# Temporary files older than this are left over from a crash, not in flight.
_STALE_PART_S = 3600.0


class StagedBlob(Protocol):
    """An upload being written: hashed and size-checked as it streams in."""

    @property
    def digest(self) -> str:
        """SHA-256 hex digest of the bytes written so far."""
        ...

    @property
    def size(self) -> int:
        """Number of bytes written so far."""
        ...

    def write(self, chunk: bytes | memoryview) -> None:
        """Append `chunk`, raising `PayloadTooLarge` past the size limit."""
        ...

    def load(self) -> tuple[ParameterSet, dict[str, str]]:
        """Parse the staged bytes as safetensors (raises `WireFormatError`)."""
        ...

    def commit(self) -> str:
        """Make the blob durable under its digest and return the digest."""
        ...

    def discard(self) -> None:
        """Drop the staged bytes; a no-op after `commit`."""
        ...


class BlobStore(Protocol):
    """Durable, content-addressed storage of safetensors blobs."""

    def stage(self, max_bytes: int) -> StagedBlob:
        """Start writing a new blob of at most `max_bytes` bytes."""
        ...

    def put(self, data: bytes) -> str:
        """Store `data` durably and return its digest."""
        ...

    def load(self, digest: str) -> tuple[ParameterSet, dict[str, str]]:
        """Return the parameter set (memory-mapped where possible) and metadata."""
        ...

    def open(self, digest: str) -> IO[bytes]:
        """Open the blob for reading (raises `KeyError` if absent)."""
        ...

    def exists(self, digest: str) -> bool:
        """Whether a blob with this digest is stored."""
        ...

    def delete(self, digest: str) -> None:
        """Remove a blob if present."""
        ...

    def digests(self, *, older_than: float | None = None) -> list[str]:
        """Return the digests of the stored blobs, only those written before `older_than` if set."""
        ...


def _check_digest(digest: str) -> str:
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"not a sha256 hex digest: {digest[:80]!r}")
    return digest


class _FileStaged:
    __slots__ = ("_done", "_fh", "_hash", "_limit", "_path", "_size", "_store")

    def __init__(self, store: FileBlobStore, max_bytes: int) -> None:
        fd, name = tempfile.mkstemp(dir=store.root / "tmp", suffix=".part")
        self._fh = os.fdopen(fd, "wb")
        self._path = Path(name)
        self._store = store
        self._hash = hashlib.sha256()
        self._limit = max_bytes
        self._size = 0
        self._done = False

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()

    @property
    def size(self) -> int:
        return self._size

    def write(self, chunk: bytes | memoryview) -> None:
        self._size += len(chunk)
        if self._size > self._limit:
            self.discard()
            raise PayloadTooLarge(f"upload exceeds the limit of {self._limit} bytes")
        self._hash.update(chunk)
        self._fh.write(chunk)

    def load(self) -> tuple[ParameterSet, dict[str, str]]:
        self._fh.flush()
        return wire.read(self._path)

    def commit(self) -> str:
        digest = self.digest
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._store.adopt(self._path, digest)
        self._done = True
        return digest

    def discard(self) -> None:
        if not self._done:
            self._fh.close()
            self._path.unlink(missing_ok=True)
            self._done = True


class FileBlobStore:
    """Blobs as files under `root/<2 hex>/<64 hex>`, written atomically and durably."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        cutoff = time.time() - _STALE_PART_S
        for leftover in (self.root / "tmp").glob("*.part"):
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink(missing_ok=True)

    def path(self, digest: str) -> Path:
        """Return where the blob `digest` lives (whether or not it exists)."""
        digest = _check_digest(digest)
        return self.root / digest[:2] / digest

    def stage(self, max_bytes: int) -> StagedBlob:
        """Start writing a new blob of at most `max_bytes` bytes."""
        return _FileStaged(self, max_bytes)

    def put(self, data: bytes) -> str:
        """Store `data` durably and return its digest."""
        staged = self.stage(len(data))
        try:
            staged.write(data)
            return staged.commit()
        finally:
            staged.discard()

    def adopt(self, temp: Path, digest: str) -> None:
        """Move a fully written, fsynced temporary file into place as `digest`."""
        final = self.path(digest)
        if final.exists():
            temp.unlink()
            return
        final.parent.mkdir(exist_ok=True)
        os.replace(temp, final)
        _fsync_dir(final.parent)

    def load(self, digest: str) -> tuple[ParameterSet, dict[str, str]]:
        """Return the blob's parameter set (read-only, memory-mapped when large) and metadata."""
        path = self.path(digest)
        if not path.exists():
            raise KeyError(digest)
        return wire.read(path)

    def open(self, digest: str) -> IO[bytes]:
        """Open the blob for reading."""
        path = self.path(digest)
        if not path.exists():
            raise KeyError(digest)
        return path.open("rb")

    def exists(self, digest: str) -> bool:
        """Whether a blob with this digest is stored."""
        return self.path(digest).exists()

    def delete(self, digest: str) -> None:
        """Remove a blob if present."""
        self.path(digest).unlink(missing_ok=True)

    def digests(self, *, older_than: float | None = None) -> list[str]:
        """Return the digests of the stored blobs, only those written before `older_than` if set.

        `older_than` is a time as `time.time()` gives it, compared with each
        file's modification time.
        """
        return sorted(
            p.name
            for p in self.root.glob("??/*")
            if len(p.name) == 64 and (older_than is None or p.stat().st_mtime < older_than)
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _MemoryStaged:
    __slots__ = ("_buf", "_hash", "_limit", "_store")

    def __init__(self, store: MemoryBlobStore, max_bytes: int) -> None:
        self._store = store
        self._buf = io.BytesIO()
        self._hash = hashlib.sha256()
        self._limit = max_bytes

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()

    @property
    def size(self) -> int:
        return self._buf.tell()

    def write(self, chunk: bytes | memoryview) -> None:
        if self._buf.tell() + len(chunk) > self._limit:
            raise PayloadTooLarge(f"upload exceeds the limit of {self._limit} bytes")
        self._hash.update(chunk)
        self._buf.write(chunk)

    def load(self) -> tuple[ParameterSet, dict[str, str]]:
        return wire.decode(self._buf.getbuffer())

    def commit(self) -> str:
        digest = self.digest
        self._store.keep(digest, self._buf.getvalue())
        return digest

    def discard(self) -> None:
        self._buf = io.BytesIO()


class MemoryBlobStore:
    """Blobs in a dict, for simulation: fast, not durable."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self._written: dict[str, float] = {}

    def stage(self, max_bytes: int) -> StagedBlob:
        """Start writing a new blob of at most `max_bytes` bytes."""
        return _MemoryStaged(self, max_bytes)

    def put(self, data: bytes) -> str:
        """Store `data` and return its digest."""
        digest = hashlib.sha256(data).hexdigest()
        self.keep(digest, bytes(data))
        return digest

    def keep(self, digest: str, data: bytes) -> None:
        """Store `data` under `digest` unless it is there already (its caller hashed it)."""
        if digest not in self.blobs:
            self.blobs[digest] = data
            self._written[digest] = time.time()

    def digests(self, *, older_than: float | None = None) -> list[str]:
        """Return the digests of the stored blobs, only those written before `older_than` if set."""
        return sorted(d for d, at in self._written.items() if older_than is None or at < older_than)

    def load(self, digest: str) -> tuple[ParameterSet, dict[str, str]]:
        """Return the blob's parameter set (views of the stored bytes) and metadata."""
        return wire.decode(self.blobs[digest])

    def open(self, digest: str) -> IO[bytes]:
        """Open the blob for reading."""
        return io.BytesIO(self.blobs[digest])

    def exists(self, digest: str) -> bool:
        """Whether a blob with this digest is stored."""
        return digest in self.blobs

    def delete(self, digest: str) -> None:
        """Remove a blob if present."""
        self.blobs.pop(digest, None)
        self._written.pop(digest, None)
