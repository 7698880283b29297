"""Keep what differentially private rounds released: a `privacy` JSON column on rounds.

The new federation status `budget_exhausted` needs no change: statuses are
plain strings (16 characters at most, which it fits exactly).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Batch mode: SQLite cannot drop a column in place on every version, and
    # the downgrade must run there too.
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(sa.Column("privacy", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("privacy")
