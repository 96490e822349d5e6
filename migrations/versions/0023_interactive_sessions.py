"""interactive sessions: Tinker-compatible training, call by call, on a resident base

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-05 01:05:55.947955

A tenant's session (`interactive_sessions`) creates LoRA models on a base (`interactive_models`)
and drives them one call at a time (forward_backward, optim_step, sample, save, ...). Each call
is a row (`interactive_calls`), the future the SDK polls: `(model_id, seq)` orders a model's
calls, and an executor holding the base resident runs them in that order, each model's weights
in one executor's memory (`held_by`). Saved weights are `interactive_checkpoints`: an adapter in
the object store, to sample from, resume, or publish as an adapter version.
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0023'
down_revision = '0022'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Executors report in the trainer registry beside the trainers; only trainers take jobs.
    op.add_column('trainers', sa.Column('kind', sa.String(length=16), server_default='trainer', nullable=False))
    op.create_check_constraint(op.f('ck_trainers_kind'), 'trainers', "kind IN ('trainer', 'interactive')")
    op.create_table('interactive_sessions',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('last_heartbeat_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('tags', postgresql.JSONB(astext_type=sa.Text()), server_default='[]', nullable=False),
    sa.Column('user_metadata', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.Column('sdk_version', sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_interactive_sessions_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_interactive_sessions'))
    )
    op.create_index('ix_interactive_sessions_tenant_created', 'interactive_sessions', ['tenant_id', 'created_at', 'id'], unique=False)
    op.create_table('interactive_models',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('session_id', sa.String(length=64), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('base_model_id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('lora_config', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.Column('model_path', sa.Text(), nullable=True),
    sa.Column('next_seq', sa.Integer(), server_default='0', nullable=False),
    sa.Column('held_by', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('unloaded_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("kind IN ('training', 'sampler')", name=op.f('ck_interactive_models_kind')),
    sa.ForeignKeyConstraint(['base_model_id'], ['base_models.id'], name=op.f('fk_interactive_models_base_model_id_base_models')),
    sa.ForeignKeyConstraint(['session_id'], ['interactive_sessions.id'], name=op.f('fk_interactive_models_session_id_interactive_sessions'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_interactive_models_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_interactive_models'))
    )
    op.create_index('ix_interactive_models_held_by', 'interactive_models', ['held_by'], unique=False, postgresql_where=sa.text('held_by IS NOT NULL'))
    op.create_index('ix_interactive_models_session', 'interactive_models', ['session_id'], unique=False)
    op.create_table('interactive_calls',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('model_id', sa.String(length=64), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('base_model_id', sa.String(length=64), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('request', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.Column('status', sa.String(length=16), server_default='pending', nullable=False),
    sa.Column('result', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('error', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('claimed_by', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('pending', 'running', 'completed', 'failed')", name=op.f('ck_interactive_calls_status')),
    sa.ForeignKeyConstraint(['model_id'], ['interactive_models.id'], name=op.f('fk_interactive_calls_model_id_interactive_models'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_interactive_calls_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_interactive_calls')),
    sa.UniqueConstraint('model_id', 'seq', name='uq_interactive_calls_model_seq')
    )
    op.create_index('ix_interactive_calls_pending', 'interactive_calls', ['base_model_id', 'created_at'], unique=False, postgresql_where=sa.text("status = 'pending'"))
    op.create_table('interactive_checkpoints',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('model_id', sa.String(length=64), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('storage_prefix', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('published_version_id', sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(['published_version_id'], ['adapter_versions.id'], name=op.f('fk_interactive_checkpoints_published_version_id_adapter_versions'), ondelete='SET NULL'),
    sa.CheckConstraint("kind IN ('sampler', 'state')", name=op.f('ck_interactive_checkpoints_kind')),
    sa.ForeignKeyConstraint(['model_id'], ['interactive_models.id'], name=op.f('fk_interactive_checkpoints_model_id_interactive_models'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_interactive_checkpoints_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_interactive_checkpoints')),
    sa.UniqueConstraint('model_id', 'kind', 'name', name='uq_interactive_checkpoints_name'),
    sa.UniqueConstraint('path', name='uq_interactive_checkpoints_path')
    )


def downgrade() -> None:
    op.drop_table('interactive_checkpoints')
    op.drop_index('ix_interactive_calls_pending', table_name='interactive_calls', postgresql_where=sa.text("status = 'pending'"))
    op.drop_table('interactive_calls')
    op.drop_index('ix_interactive_models_session', table_name='interactive_models')
    op.drop_index('ix_interactive_models_held_by', table_name='interactive_models', postgresql_where=sa.text('held_by IS NOT NULL'))
    op.drop_table('interactive_models')
    op.drop_index('ix_interactive_sessions_tenant_created', table_name='interactive_sessions')
    op.drop_table('interactive_sessions')
    op.drop_constraint(op.f('ck_trainers_kind'), 'trainers', type_='check')
    op.drop_column('trainers', 'kind')
