"""interactive call payloads: a finished call's request and answer are let go after a while

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-05 04:40:00.000000

A call's row holds what was asked (a forward_backward's tokens and weights) and what was
answered (its logprobs): megabytes for a batch of long sequences, read once, by the SDK's poll,
seconds after the call finishes. Kept for ever they grew `interactive_calls` by the size of
every batch a tenant ever trained on. A periodic task now empties the payloads of the calls
finished longer ago than `LORAFORGE_INTERACTIVE_CALL_RETENTION_SECONDS` (an hour), keeping the
row (its kind, order, status, times and error: the dashboard's counts and last failures) and
when its payload was let go (`payload_dropped_at`). A partial index holds only the finished
calls whose payload is kept, so the pass reads what it empties and nothing else.
"""

from alembic import op
import sqlalchemy as sa

revision = '0026'
down_revision = '0025'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('interactive_calls', sa.Column('payload_dropped_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index('ix_interactive_calls_payload_kept', 'interactive_calls', ['finished_at'], unique=False, postgresql_where=sa.text('finished_at IS NOT NULL AND payload_dropped_at IS NULL'))


def downgrade() -> None:
    op.drop_index('ix_interactive_calls_payload_kept', table_name='interactive_calls', postgresql_where=sa.text('finished_at IS NOT NULL AND payload_dropped_at IS NULL'))
    op.drop_column('interactive_calls', 'payload_dropped_at')
