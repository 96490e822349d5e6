"""interactive checkpoints exported for use outside the platform, and each checkpoint's files

Revision ID: 0030
Revises: 0029
Create Date: 2026-12-05 14:00:00.000000

The SDK's `save_weights_external` writes a model's adapter as a PEFT directory for use outside
the platform (optionally each file encrypted to age recipients), which its owner downloads
through signed URLs (`tinker checkpoint download`): a third kind of checkpoint, `external`,
beside `state` and `sampler`. `interactive_checkpoints.files` (JSONB; null for the
checkpoints saved before this revision) holds what a save wrote, each file's size and sha256 by
its name under the checkpoint's prefix, so a download is checked against what the executor
wrote. Downgrading deletes the `external` rows (their files stay in the object store: delete
them first, through the API, to free the space).
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0030"
down_revision = "0029"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "interactive_checkpoints",
        sa.Column("files", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )
    op.drop_constraint(
        op.f("ck_interactive_checkpoints_kind"), "interactive_checkpoints", type_="check"
    )
    op.create_check_constraint(
        op.f("ck_interactive_checkpoints_kind"),
        "interactive_checkpoints",
        "kind IN ('sampler', 'state', 'external')",
    )


def downgrade() -> None:
    op.execute("DELETE FROM interactive_checkpoints WHERE kind = 'external'")
    op.drop_constraint(
        op.f("ck_interactive_checkpoints_kind"), "interactive_checkpoints", type_="check"
    )
    op.create_check_constraint(
        op.f("ck_interactive_checkpoints_kind"),
        "interactive_checkpoints",
        "kind IN ('sampler', 'state')",
    )
    op.drop_column("interactive_checkpoints", "files")
