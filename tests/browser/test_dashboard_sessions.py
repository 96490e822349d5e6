"""The Sessions pages in a real browser: the tenant's interactive sessions counted as the
database holds them, fifty a page; a session's models with their holders, calls and last
failure, and its saved weights; a checkpoint published from the page as an adapter version
through `POST /v1/adapters/{name}/versions`' function (version 1, with the session in its
lineage) and, published again, answered with the version it already is; and every refusal (a
name the registry refuses or one bound to another base, a checkpoint not of this session, a
reader, another tenant, a post without its CSRF token) said on a page with nothing written.

Sessions, models, calls and checkpoints are rows written here as the Tinker API and its
executors write them; no executor runs."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import APIResponse, BrowserContext, ConsoleMessage, Page, expect
from sqlalchemy import text

from control_plane import registry, trainers
from control_plane.dashboard.queries import MAX_CHART_POINTS
from control_plane.dashboard.routes.interactive import SESSIONS_PAGE
from control_plane.services import Services
from tests.api_harness import TenantKeys
from tests.browser.conftest import sign_in
from tests.curves import assert_same_curves, downsampled, model_points
from tests.factories import interactive_training_steps, make_base

pytestmark = pytest.mark.browser

STATUSES = ("pending", "running", "completed", "failed")
WRITERS_ONLY = "Publishing an adapter version needs a writer"


def _csrf(page: Page) -> str:
    return str(
        page.evaluate("JSON.parse(document.body.getAttribute('hx-headers'))['X-CSRF-Token']")
    )


def _text(response: APIResponse) -> str:
    """A page's text as a person reads it (`'` is `&#39;` in the markup)."""
    return html.unescape(response.text())


def _insert(services: Services, table: str, rows: list[dict[str, Any]]) -> None:
    """Rows as the Tinker API and its executors write them (JSON columns given as text)."""
    columns = list(rows[0])
    values = ", ".join(f":{c}" for c in columns)
    with services.engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({values})"), rows)


def _ago(seconds: float) -> datetime:
    return datetime.now(UTC) - timedelta(seconds=seconds)


def add_sessions(services: Services, tenant_id: str, *ids: str, silent_s: int = 600) -> None:
    """Sessions created a second apart (the first newest), heard from `silent_s` ago."""
    rows = [
        {
            "id": s,
            "tenant_id": tenant_id,
            "created_at": _ago(i),
            "last_heartbeat_at": _ago(silent_s),
        }
        for i, s in enumerate(ids)
    ]
    _insert(services, "interactive_sessions", rows)


def add_model(
    services: Services, session_id: str, tenant_id: str, base_id: str, model_id: str, **row: Any
) -> str:
    """A training model of rank 8 unless `row` says otherwise (`rank`, or any column)."""
    config = json.dumps({"rank": row.pop("rank", 8), "seed": 0})
    model = {"id": model_id, "session_id": session_id, "tenant_id": tenant_id}
    model |= {"base_model_id": base_id, "kind": "training", "lora_config": config}
    _insert(services, "interactive_models", [model | row])
    return model_id


def add_calls(
    services: Services, model_id: str, tenant_id: str, base_id: str, calls: list[tuple[str, str]]
) -> None:
    """The model's calls in order, each `(kind, status)`; a failed one's error names its seq."""
    rows = []
    for seq, (kind, status) in enumerate(calls):
        row: dict[str, Any] = {"id": f"fut-{model_id}-{seq}", "model_id": model_id}
        row |= {"tenant_id": tenant_id, "base_model_id": base_id, "seq": seq, "kind": kind}
        failed = {"error": f"call {seq} refused", "category": "user"}
        row |= {"status": status, "error": json.dumps(failed) if status == "failed" else None}
        rows.append(row | {"created_at": _ago(len(calls) - seq)})
    _insert(services, "interactive_calls", rows)


def add_training_calls(
    services: Services,
    model_id: str,
    tenant_id: str,
    base_id: str,
    calls: list[tuple[str, str, dict[str, float] | None]],
) -> None:
    """The model's calls in order, each `(kind, status, metrics)`: `metrics` as an executor's
    `finish` keeps them apart from the answer (the answers themselves already let go)."""
    add_calls(services, model_id, tenant_id, base_id, [(kind, status) for kind, status, _ in calls])
    with services.engine.begin() as conn:
        for seq, (_, _, metrics) in enumerate(calls):
            conn.execute(
                text("UPDATE interactive_calls SET metrics = :metrics WHERE id = :id"),
                {
                    "metrics": json.dumps(metrics) if metrics else None,
                    "id": f"fut-{model_id}-{seq}",
                },
            )


def add_checkpoint(
    services: Services,
    session_id: str,
    model_id: str,
    tenant_id: str,
    name: str,
    kind: str = "sampler",
    adapter_dir: Path | None = None,
    **recorded: object,
) -> str:
    """Saved weights of the model, their files stored under the prefix an executor writes
    them to when `adapter_dir` is given (`recorded`: more of the row, e.g. `size_bytes`);
    returns the tinker path."""
    segment = {"sampler": "sampler_weights", "state": "weights", "external": "external_weights"}[
        kind
    ]
    path = f"tinker://{model_id}/{segment}/{name}"
    prefix = f"tenants/{tenant_id}/sessions/{session_id}/models/{model_id}/{segment}/{name}/"
    row = {"id": f"ckpt-{model_id}-{kind}-{name}", "model_id": model_id, "tenant_id": tenant_id}
    row |= {"kind": kind, "name": name, "path": path, "storage_prefix": prefix} | recorded
    _insert(services, "interactive_checkpoints", [row])
    if adapter_dir is not None:
        services.store.put_directory(prefix, adapter_dir)
    return path


def written(services: Services) -> tuple[Any, ...]:
    """What a publication would change: adapters, versions, checkpoints' links, stored keys."""
    with services.engine.connect() as conn:
        adapters = conn.execute(text("SELECT name, next_version FROM adapters ORDER BY name"))
        versions = conn.execute(text("SELECT count(*) FROM adapter_versions")).scalar_one()
        links = conn.execute(
            text("SELECT path, published_version_id FROM interactive_checkpoints ORDER BY path")
        )
        found = ([tuple(r) for r in adapters], versions, [tuple(r) for r in links])
    return (*found, sorted(k for k in services.store.list_keys("tenants/") if "/adapters/" in k))


