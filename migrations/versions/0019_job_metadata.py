"""job metadata: OpenAI's `metadata` on a fine-tuning job, kept, returned and filtered on

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-04 10:00:00.000000

A job's create body takes OpenAI's `metadata` (up to 16 string pairs: keys of at most 64
characters, values of at most 512), which the API accepted and then dropped: the job came back
with `metadata: null`, and `GET /v1/fine_tuning/jobs?metadata[k]=v` matched nothing of it.
`jobs.user_metadata` keeps it (`metadata` is SQLAlchemy's own name on a model). No index: the
filter runs within one tenant's newest-first pages, which its index already reads in order.
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0019'
down_revision = '0018'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        'jobs', sa.Column('user_metadata', postgresql.JSONB(astext_type=sa.Text()), nullable=True)
    )


def downgrade() -> None:
    op.drop_column('jobs', 'user_metadata')
