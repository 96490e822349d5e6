"""A checkpoint published as an adapter version while it is deleted (by its tenant, or by its
time to live running out): the publication holds the checkpoint's row from its first read to
its commit, so a deletion waits for a publication in flight (the version keeps its own copy of
the files), and a publication waits for a deletion in flight and answers not found, nothing
published: the files it reads are never a deletion's remains. Real PostgreSQL, the real
object store."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from sqlalchemy import Engine, text

from control_plane import interactive_calls, interactive_runs, interactive_saves, registry
from control_plane.registry.names import ADAPTER_FILES
from control_plane.services import Services
from tests.api_harness import TenantKeys
from tests.factories import ask_call, interactive_model, interactive_session, make_base

FILES = {name: f"{name} of step-1".encode() for name in ADAPTER_FILES}


@pytest.fixture
def saved(services: Services, tenant_a: TenantKeys) -> str:
    """Sampler weights an executor saved (files in the store, then the row): their path."""
    engine, tenant = services.engine, tenant_a.tenant_id
    base = make_base(engine)
    session = interactive_session(engine, tenant, "sess-1")
    interactive_model(engine, session, tenant, base.id, "imdl-1")
    ask_call(engine, "imdl-1", tenant, base.id, "save_weights_for_sampler", 0, {"path": "step-1"})
    with engine.begin() as conn:
        call = interactive_calls.claim_next(conn, "exec-1", base.id)
        assert call is not None
        where = interactive_saves.checkpoint_location(call, "step-1")
        for name, body in FILES.items():
            services.store.put_bytes(where.prefix + name, body)
        assert interactive_calls.finish(
            conn, call, "exec-1", {"path": where.path}, checkpoint=where
        )
    return where.path


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as threads:
        yield threads


def _count(engine: Engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql)).scalar_one())


def _still_waiting(future: Future[object]) -> None:
    time.sleep(1.0)
    assert not future.done(), "it did not wait for the checkpoint's lock"


def _until(what: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_publication_waits_for_a_deletion_in_flight_and_answers_not_found(
    services: Services, tenant_a: TenantKeys, saved: str, pool: ThreadPoolExecutor
) -> None:
    engine, store = services.engine, services.store

    def publish() -> registry.PublishedVersion:
        return registry.publish_checkpoint(
            services, tenant_id=tenant_a.tenant_id, path=saved, adapter_name="chat"
        )

    with engine.connect() as deleting:
        # The objects are gone, the row not yet: the deletion holds it until it commits.
        interactive_runs.delete_checkpoint(deleting, store, tenant_a.tenant_id, saved)
        published = pool.submit(publish)
        _still_waiting(published)
        deleting.commit()
    with pytest.raises(registry.CheckpointNotFoundError, match="step-1"):
        published.result(timeout=30)
    assert _count(engine, "SELECT count(*) FROM adapters") == 0
    assert store.list_keys(f"tenants/{tenant_a.tenant_id}/adapters/") == []


def test_a_deletion_waits_for_a_publication_in_flight_whose_version_keeps_its_files(
    services: Services, tenant_a: TenantKeys, saved: str, pool: ThreadPoolExecutor
) -> None:
    engine, store, tenant = services.engine, services.store, tenant_a.tenant_id
    [prefix] = {k.rsplit("/", 1)[0] for k in store.list_keys(f"tenants/{tenant}/sessions/")}

    def delete() -> None:
        with engine.begin() as conn:
            interactive_runs.delete_checkpoint(conn, store, tenant, saved)

    with engine.connect() as holding:
        # The publication stops at its version number's reservation, the checkpoint read.
        holding.execute(text("LOCK TABLE adapters IN SHARE MODE"))
        published = pool.submit(
            registry.publish_checkpoint,
            services,
            tenant_id=tenant,
            path=saved,
            adapter_name="chat",
        )
        _until(
            lambda: (
                _count(
                    engine,
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE 'INSERT INTO adapters%' AND datname = current_database()",
                )
                == 1
            )
        )
        deleted = pool.submit(delete)
        _still_waiting(deleted)
        holding.rollback()
    version = published.result(timeout=30).version
    deleted.result(timeout=30)
    assert _count(engine, "SELECT count(*) FROM interactive_checkpoints") == 0
    assert store.list_keys(prefix + "/") == []
    for name, body in FILES.items():
        assert store.get_bytes(version.object_prefix + name) == body


def test_two_publications_at_once_make_one_version_and_both_answer_it(
    services: Services, tenant_a: TenantKeys, saved: str, pool: ThreadPoolExecutor
) -> None:
    engine, tenant = services.engine, tenant_a.tenant_id
    with engine.connect() as holding:
        holding.execute(text("LOCK TABLE adapters IN SHARE MODE"))
        both = [
            pool.submit(
                registry.publish_checkpoint, services, tenant_id=tenant, path=saved, adapter_name=n
            )
            for n in ("chat", "other")
        ]
        _still_waiting(both[1])
        holding.rollback()
    first, second = (f.result(timeout=30) for f in both)
    assert sorted([first.created, second.created]) == [False, True]
    assert first.version.id == second.version.id
    assert _count(engine, "SELECT count(*) FROM adapter_versions") == 1
    assert len(services.store.list_keys(f"tenants/{tenant}/adapters/")) == len(FILES) + 1
