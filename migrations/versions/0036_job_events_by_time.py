"""the jobs' events by time, for the fine-tuning usage report

Revision ID: 0036
Revises: 0035
Create Date: 2026-12-05 21:30:00.000000

The platform's usage report (`GET /v1/usage`) counted only interactive sessions: the time each
tenant's fine-tuning jobs held a trainer, and the tokens its succeeded jobs trained on, were
reported nowhere. Both are read off the jobs' status changes, which the queue already writes
(`control_plane.job_usage`); this index finds a window's events without reading every event
since the platform began. It is a BRIN index on the events' time: events are only appended, so
their time follows the table's order, and the index is a few pages that the queue's writes (an
event at every claim and every finish) barely touch, where a B-tree would take an entry at
each. Events written before this revision are summarized as it is built, so the report covers
the whole history.
"""

from alembic import op

revision = "0036"
down_revision = "0035"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_job_events_created_brin",
        "job_events",
        ["created_at"],
        unique=False,
        postgresql_using="brin",
    )


def downgrade() -> None:
    op.drop_index("ix_job_events_created_brin", table_name="job_events", postgresql_using="brin")
