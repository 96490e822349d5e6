"""the SDK's own number for an interactive call

Revision ID: 0031
Revises: 0030
Create Date: 2026-12-05 15:00:00.000000

The `tinker` SDK's sampling clients number their sample requests in blocks of 10^9, one block a
clone of the sampling session (an unpickled or handed-over `SamplingClient`: `seq_id //
10^9`). With `retrieve_futures` each clone polls one long poll for the completions of its own
requests, so the call keeps the SDK's `seq_id` in a column (`interactive_calls.client_seq`,
bigint, null where the SDK sent none) that outlives its request's payload, which the retention
pass lets go after an hour. The calls whose request is still kept get theirs here.
"""

import sqlalchemy as sa
from alembic import op

revision = "0031"
down_revision = "0030"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("interactive_calls", sa.Column("client_seq", sa.BigInteger(), nullable=True))
    op.execute(
        "UPDATE interactive_calls SET client_seq = CAST(request ->> 'seq_id' AS bigint) "
        "WHERE payload_dropped_at IS NULL AND jsonb_typeof(request -> 'seq_id') = 'number'"
    )


def downgrade() -> None:
    op.drop_column("interactive_calls", "client_seq")
