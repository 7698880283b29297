"""`HttpTransport`: the client side of the aggregator's HTTP surface.

One keep-alive `httpx.Client` per transport. Requests that fail for reasons
that may pass (the server is restarting, a timeout, a 5xx, a 429) are retried
with exponential backoff and full jitter, honouring `Retry-After`, so an edge
client rides through an aggregator restart. Uploads are safe to retry: the
aggregator answers an identical re-upload with the original receipt. Answers
that say the request itself is wrong (4xx, as RFC 9457 problem+json) become the
matching `fedcore.errors` exception at once and are never retried.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ValidationError

from fedcore import (
    UPDATE_META_KEY,
    AuthError,
    ConfigError,
    Enrollment,
    FedcoreError,
    FederationStateError,
    Forbidden,
    NonFiniteUpdate,
    NotFound,
    ParameterSet,
    PayloadTooLarge,
    Receipt,
    RoundStateError,
    Task,
    TensorMismatch,
    TransportError,
    UpdateConflict,
    UpdateMeta,
    WireFormatError,
    wire,
)
from privacy.secagg import ClientIdentity

__all__ = ["HttpTransport", "RetryPolicy", "enroll", "enroll_identity"]

logger = logging.getLogger(__name__)

_Message = TypeVar("_Message", bound=BaseModel)

# Problem types (`https://fedcore.dev/problems/<slug>`) whose class the status
# alone does not tell: 409 and 422 each cover several errors.
_BY_SLUG: dict[str, type[FedcoreError]] = {
    "update-conflict": UpdateConflict,
    "round-state": RoundStateError,
    "federation-state": FederationStateError,
    "tensor-mismatch": TensorMismatch,
    "non-finite-update": NonFiniteUpdate,
    "wire-format": WireFormatError,
    "payload-too-large": PayloadTooLarge,
    "not-found": NotFound,
    "forbidden": Forbidden,
    "unauthorized": AuthError,
}
_BY_STATUS: dict[int, type[FedcoreError]] = {
    401: AuthError,
    403: Forbidden,
    404: NotFound,
    409: RoundStateError,
    413: PayloadTooLarge,
}
_TOO_MANY_REQUESTS = 429
_SERVICE_UNAVAILABLE = 503
_NOT_MODIFIED = 304
_NO_CONTENT = 204
_CLIENT_ERROR = 400
_SERVER_ERROR = 500
# The server holds a check-in at most this long (docs/http-api.md).
_MAX_WAIT_S = 30.0
# Jitter needs no cryptographic quality; it only spreads clients apart.
_jitter = random.Random()  # noqa: S311


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently a request is retried.

    The pause before retry k (k = 0, 1, ...) is uniform in
    `[0, min(max_backoff_s, backoff_s * 2**k)]`: "full jitter", which spreads
    a fleet's reconnections after an outage (Brooker, "Exponential Backoff and
    Jitter", AWS Architecture Blog, 2015). A `Retry-After` from the server
    replaces it, capped at `max_retry_after_s`. The defaults ride out about two
    minutes of downtime.
    """

    attempts: int = 10
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_retry_after_s: float = 300.0

    def __post_init__(self) -> None:
        problems = []
        if self.attempts < 1:
            problems.append(f"attempts must be >= 1, got {self.attempts}")
        if self.backoff_s < 0 or self.max_backoff_s < 0 or self.max_retry_after_s < 0:
            problems.append("backoff_s, max_backoff_s and max_retry_after_s must be >= 0")
        if problems:
            raise ConfigError(problems)

    def delay(self, retry: int, response: httpx.Response | None = None) -> float:
        """Return the pause in seconds before retry number `retry` (from 0)."""
        after = _retry_after(response) if response is not None else None
        if after is not None:
            return min(after, self.max_retry_after_s)
        return _jitter.uniform(0.0, min(self.max_backoff_s, self.backoff_s * 2.0 ** min(retry, 60)))


