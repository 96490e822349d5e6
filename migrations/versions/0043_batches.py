"""batches: OpenAI's Batch API

Revision ID: 0043
Revises: 0042
Create Date: 2026-12-07 23:20:00.000000

`POST /v1/batches` runs a file of chat or text completions (uploaded with purpose `batch`) on
the interactive executors, a few requests at a time, and writes their answers to an output file
and an error file (purpose `batch_output`). `batches` holds a batch's state, times and counts;
`batch_requests` one row per line of its input file, with the calls that answer it.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0043"
down_revision = "0042"
branch_labels = None
depends_on = None


def _time(name: str, nullable: bool = True) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("endpoint", sa.String(length=64), nullable=False),
        sa.Column("input_file_id", sa.String(length=64), nullable=False),
        sa.Column("completion_window", sa.String(length=16), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("metadata", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("output_file_id", sa.String(length=64), nullable=True),
        sa.Column("error_file_id", sa.String(length=64), nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("completed", sa.Integer(), server_default="0", nullable=False),
        sa.Column("failed", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        _time("in_progress_at"),
        _time("expires_at", nullable=False),
        _time("finalizing_at"),
        _time("completed_at"),
        _time("expired_at"),
        _time("cancelling_at"),
        _time("cancelled_at"),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_batches_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["input_file_id"], ["files.id"], name=op.f("fk_batches_input_file_id_files")
        ),
        sa.ForeignKeyConstraint(
            ["output_file_id"], ["files.id"], name=op.f("fk_batches_output_file_id_files")
        ),
        sa.ForeignKeyConstraint(
            ["error_file_id"], ["files.id"], name=op.f("fk_batches_error_file_id_files")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batches")),
    )
    op.create_index(
        "ix_batches_tenant_created", "batches", ["tenant_id", "created_at", "id"], unique=False
    )
    op.create_index(
        "ix_batches_moving",
        "batches",
        ["created_at"],
        unique=False,
        postgresql_where=sa.text("status IN ('in_progress', 'cancelling')"),
    )
    op.create_table(
        "batch_requests",
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("line", sa.Integer(), nullable=False),
        sa.Column("custom_id", sa.Text(), nullable=False),
        sa.Column("body", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("calls", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("response", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("error", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["batches.id"],
            name=op.f("fk_batch_requests_batch_id_batches"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("batch_id", "line", name=op.f("pk_batch_requests")),
        sa.UniqueConstraint("batch_id", "custom_id", name="uq_batch_requests_custom_id"),
    )
    op.create_index(
        "ix_batch_requests_unfinished",
        "batch_requests",
        ["batch_id", "line"],
        unique=False,
        postgresql_where=sa.text("status IN ('pending', 'asked')"),
    )


def downgrade() -> None:
    op.drop_table("batch_requests")
    op.drop_table("batches")
