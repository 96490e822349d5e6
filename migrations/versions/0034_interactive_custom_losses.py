"""custom losses a session uploads, run by the executor

Revision ID: 0034
Revises: 0033
Create Date: 2026-12-05 19:00:00.000000

The `tinker` SDK traces a custom loss (`ServiceClient.create_custom_loss`) and, where the server
says it runs them (`custom_loss_server_side`), uploads the traced graph as data. A
`forward_backward` that names it runs it on the executor in one pass, where the SDK would
otherwise run a forward, compute the loss itself and send its gradient back in a second call.
Each row is one session's loss: its name, its inputs and their ranks, and the graph; `seq`
is the SDK's number for it in its session, so a request sent again finds the loss it made.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0034"
down_revision = "0033"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "interactive_custom_losses",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("session_id", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("inputs", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("graph", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["interactive_sessions.id"],
            name=op.f("fk_interactive_custom_losses_session_id_interactive_sessions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_interactive_custom_losses_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_interactive_custom_losses")),
        sa.UniqueConstraint("session_id", "seq", name="uq_interactive_custom_losses_seq"),
    )


def downgrade() -> None:
    op.drop_table("interactive_custom_losses")
