"""interactive turns: a base's executors serve the tenants in turn, not the oldest call first

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-05 04:30:00.000000

An executor took the oldest pending call on its base. A tenant that asks a burst of calls (an
RL loop's few hundred samples at once) then had every one of them run before another tenant's
call asked a moment later, and each claim walked past the burst's blocked calls (a model's calls
run one at a time) to find one that could run.

- `interactive_turns`: per tenant and base, when an executor last took one of the tenant's
  calls there. A claim takes the runnable call of the tenant served least recently (never
  served first), then the oldest; it records the tenant's turn in the same statement.
- `ix_interactive_calls_unfinished` (base, model, seq) over the pending and running calls: a
  claim reads each model's first unfinished call with one probe a model (a skip scan), so its
  cost follows the models with calls waiting, not the calls waiting.
"""

from alembic import op
import sqlalchemy as sa

revision = '0025'
down_revision = '0024'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('interactive_turns',
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('base_model_id', sa.String(length=64), nullable=False),
    sa.Column('served_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['base_model_id'], ['base_models.id'], name=op.f('fk_interactive_turns_base_model_id_base_models'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_interactive_turns_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('tenant_id', 'base_model_id', name=op.f('pk_interactive_turns'))
    )
    op.create_index('ix_interactive_calls_unfinished', 'interactive_calls', ['base_model_id', 'model_id', 'seq'], unique=False, postgresql_where=sa.text("status IN ('pending', 'running')"))


def downgrade() -> None:
    op.drop_index('ix_interactive_calls_unfinished', table_name='interactive_calls', postgresql_where=sa.text("status IN ('pending', 'running')"))
    op.drop_table('interactive_turns')
