"""Alembic is the only way the schema changes: it must go up, come down, and match the models."""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import bindparam, create_engine, inspect, pool, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import IntegrityError

from control_plane import db
from control_plane.db import include_name
from control_plane.db.tables import Base
from tests.factories import (
    ask_call,
    enqueue_jobs,
    interactive_model,
    interactive_session,
    make_base,
    make_file,
    make_tenant,
)


def _tables(url: str) -> set[str]:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_from_empty_and_downgrade_back(empty_database_url: str) -> None:
    assert _tables(empty_database_url) == set()
    db.upgrade(empty_database_url)
    assert set(Base.metadata.tables) <= _tables(empty_database_url)
    db.downgrade(empty_database_url, "base")
    assert _tables(empty_database_url) == {"alembic_version"}
    db.upgrade(empty_database_url)
    assert set(Base.metadata.tables) <= _tables(empty_database_url)


def test_models_match_migrations(empty_database_url: str) -> None:
    db.upgrade(empty_database_url)
    engine = create_engine(empty_database_url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn,
                opts={
                    "include_name": include_name,
                    "compare_type": True,
                    "compare_server_default": True,
                },
            )
            diff = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_the_metric_rollups_of_jobs_logged_before_revision_0015_are_summed_as_its_trigger_sums(
    empty_database_url: str,
) -> None:
    """A job's metric events logged before revision 0015 get their buckets from the migration;
    the same events logged after it, from its trigger (one statement, each row summed as it
    is inserted): the two jobs' rows are the same."""
    db.upgrade(empty_database_url, "0014")
    engine = db.make_engine(empty_database_url, pool_size=2)
    try:
        base = make_base(engine)
        with engine.begin() as conn:  # 0014's tenants, not today's (revision 0021 adds a column)
            tenant_id = conn.execute(
                text(
                    "INSERT INTO tenants (id, name) VALUES ('tenant-0014', 'before-0015') RETURNING id"
                )
            ).scalar_one()
        file_id = make_file(engine, tenant_id).id
        before, after = enqueue_jobs(engine, tenant_id, base.id, file_id, 2)
        log = (
            "INSERT INTO job_events (job_id, type, message, data) "
            "SELECT :job, CASE WHEN g % 50 = 0 THEN 'message' ELSE 'metrics' END, 'step', "
            "jsonb_strip_nulls(jsonb_build_object('step', g % 500, "
            "'train_loss', CASE WHEN g % 9 <> 0 THEN 1.0 / g END, "
            "'eval_loss', CASE WHEN g % 10 = 0 THEN to_jsonb(2.0 / g) WHEN g % 31 = 0 THEN to_jsonb('x'::text) END)) "
            "FROM generate_series(1, 800) AS g"
        )
        with engine.begin() as conn:
            conn.execute(text(log), {"job": before})
        engine.dispose()
        db.upgrade(empty_database_url)
        with engine.begin() as conn:
            conn.execute(text(log), {"job": after})
            rows = {
                job: conn.execute(
                    text(
                        "SELECT width, bucket, first_step, last_step, train_points, "
                        "round(train_steps::numeric, 6), round(train_losses::numeric, 9), "
                        "eval_points, round(eval_steps::numeric, 6), "
                        "round(eval_losses::numeric, 9) "
                        "FROM job_metric_rollups WHERE job_id = :job ORDER BY width, bucket"
                    ),
                    {"job": job},
                ).all()
                for job in (before, after)
            }
    finally:
        engine.dispose()
    assert len(rows[before]) > 16 * 2 and rows[before] == rows[after]


def _tenant_cap_holds(url: str, column: str, good: tuple[Any, ...], bad: tuple[Any, ...]) -> None:
    """A tenant's cap `column` takes each of `good` and refuses each of `bad` by its check."""
    engine = create_engine(url, poolclass=pool.NullPool)
    insert = text(f"INSERT INTO tenants (id, name, {column}) VALUES (:n, :n, :cap)")
    try:
        with engine.begin() as conn:
            for n, cap in enumerate(good):
                conn.execute(insert, {"n": f"ok-{n}", "cap": cap})
        for cap in bad:
            with (
                pytest.raises(IntegrityError, match=f"ck_tenants_{column}"),
                engine.begin() as conn,
            ):
                conn.execute(insert, {"n": f"bad-{cap}", "cap": cap})
    finally:
        engine.dispose()


def test_revision_0027_holds_a_tenants_interactive_models_cap_to_the_settings_range_and_comes_down(
    empty_database_url: str,
) -> None:
    """`tenants.max_interactive_models` (revision 0027) holds 1 to 10,000 or null, as the
    setting it overrides does; going down to 0026 removes the column and its check, so going up
    again works."""

    def columns() -> set[str]:
        engine = create_engine(empty_database_url, poolclass=pool.NullPool)
        try:
            return {c["name"] for c in inspect(engine).get_columns("tenants")}
        finally:
            engine.dispose()

    db.upgrade(empty_database_url, "0027")
    _tenant_cap_holds(empty_database_url, "max_interactive_models", (None, 1, 10_000), (0, 10_001))
    db.downgrade(empty_database_url, "0026")
    assert "max_interactive_models" not in columns()
    db.upgrade(empty_database_url, "0027")
    assert "max_interactive_models" in columns()


