"""a tenant's finished jobs by status, newest first: a filtered page seeks instead of filtering

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 19:00:00.000000

The dashboard's jobs table filters a tenant's jobs by status, newest first, in keyset pages. A
page of jobs `running`, `cancelling` or `validating_files` reads `ix_jobs_status_lease` (the few
jobs in that status on the whole platform), but a page of `succeeded`, `failed` or `cancelled`
jobs had no index of its own: it walked the tenant's `(tenant_id, created_at, id)` index from
the newest job and fetched every row to test its status, so a tenant with a sweep of 50,000
newer queued jobs, or a long history with a few failures, read all of them for one page.
`ix_jobs_tenant_finished` holds each finished job once, by (tenant, status, age, id): a
filtered page seeks to its status (and its cursor) and reads its own rows. Partial on the
finished statuses, so a job enters it once, when it finishes: the claim, a heartbeat and a
retry write nothing more.

Built `CONCURRENTLY` (outside the migrations' transaction), so the upgrade does not hold the
platform's writes to `jobs` for as long as it reads the table.
"""

from alembic import op
import sqlalchemy as sa

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

FINISHED = "status IN ('succeeded', 'failed', 'cancelled')"


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            'ix_jobs_tenant_finished', 'jobs', ['tenant_id', 'status', 'created_at', 'id'],
            postgresql_where=sa.text(FINISHED), postgresql_concurrently=True,
        )


def downgrade() -> None:
    op.drop_index('ix_jobs_tenant_finished', table_name='jobs')
