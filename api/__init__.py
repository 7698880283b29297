"""api: the outside interfaces of fedcore, and its composition root.

The FastAPI application (client routes under `/v1`, admin routes under
`/admin`, `/healthz`, `/readyz`, `/metrics`), made by `create_app` from
`Settings`, and the `fedcore` command line (`api.cli`). May import every
other fedcore package; nothing imports it.
"""

from api.app import create_app
from api.settings import Settings

__all__ = ["Settings", "create_app"]
