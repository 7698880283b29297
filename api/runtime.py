"""What a running service holds: store, blob store, aggregator and ticker.

`Runtime.open` is called by the application's lifespan, never at import: it
migrates the database, opens the blob store, makes sure an admin token
exists, and starts the ticker that applies round deadlines and the change
feed that wakes held check-ins.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError

from aggregator import Access, Aggregator, FileBlobStore
from aggregator.sqlstore import SqlStore
from api.changes import ChangeFeed
from api.metrics import Metrics
from api.settings import Settings
from fedcore import FedcoreError

__all__ = ["Runtime", "Ticker", "bootstrap_admin"]

logger = logging.getLogger(__name__)


class Ticker:
    """A daemon thread calling `aggregator.tick()` every `interval_s` seconds.

    Deadlines pass without any request arriving, so something must look at
    the clock. Several workers may tick the same database: transitions take
    the federation's lock, so each is applied once. Before its first tick it
    collects orphan blobs (`Aggregator.collect_orphans`).
    """

    def __init__(self, aggregator: Aggregator, interval_s: float) -> None:
        self._aggregator = aggregator
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedcore-ticker", daemon=True)

    @property
    def alive(self) -> bool:
        """Whether the thread runs (readiness depends on it)."""
        return self._thread.is_alive()

    def start(self) -> None:
        """Start ticking."""
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop ticking and wait for the current tick to finish."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        # Blobs a crash left between their fsync and their row's commit: swept
        # here, once, so that a large database does not hold up start-up.
        try:
            self._aggregator.collect_orphans()
        except (SQLAlchemyError, OSError, FedcoreError):
            logger.exception("collecting orphan blobs failed; they stay until the next start")
        while not self._stop.wait(self._interval_s):
            try:
                self._aggregator.tick()
            except (SQLAlchemyError, OSError, FedcoreError):
                # A database restart or a full disk must not end deadline
                # handling for good; the next tick tries again.
                logger.exception("tick failed; retrying in %.2f s", self._interval_s)


@dataclass(slots=True)
class Runtime:
    """The service's open resources, owned by one application instance."""

    settings: Settings
    store: SqlStore
    aggregator: Aggregator
    metrics: Metrics
    ticker: Ticker
    changes: ChangeFeed

    @classmethod
    def open(cls, settings: Settings, metrics: Metrics, loop: asyncio.AbstractEventLoop) -> Runtime:
        """Migrate and open the store, the blobs and the aggregator, and start ticking.

        Args:
            settings: where the state lives.
            metrics: the application's metrics.
            loop: the event loop serving requests, whose held check-ins
                `changes` wakes.
        """
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = SqlStore.open(settings.database_url)
        try:
            aggregator = Aggregator(store, FileBlobStore(settings.blob_dir))
            bootstrap_admin(aggregator.access, settings)
        except BaseException:
            store.close()
            raise
        ticker = Ticker(aggregator, settings.tick_interval_s)
        changes = ChangeFeed(aggregator, loop)
        ticker.start()
        changes.start()
        return cls(settings, store, aggregator, metrics, ticker, changes)

    def close(self) -> None:
        """Stop the threads and release the database connections."""
        self.changes.stop()
        self.ticker.stop()
        self.store.close()


def bootstrap_admin(access: Access, settings: Settings) -> None:
    """Register the configured admin token, or create the first one.

    A created token is written to `settings.admin_token_file` (mode 0600) and
    only the file's path is logged.
    """
    if settings.admin_token is not None:
        access.ensure_admin_token(settings.admin_token.get_secret_value(), "FEDCORE_ADMIN_TOKEN")
        return
    if access.has_admin_tokens():
        return
    token = access.create_admin_token("bootstrap")
    path = settings.admin_token_file
    partial = path.with_name(path.name + ".part")
    partial.unlink(missing_ok=True)  # O_CREAT keeps an old file's mode
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(token + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(partial, path)
    logger.warning("created the first admin token and wrote it to %s (mode 0600)", path)
