"""Secure aggregation: clients' identity keys, rounds' setups, and the stage log.

- `clients.identity_key`: the Ed25519 public key registered at enrollment.
- `rounds.secagg_setup`: the encoded `RoundSetup` of a secure round.
- `secagg_messages`: each secure round's stage log, replayed after a restart.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Batch mode, as in 0002: the downgrade must drop columns on SQLite too.
    with op.batch_alter_table("clients") as batch:
        batch.add_column(sa.Column("identity_key", sa.LargeBinary(32), nullable=True))
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(sa.Column("secagg_setup", sa.LargeBinary(), nullable=True))
    op.create_table(
        "secagg_messages",
        sa.Column("federation_id", sa.String(128), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("entry", sa.String(16), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("sender", sa.String(128), nullable=True),
        sa.Column("payload", sa.LargeBinary(), nullable=True),
        sa.Column("blob", sa.String(128), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.CheckConstraint("seq >= 0", name=op.f("ck_secagg_messages_seq_nonnegative")),
        sa.ForeignKeyConstraint(
            ["federation_id", "round"],
            ["rounds.federation_id", "rounds.number"],
            name=op.f("fk_secagg_messages_federation_id_rounds"),
        ),
        sa.ForeignKeyConstraint(
            ["sender"], ["clients.id"], name=op.f("fk_secagg_messages_sender_clients")
        ),
        sa.PrimaryKeyConstraint("federation_id", "round", "seq", name=op.f("pk_secagg_messages")),
    )


def downgrade() -> None:
    op.drop_table("secagg_messages")
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("secagg_setup")
    with op.batch_alter_table("clients") as batch:
        batch.drop_column("identity_key")
