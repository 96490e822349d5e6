"""a streamed chat's text so far, written by the executor while it samples

Revision ID: 0042
Revises: 0041
Create Date: 2026-12-06 13:05:00.000000

`POST /v1/chat/completions` with `stream: true` sends the reply as it is sampled. The executor
writes each streamed call's text so far (`interactive_calls.partial`: `{"texts": [...]}`, one
a choice) every `LORAFORGE_CHAT_STREAM_EVERY_SECONDS` while it decodes, and notifies the channel
a finished call notifies (`loraforge_interactive_done`), so the API's stream wakes and sends
what is new. It is null for every other call, set back to null when the call finishes (the
answer holds the whole text) and when its payload is let go.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0042"
down_revision = "0041"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "interactive_calls",
        sa.Column("partial", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )


def downgrade() -> None:
    op.drop_column("interactive_calls", "partial")