def _table(page: Page, selector: str, key: str) -> dict[str, list[str]]:
    """A table's rows by their `data-<key>`, each the cells' text as shown."""
    rows = page.locator(f"{selector} tbody tr").evaluate_all(
        f"rows => rows.map(r => [r.dataset.{key}, "
        "...Array.from(r.cells).map(c => c.innerText.replace(/\\s+/g, ' ').trim())])"
    )
    return {row[0]: row[1:] for row in rows}


@pytest.fixture
def base_id(services: Services) -> str:
    return make_base(services.engine, "tiny-llama").id


@pytest.fixture
def saved(
    services: Services, tenant_a: TenantKeys, base_id: str, peft_adapter: Path
) -> Iterator[dict[str, str]]:
    """One session of tenant-a with a training model that saved sampler weights (a real PEFT
    adapter in the store) and a state, neither published."""
    tenant = tenant_a.tenant_id
    add_sessions(services, tenant, "sess-pub", silent_s=5)
    model = add_model(services, "sess-pub", tenant, base_id, "model-pub", rank=4, held_by="t-1")
    add_calls(services, model, tenant, base_id, [("create_model", "completed")])
    yield {
        "session": "sess-pub",
        "model": model,
        "sampler": add_checkpoint(
            services, "sess-pub", model, tenant, "step-10", adapter_dir=peft_adapter
        ),
        "state": add_checkpoint(services, "sess-pub", model, tenant, "step-10", kind="state"),
    }


def test_the_sessions_page_counts_each_sessions_models_and_calls_and_pages_past_fifty(
    live_url: str,
    page: Page,
    services: Services,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    base_id: str,
) -> None:
    tenant = tenant_a.tenant_id
    ids = [f"sess-{i:02d}" for i in range(SESSIONS_PAGE + 2)]
    add_sessions(services, tenant, *ids)
    add_sessions(services, tenant, "sess-live", silent_s=10)  # the newest, and the one active
    cycle = ["pending", "running", "completed", "failed", "completed", "completed"]
    for i, session_id in enumerate([*ids[:6], ids[-1]]):  # both pages have counts
        for j in range(i % 3 + 1):
            model = add_model(services, session_id, tenant, base_id, f"m-{session_id}-{j}")
            statuses = cycle[: (i + j) % len(cycle) + 1]
            add_calls(services, model, tenant, base_id, [("forward_backward", s) for s in statuses])
    add_sessions(services, tenant_b.tenant_id, "sess-other")
    add_calls(
        services,
        add_model(services, "sess-other", tenant_b.tenant_id, base_id, "m-other"),
        tenant_b.tenant_id,
        base_id,
        [("sample", "pending")],
    )

    sign_in(page, live_url, tenant_a.reader)
    page.click("nav a[href='/sessions']")
    page.wait_for_url(f"{live_url}/sessions")
    expect(page.locator("#active-rule")).to_contain_text("within the last 2 minutes")
    first = _table(page, "#sessions", "session")
    assert len(first) == SESSIONS_PAGE and "sess-other" not in first
    page.click("#older-sessions")
    second = _table(page, "#sessions", "session")
    assert len(second) == 3 and page.locator("#older-sessions").count() == 0
    shown = {**first, **second}
    newest = ["sess-live", *ids]  # sess-live's transaction began last
    assert [*first, *second] == newest

    # Each row's cells after id, created, last heartbeat and status are its own counts: models,
    # then calls by status, counted here one subquery each.
    calls = (
        "SELECT count(*) FROM interactive_calls c JOIN interactive_models m ON m.id = c.model_id"
    )
    per_status = [f"({calls} WHERE m.session_id = s.id AND c.status = '{st}')" for st in STATUSES]
    with services.engine.connect() as conn:
        counted = conn.execute(
            text(
                "SELECT s.id, (SELECT count(*) FROM interactive_models m WHERE m.session_id = s.id), "
                f"{', '.join(per_status)} FROM interactive_sessions s WHERE s.tenant_id = :t"
            ),
            {"t": tenant},
        ).all()
    assert {s: cells[4:] for s, cells in shown.items()} == {
        row[0]: [str(n) for n in row[1:]] for row in counted
    }
    assert shown[ids[-1]][4:] != ["0"] * 5  # the second page's counted session, not zeros
    assert shown["sess-live"][3] == "active"
    assert all(shown[s][3] == "ended" for s in ids)


def test_the_sessions_page_says_what_the_tenants_checkpoints_hold_and_the_cap_on_them(
    live_url: str,
    page: Page,
    services: Services,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    base_id: str,
) -> None:
    """The tenant's checkpoints summed over its sessions (a size not recorded counts 0;
    another tenant's are not counted), with no cap, under its own cap, and at it: full, saying
    how to make room."""
    tenant = tenant_a.tenant_id
    add_sessions(services, tenant, "sess-1", "sess-2")
    first = add_model(services, "sess-1", tenant, base_id, "m-1")
    second = add_model(services, "sess-2", tenant, base_id, "m-2")
    add_checkpoint(services, "sess-1", first, tenant, "s1", kind="state", size_bytes=12 * 10**8)
    add_checkpoint(services, "sess-1", first, tenant, "w1", size_bytes=3 * 10**8)
    add_checkpoint(services, "sess-2", second, tenant, "w1")  # saved before sizes were recorded
    add_sessions(services, tenant_b.tenant_id, "sess-b")
    theirs = add_model(services, "sess-b", tenant_b.tenant_id, base_id, "m-b")
    add_checkpoint(services, "sess-b", theirs, tenant_b.tenant_id, "w1", size_bytes=9 * 10**9)

    def own_cap(cap: int | None) -> None:
        with services.engine.begin() as conn:
            conn.execute(
                text("UPDATE tenants SET max_checkpoint_bytes = :cap WHERE id = :t"),
                {"cap": cap, "t": tenant},
            )

    assert services.settings.max_checkpoint_bytes_per_tenant is None
    sign_in(page, live_url, tenant_a.reader)
    page.goto(f"{live_url}/sessions")
    said = page.locator("#checkpoint-storage")
    expect(said).to_have_text("Your checkpoints hold 1.5 GB (3 checkpoints), with no cap on them.")
    expect(said.locator("strong")).to_have_attribute("title", "1,500,000,000 bytes")
    own_cap(20 * 10**9)
    page.reload()
    expect(said).to_have_text(
        "Your checkpoints hold 1.5 GB (3 checkpoints) of the 20 GB the platform's operator set "
        "for your tenant."
    )
    own_cap(15 * 10**8)
    page.reload()
    expect(said).to_have_text(
        "Your checkpoints hold 1.5 GB (3 checkpoints) of the 1.5 GB the platform's operator set "
        "for your tenant: full, a save is refused until you delete checkpoints "
        "(delete_checkpoint_from_tinker_path) or they expire."
    )


