"""checkpoints their owners publish to every tenant of the platform

Revision ID: 0037
Revises: 0036
Create Date: 2026-12-05 22:00:00.000000

The Tinker SDK's `publish_checkpoint_from_tinker_path` (and the CLI's `tinker checkpoint
publish`) makes a checkpoint public: loraforge answered 404. A published checkpoint
(`interactive_checkpoints.public`) may be loaded, sampled from, described (`weights_info`) and
downloaded (its export's URLs) by every tenant of the platform, by its tinker:// path; only its
owner unpublishes, changes or deletes it. Every checkpoint saved before this revision stays its
tenant's own.
"""

import sqlalchemy as sa
from alembic import op

revision = "0037"
down_revision = "0036"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "interactive_checkpoints",
        sa.Column("public", sa.Boolean(), server_default="false", nullable=False),
    )


def downgrade() -> None:
    op.drop_column("interactive_checkpoints", "public")
