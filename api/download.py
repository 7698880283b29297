"""Model downloads: safetensors streamed from the blob store, cached by ETag.

A model version is the SHA-256 of its bytes, so its ETag never goes stale:
a client holding the version answers `If-None-Match` and gets 304.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import IO

from fastapi import Response
from fastapi.responses import StreamingResponse

from aggregator import Aggregator
from fedcore import wire

__all__ = ["model_response"]

_CHUNK = 1 << 20


def model_response(
    aggregator: Aggregator, federation_id: str, version: str, if_none_match: str | None
) -> Response:
    """Answer a download of model `version`: 200 with the bytes, or 304.

    Raises:
        NotFound: unknown federation or version.
    """
    stream = aggregator.open_model(federation_id, version)
    etag = f'"{version}"'
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    if if_none_match is not None and _matches(if_none_match, etag):
        stream.close()
        return Response(status_code=304, headers=headers)
    size = stream.seek(0, os.SEEK_END)
    stream.seek(0)
    if size <= _CHUNK:
        # One read answers a small model; streaming would cost more than it saves.
        with stream:
            return Response(stream.read(), media_type=wire.MEDIA_TYPE, headers=headers)
    headers["Content-Length"] = str(size)
    return StreamingResponse(_chunks(stream), media_type=wire.MEDIA_TYPE, headers=headers)


def _matches(if_none_match: str, etag: str) -> bool:
    # RFC 9110 section 13.1.2: a list of entity tags compared weakly, or "*".
    tags = [tag.strip() for tag in if_none_match.split(",")]
    return "*" in tags or any(tag.removeprefix("W/") == etag for tag in tags)


def _chunks(stream: IO[bytes]) -> Iterator[bytes]:
    with stream:
        while chunk := stream.read(_CHUNK):
            yield chunk