def test_a_sessions_page_shows_its_models_holders_last_calls_errors_and_checkpoints(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, base_id: str
) -> None:
    tenant = tenant_a.tenant_id
    add_sessions(services, tenant, "sess-1", silent_s=3600)
    held = add_model(
        services,
        "sess-1",
        tenant,
        base_id,
        "m-held",
        rank=16,
        held_by="trainer-7",
        created_at=_ago(3),
    )
    unloaded = add_model(
        services,
        "sess-1",
        tenant,
        base_id,
        "m-gone",
        kind="sampler",
        unloaded_at=_ago(1),
        created_at=_ago(2),
    )
    waiting = add_model(services, "sess-1", tenant, base_id, "m-wait", rank=4, created_at=_ago(1))
    add_calls(
        services,
        held,
        tenant,
        base_id,
        [
            ("create_model", "completed"),
            ("forward_backward", "failed"),
            ("forward_backward", "completed"),
            ("optim_step", "running"),
            ("sample", "pending"),
        ],
    )
    add_calls(services, unloaded, tenant, base_id, [("sample", "completed")])
    add_calls(services, waiting, tenant, base_id, [("create_model", "pending")])
    sampler = add_checkpoint(services, "sess-1", held, tenant, "final")
    expires = datetime(2031, 5, 4, 3, 2, tzinfo=UTC)
    state = add_checkpoint(
        services,
        "sess-1",
        held,
        tenant,
        "final",
        kind="state",
        size_bytes=3 * 1024 * 1024,
        expires_at=expires,
    )

    sign_in(page, live_url, tenant_a.admin)
    page.goto(f"{live_url}/sessions")
    page.click("a[href='/sessions/sess-1']")
    page.wait_for_url(f"{live_url}/sessions/sess-1")
    expect(page.locator("#session-status")).to_have_text("ended")
    expect(page.locator("#session-silent")).to_contain_text("not heard from within 2 minutes")
    models = _table(page, "#models", "model")
    assert list(models) == [held, unloaded, waiting]  # oldest first
    # Cells: id, kind, base, rank, holder, pending, running, completed, failed, last call,
    # last failure.
    assert models[held][1:9] == ["training", "tiny-llama", "16", "trainer-7", "1", "1", "2", "1"]
    assert models[held][9].startswith("sample pending")
    assert models[held][10] == "call 1 refused"  # the last failed call's message
    assert models[unloaded][1:3] == ["sampler", "tiny-llama"]
    assert models[unloaded][4].startswith("unloaded")
    assert models[unloaded][9].startswith("sample completed") and models[unloaded][10] == "—"
    assert models[waiting][4:9] == ["not loaded", "1", "0", "0", "0"]
    checkpoints = _table(page, "#checkpoints", "checkpoint")
    assert set(checkpoints) == {sampler, state}
    assert checkpoints[sampler][:3] == [sampler, "sampler", "final"]
    assert checkpoints[state][:3] == [state, "state", "final"]
    # Size and expiry (a save's ttl_seconds, or set later): unknown and never for the sampler.
    assert checkpoints[state][4] == "3.0 MiB"
    assert checkpoints[state][5] == "2031-05-04 03:02:00 UTC"
    assert checkpoints[sampler][4:6] == ["—", "never"]
    expect(page.locator(".publish-form")).to_have_count(2)


def _script_error(message: ConsoleMessage) -> list[str]:
    """A console error, but the browser's own ask for a favicon (the dashboard has none)."""
    if message.type != "error" or message.location["url"].endswith("/favicon.ico"):
        return []
    return [f"{message.text} at {message.location}"]


# A model's history, and its curves by step (the optim_steps completed before a call): failed,
# running and non-training calls count for nothing.
HISTORY: list[tuple[str, str, dict[str, float] | None]] = [
    ("create_model", "completed", None),
    ("forward_backward", "completed", {"loss:sum": 2.0}),  # step 0
    ("forward_backward", "completed", {"loss:sum": 1.5}),  # step 0: summed with the one before
    ("forward", "completed", {"loss:sum": 4.0}),  # step 0: an evaluation
    ("optim_step", "completed", {"grad_norm:mean": 0.5}),  # step 0's end
    ("sample", "completed", None),
    ("forward_backward", "failed", None),
    ("optim_step", "failed", None),  # not a step
    ("forward_backward", "completed", {"loss:sum": 1.0}),  # step 1
    ("optim_step", "completed", {"grad_norm:mean": 0.25}),  # step 1's end
    ("forward_backward", "completed", {"loss:sum": 0.5}),  # step 2
    ("optim_step", "running", None),
]
CURVES = {
    "train": {"steps": [0, 1, 2], "values": [3.5, 1.0, 0.5]},
    "eval": {"steps": [0], "values": [4.0]},
    "grad_norm": {"steps": [0, 1], "values": [0.5, 0.25]},
}
# A model's curves short of a chart's points are sent whole, and say so.
WHOLE = {"downsampled": False, "max_points": MAX_CHART_POINTS}
NO_CURVES = {name: {"steps": [], "values": []} for name in CURVES} | WHOLE


@pytest.fixture
def curved(services: Services, tenant_a: TenantKeys, base_id: str) -> dict[str, str]:
    """A session of tenant-a with a model that trained (`HISTORY`), one that trained a step,
    one with no metrics; another session of tenant-a's with a model that trained."""
    tenant = tenant_a.tenant_id
    add_sessions(services, tenant, "sess-curves", "sess-sibling", silent_s=5)
    trained = add_model(services, "sess-curves", tenant, base_id, "m-trained", created_at=_ago(3))
    add_training_calls(services, trained, tenant, base_id, HISTORY)
    brief = add_model(services, "sess-curves", tenant, base_id, "m-brief", created_at=_ago(2))
    add_training_calls(
        services,
        brief,
        tenant,
        base_id,
        [
            ("forward_backward", "completed", {"loss:sum": 9.0}),
            ("optim_step", "completed", {"grad_norm:mean": 3.0}),
            ("forward_backward", "completed", {"loss:sum": 8.0}),
        ],
    )
    bare = add_model(services, "sess-curves", tenant, base_id, "m-bare", created_at=_ago(1))
    add_calls(services, bare, tenant, base_id, [("create_model", "completed")])
    sibling = add_model(services, "sess-sibling", tenant, base_id, "m-sibling")
    add_training_calls(
        services, sibling, tenant, base_id, [("forward", "completed", {"loss:sum": 1.0})]
    )
    return {"session": "sess-curves", "trained": trained, "brief": brief, "bare": bare}


