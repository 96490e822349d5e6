"""a sampler's clone numbers, handed out by the server

Revision ID: 0032
Revises: 0031
Create Date: 2026-12-05 16:00:00.000000

A `tinker` sampling client opened from another's handle (another process of an RL loop) is a
clone of its sampling session, numbering its requests in a block of 10^9 of its own; its one
long poll (`retrieve_futures`) reports only its block's completions. Picked at random, two
clones' numbers can meet, and each would be told the other's completions. With the client
config's `sample_join_sampling_session` the SDK asks the server for the number instead:
`interactive_models.next_clone` (from 1; the client that created the sampler is 0) hands them
out, each once.
"""

import sqlalchemy as sa
from alembic import op

revision = "0032"
down_revision = "0031"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "interactive_models",
        sa.Column("next_clone", sa.Integer(), server_default="1", nullable=False),
    )


def downgrade() -> None:
    op.drop_column("interactive_models", "next_clone")
