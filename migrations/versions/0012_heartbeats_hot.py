"""jobs indexed by status alone: a heartbeat changes no indexed column and is a HOT update

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 19:40:00.000000

A trainer renews its lease every few seconds for as long as it trains (`JobQueue.heartbeat`:
the lease's expiry, progress, ETA, tokens trained). `lease_expires_at` was the second column
of `ix_jobs_status_lease`, so every heartbeat changed an indexed column: PostgreSQL wrote a new
entry in each of the table's indexes for it (none of 1,000 heartbeats was a heap-only
update, and the indexes grew by 24 KB, measured): the busiest write on `jobs` on a platform of
many trainers, and bloat that only vacuum takes back. The index is now on `status` alone
(`ix_jobs_status`); nothing a heartbeat writes is indexed, so it is a heap-only (HOT) update
(99 % of them were; the indexes did not grow; a heartbeat's time is its round trips, about the
same). What read the old index reads this one: the reaper finds the running jobs by status and
tests each one's expiry (one row per trainer: 0.21 against 0.11 ms with 200 running), a
metrics scrape counts the jobs still validating, and a dashboard page of running or
validating jobs finds them.

Built `CONCURRENTLY` (outside the migrations' transaction), the new index before the old one
goes, so the reaper always has one.
"""

from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index('ix_jobs_status', 'jobs', ['status'], postgresql_concurrently=True)
        op.drop_index('ix_jobs_status_lease', table_name='jobs', postgresql_concurrently=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            'ix_jobs_status_lease', 'jobs', ['status', 'lease_expires_at'],
            postgresql_concurrently=True,
        )
        op.drop_index('ix_jobs_status', table_name='jobs', postgresql_concurrently=True)
