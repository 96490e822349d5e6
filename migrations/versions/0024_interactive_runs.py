"""interactive runs: what a Tinker user looks up, resumes from and lets expire

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-05 04:20:00.000000

The SDK's `RestClient` lists a tenant's training runs (its training models) and their saved
weights, says what a checkpoint was trained on (`weights_info`, which
`create_training_client_from_state` reads), deletes a checkpoint and sets when one expires.

- `interactive_checkpoints.size_bytes`: the bytes the save wrote to the object store;
  `expires_at`: when the platform deletes it (a save's `ttl_seconds`, or set later; null:
  never); `user_metadata`: what the SDK attached to the save. A partial index keeps the
  expiry pass to the checkpoints that expire; another lists a tenant's checkpoints newest
  first.
- `interactive_models.user_metadata`: what the SDK attached to the training run.
- A training run listing reads a partial index of the tenant's training models; the cap on a
  tenant's loaded training models (`LORAFORGE_MAX_INTERACTIVE_MODELS_PER_TENANT`) counts another.
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = "0024"
down_revision = "0023"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "interactive_checkpoints", sa.Column("size_bytes", sa.BigInteger(), nullable=True)
    )
    op.add_column(
        "interactive_checkpoints",
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.add_column(
        "interactive_checkpoints",
        sa.Column(
            "user_metadata",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default="{}",
            nullable=False,
        ),
    )
    op.create_index(
        "ix_interactive_checkpoints_tenant_created",
        "interactive_checkpoints",
        ["tenant_id", "created_at", "id"],
        unique=False,
    )
    op.create_index(
        "ix_interactive_checkpoints_expires",
        "interactive_checkpoints",
        ["expires_at"],
        unique=False,
        postgresql_where=sa.text("expires_at IS NOT NULL"),
    )
    op.add_column(
        "interactive_models",
        sa.Column(
            "user_metadata",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default="{}",
            nullable=False,
        ),
    )
    op.create_index(
        "ix_interactive_models_tenant_runs",
        "interactive_models",
        ["tenant_id", "created_at", "id"],
        unique=False,
        postgresql_where=sa.text("kind = 'training'"),
    )
    op.create_index(
        "ix_interactive_models_tenant_loaded",
        "interactive_models",
        ["tenant_id"],
        unique=False,
        postgresql_where=sa.text("kind = 'training' AND unloaded_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_interactive_models_tenant_loaded",
        table_name="interactive_models",
        postgresql_where=sa.text("kind = 'training' AND unloaded_at IS NULL"),
    )
    op.drop_index(
        "ix_interactive_models_tenant_runs",
        table_name="interactive_models",
        postgresql_where=sa.text("kind = 'training'"),
    )
    op.drop_column("interactive_models", "user_metadata")
    op.drop_index(
        "ix_interactive_checkpoints_expires",
        table_name="interactive_checkpoints",
        postgresql_where=sa.text("expires_at IS NOT NULL"),
    )
    op.drop_index("ix_interactive_checkpoints_tenant_created", table_name="interactive_checkpoints")
    op.drop_column("interactive_checkpoints", "user_metadata")
    op.drop_column("interactive_checkpoints", "expires_at")
    op.drop_column("interactive_checkpoints", "size_bytes")
