"""Client routes (`/v1`): enrollment, check-in, model download, update upload, SecAgg stages."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from aggregator import StagedBlob, Submission
from api.deps import AggregatorDep, Member, MemberDep, RuntimeDep
from api.download import model_response
from api.problems import problem_type
from api.runtime import Runtime
from api.schemas import EnrollIn
from fedcore import Enrollment, FedcoreError, PayloadTooLarge, Receipt, Task, TaskAction, wire
from privacy.secagg import Stage

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["client"])

# A held check-in asks the service again at least this often, even without
# a transition in this process: another worker may have moved the round, or
# a deadline passed.
_RECHECK_S = 1.0
# Upload bytes are written to the staged blob in batches of this size, off
# the event loop.
_BATCH = 1 << 20


@router.post("/enroll", status_code=201)
def enroll(body: EnrollIn, aggregator: AggregatorDep) -> Enrollment:
    """Exchange a one-time enrollment token for a client credential."""
    return aggregator.access.enroll(body.enrollment_token, identity_key=body.identity_key_bytes())


@router.get("/federations/{fid}/task")
async def check_in(
    fid: str,
    request: Request,
    member: MemberDep,
    runtime: RuntimeDep,
    wait: Annotated[float, Query(ge=0, allow_inf_nan=False)] = 0.0,
) -> Task:
    """Check in and get the next task, holding the request while the answer is `wait`.

    `wait` is capped at the server's `long_poll_max_s`.
    """
    aggregator = runtime.aggregator
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(wait, runtime.settings.long_poll_max_s)

    def ask() -> Task:
        return aggregator.next_task(member.client().id, fid)

    while True:
        seen = aggregator.generation
        task = await run_in_threadpool(ask)
        remaining = deadline - loop.time()
        if task.action is not TaskAction.WAIT or remaining <= 0:
            return task
        await runtime.changes.wait(seen, min(remaining, _RECHECK_S))
        if await request.is_disconnected():
            return task


@router.get(
    "/federations/{fid}/models/{version}",
    response_class=Response,
    responses={200: {"content": {wire.MEDIA_TYPE: {}}}, 304: {"description": "Not modified"}},
)
def download_model(
    fid: str,
    version: str,
    member: MemberDep,
    aggregator: AggregatorDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """Download a model version as safetensors (ETag: the version)."""
    member.client()  # 401 or 403 before anything of the model is read
    return model_response(aggregator, fid, version, if_none_match)


@router.put(
    "/federations/{fid}/rounds/{n}/update",
    status_code=201,
    response_model=Receipt,
    responses={200: {"model": Receipt, "description": "The identical update was stored before"}},
    openapi_extra={"requestBody": {"content": {wire.MEDIA_TYPE: {}}, "required": True}},
)
async def upload_update(
    fid: str, n: int, request: Request, member: MemberDep, runtime: RuntimeDep
) -> Response:
    """Upload the client's update (a safetensors delta) for round `n`.

    The body streams to a staged file in the blob store, never whole into
    memory. Answers 201 with a new receipt, or 200 with the original receipt
    when this client's update for the round was already stored (an identical
    re-upload; a different one is refused with 409).
    """
    aggregator = runtime.aggregator
    staged = await run_in_threadpool(_prepare, runtime, fid, request, member)
    submit = functools.partial(aggregator.submit_update, member.client().id, fid, n)
    try:
        tail = await _receive(request, staged)
        submitted = await run_in_threadpool(_finish, staged, tail, submit)
    except FedcoreError as exc:
        runtime.metrics.updates_rejected.labels(problem_type(exc).slug).inc()
        raise
    finally:
        staged.discard()
    repeated = submitted.repeated
    counter = runtime.metrics.updates_repeated if repeated else runtime.metrics.updates_accepted
    counter.inc()
    body = submitted.receipt.model_dump(mode="json")
    return JSONResponse(body, status_code=200 if repeated else 201)


def _prepare(runtime: Runtime, fid: str, request: Request, member: Member) -> StagedBlob:
    """Authenticate the client; return the blob to stage its upload in, of at most the limit.

    Raises:
        AuthError, Forbidden: as `Member.client`.
        PayloadTooLarge: the declared length is over the limit.
    """
    member.client()  # 401 or 403 before a byte of the body is read
    aggregator = runtime.aggregator
    limit = min(aggregator.config(fid).max_update_bytes, runtime.settings.max_body_bytes)
    _check_declared_length(request, limit)
    # Creating the staged file touches the disk: here, off the event loop.
    return aggregator.blobs.stage(limit)


def _finish(
    staged: StagedBlob, tail: bytes, submit: Callable[[StagedBlob], Submission]
) -> Submission:
    """Write the last bytes of an upload and submit it, in one hand-off to a thread."""
    if tail:
        staged.write(tail)
    return submit(staged)


def _check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("Content-Length", "")
    # Refuse before reading a byte; a body without a length is cut off by the
    # staged blob instead.
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"update of {declared} bytes exceeds the limit of {limit} bytes")


async def _receive(request: Request, staged: StagedBlob) -> bytes:
    """Stream the body into `staged` in batches; return the last batch, not yet written."""
    pending = bytearray()
    async for chunk in request.stream():
        pending += chunk
        if len(pending) >= _BATCH:
            await run_in_threadpool(staged.write, bytes(pending))
            pending.clear()
    return bytes(pending)


_OCTETS = "application/octet-stream"


@dataclass(frozen=True, slots=True)
class _StagePath:
    """Where a SecAgg+ stage message goes: federation, round and stage."""

    fid: str
    n: int
    stage: Stage


def _stage_path(
    fid: str, n: int, stage: Annotated[Stage, Path(description="the SecAgg+ stage")]
) -> _StagePath:
    return _StagePath(fid, n, stage)


StagePathDep = Annotated[_StagePath, Depends(_stage_path)]


@router.get(
    "/federations/{fid}/rounds/{n}/secagg/{stage}",
    response_class=Response,
    responses={
        200: {"content": {_OCTETS: {}}, "description": "The message that opens the stage"},
        204: {"description": "The stage is not open yet; ask again"},
    },
)
def fetch_secagg(where: StagePathDep, member: MemberDep, aggregator: AggregatorDep) -> Response:
    """Fetch the server message that opens a stage of a secure round for this client.

    For `advertise-keys`: JSON `SecAggSetup` (the round's setup and the
    cohort's identity keys); for later stages, the encoded SecAgg+ message.
    """
    data = aggregator.fetch_secagg(member.client().id, where.fid, where.n, where.stage.value)
    if data is None:
        return Response(status_code=204)
    return Response(data, media_type=_OCTETS)


@router.post(
    "/federations/{fid}/rounds/{n}/secagg/{stage}",
    status_code=204,
    response_class=Response,
    openapi_extra={"requestBody": {"content": {_OCTETS: {}}, "required": True}},
)
async def send_secagg(
    where: StagePathDep, request: Request, member: MemberDep, runtime: RuntimeDep
) -> Response:
    """Send this client's message for a stage of a secure round; durable when answered.

    The same message sent again is taken once (204 again); a message the
    protocol refuses excludes the client from the round (409).
    """
    # Authenticated before the body is read.
    client = await run_in_threadpool(member.client)
    body = await request.body()
    send = runtime.aggregator.send_secagg
    await run_in_threadpool(send, client.id, where.fid, where.n, where.stage.value, body)
    return Response(status_code=204)