def _metrics_url(live_url: str, session_id: str, model_id: str) -> str:
    return f"{live_url}/sessions/{session_id}/models/{model_id}/metrics.json"


def test_a_models_curves_are_its_training_steps_summed_and_only_its_own_tenants(
    live_url: str,
    page: Page,
    services: Services,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    base_id: str,
    curved: dict[str, str],
) -> None:
    """`metrics.json`: per step, the step's forward_backward losses summed (train), its forward
    calls' summed (eval), its optim_step's gradient norm; a model with no metrics has empty
    curves. A model of another session, or another tenant's session or model, is not found."""
    sign_in(page, live_url, tenant_a.reader)
    session = curved["session"]
    answered = page.request.get(_metrics_url(live_url, session, curved["trained"]))
    assert answered.status == 200 and answered.json() == CURVES | WHOLE
    assert answered.headers["cache-control"] == "no-store"
    bare = page.request.get(_metrics_url(live_url, session, curved["bare"]))
    assert bare.status == 200 and bare.json() == NO_CURVES
    sibling = page.request.get(_metrics_url(live_url, "sess-sibling", "m-sibling"))
    assert sibling.json()["eval"] == {"steps": [0], "values": [1.0]}
    for path in (
        _metrics_url(live_url, session, "m-sibling"),  # tenant-a's, of another session
        _metrics_url(live_url, session, "m-none"),
        _metrics_url(live_url, "sess-none", curved["trained"]),
    ):
        assert page.request.get(path).status == 404, path

    add_sessions(services, tenant_b.tenant_id, "sess-b")
    add_model(services, "sess-b", tenant_b.tenant_id, base_id, "m-b")
    page.context.clear_cookies()
    sign_in(page, live_url, tenant_b.admin)
    for path in (
        _metrics_url(live_url, session, curved["trained"]),  # tenant-a's session and model
        _metrics_url(live_url, "sess-b", curved["trained"]),  # its own session, a's model
    ):
        assert page.request.get(path).status == 404, path
    assert page.request.get(_metrics_url(live_url, "sess-b", "m-b")).json() == NO_CURVES


def test_a_sessions_page_draws_each_trained_models_curves_without_a_script_error(
    live_url: str, page: Page, tenant_a: TenantKeys, curved: dict[str, str]
) -> None:
    """The first trained model's chart is drawn as the page opens (a uPlot canvas, a point per
    step, the gradient norm a series of its own); another's when its row's "curve" link opens
    it; a model with no metrics has neither link nor chart; nothing logs an error."""
    errors: list[str] = []
    page.on("console", lambda message: errors.extend(_script_error(message)))
    page.on("pageerror", lambda error: errors.append(str(error)))
    sign_in(page, live_url, tenant_a.reader)
    page.goto(f"{live_url}/sessions/{curved['session']}")
    trained, brief = (
        page.locator(f"#curve-{curved['trained']}"),
        page.locator(f"#curve-{curved['brief']}"),
    )
    chart = trained.locator(".chart[data-ready=true]")
    expect(chart.locator("canvas")).to_have_count(1)
    steps = {s for series in CURVES.values() for s in series["steps"]}
    expect(chart).to_have_attribute("data-points", str(len(steps)))
    expect(trained.locator(".u-legend")).to_contain_text("grad norm")
    assert chart.get_attribute("aria-label") == (
        f"Train loss, eval loss and gradient norm of model {curved['trained']} by step"
    )

    expect(brief).not_to_have_attribute("open", "")
    expect(brief.locator("canvas")).to_have_count(0)  # drawn once opened, not before
    page.locator(f"#models tr[data-model='{curved['brief']}'] a.curve-link").click()
    expect(brief).to_have_attribute("open", "")
    expect(brief.locator(".chart[data-ready=true] canvas")).to_have_count(1)
    drawn = page.request.get(_metrics_url(live_url, curved["session"], curved["brief"])).json()
    expect(brief.locator(".chart")).to_have_attribute(
        "data-points", str(len(drawn["train"]["steps"]))
    )

    expect(page.locator(f"#curve-{curved['bare']}")).to_have_count(0)
    expect(page.locator(f"#models tr[data-model='{curved['bare']}'] a.curve-link")).to_have_count(0)
    expect(page.locator("details.curve")).to_have_count(2)
    assert errors == []


def test_a_long_models_curves_come_downsampled_as_a_jobs_and_are_drawn(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, base_id: str
) -> None:
    """A model trained 3,000 steps (`interactive_training_steps`): its `metrics.json` says it is
    downsampled, each series in at most MAX_CHART_POINTS points, equal to the job chart's rule
    over its every point (`tests.curves`: buckets of 4 steps), the first bucket holding its
    first step and the last its newest; the session page draws it, a point per step sent, with
    no script error."""
    errors: list[str] = []
    page.on("console", lambda message: errors.extend(_script_error(message)))
    page.on("pageerror", lambda error: errors.append(str(error)))
    add_sessions(services, tenant_a.tenant_id, "sess-long", silent_s=5)
    model = add_model(services, "sess-long", tenant_a.tenant_id, base_id, "m-long")
    interactive_training_steps(services.engine, model, 3_000)
    sign_in(page, live_url, tenant_a.reader)
    with page.expect_response(re.compile(r".*/metrics\.json$")) as metrics:
        page.goto(f"{live_url}/sessions/sess-long")
    body = metrics.value.json()
    assert (body["downsampled"], body["max_points"]) == (True, MAX_CHART_POINTS)
    names = ("train", "eval", "grad_norm")
    sent = {n: list(zip(body[n]["steps"], body[n]["values"], strict=True)) for n in names}
    with services.engine.connect() as conn:
        want = downsampled(model_points(conn, model), MAX_CHART_POINTS)
    assert_same_curves(sent | {"downsampled": body["downsampled"]}, want)
    assert all(0 < len(body[n]["steps"]) <= MAX_CHART_POINTS for n in names)
    assert (body["train"]["steps"][0], body["train"]["steps"][-1]) == (1.5, 2_997.5)

    chart = page.locator(f"#curve-{model} .chart[data-ready=true]")
    expect(chart.locator("canvas")).to_have_count(1)
    steps = {s for n in names for s in body[n]["steps"]}
    expect(chart).to_have_attribute("data-points", str(len(steps)))
    expect(page.locator(f"#curve-{model} .u-legend")).to_contain_text("grad norm")
    assert errors == []


