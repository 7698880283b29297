"""Request body limits, enforced while the body streams in.

FastAPI reads a JSON body whole, before any dependency runs, so without a
limit an unauthenticated `POST /v1/enroll` could make the server buffer
gigabytes. This middleware counts body bytes as the application receives
them: endpoints that stream their body to disk (uploads) may take up to
`max_body_bytes`, every other route `small_body_bytes`. A declared
`Content-Length` over the limit is refused before a byte is read.
"""

from __future__ import annotations

from collections.abc import Callable, Set
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["SMALL_BODY_BYTES", "BodyLimitMiddleware"]

# JSON bodies of this API are below a kilobyte; a megabyte leaves room.
SMALL_BODY_BYTES = 1 << 20


class BodyLimitMiddleware:
    """Refuse request bodies over the limit of the route they are sent to (413)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        streaming_endpoints: Set[Callable[..., Any]],
        max_body_bytes: int,
        small_body_bytes: int = SMALL_BODY_BYTES,
    ) -> None:
        self._app = app
        self._streaming = frozenset(streaming_endpoints)
        self._large = max_body_bytes
        self._small = small_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the request, cutting its body off at the route's limit."""
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        received = -1

        async def limited() -> Message:
            nonlocal received
            if received < 0:
                # The first read happens after routing: the route is known.
                received = 0
                _check_declared(scope, self._limit(scope))
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                limit = self._limit(scope)
                if received > limit:
                    raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
            return message

        await self._app(scope, limited, send)

    def _limit(self, scope: Scope) -> int:
        # The router records the matched route in the scope.
        endpoint = getattr(scope.get("route"), "endpoint", None)
        return self._large if endpoint in self._streaming else self._small


def _check_declared(scope: Scope, limit: int) -> None:
    declared = Headers(scope=scope).get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body of {declared} bytes exceeds the limit of {limit}")
