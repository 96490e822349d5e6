"""a tenant's highest priority: the platform's operator caps what a tenant's jobs may ask for

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-04 20:30:00.000000

A job's priority goes before the fair share between tenants, so a tenant that asks for 100 on
every job would be served before every other tenant whatever its share. `tenants.max_priority`
(none: the platform's `MAX_PRIORITY_PER_TENANT`, itself none by default: no cap, as before) is
the highest priority the tenant's jobs may be created with or be given later; a lower one is
always allowed. Set by the platform's operator (`loraforge admin
tenant NAME --max-priority N`), as Slurm lets only its operators raise a job's priority and
Kueue's priority classes are a cluster administrator's.
"""

from alembic import op
import sqlalchemy as sa

revision = '0021'
down_revision = '0020'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('tenants', sa.Column('max_priority', sa.Integer(), nullable=True))
    op.create_check_constraint(
        op.f('ck_tenants_max_priority'), 'tenants', 'max_priority BETWEEN -100 AND 100'
    )


def downgrade() -> None:
    op.drop_constraint(op.f('ck_tenants_max_priority'), 'tenants', type_='check')
    op.drop_column('tenants', 'max_priority')
