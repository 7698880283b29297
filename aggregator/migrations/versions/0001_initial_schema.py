"""Create the aggregator's tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(length=128)
HASH = sa.String(length=128)
NAME = sa.String(length=200)
STATUS = sa.String(length=16)


def upgrade() -> None:
    op.create_table(
        "federations",
        sa.Column("id", ID, nullable=False),
        sa.Column("name", NAME, nullable=False),
        sa.Column("config_json", sa.Text(), nullable=False),
        sa.Column("status", STATUS, nullable=False),
        sa.Column("model_version", HASH, nullable=False),
        sa.Column("current_round", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.CheckConstraint(
            "current_round >= 0", name=op.f("ck_federations_current_round_nonnegative")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_federations")),
    )
    op.create_table(
        "admin_tokens",
        sa.Column("token_hash", HASH, nullable=False),
        sa.Column("name", NAME, nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_admin_tokens")),
    )
    op.create_table(
        "clients",
        sa.Column("id", ID, nullable=False),
        sa.Column("federation_id", ID, nullable=False),
        sa.Column("token_hash", HASH, nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["federation_id"],
            ["federations.id"],
            name=op.f("fk_clients_federation_id_federations"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_clients")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_clients_token_hash")),
    )
    op.create_index(op.f("ix_clients_federation_id"), "clients", ["federation_id"])
    op.create_table(
        "enrollment_tokens",
        sa.Column("token_hash", HASH, nullable=False),
        sa.Column("federation_id", ID, nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("client_id", ID, nullable=True),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["client_id"], ["clients.id"], name=op.f("fk_enrollment_tokens_client_id_clients")
        ),
        sa.ForeignKeyConstraint(
            ["federation_id"],
            ["federations.id"],
            name=op.f("fk_enrollment_tokens_federation_id_federations"),
        ),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_enrollment_tokens")),
    )
    op.create_index(
        op.f("ix_enrollment_tokens_federation_id"), "enrollment_tokens", ["federation_id"]
    )
    op.create_table(
        "rounds",
        sa.Column("federation_id", ID, nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("status", STATUS, nullable=False),
        sa.Column("model_version", HASH, nullable=False),
        sa.Column("opened_at", sa.Float(), nullable=False),
        sa.Column("deadline", sa.Float(), nullable=False),
        sa.Column("cohort", sa.JSON(), nullable=False),
        sa.Column("closed_at", sa.Float(), nullable=True),
        sa.Column("result_version", HASH, nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.CheckConstraint("number >= 0", name=op.f("ck_rounds_number_nonnegative")),
        sa.ForeignKeyConstraint(
            ["federation_id"], ["federations.id"], name=op.f("fk_rounds_federation_id_federations")
        ),
        sa.PrimaryKeyConstraint("federation_id", "number", name=op.f("pk_rounds")),
    )
    op.create_table(
        "updates",
        sa.Column("federation_id", ID, nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("client_id", ID, nullable=False),
        sa.Column("sha256", HASH, nullable=False),
        sa.Column("num_examples", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.CheckConstraint("num_examples >= 0", name=op.f("ck_updates_num_examples_nonnegative")),
        sa.ForeignKeyConstraint(
            ["client_id"], ["clients.id"], name=op.f("fk_updates_client_id_clients")
        ),
        sa.ForeignKeyConstraint(
            ["federation_id", "round"],
            ["rounds.federation_id", "rounds.number"],
            name=op.f("fk_updates_federation_id_rounds"),
        ),
        sa.PrimaryKeyConstraint("federation_id", "round", "client_id", name=op.f("pk_updates")),
    )
    op.create_table(
        "model_versions",
        sa.Column("federation_id", ID, nullable=False),
        sa.Column("version", HASH, nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.CheckConstraint(
            "size_bytes >= 0", name=op.f("ck_model_versions_size_bytes_nonnegative")
        ),
        sa.ForeignKeyConstraint(
            ["federation_id"],
            ["federations.id"],
            name=op.f("fk_model_versions_federation_id_federations"),
        ),
        sa.PrimaryKeyConstraint("federation_id", "version", name=op.f("pk_model_versions")),
    )


def downgrade() -> None:
    op.drop_table("model_versions")
    op.drop_table("updates")
    op.drop_table("rounds")
    op.drop_index(op.f("ix_enrollment_tokens_federation_id"), table_name="enrollment_tokens")
    op.drop_table("enrollment_tokens")
    op.drop_index(op.f("ix_clients_federation_id"), table_name="clients")
    op.drop_table("clients")
    op.drop_table("admin_tokens")
    op.drop_table("federations")