def test_a_writer_publishes_a_checkpoint_as_version_one_and_again_is_told_it_already_is(
    live_url: str,
    context: BrowserContext,
    services: Services,
    tenant_a: TenantKeys,
    saved: dict[str, str],
) -> None:
    page, stale = context.new_page(), context.new_page()
    sign_in(page, live_url, tenant_a.member)  # a member may write
    url = f"{live_url}/sessions/{saved['session']}"
    for tab in (page, stale):
        tab.goto(url)
    row = page.locator(f"#checkpoints tr[data-checkpoint='{saved['sampler']}']")
    row.locator("input[name=adapter_name]").fill("chat-bot")
    row.get_by_role("button", name="Publish as adapter version").click()
    page.wait_for_url(f"{url}?*")
    expect(page.locator("#notice")).to_contain_text(f"Published {saved['sampler']} as chat-bot@1")
    expect(row.locator(".published")).to_have_text("published as chat-bot@1")
    expect(row.locator("form")).to_have_count(0)

    with services.engine.connect() as conn:
        version = registry.resolve_version(conn, tenant_a.tenant_id, "chat-bot", 1)
        link = conn.execute(
            text("SELECT published_version_id FROM interactive_checkpoints WHERE path = :p"),
            {"p": saved["sampler"]},
        ).scalar_one()
    assert version.lineage["source"] == "interactive_session"
    assert version.lineage["session_id"] == saved["session"]
    assert version.lineage["model_id"] == saved["model"]
    assert link == version.id
    before = written(services)

    # The other tab still shows the form: its post is answered with the version it already is.
    old = stale.locator(f"#checkpoints tr[data-checkpoint='{saved['sampler']}']")
    old.locator("input[name=adapter_name]").fill("another-name")
    old.get_by_role("button", name="Publish as adapter version").click()
    stale.wait_for_url(f"{url}?*")
    expect(stale.locator("#notice")).to_contain_text(
        f"Nothing new was published: {saved['sampler']} was published already, as chat-bot@1"
    )
    assert written(services) == before
    row.locator(".published a").click()
    page.wait_for_url(f"{live_url}/adapters/chat-bot#v1")


def test_a_bad_name_or_a_checkpoint_not_of_this_session_is_refused_and_writes_nothing(
    live_url: str,
    page: Page,
    services: Services,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    base_id: str,
    saved: dict[str, str],
) -> None:
    other_base = make_base(services.engine, "other-base").id
    with services.engine.begin() as conn:  # an adapter of tenant-a's on another base
        conn.execute(
            text(
                "INSERT INTO adapters (id, tenant_id, name, base_model_id) "
                "VALUES ('adapter-x', :t, 'taken', :b)"
            ),
            {"t": tenant_a.tenant_id, "b": other_base},
        )
    add_sessions(services, tenant_a.tenant_id, "sess-sibling")
    add_model(services, "sess-sibling", tenant_a.tenant_id, base_id, "m-sibling")
    sibling = add_checkpoint(services, "sess-sibling", "m-sibling", tenant_a.tenant_id, "s")
    add_sessions(services, tenant_b.tenant_id, "sess-b")
    add_model(services, "sess-b", tenant_b.tenant_id, base_id, "m-b")
    theirs = add_checkpoint(services, "sess-b", "m-b", tenant_b.tenant_id, "s")
    before = written(services)

    sign_in(page, live_url, tenant_a.admin)
    url = f"{live_url}/sessions/{saved['session']}"
    for name, status, said in [
        ("Bad Name!", 400, "adapter name 'Bad Name!': use letters, digits, '.', '_' or '-'"),
        ("taken", 409, "adapter 'taken' exists for another base model"),
    ]:
        page.goto(url)
        row = page.locator(f"#checkpoints tr[data-checkpoint='{saved['sampler']}']")
        row.locator("input[name=adapter_name]").fill(name)
        with page.expect_navigation() as answered:
            row.get_by_role("button", name="Publish as adapter version").click()
        assert answered.value is not None and answered.value.status == status, name
        expect(page.locator("#notice")).to_contain_text(f"No version was published: {said}")
        expect(row.locator("input[name=adapter_name]")).to_have_value(name)  # as typed
        assert written(services) == before, name

    token = _csrf(page)
    for path in (sibling, theirs, "tinker://m-none/sampler_weights/x"):
        refused = page.request.post(
            f"{url}/publish",
            form={"csrf_token": token, "checkpoint": path, "adapter_name": "fine"},
            max_redirects=0,
        )
        assert refused.status == 404, path
        assert f"no model of this session saved weights at '{path}'" in _text(refused), path
    assert written(services) == before


def test_an_export_encrypted_to_its_owners_keys_is_marked_and_offers_no_publish_form(
    live_url: str,
    page: Page,
    services: Services,
    tenant_a: TenantKeys,
    saved: dict[str, str],
    peft_adapter: Path,
) -> None:
    tenant, model = tenant_a.tenant_id, saved["model"]
    sealed_files = {"adapter_config.json.age": {"size": 9, "sha256": "ab"}}
    sealed = add_checkpoint(
        services,
        saved["session"],
        model,
        tenant,
        "sealed",
        kind="external",
        files=json.dumps(sealed_files),
    )
    plain = add_checkpoint(
        services,
        saved["session"],
        model,
        tenant,
        "plain",
        kind="external",
        adapter_dir=peft_adapter,
        files=json.dumps({"adapter_config.json": {"size": 9, "sha256": "ab"}}),
    )
    sign_in(page, live_url, tenant_a.member)
    page.goto(f"{live_url}/sessions/{saved['session']}")
    rows = _table(page, "#checkpoints", "checkpoint")
    assert rows[sealed][1] == "external (encrypted)"
    assert "the platform cannot read it to publish" in rows[sealed][-1]
    assert rows[plain][1] == "external"
    row = page.locator(f"#checkpoints tr[data-checkpoint='{sealed}']")
    expect(row.locator("form")).to_have_count(0)
    # The unencrypted export publishes as any sampler's weights do.
    row = page.locator(f"#checkpoints tr[data-checkpoint='{plain}']")
    row.locator("input[name=adapter_name]").fill("exported")
    row.get_by_role("button", name="Publish as adapter version").click()
    expect(page.locator("#notice")).to_contain_text(f"Published {plain} as exported@1")