def test_revision_0028_holds_a_tenants_checkpoint_bytes_cap_above_zero_and_comes_down(
    empty_database_url: str,
) -> None:
    """`tenants.max_checkpoint_bytes` (revision 0028) holds a bigint above 0 or null (20 GB
    and an exabyte fit); with it comes the index the sum of a tenant's checkpoint bytes reads.
    Going down to 0027 removes the column, its check and the index, so going up again works."""

    def schema() -> tuple[set[str], dict[str, Any]]:
        """The tenants' columns; the checkpoints' indexes with the columns each includes."""
        engine = create_engine(empty_database_url, poolclass=pool.NullPool)
        try:
            found = inspect(engine)
            columns = {c["name"] for c in found.get_columns("tenants")}
            indexes = {
                str(i["name"]): i.get("dialect_options", {}).get("postgresql_include")
                for i in found.get_indexes("interactive_checkpoints")
            }
            return columns, indexes
        finally:
            engine.dispose()

    db.upgrade(empty_database_url, "0028")
    _tenant_cap_holds(
        empty_database_url, "max_checkpoint_bytes", (None, 1, 20 * 10**9, 10**18), (0, -1)
    )
    columns, indexes = schema()
    assert "max_checkpoint_bytes" in columns
    assert indexes["ix_interactive_checkpoints_tenant_size"] == ["size_bytes"]
    db.downgrade(empty_database_url, "0027")
    columns, indexes = schema()
    assert "max_checkpoint_bytes" not in columns
    assert "ix_interactive_checkpoints_tenant_size" not in indexes
    db.upgrade(empty_database_url, "0028")
    assert "max_checkpoint_bytes" in schema()[0]


def test_revision_0029_keeps_the_metrics_of_the_training_calls_whose_answer_is_still_kept(
    empty_database_url: str,
) -> None:
    """`interactive_calls.metrics` (revision 0029) is filled from the answers still kept: a
    completed forward_backward's, forward's and optim_step's `result["metrics"]`, never another
    kind's, a failed call's, or one whose answer was already let go (it has none). Going down
    to 0028 removes the column, so going up again works."""
    db.upgrade(empty_database_url, "0028")
    engine = db.make_engine(empty_database_url, pool_size=2)
    finished = {  # seq: (kind, status, result, payload let go)
        0: ("create_model", "completed", {"model_id": "m", "metrics": {"x": 1}}, False),
        1: ("forward_backward", "completed", {"metrics": {"loss:sum": 2.5}}, False),
        2: ("forward", "completed", {"metrics": {"loss:sum": 1.5}}, False),
        3: ("optim_step", "completed", {"metrics": {"grad_norm:mean": 0.25}}, False),
        4: ("forward_backward", "completed", None, True),
        5: ("sample", "completed", {"sequences": [], "metrics": {"loss:sum": 9}}, False),
        6: ("forward_backward", "failed", None, False),
        7: ("forward_backward", "pending", None, False),
    }
    try:
        tenant = make_tenant(engine, "before-0029")
        base = make_base(engine)
        session = interactive_session(engine, tenant.id, "isess-0029")
        model = interactive_model(engine, session, tenant.id, base.id, "imdl-0029")
        for seq, (kind, status, result, dropped) in finished.items():
            call = ask_call(engine, model, tenant.id, base.id, kind, seq)
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "UPDATE interactive_calls SET status = :status, result = :result, "
                        "finished_at = CASE WHEN :finished THEN now() END, "
                        "payload_dropped_at = CASE WHEN :dropped THEN now() END WHERE id = :id"
                    ).bindparams(bindparam("result", type_=JSONB)),
                    {
                        "status": status,
                        "result": result,
                        "finished": status != "pending",
                        "dropped": dropped,
                        "id": call,
                    },
                )
        engine.dispose()
        db.upgrade(empty_database_url, "0029")
        with engine.connect() as conn:
            kept = dict(
                conn.execute(text("SELECT seq, metrics FROM interactive_calls ORDER BY seq")).all()
            )
        assert kept == {
            0: None,
            1: {"loss:sum": 2.5},
            2: {"loss:sum": 1.5},
            3: {"grad_norm:mean": 0.25},
            4: None,
            5: None,
            6: None,
            7: None,
        }
        engine.dispose()
        db.downgrade(empty_database_url, "0028")
        assert "metrics" not in _columns(empty_database_url, "interactive_calls")
        db.upgrade(empty_database_url, "0029")
        assert "metrics" in _columns(empty_database_url, "interactive_calls")
    finally:
        engine.dispose()


