"""which adapter version a session's model holds, and each save's, for the lineage it publishes

Revision ID: 0041
Revises: 0040
Create Date: 2026-12-06 09:10:00.000000

A registry adapter version may now be loaded by an interactive session
(`tinker://adapters/name@3`, `control_plane.session_weights`): an RL run starts from the
adapter a fine-tuning job trained. A version published from that run's checkpoint then descends
from the version it started from. `interactive_models.weights_version_id` is the version the
model's weights descend from (set as a load completes: the version loaded, or the one the
tenant's own save loaded came from; null after loading anything else), and
`interactive_checkpoints.from_version_id` the model's at the save, which publication records as
the new version's parent. Both are null for what was saved before this revision, and a deleted
version leaves them null; a partial index on each finds the rows a deletion sets null.
"""

import sqlalchemy as sa
from alembic import op

revision = "0041"
down_revision = "0040"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "interactive_models",
        sa.Column("weights_version_id", sa.String(length=64), nullable=True),
    )
    op.create_foreign_key(
        op.f("fk_interactive_models_weights_version_id_adapter_versions"),
        "interactive_models",
        "adapter_versions",
        ["weights_version_id"],
        ["id"],
        ondelete="SET NULL",
    )
    op.add_column(
        "interactive_checkpoints",
        sa.Column("from_version_id", sa.String(length=64), nullable=True),
    )
    op.create_foreign_key(
        op.f("fk_interactive_checkpoints_from_version_id_adapter_versions"),
        "interactive_checkpoints",
        "adapter_versions",
        ["from_version_id"],
        ["id"],
        ondelete="SET NULL",
    )
    op.create_index(
        "ix_interactive_models_weights_version",
        "interactive_models",
        ["weights_version_id"],
        postgresql_where=sa.text("weights_version_id IS NOT NULL"),
    )
    op.create_index(
        "ix_interactive_checkpoints_from_version",
        "interactive_checkpoints",
        ["from_version_id"],
        postgresql_where=sa.text("from_version_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_interactive_checkpoints_from_version", table_name="interactive_checkpoints")
    op.drop_index("ix_interactive_models_weights_version", table_name="interactive_models")
    op.drop_column("interactive_checkpoints", "from_version_id")
    op.drop_column("interactive_models", "weights_version_id")