class HttpTransport:
    """A `fedcore.Transport` over HTTP, bound to one client token.

    Use it as a context manager (or call `close`) to release the connection.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout_s: float = 30.0,
        wait_s: float = 20.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        """Connect to the aggregator at `base_url` with the client `token`.

        Args:
            base_url: e.g. "https://fl.example.org".
            token: the client's bearer token (`fcc_...`).
            timeout_s: connect, read and write timeout of one request.
            wait_s: how long the server may hold a check-in (long poll), 0 to 30.
            retry: the retry policy; `RetryPolicy()` if omitted.

        Raises:
            ValueError: empty token or `wait_s` outside 0 to 30.
        """
        if not token:
            raise ValueError("token is empty; pass the client token (fcc_...)")
        if not 0 <= wait_s <= _MAX_WAIT_S:
            raise ValueError(f"wait_s must be within 0 and {_MAX_WAIT_S:g}, got {wait_s}")
        self.wait_s = wait_s
        self.retry = retry or RetryPolicy()
        self._timeout_s = timeout_s
        self._http = httpx.Client(
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout_s,
        )
        self._cached: tuple[str, str, str, ParameterSet] | None = None

    def __enter__(self) -> HttpTransport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def fetch_task(self, federation_id: str) -> Task:
        """Check in, long-polling up to `wait_s` seconds, and return the task."""
        response = self._call(
            "GET",
            f"/v1/federations/{_segment(federation_id)}/task",
            params={"wait": f"{self.wait_s:g}"},
            timeout=self._timeout_s + self.wait_s,
        )
        return _parse(Task, response)

    def fetch_model(self, federation_id: str, version: str) -> ParameterSet:
        """Download model `version`; a cached copy is revalidated by ETag (304)."""
        cached = self._cached
        headers = {}
        if cached is not None and cached[:2] == (federation_id, version):
            headers["If-None-Match"] = cached[2]
        response = self._call(
            "GET",
            f"/v1/federations/{_segment(federation_id)}/models/{_segment(version)}",
            headers=headers,
        )
        if response.status_code == _NOT_MODIFIED:
            if not headers or cached is None:
                raise TransportError("the server answered 304 to a request without If-None-Match")
            return cached[3]
        params, _ = wire.decode(response.content)
        etag = response.headers.get("ETag")
        # Only the latest model is kept: models can be hundreds of megabytes.
        self._cached = (federation_id, version, etag, params) if etag else None
        return params

    def submit_update(
        self, federation_id: str, round_number: int, delta: ParameterSet, meta: UpdateMeta
    ) -> Receipt:
        """Upload `delta` (safetensors, `meta` in its metadata) and return the receipt."""
        body = wire.encode(delta, {UPDATE_META_KEY: meta.model_dump_json()})
        return self.submit_encoded(federation_id, round_number, body)

    def submit_encoded(
        self, federation_id: str, round_number: int, data: bytes | memoryview
    ) -> Receipt:
        """Upload an update already in the wire format and return the receipt."""
        response = self._call(
            "PUT",
            f"/v1/federations/{_segment(federation_id)}/rounds/{int(round_number)}/update",
            content=bytes(data) if isinstance(data, memoryview) else data,
            headers={"Content-Type": wire.MEDIA_TYPE},
        )
        return _parse(Receipt, response)

    def fetch_secagg(self, federation_id: str, round_number: int, stage: str) -> bytes | None:
        """Return the server message that opens `stage` for this client; None (204): not yet."""
        response = self._call("GET", _secagg_path(federation_id, round_number, stage))
        return None if response.status_code == _NO_CONTENT else response.content

    def send_secagg(self, federation_id: str, round_number: int, stage: str, data: bytes) -> None:
        """Send this client's message for `stage`; a retry of the same bytes is taken once."""
        self._call(
            "POST",
            _secagg_path(federation_id, round_number, stage),
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        request = self._http.build_request(method, path, **kwargs)
        return _exchange(self._http, request, self.retry, idempotent=True)


def enroll(
    base_url: str,
    enrollment_token: str,
    *,
    identity_key: bytes | None = None,
    timeout_s: float = 30.0,
    retry: RetryPolicy | None = None,
) -> Enrollment:
    """Exchange a one-time enrollment token (`fce_...`) for a client credential.

    The request is retried only when it cannot have been processed (no
    connection, 429, 503): a second use of the token would be refused.

    Args:
        base_url: the aggregator's URL.
        enrollment_token: the one-time token from an admin.
        identity_key: the raw Ed25519 public key of the client's identity
            (`privacy.secagg.ClientIdentity`); secure federations require it.
        timeout_s: the request's timeout.
        retry: how to retry when the request cannot have been processed.

    Raises:
        AuthError: the enrollment token is unknown, used or expired.
        TransportError: the server could not be reached.
    """
    body = {"enrollment_token": enrollment_token}
    if identity_key is not None:
        body["identity_key"] = identity_key.hex()
    with httpx.Client(base_url=base_url, timeout=timeout_s) as http:
        request = http.build_request("POST", "/v1/enroll", json=body)
        response = _exchange(http, request, retry or RetryPolicy(), idempotent=False)
        return _parse(Enrollment, response)


def enroll_identity(
    base_url: str,
    enrollment_token: str,
    *,
    timeout_s: float = 30.0,
    retry: RetryPolicy | None = None,
) -> tuple[Enrollment, ClientIdentity]:
    """Enroll with a fresh Ed25519 identity key; return the credential and the identity.

    The identity signs the client's keys in federations with secure
    aggregation (pass it to `Client(..., identity=...)`). Its private key
    never leaves this process: keep the returned identity for as long as the
    credential.

    Raises:
        AuthError: the enrollment token is unknown, used or expired.
        TransportError: the server could not be reached.
    """
    key = Ed25519PrivateKey.generate()
    enrollment = enroll(
        base_url,
        enrollment_token,
        identity_key=key.public_key().public_bytes_raw(),
        timeout_s=timeout_s,
        retry=retry,
    )
    return enrollment, ClientIdentity(enrollment.client_id, key)


def _exchange(
    http: httpx.Client, request: httpx.Request, retry: RetryPolicy, *, idempotent: bool
) -> httpx.Response:
    """Send `request` with retries; return a success or raise the mapped error."""
    what = f"{request.method} {request.url.path}"
    reason = "not sent"
    for attempt in range(retry.attempts):
        response, reason = _attempt(http, request, idempotent=idempotent)
        if response is not None and not _retryable(response.status_code, idempotent=idempotent):
            if response.status_code >= _CLIENT_ERROR:
                raise _problem_error(response)
            return response
        if attempt + 1 < retry.attempts:
            pause = retry.delay(attempt, response)
            logger.warning(
                "%s: %s; retry %d of %d in %.2f s",
                what,
                reason,
                attempt + 1,
                retry.attempts - 1,
                pause,
            )
            time.sleep(pause)
    raise TransportError(f"{what} failed after {retry.attempts} attempts: {reason}")


def _attempt(
    http: httpx.Client, request: httpx.Request, *, idempotent: bool
) -> tuple[httpx.Response | None, str]:
    try:
        response = http.send(request)
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        # The request never reached the server: always safe to send again.
        return None, f"{type(exc).__name__}: {exc}"
    except httpx.TransportError as exc:
        if not idempotent:
            raise TransportError(
                f"{request.method} {request.url.path} failed after it was sent: {exc}"
            ) from exc
        return None, f"{type(exc).__name__}: {exc}"
    if response.status_code < _CLIENT_ERROR:
        return response, f"HTTP {response.status_code}"
    detail = _problem_body(response).get("detail") or response.reason_phrase
    return response, f"HTTP {response.status_code}: {detail}"


def _retryable(status: int, *, idempotent: bool) -> bool:
    if status in (_TOO_MANY_REQUESTS, _SERVICE_UNAVAILABLE):
        return True
    return idempotent and status >= _SERVER_ERROR


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _problem_error(response: httpx.Response) -> FedcoreError:
    """Turn a 4xx (or exhausted 5xx) answer into the matching fedcore error."""
    problem = _problem_body(response)
    slug = str(problem.get("type") or "").rstrip("/").rsplit("/", 1)[-1]
    detail = str(problem.get("detail") or problem.get("title") or response.reason_phrase)
    status = response.status_code
    if slug == "invalid-config":
        listed = problem.get("problems")
        problems = [str(p) for p in listed] if isinstance(listed, list) and listed else [detail]
        return ConfigError(problems)
    cls = _BY_SLUG.get(slug) or _BY_STATUS.get(status) or TransportError
    label = f"HTTP {status} {slug}" if slug else f"HTTP {status}"
    return cls(f"{detail} ({label})")


def _problem_body(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {"detail": response.text[:500] or None}
    return body if isinstance(body, dict) else {}


def _parse(model: type[_Message], response: httpx.Response) -> _Message:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise TransportError(
            f"{response.request.method} {response.request.url.path} answered "
            f"HTTP {response.status_code} without a valid {model.__name__}: "
            f"{exc.error_count()} problem(s)"
        ) from None


def _secagg_path(federation_id: str, round_number: int, stage: str) -> str:
    return (
        f"/v1/federations/{_segment(federation_id)}/rounds/{int(round_number)}"
        f"/secagg/{_segment(stage)}"
    )


def _segment(value: str) -> str:
    # Ids go into the path quoted, so an id can never reach another route.
    return quote(value, safe="")
