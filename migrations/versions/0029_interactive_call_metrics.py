"""an interactive call's metrics, kept after its request and answer are let go

Revision ID: 0029
Revises: 0028
Create Date: 2026-12-05 12:00:00.000000

A finished interactive call's request and answer are let go an hour after it finished
(`interactive_calls.forget_payloads`), and with the answer went a model's training history:
the `loss:sum` of its forward_backward and forward calls and the `grad_norm:mean` of its
optim_steps. `interactive_calls.metrics` (JSONB, null for the other kinds) holds the answer's
`metrics` object of those three kinds, written with the answer and never let go, a few dozen
bytes a call: the dashboard's session page draws a model's curves from it. The calls finished
within the retention, whose answer is still kept, get theirs here (read off the partial index
of the calls whose payload is kept, not the whole history).
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0029"
down_revision = "0028"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "interactive_calls",
        sa.Column("metrics", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )
    op.execute(
        "UPDATE interactive_calls SET metrics = result -> 'metrics' "
        "WHERE finished_at IS NOT NULL AND payload_dropped_at IS NULL "
        "AND status = 'completed' AND kind IN ('forward_backward', 'forward', 'optim_step')"
    )


def downgrade() -> None:
    op.drop_column("interactive_calls", "metrics")
