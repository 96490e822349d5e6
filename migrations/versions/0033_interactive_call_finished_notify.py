"""an interactive call that finishes says so on a channel the API's polls wake on

Revision ID: 0033
Revises: 0032
Create Date: 2026-12-05 17:00:00.000000

A Tinker future's poll (`retrieve_future`, a sampling client's `retrieve_futures`) looked at
its call at growing intervals, 50 ms to 1 s apart: a call that finished just after a look was
answered up to a second late, every step of a training loop. An update that moves a call to
`completed` or `failed`, on any path (the executor's answer, a failure, a cancel, a lost
executor's calls settled), now notifies `loraforge_interactive_done` with the call's model and
its id (`<model_id> <call_id>`), delivered when that transaction commits; each API process
listens on one connection and wakes the polls waiting on either.
"""

from alembic import op

revision = "0033"
down_revision = "0032"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION interactive_call_finished() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
          PERFORM pg_notify('loraforge_interactive_done', NEW.model_id || ' ' || NEW.id);
          RETURN NULL;
        END $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER tr_interactive_calls_finished
        AFTER UPDATE OF status ON interactive_calls
        FOR EACH ROW
        WHEN (NEW.status IN ('completed', 'failed') AND OLD.status IS DISTINCT FROM NEW.status)
        EXECUTE FUNCTION interactive_call_finished()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER tr_interactive_calls_finished ON interactive_calls")
    op.execute("DROP FUNCTION interactive_call_finished()")
