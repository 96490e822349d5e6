"""base model imports: their errors and when they were asked for

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 04:20:00.000000
"""

from alembic import op
import sqlalchemy as sa

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('base_models', sa.Column('error_message', sa.Text(), nullable=True))
    op.add_column('base_models', sa.Column('import_requested_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column('base_models', 'import_requested_at')
    op.drop_column('base_models', 'error_message')
