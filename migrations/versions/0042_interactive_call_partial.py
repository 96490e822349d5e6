"""a streamed chat's text so far, written by the executor while it samples

Revision ID: 0042
Revises: 0041
Create Date: 2026-12-06 13:05:00.000000

`POST /v1/chat/completions` with `stream: true` sends the reply as it is sampled. The executor
writes each streamed call's text so far (`interactive_calls.partial`: `{"texts": [...]}`, one
a choice) every `LORAFORGE_CHAT_STREAM_EVERY_SECONDS` while it decodes, and notifies the channel
a finished call notifies (`loraforge_interactive_done`), so the API's stream wakes and sends
what is new. It is null for every other call, set back to null when the call finishes (the
answer holds the whole text) and when its payload is let go. `stream_left_at` is when a
streamed chat's client left (or its stream ended early): the executor, told so by its next
write, stops sampling the chat, whose answer then holds what was sampled until then.
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
    op.add_column(
        "interactive_calls",
        sa.Column("stream_left_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_column("interactive_calls", "stream_left_at")
    op.drop_column("interactive_calls", "partial")
