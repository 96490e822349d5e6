"""what each interactive call used, for the tenant's usage report

Revision ID: 0035
Revises: 0034
Create Date: 2026-12-05 19:30:00.000000

A tenant's interactive calls were counted nowhere: a platform that many tenants share could
not say who trained or sampled how many tokens. A call answered now records what it used
(`interactive_calls.usage`: a forward's or forward_backward's training tokens, a sample's prompt
and sampled tokens, a save's checkpoint), kept when its payload is let go, and read by the
usage report (`GET /api/v1/billing/usage/events`, the SDK's `AdminClient.get_billing_usage`)
hour by hour off a partial index of the metered calls by tenant and finish time. Calls answered
before this revision have no usage and are not counted.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0035"
down_revision = "0034"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "interactive_calls",
        sa.Column("usage", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )
    op.create_index(
        "ix_interactive_calls_tenant_usage",
        "interactive_calls",
        ["tenant_id", "finished_at"],
        unique=False,
        postgresql_where=sa.text("usage IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_interactive_calls_tenant_usage",
        table_name="interactive_calls",
        postgresql_where=sa.text("usage IS NOT NULL"),
    )
    op.drop_column("interactive_calls", "usage")
