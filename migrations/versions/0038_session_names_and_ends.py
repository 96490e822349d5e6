"""sessions' display names and how their clients finished them, for the session search

Revision ID: 0038
Revises: 0037
Create Date: 2026-12-05 22:30:00.000000

The SDK names a session (`display_name`) and says, as its client closes, whether it succeeded,
errored or was interrupted: loraforge kept neither, so `RestClient.search_sessions` (a 404) had
nothing to search by and no status to report. A session made before this revision has no name,
and one finished before it no finish.
"""

import sqlalchemy as sa
from alembic import op

revision = "0038"
down_revision = "0037"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("interactive_sessions", sa.Column("display_name", sa.String(200), nullable=True))
    op.add_column(
        "interactive_sessions",
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.add_column("interactive_sessions", sa.Column("finish_reason", sa.String(16), nullable=True))
    op.add_column("interactive_sessions", sa.Column("finish_detail", sa.Text(), nullable=True))


def downgrade() -> None:
    for column in ("finish_detail", "finish_reason", "finished_at", "display_name"):
        op.drop_column("interactive_sessions", column)
