"""Operations routes: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.exceptions import HTTPException
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import SQLAlchemyError

from api.deps import RuntimeDep
from api.schemas import HealthOut

__all__ = ["router"]

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> HealthOut:
    """Answer while the process serves requests."""
    return HealthOut(status="ok")


@router.get("/readyz")
def readyz(runtime: RuntimeDep) -> HealthOut:
    """Answer once the database is reachable and deadlines are being applied."""
    try:
        with runtime.store.read() as tx:
            tx.count_admin_tokens()
    except SQLAlchemyError:
        raise HTTPException(503, "the database is unreachable") from None
    if not runtime.ticker.alive:
        raise HTTPException(503, "the round ticker has stopped; see the server log")
    return HealthOut(status="ready")


@router.get("/metrics", response_class=Response)
def metrics(runtime: RuntimeDep) -> Response:
    """Expose the metrics in the Prometheus text format."""
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)
