"""The FastAPI application, made by a factory: nothing is created at import.

`create_app(settings)` wires the routers, the problem handlers and the metrics
middleware; its lifespan opens the store (applying migrations), the blob
store and the aggregator, bootstraps an admin token and runs the ticker, and
closes all of it on shutdown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from aggregator import Aggregator
from api import routes_admin, routes_client, routes_ops
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
        runtime = await run_in_threadpool(Runtime.open, settings, metrics)
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
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.include_router(routes_client.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_ops.router)
    metrics.watch(lambda: _aggregator_of(app))
    return app


def _aggregator_of(app: FastAPI) -> Aggregator | None:
    runtime: Runtime | None = getattr(app.state, "runtime", None)
    return None if runtime is None else runtime.aggregator
