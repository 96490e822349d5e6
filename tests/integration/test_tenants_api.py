"""The platform operators' API (`/v1/tenants`, `loraforge.PlatformAdmin`) on a real PostgreSQL
and a real socket: a tenant onboarded with its first key, which works with the official
`openai` SDK and sees only its own; limits set over REST that hold the next claims and wake an
idle trainer when they leave room; every tenant paged by name with its jobs counted off the
queue's bookkeeping; and every refusal with its reason, nothing written."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import httpx
import openai
import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError

from control_plane import tenants
from control_plane.queue import JobQueue
from control_plane.services import Services
from loraforge import Client, LoraforgeError, PlatformAdmin
from tests.api_harness import TenantKeys
from tests.factories import assert_no_drift, enqueue_jobs, make_base, make_file, make_tenant
from tests.integration.test_wakeups import Trainer, _sleepers, _wait_for, wake_one


def _tenant_rows(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                text(
                    "SELECT t.id, t.name, t.max_running_jobs, t.max_priority, "
                    "t.max_interactive_models, t.max_checkpoint_bytes, "
                    "(SELECT count(*) FROM api_keys k WHERE k.tenant_id = t.id), "
                    "(SELECT count(*) FROM api_keys k WHERE k.tenant_id = t.id "
                    " AND k.revoked_at IS NULL) FROM tenants t ORDER BY t.name"
                )
            )
        ]


def _refused(call: Any, status: int, code: str, param: str | None = None) -> LoraforgeError:
    with pytest.raises(LoraforgeError) as refused:
        call()
    assert (refused.value.status, refused.value.code) == (status, code), refused.value
    if param is not None:
        assert refused.value.param == param, refused.value
    return refused.value


def test_an_operator_onboards_a_tenant_whose_first_key_works_and_sees_only_its_own(
    services: Services, live_url: str, tenant_a: TenantKeys, tenant_b: TenantKeys
) -> None:
    """tenant-a's admin is a platform operator (the harness's settings): it creates `acme` with
    its limits; the admin key in the answer works at once (the official SDK lists acme's jobs:
    none of tenant-b's), makes acme's own keys, and is not an operator's; acme's cap and running
    limit hold its jobs; the same name again is refused with nothing written."""
    engine = services.engine
    operator = PlatformAdmin(Client(live_url, tenant_a.admin))
    created = operator.create_tenant(
        "acme",
        max_running_jobs=2,
        max_priority=10,
        max_interactive_models=3,
        max_checkpoint_bytes=20 * 10**9,
    )
    key = created.pop("admin_key")
    assert key["role"] == "admin" and key["key"].startswith("lf-") and not key["revoked"]
    assert created["name"] == "acme" and created["id"].startswith("tenant")
    assert (created["max_running_jobs"], created["effective_max_running_jobs"]) == (2, 2)
    assert (created["max_priority"], created["effective_max_priority"]) == (10, 10)
    assert (created["max_interactive_models"], created["effective_max_interactive_models"]) == (
        3,
        3,
    )
    assert (created["max_checkpoint_bytes"], created["effective_max_checkpoint_bytes"]) == (
        20 * 10**9,
        20 * 10**9,
    )
    assert created["jobs"] == dict.fromkeys(
        ("queued", "running", "cancelling", "succeeded", "failed", "cancelled"), 0
    )
    assert (created["last_served_at"], created["live_api_keys"]) == (None, 1)
    assert operator.get_tenant("acme") == created
    assert [t["name"] for t in operator.list_tenants()] == ["acme", "tenant-a", "tenant-b"]

    base = make_base(engine, "tiny-onboard").name
    enqueue_jobs(
        engine,
        tenant_b.tenant_id,
        make_base(engine, "b2").id,
        make_file(engine, tenant_b.tenant_id).id,
        2,
    )
    sdk = openai.OpenAI(base_url=live_url + "/v1", api_key=key["key"], max_retries=0)
    assert list(sdk.fine_tuning.jobs.list()) == []  # tenant-b's two jobs are not acme's
    acme = Client(live_url, key["key"])
    member = acme.request("POST", "/v1/api_keys", json={"name": "ci", "role": "member"})
    file_id = make_file(engine, created["id"]).id
    job = Client(live_url, member["key"]).create_job(model=base, training_file=file_id, priority=10)
    assert job["priority"] == 10
    _refused(
        lambda: acme.create_job(model=base, training_file=file_id, priority=11),
        403,
        "priority_above_tenant_cap",
        "priority",
    )
    _refused(lambda: PlatformAdmin(acme).list_tenants(), 403, "platform_operator_required")

    before = _tenant_rows(engine)
    taken = _refused(lambda: operator.create_tenant("acme"), 409, "tenant_exists", "name")
    assert "'acme' already exists" in taken.message
    assert _tenant_rows(engine) == before  # no second tenant, no key for it


def test_only_a_name_taken_is_told_as_one_and_a_limit_the_database_refuses_is_its_own_error(
    engine: Engine,
) -> None:
    """`tenants.create_tenant` called with a limit out of its check constraint's range (the REST
    body and the CLI refuse these first, a caller in Python need not) raises the database's
    check violation, naming that constraint, not "a tenant named ... already exists"; nothing
    is written, and the transaction goes on: the name is then created, and taken the second
    time."""
    out_of_range = [
        ({"max_priority": 101}, "ck_tenants_max_priority"),
        ({"max_interactive_models": 0}, "ck_tenants_max_interactive_models"),
        ({"max_checkpoint_bytes": 0}, "ck_tenants_max_checkpoint_bytes"),
    ]
    with engine.begin() as conn:
        for limits, constraint in out_of_range:
            with pytest.raises(IntegrityError) as refused:
                tenants.create_tenant(conn, "acme", **limits)
            assert isinstance(refused.value.orig, psycopg.errors.CheckViolation), limits
            assert refused.value.orig.diag.constraint_name == constraint, limits
            assert tenants.get_tenant_by_name(conn, "acme") is None, limits
        created = tenants.create_tenant(conn, "acme", max_priority=100)
        with pytest.raises(tenants.TenantExistsError, match="a tenant named 'acme' already exists"):
            tenants.create_tenant(conn, "acme", max_priority=5)
    assert _tenant_rows(engine) == [(created.id, "acme", None, 100, None, None, 0, 0)]


def test_limits_set_over_rest_hold_the_next_claims_and_wake_an_idle_trainer(
    services: Services, database_url: str, live_url: str, tenant_a: TenantKeys
) -> None:
    """`max_running_jobs: 0` holds a tenant's queue (its jobs wait, another tenant's go on); 1
    lets exactly one run at a time; raised while a trainer sleeps (its poll a minute away, no
    other job queued), the trainer is woken and drains the tenant's jobs; null returns it to the
    platform's default; the queue's bookkeeping stays exact throughout."""
    engine = services.engine
    operator = PlatformAdmin(Client(live_url, tenant_a.admin))
    acme_id = operator.create_tenant("acme", max_running_jobs=0)["id"]
    other = make_tenant(engine, "other", max_running_jobs=10)
    base_id = make_base(engine, "tiny-limits").id
    mine = enqueue_jobs(engine, acme_id, base_id, make_file(engine, acme_id).id, 3)
    [theirs] = enqueue_jobs(engine, other.id, base_id, make_file(engine, other.id).id, 1)
    queue = JobQueue(engine, max_running_per_tenant=services.settings.max_running_jobs_per_tenant)
    claimed = queue.claim("w1")
    assert claimed is not None and claimed.id == theirs
    assert queue.claim("w1") is None  # acme is held at 0
    assert queue.complete(theirs, "w1") is not None
    held = operator.get_tenant("acme")
    assert (held["effective_max_running_jobs"], held["jobs"]["queued"]) == (0, 3)

    assert operator.set_limits("acme", max_running_jobs=1)["effective_max_running_jobs"] == 1
    first = queue.claim("w1")
    assert first is not None and first.id in mine
    assert queue.claim("w2") is None  # one at a time
    assert operator.get_tenant("acme")["jobs"] == {
        "queued": 2,
        "running": 1,
        "cancelling": 0,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 0,
    }
    operator.set_limits("acme", max_running_jobs=0)
    assert queue.complete(first.id, "w1") is not None
    assert queue.claim("w1") is None  # held again, the running job was left to end

    trainer = Trainer(engine, database_url, "sleeper", idle_wait=60.0)
    trainer.start()
    try:
        _wait_for(lambda: _sleepers(engine) == ["sleeper"] and trainer.claims == 2, "asleep")
        raised = operator.set_limits("acme", max_running_jobs=1)
        assert raised["max_running_jobs"] == 1
        # Woken by the raise (nothing else queued, its poll 60 s away), it drains acme's jobs.
        _wait_for(lambda: len(trainer.taken) == 2, "the sleeping trainer woken", timeout=20)
    finally:
        trainer.stop.set()
        wake_one(engine, None)
        trainer.join(10)
    assert not trainer.errors, trainer.errors
    assert sorted(trainer.taken) == sorted(set(mine) - {first.id})
    done = operator.get_tenant("acme")
    assert (done["jobs"]["succeeded"], done["jobs"]["queued"]) == (3, 0)
    assert done["last_served_at"] is not None

    capped = operator.set_limits("acme", max_interactive_models=5)
    assert (capped["max_interactive_models"], capped["effective_max_interactive_models"]) == (5, 5)
    default = services.settings.max_running_jobs_per_tenant
    back = operator.set_limits("acme", max_running_jobs=None)
    assert (back["max_running_jobs"], back["effective_max_running_jobs"]) == (None, default)
    assert back["max_priority"] is None  # left out: unchanged
    assert back["max_interactive_models"] == 5  # left out: unchanged
    back = operator.set_limits("acme", max_interactive_models=None)
    assert (back["max_interactive_models"], back["effective_max_interactive_models"]) == (
        None,
        services.settings.max_interactive_models_per_tenant,
    )
    assert operator.get_tenant("acme")["max_running_jobs"] is None  # left out: unchanged
    # A cap on its checkpoints' bytes; null: the platform's default, which is none here.
    assert services.settings.max_checkpoint_bytes_per_tenant is None
    capped = operator.set_limits("acme", max_checkpoint_bytes=10**18)
    assert (capped["max_checkpoint_bytes"], capped["effective_max_checkpoint_bytes"]) == (
        10**18,
        10**18,
    )
    assert capped["max_interactive_models"] is None  # left out: unchanged
    back = operator.set_limits("acme", max_checkpoint_bytes=None)
    assert (back["max_checkpoint_bytes"], back["effective_max_checkpoint_bytes"]) == (None, None)
    assert_no_drift(engine)


def test_tenants_page_by_name_with_their_jobs_counted_as_the_jobs_stand(
    services: Services, live_url: str, tenant_a: TenantKeys
) -> None:
    """21 tenants paged 5 at a time: every one once, in name order; each one's counts are what
    its jobs' statuses say after claims, finishes, a failure and cancels."""
    engine = services.engine
    base_id = make_base(engine, "tiny-pages").id
    queue = JobQueue(engine, max_running_per_tenant=100, retry_backoff_seconds=60)
    for n in range(20):
        tenant = make_tenant(engine, f"team-{n:02d}")
        enqueue_jobs(engine, tenant.id, base_id, make_file(engine, tenant.id).id, n % 4)
    for n in itertools.count():
        job = queue.claim(f"w{n}")
        if job is None or n == 24:
            break
        if n % 4 == 0:
            queue.complete(job.id, f"w{n}")
        elif n % 4 == 1:
            queue.fail(job.id, f"w{n}", code="boom", message="boom", retryable=False)
        elif n % 4 == 2:
            queue.request_cancel(job.id)  # running: cancelling
    with engine.connect() as conn:
        queued = conn.execute(text("SELECT id FROM jobs WHERE status = 'queued' LIMIT 2"))
        for (job_id,) in queued.all():
            queue.request_cancel(job_id)
        statuses = conn.execute(
            text("SELECT t.name, j.status FROM jobs j JOIN tenants t ON t.id = j.tenant_id")
        ).all()
        names = sorted(conn.execute(text("SELECT name FROM tenants")).scalars())
    expected: dict[str, Counter[str]] = {name: Counter() for name in names}
    for name, status in statuses:
        expected[name][status] += 1
        if status in ("running", "cancelling"):
            expected[name]["held"] += 1

    listed = PlatformAdmin(Client(live_url, tenant_a.admin)).list_tenants(page_size=5)
    assert [t["name"] for t in listed] == names and len(names) == 21
    for tenant in listed:
        want = expected[tenant["name"]]
        assert tenant["jobs"] == {
            "queued": want["queued"],
            "running": want["held"],
            "cancelling": want["cancelling"],
            "succeeded": want["succeeded"],
            "failed": want["failed"],
            "cancelled": want["cancelled"],
        }, tenant["name"]
    assert sum(t["jobs"]["cancelling"] for t in listed) > 0
    assert sum(t["jobs"]["failed"] for t in listed) > 0
    page = httpx.get(
        f"{live_url}/v1/tenants",
        params={"after": "team-17", "limit": 2},
        headers=tenant_a.headers(),
    ).json()
    assert ([t["name"] for t in page["data"]], page["has_more"]) == (["team-18", "team-19"], True)
    assert (page["first_id"], page["last_id"]) == ("team-18", "team-19")


