"""Errors as RFC 9457 problem details: one table from exception to HTTP answer.

Routes raise `fedcore.errors` exceptions (or let the service core raise them)
and never build error responses themselves; the handlers installed here turn
every exception into `application/problem+json` with a stable `type` URI, so
clients can branch on the type and people can read the detail.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from fedcore.errors import (
    AuthError,
    ConfigError,
    FedcoreError,
    FederationStateError,
    Forbidden,
    NonFiniteUpdate,
    NotFound,
    PayloadTooLarge,
    RoundStateError,
    TensorMismatch,
    TransportError,
    UpdateConflict,
    UpdateRejected,
    WireFormatError,
)

__all__ = [
    "MEDIA_TYPE",
    "PROBLEMS",
    "TYPE_BASE",
    "ProblemType",
    "install_problem_handlers",
    "problem_type",
]

MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://fedcore.dev/problems/"

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProblemType:
    """How one kind of error is answered: status code, stable slug and title."""

    status: int
    slug: str
    title: str

    @property
    def uri(self) -> str:
        """The problem's `type` member."""
        return TYPE_BASE + self.slug


# The one table. Lookup walks the exception's MRO, so a subclass without its
# own row is answered like its closest listed ancestor.
PROBLEMS: Mapping[type[Exception], ProblemType] = {
    ConfigError: ProblemType(422, "invalid-config", "Invalid federation configuration"),
    WireFormatError: ProblemType(422, "wire-format", "Malformed safetensors payload"),
    TensorMismatch: ProblemType(422, "tensor-mismatch", "Tensors do not match the model"),
    NonFiniteUpdate: ProblemType(422, "non-finite-update", "Update holds NaN or Inf"),
    PayloadTooLarge: ProblemType(413, "payload-too-large", "Request body too large"),
    UpdateConflict: ProblemType(409, "update-conflict", "A different update is already stored"),
    UpdateRejected: ProblemType(422, "update-rejected", "Update rejected"),
    RoundStateError: ProblemType(409, "round-state", "The round does not accept this"),
    FederationStateError: ProblemType(
        409, "federation-state", "The federation cannot do this in its state"
    ),
    NotFound: ProblemType(404, "not-found", "Not found"),
    Forbidden: ProblemType(403, "forbidden", "Forbidden"),
    AuthError: ProblemType(401, "unauthorized", "Unauthorized"),
    TransportError: ProblemType(502, "bad-gateway", "An upstream service failed"),
    FedcoreError: ProblemType(400, "bad-request", "Bad request"),
    RequestValidationError: ProblemType(422, "invalid-request", "Invalid request"),
    # The client went away mid-request; nobody reads the answer, but it is
    # not a server failure either.
    ClientDisconnect: ProblemType(400, "client-disconnected", "Client disconnected"),
}

# Starlette raises HTTPException for routing and protocol errors (unknown
# path, wrong method, malformed multipart); these keep their status.
_HTTP_SLUGS: Mapping[int, str] = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    406: "not-acceptable",
    413: "payload-too-large",
    415: "unsupported-media-type",
    503: "unavailable",
}
_INTERNAL = ProblemType(500, "internal-error", "Internal server error")


def problem_type(exc: BaseException) -> ProblemType:
    """Return the problem type that answers `exc`."""
    if isinstance(exc, HTTPException):
        return _http_problem(exc.status_code)
    for cls in type(exc).__mro__:
        found = PROBLEMS.get(cls)
        if found is not None:
            return found
    return _INTERNAL


def install_problem_handlers(app: FastAPI) -> None:
    """Answer every error raised while serving `app` with problem+json."""
    for cls in (FedcoreError, RequestValidationError, HTTPException, ClientDisconnect, Exception):
        app.add_exception_handler(cls, _answer)


async def _answer(request: Request, exc: Exception) -> JSONResponse:
    kind = problem_type(exc)
    if kind is _INTERNAL:
        # Starlette re-raises after this handler answers, so the server logs
        # the traceback too; the client learns nothing about the internals.
        logger.error("unexpected %s serving %s %s", type(exc).__name__, request.method,
                     request.url.path)  # fmt: skip
    problems = _problems(exc)
    return JSONResponse(
        _body(kind, _detail(exc, kind, problems), problems),
        kind.status,
        headers=_headers(exc),
        media_type=MEDIA_TYPE,
    )


def _http_problem(status: int) -> ProblemType:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "HTTP error"
    return ProblemType(status, _HTTP_SLUGS.get(status, f"http-{status}"), phrase)


def _problems(exc: Exception) -> list[str] | None:
    if isinstance(exc, ConfigError):
        return list(exc.problems)
    if isinstance(exc, RequestValidationError):
        # Location and message only: echoing the input could leak a token.
        return [
            f"{'.'.join(str(p) for p in err.get('loc', ())) or 'request'}: {err.get('msg')}"
            for err in exc.errors()
        ]
    return None


def _detail(exc: Exception, kind: ProblemType, problems: Sequence[str] | None) -> str:
    if kind is _INTERNAL:
        return "the server failed; the error was logged"
    if isinstance(exc, HTTPException):
        return exc.detail if isinstance(exc.detail, str) else kind.title
    if isinstance(exc, RequestValidationError) and problems is not None:
        return f"{len(problems)} problem(s) with the request: " + "; ".join(problems)
    return str(exc) or kind.title


def _headers(exc: Exception) -> Mapping[str, str] | None:
    if isinstance(exc, HTTPException):
        return exc.headers
    if isinstance(exc, AuthError) and not isinstance(exc, Forbidden):
        # RFC 6750 section 3: a 401 names the scheme the client should use.
        return {"WWW-Authenticate": "Bearer"}
    return None


def _body(kind: ProblemType, detail: str, problems: Sequence[str] | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": kind.uri,
        "title": kind.title,
        "status": kind.status,
        "detail": detail,
    }
    if problems is not None:
        body["problems"] = list(problems)
    return body
