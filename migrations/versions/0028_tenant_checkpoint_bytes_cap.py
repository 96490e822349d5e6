"""a tenant's own cap on its interactive checkpoints' stored bytes, and their sum by tenant

Revision ID: 0028
Revises: 0027
Create Date: 2026-12-05 09:00:00.000000

Interactive sessions save checkpoints (`save_state`, `save_weights_for_sampler`) to the object
store, and nothing bounded how much a tenant kept: an RL loop saves a sampler an iteration. A
tenant may now be held to `LORAFORGE_MAX_CHECKPOINT_BYTES_PER_TENANT` (none by default), or to
its own cap where the platform's operator sets one: `tenants.max_checkpoint_bytes` (bigint;
none: the platform's setting; above 0). A save asked while the tenant's checkpoints hold as
many bytes as its cap is refused.

Every save asks for the tenant's sum, and the SDK's `get_current_checkpoint_storage_usage`
too, so the sum reads an index of its own, `ix_interactive_checkpoints_tenant_size` on
`tenant_id` with `size_bytes` included: an index-only scan of the tenant's own entries, never
the table's rows nor another tenant's checkpoints (the listing's index by tenant and time has
no sizes in it).
"""

from alembic import op
import sqlalchemy as sa

revision = "0028"
down_revision = "0027"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("max_checkpoint_bytes", sa.BigInteger(), nullable=True))
    op.create_check_constraint(
        op.f("ck_tenants_max_checkpoint_bytes"), "tenants", "max_checkpoint_bytes > 0"
    )
    op.create_index(
        "ix_interactive_checkpoints_tenant_size",
        "interactive_checkpoints",
        ["tenant_id"],
        postgresql_include=["size_bytes"],
    )


def downgrade() -> None:
    op.drop_index("ix_interactive_checkpoints_tenant_size", table_name="interactive_checkpoints")
    op.drop_constraint(op.f("ck_tenants_max_checkpoint_bytes"), "tenants", type_="check")
    op.drop_column("tenants", "max_checkpoint_bytes")