def test_tenant_administration_is_refused_with_a_reason_and_writes_nothing(
    services: Services, live_url: str, tenant_a: TenantKeys, tenant_b: TenantKeys
) -> None:
    engine = services.engine
    operator = PlatformAdmin(Client(live_url, tenant_a.admin))
    operator.create_tenant("acme", max_priority=5, max_interactive_models=2)
    acme_key = operator.create_key("acme", role="reader", key_name="ro")
    before = _tenant_rows(engine)

    def call(method: str, path: str, key: str | None = tenant_a.admin, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.request(method, live_url + path, headers=headers, **kw)

    routes = [
        ("POST", "/v1/tenants", {"json": {"name": "x"}}),
        ("GET", "/v1/tenants", {}),
        ("GET", "/v1/tenants/acme", {}),
        ("PATCH", "/v1/tenants/acme", {"json": {"max_priority": 1}}),
        ("GET", "/v1/tenants/acme/api_keys", {}),
        ("POST", "/v1/tenants/acme/api_keys", {"json": {"role": "admin"}}),
        ("DELETE", f"/v1/tenants/acme/api_keys/{acme_key['id']}", {}),
    ]
    for method, path, kw in routes:
        for key, status, code in (
            (None, 401, "missing_api_key"),
            ("lf-made-up", 401, "invalid_api_key"),
            (tenant_b.admin, 403, "platform_operator_required"),  # an admin, not an operator
            (tenant_a.member, 403, "admin_required"),
            (tenant_a.reader, 403, "admin_required"),
        ):
            answer = call(method, path, key, **kw)
            assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), (
                method,
                path,
                key,
            )
    refused = call("GET", "/v1/tenants", tenant_b.admin).json()["error"]["message"]
    assert "LORAFORGE_PLATFORM_OPERATOR_TENANTS" in refused

    bad_creates = [
        ({"name": "has space"}, "name"),
        ({"name": ""}, "name"),
        ({"name": "-dash-first"}, "name"),
        ({"name": "x" * 129}, "name"),
        ({"name": "ok", "max_running_jobs": -1}, "max_running_jobs"),
        ({"name": "ok", "max_running_jobs": 10_001}, "max_running_jobs"),
        ({"name": "ok", "max_priority": 101}, "max_priority"),
        ({"name": "ok", "max_priority": "high"}, "max_priority"),
        ({"name": "ok", "max_interactive_models": 0}, "max_interactive_models"),
        ({"name": "ok", "max_interactive_models": 10_001}, "max_interactive_models"),
        ({"name": "ok", "max_interactive_models": "many"}, "max_interactive_models"),
        ({"name": "ok", "max_checkpoint_bytes": 0}, "max_checkpoint_bytes"),
        ({"name": "ok", "max_checkpoint_bytes": -1}, "max_checkpoint_bytes"),
        ({"name": "ok", "max_checkpoint_bytes": 10**18 + 1}, "max_checkpoint_bytes"),
        ({"name": "ok", "max_checkpoint_bytes": "20G"}, "max_checkpoint_bytes"),
        ({"name": "ok", "weight": 2}, "weight"),
        ({}, "name"),
    ]
    for body, param in bad_creates:
        answer = call("POST", "/v1/tenants", json=body)
        error = answer.json()["error"]
        assert (answer.status_code, error["param"]) == (400, param), body
    bad_patches = [
        (
            {},
            None,
            "give max_running_jobs, max_priority, max_interactive_models and/or "
            "max_checkpoint_bytes",
        ),
        ({"max_priority": -101}, "max_priority", "-100"),
        ({"max_interactive_models": 0}, "max_interactive_models", "greater than or equal to 1"),
        (
            {"max_interactive_models": 10_001},
            "max_interactive_models",
            "less than or equal to 10000",
        ),
        ({"max_interactive_models": "many"}, "max_interactive_models", "valid integer"),
        ({"max_interactive_models": True}, "max_interactive_models", "not true or false"),
        ({"max_checkpoint_bytes": 0}, "max_checkpoint_bytes", "greater than or equal to 1"),
        ({"max_checkpoint_bytes": -5}, "max_checkpoint_bytes", "greater than or equal to 1"),
        (
            {"max_checkpoint_bytes": 10**18 + 1},
            "max_checkpoint_bytes",
            "less than or equal to 1000000000000000000",
        ),
        ({"max_checkpoint_bytes": "20G"}, "max_checkpoint_bytes", "valid integer"),
        ({"max_checkpoint_bytes": True}, "max_checkpoint_bytes", "not true or false"),
        ({"max_running_jobs": 1.5}, "max_running_jobs", ""),
        ({"priority": 3}, "priority", ""),
    ]
    for body, param, said in bad_patches:
        answer = call("PATCH", "/v1/tenants/acme", json=body)
        error = answer.json()["error"]
        assert (answer.status_code, error["param"]) == (400, param), body
        assert said in error["message"], error
    for method, path, kw in (
        ("GET", "/v1/tenants/nobody", {}),
        ("PATCH", "/v1/tenants/nobody", {"json": {"max_priority": 1}}),
        ("GET", "/v1/tenants/nobody/api_keys", {}),
        ("POST", "/v1/tenants/nobody/api_keys", {"json": {}}),
    ):
        answer = call(method, path, **kw)
        assert (answer.status_code, answer.json()["error"]["code"]) == (404, "tenant_not_found")
        assert answer.json()["error"]["message"] == "No tenant named 'nobody'"
    # Another tenant's key named under acme's path is not acme's: 404, and it still works.
    answer = call("DELETE", f"/v1/tenants/acme/api_keys/{_key_id(engine, tenant_b.tenant_id)}")
    assert (answer.status_code, answer.json()["error"]["code"]) == (404, "api_key_not_found")
    assert call("GET", "/v1/fine_tuning/jobs", tenant_b.admin).status_code == 200
    assert _tenant_rows(engine) == before  # nothing written by any refusal

    # A key revoked by the operator stops working at once; revoking it again is a 404.
    assert call("GET", "/v1/fine_tuning/jobs", acme_key["key"]).status_code == 200
    revoked = operator.revoke_key("acme", acme_key["id"])
    assert revoked["revoked"] and revoked["key"] is None
    assert call("GET", "/v1/fine_tuning/jobs", acme_key["key"]).status_code == 401
    _refused(lambda: operator.revoke_key("acme", acme_key["id"]), 404, "api_key_not_found")
    listed = operator.list_keys("acme")
    assert [(k["name"], k["revoked"]) for k in listed] == [("admin", False), ("ro", True)]
    assert all(k["key"] is None for k in listed)  # a plaintext is shown once, at creation


def _key_id(engine: Engine, tenant_id: str) -> str:
    with engine.connect() as conn:
        return str(
            conn.execute(
                text("SELECT id FROM api_keys WHERE tenant_id = :t AND role = 'member'"),
                {"t": tenant_id},
            ).scalar_one()
        )
