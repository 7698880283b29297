"""The FastAPI application, made by a factory: nothing is created at import.

`create_app(settings)` wires the routers, the problem handlers and the metrics
middleware; its lifespan opens the store (applying migrations), the blob
store and the aggregator, bootstraps an admin token and runs the ticker, and
closes all of it on shutdown. Request bodies are limited by route
(`api.limits`): uploads stream up to `max_body_bytes`, JSON stays small.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from aggregator import Aggregator
from api import routes_admin, routes_client, routes_ops
from api.limits import BodyLimitMiddleware
from api.metrics import Metrics, MetricsMiddleware
from api.problems import install_problem_handlers
from api.runtime import Runtime
from api.settings import Settings

__all__ = ["create_app"]


def create_app(settings: Settings | None = None) -> FastAPI:
    """Return the aggregator's HTTP application.

    Args:
        settings: where the state lives and how to serve; read from the
            `FEDCORE_*` environment when omitted.
    """
    settings = settings if settings is not None else Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        runtime = await run_in_threadpool(Runtime.open, settings, metrics, loop)
        app.state.runtime = runtime
        try:
            yield
        finally:
            await run_in_threadpool(runtime.close)
            del app.state.runtime

    app = FastAPI(
        title="fedcore aggregator",
        summary="Federated learning rounds over HTTP: client, admin and operations routes.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_problem_handlers(app)
    app.include_router(routes_client.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_ops.router)
    app.add_middleware(
        BodyLimitMiddleware,
        streaming_endpoints={
            routes_client.upload_update,
            routes_client.send_secagg,
            routes_admin.create_federation,
        },
        max_body_bytes=settings.max_body_bytes,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    metrics.watch(lambda: _aggregator_of(app))
    return app


def _aggregator_of(app: FastAPI) -> Aggregator | None:
    runtime: Runtime | None = getattr(app.state, "runtime", None)
    return None if runtime is None else runtime.aggregator
