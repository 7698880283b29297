"""Settings of the aggregator service, read from `FEDCORE_*` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Where the service keeps its state and how it serves HTTP.

    Every field can be set from the environment with the `FEDCORE_` prefix,
    e.g. `FEDCORE_DATABASE_URL=postgresql+psycopg://fl@db/fedcore`. Nothing is
    read at import time: build a `Settings()` where the application is made.
    """

    model_config = SettingsConfigDict(env_prefix="FEDCORE_", extra="ignore")

    data_dir: Path = Path("./fedcore-data")
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL; empty means SQLite at <data_dir>/fedcore.db.",
    )
    admin_token: SecretStr | None = Field(
        default=None,
        description="An admin token ('fca_...') to register at start-up.",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_body_bytes: int = Field(default=1 << 30, ge=1)
    long_poll_max_s: float = Field(default=30.0, ge=0, le=300)
    tick_interval_s: float = Field(default=0.5, gt=0, le=60)

    @model_validator(mode="after")
    def _default_database(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'fedcore.db').resolve()}"
        return self

    @property
    def blob_dir(self) -> Path:
        """Where the content-addressed blobs (models, updates) live."""
        return self.data_dir / "blobs"

    @property
    def admin_token_file(self) -> Path:
        """Where a generated admin token is written (mode 0600)."""
        return self.data_dir / "admin-token"
