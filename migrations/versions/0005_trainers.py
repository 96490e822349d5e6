"""trainers: a registry of trainer processes, upserted on every heartbeat

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 01:50:00.000000
"""

from alembic import op
import sqlalchemy as sa

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'trainers',
        sa.Column('id', sa.String(length=128), nullable=False),
        sa.Column('host', sa.String(length=255), nullable=False),
        sa.Column('pid', sa.Integer(), nullable=False),
        sa.Column('device', sa.String(length=64), nullable=False),
        sa.Column('resident_base', sa.String(length=255), nullable=True),
        sa.Column('current_job_id', sa.String(length=64), nullable=True),
        sa.Column('tokens_per_second', sa.Float(), nullable=True),
        sa.Column('step_seconds', sa.Float(), nullable=True),
        sa.Column('peak_memory_bytes', sa.BigInteger(), nullable=True),
        sa.Column('claims', sa.BigInteger(), server_default='0', nullable=False),
        sa.Column('succeeded', sa.BigInteger(), server_default='0', nullable=False),
        sa.Column('failed', sa.BigInteger(), server_default='0', nullable=False),
        sa.Column('let_go', sa.BigInteger(), server_default='0', nullable=False),
        sa.Column('tokens_trained', sa.BigInteger(), server_default='0', nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('last_heartbeat_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_trainers')),
    )
    op.create_index(op.f('ix_trainers_last_heartbeat_at'), 'trainers', ['last_heartbeat_at'])


def downgrade() -> None:
    op.drop_index(op.f('ix_trainers_last_heartbeat_at'), table_name='trainers')
    op.drop_table('trainers')