def test_a_reader_sees_no_publish_form_and_its_forged_post_is_refused(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, saved: dict[str, str]
) -> None:
    before = written(services)
    sign_in(page, live_url, tenant_a.reader)
    page.goto(f"{live_url}/sessions/{saved['session']}")
    expect(page.locator("#checkpoints tbody tr")).to_have_count(2)
    expect(page.locator(".publish-form")).to_have_count(0)
    expect(page.locator("#checkpoints .published").first).to_have_text("not published")
    refused = page.request.post(
        f"{live_url}/sessions/{saved['session']}/publish",
        form={"csrf_token": _csrf(page), "checkpoint": saved["sampler"], "adapter_name": "x"},
        max_redirects=0,
    )
    assert refused.status == 403 and WRITERS_ONLY in _text(refused)
    assert written(services) == before


def test_another_tenants_session_and_its_publish_post_are_not_found(
    live_url: str, page: Page, services: Services, tenant_b: TenantKeys, saved: dict[str, str]
) -> None:
    before = written(services)
    sign_in(page, live_url, tenant_b.admin)
    page.goto(f"{live_url}/sessions")
    expect(page.locator("#sessions-empty")).to_be_visible()  # tenant-a's session not listed
    token = _csrf(page)
    for path in (f"/sessions/{saved['session']}", f"/sessions?after={saved['session']}"):
        shown = page.goto(f"{live_url}{path}")
        assert shown is not None and shown.status == 404, path
        expect(page.locator("#not-found")).to_be_visible()
    refused = page.request.post(
        f"{live_url}/sessions/{saved['session']}/publish",
        form={"csrf_token": token, "checkpoint": saved["sampler"], "adapter_name": "x"},
        max_redirects=0,
    )
    assert refused.status == 404
    assert written(services) == before


def test_a_publish_post_without_the_pages_csrf_token_is_refused(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, saved: dict[str, str]
) -> None:
    before = written(services)
    sign_in(page, live_url, tenant_a.admin)
    form: dict[str, str | float | bool] = {"checkpoint": saved["sampler"], "adapter_name": "c"}
    target = f"{live_url}/sessions/{saved['session']}/publish"
    refused = page.request.post(target, form=form, max_redirects=0)
    assert refused.status == 403 and "security token (CSRF)" in _text(refused)
    wrong = page.request.post(target, form={"csrf_token": "0" * 64, **form}, max_redirects=0)
    assert wrong.status == 403
    assert written(services) == before


def test_the_queue_page_shows_each_interactive_executor_and_the_calls_waiting_on_its_base(
    live_url: str,
    page: Page,
    services: Services,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    base_id: str,
) -> None:
    """An operator sees every executor, the models it holds and each base's waiting calls; a
    tenant sees the executors with only its own models counted, and no other tenant's calls."""
    with services.engine.begin() as conn:
        for name, claims in (("exec-live", 17), ("exec-gone", 3)):
            trainers.report(
                conn,
                trainers.TrainerReport(
                    name,
                    "gpu-node-2",
                    7,
                    "cuda:0 NVIDIA H100",
                    resident_base="tiny-llama",
                    claims=claims,
                    kind="interactive",
                ),
            )
        conn.execute(
            text(
                "UPDATE trainers SET last_heartbeat_at = now() - interval '1 hour' "
                "WHERE id = 'exec-gone'"
            )
        )
    add_sessions(services, tenant_a.tenant_id, "sess-a")
    add_sessions(services, tenant_b.tenant_id, "sess-b")
    for model, session, tenant in (
        ("m-a1", "sess-a", tenant_a.tenant_id),
        ("m-a2", "sess-a", tenant_a.tenant_id),
        ("m-b1", "sess-b", tenant_b.tenant_id),
    ):
        add_model(services, session, tenant, base_id, model, held_by="exec-live")
        add_calls(
            services, model, tenant, base_id, [("forward", "completed"), ("forward", "pending")]
        )

    sign_in(page, live_url, tenant_a.admin)  # an operator's admin
    page.goto(f"{live_url}/queue")
    executors = _table(page, "#executors", "executor")
    assert list(executors) == ["exec-live", "exec-gone"]  # alive first
    assert executors["exec-live"][1:7] == [
        "alive",
        "gpu-node-2",
        "cuda:0 NVIDIA H100",
        "tiny-llama",
        "3",
        "17",
    ]
    assert executors["exec-gone"][1] == "gone" and executors["exec-gone"][5] == "0"
    backlog = _table(page, "#interactive-backlog", "base")
    assert backlog["tiny-llama"][1] == "3" and backlog["tiny-llama"][3] == "1"
    expect(page.locator("#trainers")).to_have_count(0)  # executors are not job trainers
    expect(page.locator("#trainers-empty")).to_be_visible()

    page.context.clear_cookies()
    sign_in(page, live_url, tenant_b.member)
    page.goto(f"{live_url}/queue")
    executors = _table(page, "#executors", "executor")
    assert executors["exec-live"][5] == "1"  # its own model only
    expect(page.locator("#executors thead")).to_contain_text("Your models held")
    expect(page.locator("#interactive-backlog")).to_have_count(0)


