"""jobs: interruptions (leases lost with their trainer), counted apart from attempts

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 17:40:00.000000
"""

from alembic import op
import sqlalchemy as sa

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        'jobs', sa.Column('interruptions', sa.Integer(), server_default='0', nullable=False)
    )


def downgrade() -> None:
    op.drop_column('jobs', 'interruptions')
