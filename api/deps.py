"""Request dependencies: the running service and the caller's credential.

Routes declare what they need with these `Annotated` types. An admin token
is checked here; a client token's form is checked here and its lookup runs
when the route first asks for the client (`Member.client`), in the thread
the route hands its own work to, and always before it reads a request body.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from aggregator import Access, AdminTokenRecord, Aggregator, ClientRecord, check_client_token
from api.runtime import Runtime
from fedcore import AuthError, Forbidden

__all__ = [
    "AdminDep",
    "AggregatorDep",
    "Member",
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
# shared node, which also declares the scheme in the OpenAPI document. An
# admin token's lookup leaves the event loop in a thread hop of its own; a
# client token's joins the route's (`Member`).


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


@dataclass(slots=True)
class Member:
    """A client's credential for the federation of the route's `{fid}`, looked up on first use.

    Looking the token up in a thread of its own would cost a second thread
    hop per request, which took as much CPU as the lookup itself (about
    0.1 ms each on the development VM): routes call `client` in the thread
    that runs their own work instead.
    """

    access: Access = field(repr=False)
    # Never shown: a repr may end up in a log.
    token: str = field(repr=False)
    federation_id: str
    _client: ClientRecord | None = field(default=None, repr=False)

    def client(self) -> ClientRecord:
        """Return the authenticated client; it reads the database on first call (off the loop).

        Raises:
            AuthError: the token is unknown or its client revoked.
            Forbidden: the client is enrolled in another federation.
        """
        if self._client is None:
            client = self.access.authenticate_client(self.token)
            if client.federation_id != self.federation_id:
                raise Forbidden("this client is enrolled in another federation")
            self._client = client
        return self._client


async def _member(fid: str, request: Request, credentials: _Credentials) -> Member:
    # A missing, malformed or non-client token is refused here, before any
    # parameter or body is read; an unknown or revoked one by `Member.client`.
    token = check_client_token(_token(request, credentials))
    return Member(_runtime_of(request).aggregator.access, token, fid)


MemberDep = Annotated[Member, Depends(_member)]
"""A client credential for the federation named by the route's `{fid}`."""