def test_a_sessions_page_says_its_calls_wait_on_a_base_no_executor_holds(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, base_id: str
) -> None:
    """As the SDK's polls say it (paused for capacity): calls pending on a base that no live
    executor holds wait until one starts; once one reports, the page no longer says so."""
    tenant = tenant_a.tenant_id
    add_sessions(services, tenant, "sess-w", silent_s=5)
    model = add_model(services, "sess-w", tenant, base_id, "m-waits")
    add_calls(services, model, tenant, base_id, [("create_model", "pending")])
    idle = add_model(services, "sess-w", tenant, make_base(services.engine, "idle").id, "m-done")
    add_calls(services, idle, tenant, base_id, [("create_model", "completed")])
    sign_in(page, live_url, tenant_a.member)
    page.goto(f"{live_url}/sessions/sess-w")
    expect(page.locator("#unserved")).to_contain_text(
        "Calls wait: no interactive executor holds tiny-llama now"
    )
    expect(page.locator("#unserved")).to_contain_text("loraforge interactive --base tiny-llama")
    expect(page.locator("#unserved")).not_to_contain_text("idle")  # nothing of it waits
    with services.engine.begin() as conn:
        trainers.report(
            conn,
            trainers.TrainerReport(
                "exec-1", "h", 1, "cpu", resident_base="tiny-llama", kind="interactive"
            ),
        )
    page.reload()
    expect(page.locator("#models")).to_be_visible()
    expect(page.locator("#unserved")).to_have_count(0)


def add_metered_calls(
    services: Services,
    model_id: str,
    tenant_id: str,
    base_id: str,
    calls: list[tuple[str, str, dict[str, int] | None]],
) -> None:
    """The model's calls in order, each `(kind, status, usage)`: `usage` as an executor's
    `finish` records it (`control_plane.usage.call_usage`), each finished call finished now."""
    add_calls(services, model_id, tenant_id, base_id, [(kind, status) for kind, status, _ in calls])
    with services.engine.begin() as conn:
        for seq, (*_, used) in enumerate(calls):
            conn.execute(
                text(
                    "UPDATE interactive_calls SET usage = :usage, finished_at = CASE "
                    "WHEN status IN ('completed', 'failed') THEN now() END WHERE id = :id"
                ),
                {"usage": json.dumps(used) if used else None, "id": f"fut-{model_id}-{seq}"},
            )


def _usage_total(page: Page) -> list[str]:
    """The `#usage` table's total row, its cells' text as shown."""
    return list(
        page.locator("#usage-total").evaluate(
            "r => Array.from(r.cells).map(c => c.innerText.replace(/\\s+/g, ' ').trim())"
        )
    )


@pytest.fixture
def metered(
    services: Services, tenant_a: TenantKeys, tenant_b: TenantKeys, base_id: str
) -> dict[str, str]:
    """A session of tenant-a's whose training model trained, evaluated and saved twice and
    whose sampler sampled twice, with calls failed, pending, running or unmetered beside them
    (and one failed call carrying a usage no executor writes, which must not count), and a
    model that used nothing; another session of tenant-a's and one of tenant-b's that used
    plenty, and a model of tenant-b's under tenant-a's session id (a row no API writes, which
    the page must not read either)."""
    tenant = tenant_a.tenant_id
    add_sessions(services, tenant, "sess-used", "sess-used-sibling", silent_s=5)
    train = add_model(services, "sess-used", tenant, base_id, "m-train", created_at=_ago(3))
    add_metered_calls(
        services,
        train,
        tenant,
        base_id,
        [
            ("create_model", "completed", None),
            ("forward_backward", "completed", {"training_tokens": 1200}),
            ("forward_backward", "completed", {"training_tokens": 2345}),
            ("forward", "completed", {"training_tokens": 300}),
            ("optim_step", "completed", None),
            ("forward_backward", "failed", {"training_tokens": 999_000}),
            ("save_weights_for_sampler", "completed", {"checkpoints": 1}),
            ("save_weights", "completed", {"checkpoints": 1}),
            ("forward_backward", "running", None),
        ],
    )
    sampler = add_model(
        services, "sess-used", tenant, base_id, "m-sample", kind="sampler", created_at=_ago(2)
    )
    add_metered_calls(
        services,
        sampler,
        tenant,
        base_id,
        [
            ("create_model", "completed", None),
            ("sample", "completed", {"prefill_tokens": 40, "sampled_tokens": 2500}),
            ("sample", "completed", {"prefill_tokens": 1000, "sampled_tokens": 512}),
            ("sample", "failed", None),
            ("sample", "pending", None),
        ],
    )
    idle = add_model(services, "sess-used", tenant, base_id, "m-idle", created_at=_ago(1))
    add_metered_calls(
        services,
        idle,
        tenant,
        base_id,
        [("create_model", "completed", None), ("forward_backward", "failed", None)],
    )
    sibling = add_model(services, "sess-used-sibling", tenant, base_id, "m-sibling")
    add_metered_calls(
        services,
        sibling,
        tenant,
        base_id,
        [
            ("forward_backward", "completed", {"training_tokens": 50_000}),
            ("sample", "completed", {"prefill_tokens": 7, "sampled_tokens": 9}),
            ("save_weights_for_sampler", "completed", {"checkpoints": 1}),
        ],
    )
    theirs = tenant_b.tenant_id
    add_sessions(services, theirs, "sess-b-used", silent_s=5)
    own = add_model(services, "sess-b-used", theirs, base_id, "m-b-own")
    add_metered_calls(
        services, own, theirs, base_id, [("forward", "completed", {"training_tokens": 70_000})]
    )
    stray = add_model(services, "sess-used", theirs, base_id, "m-b-stray")
    add_metered_calls(
        services,
        stray,
        theirs,
        base_id,
        [
            ("forward_backward", "completed", {"training_tokens": 900_000}),
            ("save_weights", "completed", {"checkpoints": 5}),
        ],
    )
    return {"session": "sess-used", "train": train, "sampler": sampler, "idle": idle}


