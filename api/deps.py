"""Request dependencies: the running service and the caller's credential.

Routes declare what they need with these `Annotated` types; authentication
happens here, before a route reads any request body.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from aggregator import AdminTokenRecord, Aggregator, ClientRecord
from api.runtime import Runtime
from fedcore import AuthError, Forbidden

__all__ = [
    "AdminDep",
    "AggregatorDep",
    "BearerDep",
    "ClientDep",
    "MemberDep",
    "RuntimeDep",
]

# auto_error=False: a missing or malformed header becomes a fedcore AuthError,
# answered by the problem table like every other error.
_bearer = HTTPBearer(auto_error=False)


# Dependencies that only read values are coroutines, so FastAPI runs them on
# the event loop instead of a worker thread; those that query the database
# stay plain functions and run in the threadpool.


async def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(_runtime)]


async def _aggregator(runtime: RuntimeDep) -> Aggregator:
    return runtime.aggregator


AggregatorDep = Annotated[Aggregator, Depends(_aggregator)]


async def _bearer_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str | None:
    if credentials is not None:
        return credentials.credentials
    if request.headers.get("Authorization"):
        raise AuthError("the Authorization header must read 'Bearer <token>'")
    return None


BearerDep = Annotated[str | None, Depends(_bearer_token)]


def _admin(aggregator: AggregatorDep, token: BearerDep) -> AdminTokenRecord:
    return aggregator.access.authenticate_admin(token)


AdminDep = Annotated[AdminTokenRecord, Depends(_admin)]


def _client(aggregator: AggregatorDep, token: BearerDep) -> ClientRecord:
    return aggregator.access.authenticate_client(token)


ClientDep = Annotated[ClientRecord, Depends(_client)]


async def _member(fid: str, client: ClientDep) -> ClientRecord:
    if client.federation_id != fid:
        raise Forbidden("this client is enrolled in another federation")
    return client


MemberDep = Annotated[ClientRecord, Depends(_member)]
"""A client enrolled in the federation named by the route's `{fid}`."""
