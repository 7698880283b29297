"""Admin routes (`/admin`): federations, rounds, clients, tokens and models.

Every route needs an admin token. Routes only translate between HTTP and the
service core; errors are raised, and answered by `api.problems`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from aggregator import FederationSettings, parse_settings
from api.deps import AdminDep, AggregatorDep, RuntimeDep
from api.download import model_response
from api.schemas import (
    ClientOut,
    FederationOut,
    ModelOut,
    PrivacyOut,
    RoundOut,
    TokensIn,
    TokensOut,
)
from fedcore import ConfigError, PayloadTooLarge, wire

__all__ = ["router"]

router = APIRouter(prefix="/admin", tags=["admin"])

# A federation config is a few hundred bytes; this bounds the text field.
_MAX_CONFIG_BYTES = 1 << 20
_CHUNK = 1 << 20
_CREATE_BODY = {
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["config", "model"],
                "properties": {
                    "config": {
                        "type": "string",
                        "description": "FederationConfig as JSON, with an optional `dp` section",
                    },
                    "model": {"type": "string", "format": "binary"},
                },
            }
        }
    },
    "required": True,
}


@router.post("/federations", status_code=201, openapi_extra={"requestBody": _CREATE_BODY})
async def create_federation(
    request: Request, _admin: AdminDep, runtime: RuntimeDep
) -> FederationOut:
    """Create a federation from a config (JSON text) and an initial model (safetensors).

    The form is parsed only after the admin token was checked. An invalid
    config or model is refused and leaves nothing behind.
    """
    limit = runtime.settings.max_body_bytes
    declared = request.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request of {declared} bytes exceeds the limit of {limit} bytes")
    async with request.form(max_files=2, max_fields=2, max_part_size=_MAX_CONFIG_BYTES) as form:
        config_field, model = _form_parts(form)
        config = _parse_config_text(await _text(config_field))
        staged = runtime.aggregator.blobs.stage(limit)
        try:
            while chunk := await model.read(_CHUNK):
                await run_in_threadpool(staged.write, chunk)
            record = await run_in_threadpool(runtime.aggregator.create_federation, config, staged)
        finally:
            staged.discard()
    return FederationOut.of(record)


@router.get("/federations")
def list_federations(_admin: AdminDep, aggregator: AggregatorDep) -> list[FederationOut]:
    """List every federation, oldest first."""
    return [FederationOut.of(f) for f in aggregator.list_federations()]


@router.get("/federations/{fid}")
def get_federation(fid: str, _admin: AdminDep, aggregator: AggregatorDep) -> FederationOut:
    """Show one federation."""
    return FederationOut.of(aggregator.get_federation(fid))


@router.post("/federations/{fid}/start")
def start_federation(fid: str, _admin: AdminDep, aggregator: AggregatorDep) -> FederationOut:
    """Start or resume a federation's rounds."""
    return FederationOut.of(aggregator.start(fid))


@router.post("/federations/{fid}/pause")
def pause_federation(fid: str, _admin: AdminDep, aggregator: AggregatorDep) -> FederationOut:
    """Pause a running federation."""
    return FederationOut.of(aggregator.pause(fid))


@router.post("/federations/{fid}/stop")
def stop_federation(fid: str, _admin: AdminDep, aggregator: AggregatorDep) -> FederationOut:
    """Stop a federation for good; an open round fails."""
    return FederationOut.of(aggregator.stop(fid))


@router.get("/federations/{fid}/rounds")
def list_rounds(fid: str, _admin: AdminDep, aggregator: AggregatorDep) -> list[RoundOut]:
    """List a federation's rounds in order."""
    return [RoundOut.of(r) for r in aggregator.list_rounds(fid)]


@router.get("/federations/{fid}/rounds/{n}")
def get_round(fid: str, n: int, _admin: AdminDep, aggregator: AggregatorDep) -> RoundOut:
    """Show one round."""
    return RoundOut.of(aggregator.get_round(fid, n))


@router.get("/federations/{fid}/privacy")
def get_privacy(fid: str, _admin: AdminDep, aggregator: AggregatorDep) -> PrivacyOut:
    """Show a federation's privacy budget, the ε spent and the ε after each round.

    The ε spent is recomputed from the accounting events stored with the
    rounds. A federation without differential privacy answers `mode` null.
    """
    return PrivacyOut.of(aggregator.privacy(fid))


@router.get("/federations/{fid}/clients")
def list_clients(fid: str, _admin: AdminDep, aggregator: AggregatorDep) -> list[ClientOut]:
    """List a federation's enrolled clients."""
    return [ClientOut.of(c) for c in aggregator.list_clients(fid)]


@router.post("/federations/{fid}/clients/{cid}/revoke")
def revoke_client(fid: str, cid: str, _admin: AdminDep, aggregator: AggregatorDep) -> ClientOut:
    """Revoke a client's credential; its later requests get 401."""
    return ClientOut.of(aggregator.access.revoke_client(fid, cid))


@router.post("/federations/{fid}/enrollment-tokens", status_code=201)
def create_enrollment_tokens(
    fid: str, body: TokensIn, _admin: AdminDep, aggregator: AggregatorDep
) -> TokensOut:
    """Issue one-time enrollment tokens for devices of a federation."""
    tokens, expires_at = aggregator.access.create_enrollment_tokens(fid, body.count, body.ttl_s)
    return TokensOut(tokens=tokens, expires_at=expires_at)


@router.get("/federations/{fid}/models")
def list_models(fid: str, _admin: AdminDep, aggregator: AggregatorDep) -> list[ModelOut]:
    """List a federation's model versions, oldest first."""
    return [ModelOut.of(m) for m in aggregator.list_models(fid)]


@router.get(
    "/federations/{fid}/models/{version}",
    response_class=Response,
    responses={200: {"content": {wire.MEDIA_TYPE: {}}}, 304: {"description": "Not modified"}},
)
def download_model(
    fid: str,
    version: str,
    _admin: AdminDep,
    aggregator: AggregatorDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """Download a model version as safetensors."""
    return model_response(aggregator, fid, version, if_none_match)


def _form_parts(form: FormData) -> tuple[str | UploadFile, UploadFile]:
    config, model = form.get("config"), form.get("model")
    if config is None or not isinstance(model, UploadFile):
        missing = [] if config is not None else [_missing("config", "the FederationConfig as JSON")]
        if not isinstance(model, UploadFile):
            missing.append(_missing("model", "the initial model as a safetensors file"))
        raise RequestValidationError(missing)
    return config, model


def _missing(field: str, message: str) -> dict[str, Any]:
    return {"type": "missing", "loc": ("body", field), "msg": f"required: {message}"}


async def _text(field: str | UploadFile) -> str:
    if isinstance(field, str):
        return field
    data = await field.read(_MAX_CONFIG_BYTES + 1)
    if len(data) > _MAX_CONFIG_BYTES:
        raise ConfigError([f"config: larger than {_MAX_CONFIG_BYTES} bytes"])
    return data.decode("utf-8", errors="replace")


def _parse_config_text(text: str) -> FederationSettings:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError([f"config: not valid JSON ({exc})"]) from None
    return parse_settings(data)