def test_a_sessions_usage_is_its_models_completed_calls_metered_and_their_total(
    live_url: str,
    page: Page,
    monkeypatch: pytest.MonkeyPatch,
    tenant_a: TenantKeys,
    metered: dict[str, str],
) -> None:
    """Per model that used something (oldest first), its completed calls' training, prompt and
    sampled tokens and checkpoints, with thousands separators, and the session's total: a
    failed call, another session's and another tenant's are not counted; a model that used
    nothing is left out. With fewer models listed than used something, the total still counts
    them all."""
    sign_in(page, live_url, tenant_a.reader)
    page.goto(f"{live_url}/sessions/{metered['session']}")
    expect(page.locator("#usage-rule")).to_have_text(
        "Metered when each call is answered; failed calls are not counted; a sample's prompt "
        "counts once a request. The SDK's AdminClient.get_billing_usage reads the same by hour."
    )
    expect(page.locator("#usage-empty")).to_have_count(0)
    used = _table(page, "#usage", "model")
    # Cells: id, kind, base, training tokens, prompt tokens, sampled tokens, checkpoints.
    assert used == {
        metered["train"]: [metered["train"], "training", "tiny-llama", "3,845", "0", "0", "2"],
        metered["sampler"]: [
            metered["sampler"],
            "sampler",
            "tiny-llama",
            "0",
            "1,040",
            "3,012",
            "0",
        ],
    }
    assert list(used) == [metered["train"], metered["sampler"]]  # oldest first
    assert _usage_total(page) == ["Session total", "3,845", "1,040", "3,012", "2"]
    expect(page.locator("#more-usage")).to_have_count(0)
    # The models table still lists the model that used nothing, and not tenant-b's.
    assert list(_table(page, "#models", "model")) == [
        metered["train"],
        metered["sampler"],
        metered["idle"],
    ]

    monkeypatch.setattr("control_plane.dashboard.routes.interactive.MODELS_SHOWN", 1)
    page.reload()
    assert list(_table(page, "#usage", "model")) == [metered["train"]]
    assert _usage_total(page) == ["Session total", "3,845", "1,040", "3,012", "2"]
    expect(page.locator("#more-usage")).to_have_text(
        "Only the first 1 models are shown; the session total counts them all."
    )


def test_a_sessions_usage_reads_as_the_billing_report_and_each_tenant_sees_its_own(
    live_url: str,
    page: Page,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    metered: dict[str, str],
) -> None:
    """The sibling session's page counts what `GET /api/v1/billing/usage/events` reports for
    it; tenant-b's page counts its own session's calls only."""
    sign_in(page, live_url, tenant_a.reader)
    page.goto(f"{live_url}/sessions/sess-used-sibling")
    assert _table(page, "#usage", "model") == {
        "m-sibling": ["m-sibling", "training", "tiny-llama", "50,000", "7", "9", "1"]
    }
    assert _usage_total(page) == ["Session total", "50,000", "7", "9", "1"]
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    report = page.request.get(
        f"{live_url}/api/v1/billing/usage/events",
        params={
            "starting_on": (hour - timedelta(hours=1)).isoformat(),
            "ending_before": (hour + timedelta(hours=2)).isoformat(),
        },
        headers=tenant_a.headers("reader"),
    )
    assert report.status == 200, report.text()
    reported: dict[str, int] = {}
    for event in report.json()["data"]:
        if event["session_id"] == "sess-used-sibling":
            info = event["event_info"]
            amount = info["count"] if info["type"] == "checkpoint" else info["token_count"]
            reported[info["type"]] = reported.get(info["type"], 0) + int(amount)
    assert reported == {
        "training": 50_000,
        "sampling_prefill": 7,
        "sampling_sample": 9,
        "checkpoint": 1,
    }

    page.context.clear_cookies()
    sign_in(page, live_url, tenant_b.reader)
    page.goto(f"{live_url}/sessions/sess-b-used")
    assert _table(page, "#usage", "model") == {
        "m-b-own": ["m-b-own", "training", "tiny-llama", "70,000", "0", "0", "0"]
    }
    assert _usage_total(page) == ["Session total", "70,000", "0", "0", "0"]


def test_a_session_with_nothing_metered_says_so(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, base_id: str
) -> None:
    """Calls failed, pending, running or of kinds not metered: the usage section's empty state,
    no table; another session's metered calls change nothing."""
    tenant = tenant_a.tenant_id
    add_sessions(services, tenant, "sess-quiet", "sess-loud", silent_s=5)
    quiet = add_model(services, "sess-quiet", tenant, base_id, "m-quiet")
    add_metered_calls(
        services,
        quiet,
        tenant,
        base_id,
        [
            ("create_model", "completed", None),
            ("forward_backward", "failed", None),
            ("optim_step", "completed", None),
            ("forward_backward", "running", None),
            ("sample", "pending", None),
        ],
    )
    loud = add_model(services, "sess-loud", tenant, base_id, "m-loud")
    add_metered_calls(
        services, loud, tenant, base_id, [("forward", "completed", {"training_tokens": 12})]
    )
    sign_in(page, live_url, tenant_a.reader)
    page.goto(f"{live_url}/sessions/sess-quiet")
    expect(page.locator("#usage-empty")).to_contain_text("Nothing metered yet")
    expect(page.locator("#usage")).to_have_count(0)
    expect(page.locator("#usage-rule")).to_be_visible()
    expect(page.locator("#models tbody tr")).to_have_count(1)


def test_a_sessions_page_downloads_its_timeline_as_a_perfetto_trace(
    live_url: str,
    page: Page,
    services: Services,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    base_id: str,
) -> None:
    from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import Trace, TrackEvent

    tenant = tenant_a.tenant_id
    add_sessions(services, tenant, "sess-traced")
    add_model(services, "sess-traced", tenant, base_id, "m-traced")
    add_calls(
        services,
        "m-traced",
        tenant,
        base_id,
        [("create_model", "completed"), ("forward_backward", "completed"), ("sample", "failed")],
    )
    with services.engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE interactive_calls SET claimed_by = 'executor-9', "
                "started_at = created_at + interval '10 milliseconds', "
                "finished_at = created_at + interval '300 milliseconds' "
                "WHERE model_id = 'm-traced'"
            )
        )
    sign_in(page, live_url, tenant_a.member)
    page.goto(f"{live_url}/sessions/sess-traced")
    with page.expect_download() as downloading:
        page.locator("#session-trace").click()
    download = downloading.value
    assert download.suggested_filename == "sess-traced.pftrace"
    trace = Trace.FromString(Path(download.path()).read_bytes())
    names = {
        p.track_descriptor.uuid: p.track_descriptor.name
        for p in trace.packet
        if p.HasField("track_descriptor")
    }
    model_track = next(u for u, n in names.items() if n == "training run m-traced")
    begun = [
        p.track_event.name
        for p in sorted(trace.packet, key=lambda p: p.timestamp)
        if p.track_event.type == TrackEvent.TYPE_SLICE_BEGIN
        and p.track_event.track_uuid == model_track
    ]
    assert begun == ["create_model", "forward_backward", "sample"]
    assert "session sess-traced" in names.values()
    # Another tenant's session has no trace to download.
    page.context.clear_cookies()
    sign_in(page, live_url, tenant_b.admin)
    refused = page.request.get(f"{live_url}/sessions/sess-traced/trace.pftrace")
    assert refused.status == 404
