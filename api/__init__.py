"""api: the outside interfaces of fedcore, and its composition root.

The FastAPI application (client routes under `/v1`, admin routes under
`/admin`, `/healthz`, `/readyz`, `/metrics`), made by `create_app` from
`Settings`, and the `fedcore` command line (`api.cli`). May import every
other fedcore package; nothing imports it.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from api.app import create_app
    from api.settings import Settings

__all__ = ["Settings", "create_app"]


def __getattr__(name: str) -> Any:
    # Loaded on first use: `fedcore simulate` and the demo import api's
    # submodules and should not pay for FastAPI and SQLAlchemy at start-up.
    if name == "create_app":
        from api.app import create_app

        return create_app
    if name == "Settings":
        from api.settings import Settings

        return Settings
    raise AttributeError(f"module 'api' has no attribute {name!r}")
