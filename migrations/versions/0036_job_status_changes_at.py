"""the jobs' status changes by time, for the fine-tuning usage report

Revision ID: 0036
Revises: 0035
Create Date: 2026-12-05 21:30:00.000000

The platform's usage report (`GET /v1/usage`) counted only interactive sessions: the time each
tenant's fine-tuning jobs held a trainer, and the tokens its succeeded jobs trained on, were
reported nowhere. Both are read off the jobs' status changes, which the queue already writes
(`control_plane.job_usage`); this index finds a window's changes without reading every event
(metrics and log lines included) since the platform began. Changes written before this revision
are indexed as it is built, so the report covers the whole history.
"""

import sqlalchemy as sa
from alembic import op

revision = "0036"
down_revision = "0035"
branch_labels = None
depends_on = None

STATUS_CHANGE = "(data -> 'status') IS NOT NULL"


def upgrade() -> None:
    op.create_index(
        "ix_job_events_status_changes_at",
        "job_events",
        ["created_at"],
        unique=False,
        postgresql_where=sa.text(STATUS_CHANGE),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_job_events_status_changes_at",
        table_name="job_events",
        postgresql_where=sa.text(STATUS_CHANGE),
    )
