"""a tenant's own cap on its loaded interactive training models

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-05 06:00:00.000000

A tenant holds at most `LORAFORGE_MAX_INTERACTIVE_MODELS_PER_TENANT` loaded training models
(their weights and optimizer state live in executors' memory), one number for every tenant. As
its running limit and its priority cap are, the cap is now a tenant's own where the platform's
operator sets one: `tenants.max_interactive_models` (none: the platform's setting), 1 to 10,000
as the setting itself, counted by the creation (or resume) that would go past it, under the
tenant's advisory lock.
"""

from alembic import op
import sqlalchemy as sa

revision = "0027"
down_revision = "0026"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("max_interactive_models", sa.Integer(), nullable=True))
    op.create_check_constraint(
        op.f("ck_tenants_max_interactive_models"),
        "tenants",
        "max_interactive_models BETWEEN 1 AND 10000",
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_tenants_max_interactive_models"), "tenants", type_="check")
    op.drop_column("tenants", "max_interactive_models")
