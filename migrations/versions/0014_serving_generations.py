"""serving generations: a poll of the serving index that finds nothing changed reads one row

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03 03:15:00.000000

Serving clusters poll `GET /v1/adapters/index` (the operator's AdapterSync, every 30 s each)
with the ETag of the index they hold. The ETag was a digest of the chosen versions (adapter,
number, id), so a poll that changed nothing still found every adapter of the base and its
chosen version: 80 ms at 5,000 adapters of one base (`serving_index_unchanged` in
`python -m benchmarks.registry`), for every poll of every serving cluster.

`serving_generations` counts, per (tenant, base model), the changes to what any index of theirs
can hold: a version published or deleted, an alias set, moved or deleted, an adapter deleted,
renamed or moved to another base. Triggers count them, whoever writes (the API, a publish, a
rebuild from the manifests, a cascade), and the ETag is a digest of (tenant, base, alias,
generation): one row read. It may change where the index did not (another alias moved), which
costs that poll the whole index once; it never stays where the index changed.

No foreign keys: a tenant's deletion cascades to its adapters, whose triggers count here while
the tenant's row is going, and a row left for a deleted tenant or base is never read again.
"""

from alembic import op
import sqlalchemy as sa

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None

FUNCTIONS = """
CREATE FUNCTION serving_generation_bump(p_tenant text, p_base text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO serving_generations AS g (tenant_id, base_model_id, generation)
  VALUES (p_tenant, p_base, 1)
  ON CONFLICT (tenant_id, base_model_id) DO UPDATE SET generation = g.generation + 1;
END $$;

-- A version or an alias changed: its adapter's (tenant, base). An adapter already gone (its
-- deletion cascading here) counted its own change.
CREATE FUNCTION serving_generation_of_adapter() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  a record;
BEGIN
  SELECT tenant_id, base_model_id INTO a FROM adapters
   WHERE id = CASE WHEN TG_OP = 'DELETE' THEN OLD.adapter_id ELSE NEW.adapter_id END;
  IF FOUND THEN
    PERFORM serving_generation_bump(a.tenant_id, a.base_model_id);
  END IF;
  IF TG_OP = 'UPDATE' AND OLD.adapter_id IS DISTINCT FROM NEW.adapter_id THEN
    SELECT tenant_id, base_model_id INTO a FROM adapters WHERE id = OLD.adapter_id;
    IF FOUND THEN
      PERFORM serving_generation_bump(a.tenant_id, a.base_model_id);
    END IF;
  END IF;
  RETURN NULL;
END $$;

CREATE FUNCTION serving_generation_of_adapter_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM serving_generation_bump(OLD.tenant_id, OLD.base_model_id);
  IF TG_OP = 'UPDATE' THEN
    PERFORM serving_generation_bump(NEW.tenant_id, NEW.base_model_id);
  END IF;
  RETURN NULL;
END $$;

CREATE TRIGGER serving_generation_versions AFTER INSERT OR DELETE ON adapter_versions
  FOR EACH ROW EXECUTE FUNCTION serving_generation_of_adapter();
CREATE TRIGGER serving_generation_aliases AFTER INSERT OR UPDATE OR DELETE ON adapter_aliases
  FOR EACH ROW EXECUTE FUNCTION serving_generation_of_adapter();
CREATE TRIGGER serving_generation_adapters AFTER DELETE ON adapters
  FOR EACH ROW EXECUTE FUNCTION serving_generation_of_adapter_row();
CREATE TRIGGER serving_generation_adapters_moved
  AFTER UPDATE OF name, tenant_id, base_model_id ON adapters
  FOR EACH ROW WHEN ((OLD.name, OLD.tenant_id, OLD.base_model_id)
                     IS DISTINCT FROM (NEW.name, NEW.tenant_id, NEW.base_model_id))
  EXECUTE FUNCTION serving_generation_of_adapter_row();
"""

DROP_FUNCTIONS = """
DROP TRIGGER serving_generation_adapters_moved ON adapters;
DROP TRIGGER serving_generation_adapters ON adapters;
DROP TRIGGER serving_generation_aliases ON adapter_aliases;
DROP TRIGGER serving_generation_versions ON adapter_versions;
DROP FUNCTION serving_generation_of_adapter_row();
DROP FUNCTION serving_generation_of_adapter();
DROP FUNCTION serving_generation_bump(text, text);
"""


def upgrade() -> None:
    op.create_table(
        'serving_generations',
        sa.Column('tenant_id', sa.String(length=64), nullable=False),
        sa.Column('base_model_id', sa.String(length=64), nullable=False),
        sa.Column('generation', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            'tenant_id', 'base_model_id', name=op.f('pk_serving_generations')
        ),
    )
    # Every (tenant, base) with adapters starts counted once.
    op.execute(
        "INSERT INTO serving_generations (tenant_id, base_model_id, generation) "
        "SELECT DISTINCT tenant_id, base_model_id, 1 FROM adapters"
    )
    op.execute(FUNCTIONS)


def downgrade() -> None:
    op.execute(DROP_FUNCTIONS)
    op.drop_table('serving_generations')
