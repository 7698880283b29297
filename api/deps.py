"""Request dependencies: the running service and the caller's credential.

Routes declare what they need with these `Annotated` types; authentication
happens here, before a route reads any request body.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from aggregator import AdminTokenRecord, Aggregator, ClientRecord
from api.runtime import Runtime
from fedcore import AuthError, Forbidden

__all__ = [
    "AdminDep",
    "AggregatorDep",
    "MemberDep",
    "RuntimeDep",
]

# auto_error=False: a missing or malformed header becomes a fedcore AuthError,
# answered by the problem table like every other error.
_bearer = HTTPBearer(auto_error=False)


# Each dependency is a node of FastAPI's dependency graph, solved on the
# event loop at every request (some tens of microseconds each): the
# dependencies below read the runtime and the credential themselves rather
# than through further nodes. The credential goes through `_bearer`, the one
# shared node, which also declares the scheme in the OpenAPI document. Only
# the token lookup leaves the event loop, in one thread hop per request.


def _runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def _runtime(request: Request) -> Runtime:
    return _runtime_of(request)


RuntimeDep = Annotated[Runtime, Depends(_runtime)]


async def _aggregator(request: Request) -> Aggregator:
    return _runtime_of(request).aggregator


AggregatorDep = Annotated[Aggregator, Depends(_aggregator)]

_Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _token(request: Request, credentials: HTTPAuthorizationCredentials | None) -> str | None:
    if credentials is not None:
        return credentials.credentials
    if request.headers.get("Authorization"):
        raise AuthError("the Authorization header must read 'Bearer <token>'")
    return None


async def _admin(request: Request, credentials: _Credentials) -> AdminTokenRecord:
    authenticate = _runtime_of(request).aggregator.access.authenticate_admin
    return await run_in_threadpool(authenticate, _token(request, credentials))


AdminDep = Annotated[AdminTokenRecord, Depends(_admin)]


async def _member(fid: str, request: Request, credentials: _Credentials) -> ClientRecord:
    authenticate = _runtime_of(request).aggregator.access.authenticate_client
    client = await run_in_threadpool(authenticate, _token(request, credentials))
    if client.federation_id != fid:
        raise Forbidden("this client is enrolled in another federation")
    return client


MemberDep = Annotated[ClientRecord, Depends(_member)]
"""A client enrolled in the federation named by the route's `{fid}`."""