def test_revision_0030_takes_external_checkpoints_with_their_files_and_comes_down(
    empty_database_url: str,
) -> None:
    """Revision 0030: a checkpoint may be `external` (save_weights_external) and records its
    files; another kind is still refused. Going down deletes the external rows only (a state
    and a sampler stay) and the files column, refuses `external` again, and goes up again."""
    db.upgrade(empty_database_url, "0030")
    engine = db.make_engine(empty_database_url, pool_size=2)
    insert = text(
        "INSERT INTO interactive_checkpoints (id, model_id, tenant_id, kind, name, path, "
        "storage_prefix, files) VALUES (:id, :model, :tenant, :kind, 'n', :path, 'p/', "
        "CAST(:files AS jsonb))"
    )
    try:
        tenant = make_tenant(engine, "at-0030")
        base = make_base(engine)
        session = interactive_session(engine, tenant.id, "isess-0030")
        model = interactive_model(engine, session, tenant.id, base.id, "imdl-0030")
        files = '{"adapter_config.json": {"size": 2, "sha256": "ab"}}'
        with engine.begin() as conn:
            for kind in ("state", "sampler", "external"):
                params = {"model": model, "tenant": tenant.id, "kind": kind, "files": files}
                conn.execute(insert, {**params, "id": f"c-{kind}", "path": f"p-{kind}"})
        with pytest.raises(IntegrityError), engine.begin() as conn:
            params = {"model": model, "tenant": tenant.id, "kind": "other", "files": None}
            conn.execute(insert, {**params, "id": "c-other", "path": "p-other"})
        with engine.connect() as conn:
            stored = conn.execute(
                text("SELECT files FROM interactive_checkpoints WHERE id = 'c-external'")
            ).scalar_one()
        assert stored == {"adapter_config.json": {"size": 2, "sha256": "ab"}}
        engine.dispose()
        db.downgrade(empty_database_url, "0029")
        assert "files" not in _columns(empty_database_url, "interactive_checkpoints")
        with engine.connect() as conn:
            kinds = conn.execute(text("SELECT kind FROM interactive_checkpoints ORDER BY kind"))
            assert list(kinds.scalars()) == ["sampler", "state"]
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO interactive_checkpoints (id, model_id, tenant_id, kind, name, "
                    "path, storage_prefix) VALUES ('x', :model, :tenant, 'external', 'n', 'x', "
                    "'p/')"
                ),
                {"model": model, "tenant": tenant.id},
            )
        engine.dispose()
        db.upgrade(empty_database_url, "0030")
        assert "files" in _columns(empty_database_url, "interactive_checkpoints")
    finally:
        engine.dispose()


def test_revision_0031_keeps_the_sdks_seq_id_of_the_calls_whose_request_is_still_kept(
    empty_database_url: str,
) -> None:
    """`interactive_calls.client_seq` (revision 0031) is filled from the requests still kept
    (a number only); a call whose payload was let go, or that sent none, has none. Going down
    removes the column, so going up again works."""
    db.upgrade(empty_database_url, "0030")
    engine = db.make_engine(empty_database_url, pool_size=2)
    calls = {  # seq: (request, payload let go)
        0: ({"seq_id": 3_000_000_007, "num_samples": 1}, False),
        1: ({"seq_id": 5}, True),
        2: ({"num_samples": 1}, False),
        3: ({"seq_id": "5"}, False),
    }
    try:
        tenant = make_tenant(engine, "before-0031")
        base = make_base(engine)
        session = interactive_session(engine, tenant.id, "isess-0031")
        model = interactive_model(engine, session, tenant.id, base.id, "imdl-0031")
        for seq, (request, dropped) in calls.items():
            call = ask_call(engine, model, tenant.id, base.id, "sample", seq, request)
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "UPDATE interactive_calls SET payload_dropped_at = "
                        "CASE WHEN :dropped THEN now() END WHERE id = :id"
                    ),
                    {"dropped": dropped, "id": call},
                )
        engine.dispose()
        db.upgrade(empty_database_url, "0031")
        with engine.connect() as conn:
            kept = dict(
                conn.execute(text("SELECT seq, client_seq FROM interactive_calls ORDER BY seq"))
                .tuples()
                .all()
            )
        assert kept == {0: 3_000_000_007, 1: None, 2: None, 3: None}
        engine.dispose()
        db.downgrade(empty_database_url, "0030")
        assert "client_seq" not in _columns(empty_database_url, "interactive_calls")
        db.upgrade(empty_database_url, "0031")
        assert "client_seq" in _columns(empty_database_url, "interactive_calls")
    finally:
        engine.dispose()


def _columns(url: str, table: str) -> set[str]:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        return {c["name"] for c in inspect(engine).get_columns(table)}
    finally:
        engine.dispose()
