"""a tenant's audit log

Revision ID: 0039
Revises: 0038
Create Date: 2026-12-05 23:00:00.000000

A tenant could not tell who read the checkpoints it published, nor who revoked a key or changed
its limits: the Tinker SDK's `AdminClient.get_audit_log` was a 404. `audit_events` keeps one
row per such event, written in the transaction of what it records (`control_plane.audit`), read
a UTC day at a time off the tenant's index, and deleted past the platform's retention off a
BRIN index on the time (the table only grows at its end).
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0039"
down_revision = "0038"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("event", sa.String(length=64), nullable=False),
        sa.Column(
            "details",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default="{}",
            nullable=False,
        ),
        sa.Column("once", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_audit_events_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    op.create_index(
        "ix_audit_events_tenant_created",
        "audit_events",
        ["tenant_id", "created_at", "id"],
        unique=False,
    )
    op.create_index(
        "uq_audit_events_once",
        "audit_events",
        ["tenant_id", "once"],
        unique=True,
        postgresql_where=sa.text("once IS NOT NULL"),
    )
    op.create_index(
        "ix_audit_events_created_brin",
        "audit_events",
        ["created_at"],
        unique=False,
        postgresql_using="brin",
    )


def downgrade() -> None:
    op.drop_table("audit_events")
