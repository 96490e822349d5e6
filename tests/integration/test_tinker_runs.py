"""What a Tinker user does with the runs and weights of their sessions, through the official
`tinker` SDK's `RestClient` and `ServiceClient` against the API on a real socket: list and look
up training runs, checkpoints and sessions; resume a new run from a saved state
(`create_training_client_from_state[_with_optimizer]`) on the real executor; give checkpoints a
time to live, which the platform's periodic task honours; delete them. The files are in the
object store and the rows in PostgreSQL, checked on both sides. Another tenant, a reader, a bad
value and a path that names nothing are refused with their reason and nothing changed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
from sqlalchemy import Engine, bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from tinker import types

from control_plane import interactive_calls, interactive_runs, interactive_saves, trainers
from control_plane.services import Services
from control_plane.settings import Settings
from control_plane.storage import ObjectStore
from loraforge import tasks
from tests.api_harness import TenantKeys
from tests.factories import ask_call, interactive_model, interactive_session
from tests.tinker_harness import DATUM, sdk_service, tinker_settings

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return tinker_settings(tmp_path)


def _rest(url: str, key: str) -> tinker.RestClient:
    return tinker.RestClient(base_url=url, api_key="tml-" + key)


def _stored(store: ObjectStore, path_prefix: str) -> int:
    """The bytes under an object-store prefix."""
    total = 0
    for key in store.list_keys(path_prefix):
        info = store.head(key)
        assert info is not None
        total += info.size
    return total


def _prefix(engine: Engine, path: str) -> str | None:
    with engine.connect() as conn:
        found = conn.execute(
            text("SELECT storage_prefix FROM interactive_checkpoints WHERE path = :p"), {"p": path}
        ).scalar_one_or_none()
    return None if found is None else str(found)


def _loss(training: Any) -> float:
    return float(training.forward([DATUM], "cross_entropy").result(timeout=120).metrics["loss:sum"])


def test_a_run_resumes_from_its_saved_state_and_its_checkpoints_are_listed_expire_and_delete(
    services: Services, live_url: str, tenant_a: TenantKeys, executor: str
) -> None:
    """The SDK unmodified against the real executor on the tiny test base."""
    engine, store = services.engine, services.store
    with sdk_service(live_url, tenant_a.member) as service:
        training = service.create_lora_training_client(
            base_model=executor, rank=4, seed=0, user_metadata={"experiment": "resume"}
        ).result(timeout=120)
        for _ in range(2):
            training.forward_backward([DATUM], "cross_entropy").result(timeout=120)
            training.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=120)
        state = training.save_state("step-2", ttl_seconds=7200, user_metadata={"step": "2"})
        state = state.result(timeout=120).path
        sampler = training.save_weights_for_sampler("step-2").result(timeout=120).path
        trained_loss = _loss(training)
        rest = _rest(live_url, tenant_a.member)

        # What the weights were trained on: the SDK reads it to resume.
        info = rest.get_weights_info_by_tinker_path(state).result(timeout=30)
        assert (info.base_model, info.lora_rank, info.is_lora) == (executor, 4, True)

        # Resumed with its optimizer: a new run with the SDK's own id, the same weights (the
        # same loss), and the same next step as the original's.
        resumed = service.create_training_client_from_state_with_optimizer(state).result(
            timeout=120
        )
        assert resumed.model_id == f"{service.holder.get_session_id()}:train:1"
        assert resumed.get_info().lora_rank == 4
        assert _loss(resumed) == pytest.approx(trained_loss, rel=1e-5)
        weights_only = service.create_training_client_from_state(state).result(timeout=120)
        assert _loss(weights_only) == pytest.approx(trained_loss, rel=1e-5)
        steps = []
        for client in (training, resumed, weights_only):
            client.forward_backward([DATUM], "cross_entropy").result(timeout=120)
            client.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=120)
            steps.append(_loss(client))
        assert steps[1] == pytest.approx(steps[0], rel=1e-4)  # Adam's moments came with it
        assert steps[2] != pytest.approx(steps[0], rel=1e-4)  # a fresh optimizer steps elsewhere

        # The run and its checkpoints as the RestClient lists them, sizes as stored.
        run = rest.get_training_run(training.model_id).result(timeout=30)
        assert (run.base_model, run.lora_rank, run.model_owner) == (executor, 4, tenant_a.tenant_id)
        assert run.user_metadata == {"experiment": "resume"}
        assert run.last_checkpoint is not None and run.last_checkpoint.tinker_path == state
        assert run.last_sampler_checkpoint is not None
        assert run.last_sampler_checkpoint.tinker_path == sampler
        listed = rest.list_checkpoints(training.model_id).result(timeout=30).checkpoints
        by_path = {c.tinker_path: c for c in listed}
        assert set(by_path) == {state, sampler}
        assert by_path[state].checkpoint_type == "training"
        assert by_path[state].checkpoint_id == "weights/step-2"
        assert by_path[sampler].checkpoint_type == "sampler"
        assert by_path[state].user_metadata == {"step": "2"}
        assert by_path[sampler].user_metadata is None
        for path, saved in by_path.items():
            prefix = _prefix(engine, path)
            assert prefix is not None and saved.size_bytes == _stored(store, prefix) > 0
        # The state has optimizer moments besides the adapter: it is the larger.
        assert by_path[state].size_bytes > by_path[sampler].size_bytes  # type: ignore[operator]
        now = datetime.now(UTC)
        expires = by_path[state].expires_at
        assert expires is not None and abs(expires - (now + timedelta(hours=2))) < timedelta(
            minutes=1
        )
        assert by_path[sampler].expires_at is None
        runs = rest.list_training_runs(limit=2).result(timeout=30)
        assert runs.cursor.total_count == 3  # the original and the two resumed
        assert [r.training_run_id for r in runs.training_runs] == [
            weights_only.model_id,
            resumed.model_id,
        ]
        page = rest.list_user_checkpoints(limit=1, offset=1).result(timeout=30)
        assert page.cursor is not None and page.cursor.total_count == 2
        assert [c.tinker_path for c in page.checkpoints] == [state]  # newest first: the sampler
        session = rest.get_session(service.holder.get_session_id()).result(timeout=30)
        assert session.training_run_ids == [
            training.model_id,
            resumed.model_id,
            weights_only.model_id,
        ]
        assert service.holder.get_session_id() in rest.list_sessions().result(timeout=30).sessions

        # A time to live set later; and removed.
        rest.set_checkpoint_ttl_from_tinker_path(sampler, 3600).result(timeout=30)
        rest.set_checkpoint_ttl_from_tinker_path(state, None).result(timeout=30)
        listed = rest.list_checkpoints(training.model_id).result(timeout=30).checkpoints
        by_path = {c.tinker_path: c for c in listed}
        assert by_path[state].expires_at is None
        expires = by_path[sampler].expires_at
        assert expires is not None and timedelta(minutes=59) < expires - now < timedelta(
            hours=1, minutes=1
        )

        # The hour passes: the periodic task deletes the files, then the row.
        sampler_prefix = _prefix(engine, sampler)
        assert sampler_prefix is not None
        with engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE interactive_checkpoints SET expires_at = now() - interval '1 second' "
                    "WHERE path = :p"
                ),
                {"p": sampler},
            )
        assert tasks.expire_interactive_checkpoints.run() == 1
        assert store.list_keys(sampler_prefix) == [] and _prefix(engine, sampler) is None
        with pytest.raises(tinker.NotFoundError, match="step-2"):
            service.create_sampling_client(model_path=sampler).result(timeout=30)

        # Deleted by the user: files and row; resuming from it is refused, nothing made.
        state_prefix = _prefix(engine, state)
        assert state_prefix is not None
        rest.delete_checkpoint_from_tinker_path(state).result(timeout=30)
        assert store.list_keys(state_prefix) == [] and _prefix(engine, state) is None
        assert rest.list_checkpoints(training.model_id).result(timeout=30).checkpoints == []
        with pytest.raises(tinker.NotFoundError, match="step-2"):
            service.create_training_client_from_state(state).result(timeout=30)
        assert rest.list_training_runs().result(timeout=30).cursor.total_count == 3


def _saved(
    services: Services, tenant: str, model: str, kind: str, name: str, expires: str | None = None
) -> str:
    """A checkpoint of `model` with a file in the store, as an executor's save writes it."""
    with services.engine.connect() as conn:
        session = conn.execute(
            text("SELECT session_id FROM interactive_models WHERE id = :m"), {"m": model}
        ).scalar_one()
    call = interactive_calls.Call(
        "fut",
        model,
        tenant,
        session,
        "base",
        1,
        "save_weights" if kind == "state" else "save_weights_for_sampler",
        {},
        "training",
        {"rank": 4},
        None,
    )
    saved = interactive_saves.checkpoint_location(call, name)
    services.store.put_bytes(saved.prefix + "adapter_model.safetensors", b"w" * 100)
    with services.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO interactive_checkpoints (id, model_id, tenant_id, kind, name, path, "
                "storage_prefix, size_bytes, expires_at) VALUES (:id, :m, :t, :k, :n, :p, :pre, "
                "100, CAST(:exp AS timestamptz))"
            ),
            {
                "id": f"ickpt-{model}-{kind}-{name}",
                "m": model,
                "t": tenant,
                "k": kind,
                "n": name,
                "p": saved.path,
                "pre": saved.prefix,
                "exp": expires,
            },
        )
    return saved.path


def _state(engine: Engine) -> tuple[Any, ...]:
    with engine.connect() as conn:
        return tuple(
            conn.execute(
                text(
                    "SELECT (SELECT count(*) FROM interactive_models), "
                    "(SELECT count(*) FROM interactive_calls), "
                    "(SELECT array_agg(path || ':' || coalesce(expires_at::text, '-') ORDER BY path)"
                    " FROM interactive_checkpoints)"
                )
            ).one()
        )


def test_runs_are_the_tenants_own_and_refusals_change_nothing(
    services: Services, live_url: str, tenant_a: TenantKeys, tenant_b: TenantKeys, base_name: str
) -> None:
    engine, store = services.engine, services.store
    base_id = _base_id(engine, base_name)
    session = interactive_session(engine, tenant_a.tenant_id, "isess-a")
    model = interactive_model(engine, session, tenant_a.tenant_id, base_id, "imdl-a")
    state = _saved(services, tenant_a.tenant_id, model, "state", "s1")
    _saved(services, tenant_a.tenant_id, model, "sampler", "w1")
    prefix = _prefix(engine, state)
    assert prefix is not None
    before = _state(engine)

    other = _rest(live_url, tenant_b.member)
    assert other.list_training_runs().result(timeout=30).cursor.total_count == 0
    assert other.list_user_checkpoints().result(timeout=30).checkpoints == []
    assert other.list_sessions().result(timeout=30).sessions == []
    for ask in (
        lambda: other.get_training_run(model),
        lambda: other.list_checkpoints(model),
        lambda: other.get_weights_info_by_tinker_path(state),
        lambda: other.delete_checkpoint_from_tinker_path(state),
        lambda: other.set_checkpoint_ttl_from_tinker_path(state, 3600),
        lambda: other.get_session(session),
    ):
        with pytest.raises(tinker.NotFoundError):
            ask().result(timeout=30)
    with (
        sdk_service(live_url, tenant_b.member) as service,
        pytest.raises(tinker.NotFoundError, match="s1"),
    ):
        service.create_training_client_from_state(state).result(timeout=30)

    # A reader looks, and changes nothing.
    reader = _rest(live_url, tenant_a.reader)
    assert [
        r.training_run_id for r in reader.list_training_runs().result(timeout=30).training_runs
    ] == [model]
    assert len(reader.list_checkpoints(model).result(timeout=30).checkpoints) == 2
    for ask in (
        lambda: reader.delete_checkpoint_from_tinker_path(state),
        lambda: reader.set_checkpoint_ttl_from_tinker_path(state, 3600),
    ):
        with pytest.raises(tinker.PermissionDeniedError):
            ask().result(timeout=30)

    # Bad values: 400 naming the field; paths that name nothing: 404 naming them.
    headers = {"X-API-Key": "tml-" + tenant_a.member}
    with httpx.Client(base_url=live_url + "/api/v1", headers=headers, timeout=30) as http:
        ttl = f"/training_runs/{model}/checkpoints/weights/s1/ttl"
        for bad in (60, 11 * 365 * 24 * 3600, True, "soon"):
            refused = http.put(ttl, json={"ttl_seconds": bad})
            assert refused.status_code == 400 and "ttl_seconds" in refused.text, refused.text
        assert http.get("/training_runs", params={"project_id": "p"}).status_code == 400
        assert http.get("/training_runs", params={"limit": 0}).status_code == 400
        missing = http.delete(f"/training_runs/{model}/checkpoints/other_weights/s1")
        assert missing.status_code == 404 and "weights/<name>" in missing.text
        missing = http.delete(f"/training_runs/{model}/checkpoints/weights/nope")
        assert missing.status_code == 404 and "nope" in missing.text
        both = http.post(
            "/load_weights",
            json={
                "model_id": model,
                "session_id": session,
                "model_seq_id": 1,
                "path": state,
                "optimizer": True,
            },
        )
        assert both.status_code == 400 and "not both" in both.text
        save = http.post("/save_weights", json={"model_id": model, "path": "s2", "ttl_seconds": 10})
        assert save.status_code == 400 and "ttl_seconds" in save.text
        # Resuming on a base no executor holds: refused, naming it.
        resume = http.post(
            "/load_weights",
            json={"session_id": session, "model_seq_id": 7, "path": state, "optimizer": True},
        )
        assert resume.status_code == 400 and "no interactive executor" in resume.text
    assert _state(engine) == before
    assert store.list_keys(prefix) != []


def _base_id(engine: Engine, name: str) -> str:
    with engine.connect() as conn:
        return str(
            conn.execute(
                text("SELECT id FROM base_models WHERE name = :n"), {"n": name}
            ).scalar_one()
        )


def test_a_resume_sent_again_is_one_run_and_one_future(
    services: Services, live_url: str, tenant_a: TenantKeys, base_name: str
) -> None:
    """The SDK resends a request whose answer it lost: the same run and future, not two."""
    engine = services.engine
    base_id = _base_id(engine, base_name)
    session = interactive_session(engine, tenant_a.tenant_id, "isess-resend")
    model = interactive_model(engine, session, tenant_a.tenant_id, base_id, "imdl-resend")
    state = _saved(services, tenant_a.tenant_id, model, "state", "s1")
    with engine.begin() as conn:
        trainers.report(
            conn,
            trainers.TrainerReport(
                "exec-1", "h", 1, "cpu", resident_base=base_name, kind="interactive"
            ),
        )
    body = {
        "session_id": session,
        "model_seq_id": 3,
        "path": state,
        "optimizer": False,
        "user_metadata": {"k": "v"},
    }
    headers = {"X-API-Key": "tml-" + tenant_a.member}
    with httpx.Client(base_url=live_url + "/api/v1", headers=headers, timeout=30) as http:
        first = http.post("/load_weights", json=body).json()
        again = http.post("/load_weights", json=body).json()
    assert first == again and first["model_id"] == f"{session}:train:3"
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT m.lora_config, m.user_metadata, m.next_seq, c.seq, c.kind, c.request "
                "FROM interactive_models m JOIN interactive_calls c ON c.model_id = m.id "
                "WHERE m.id = :m"
            ),
            {"m": first["model_id"]},
        ).all()
    assert len(row) == 1
    lora, metadata, next_seq, seq, kind, request = row[0]
    assert (lora["rank"], metadata, next_seq, seq, kind) == (4, {"k": "v"}, 1, 0, "load_weights")
    assert request["path"] == state and request["optimizer"] is False


def test_the_expiry_pass_deletes_only_what_expired_in_batches(
    services: Services, tenant_a: TenantKeys, base_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, store = services.engine, services.store
    monkeypatch.setattr(interactive_runs, "EXPIRE_BATCH", 4)
    base_id = _base_id(engine, base_name)
    session = interactive_session(engine, tenant_a.tenant_id, "isess-expiry")
    model = interactive_model(engine, session, tenant_a.tenant_id, base_id, "imdl-expiry")
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    expired = [
        _saved(services, tenant_a.tenant_id, model, "state", f"old-{i}", past) for i in range(9)
    ]
    kept = [
        _saved(services, tenant_a.tenant_id, model, "state", "later", future),
        _saved(services, tenant_a.tenant_id, model, "sampler", "forever"),
    ]
    prefixes = {p: _prefix(engine, p) for p in expired + kept}
    assert interactive_runs.expire_checkpoints(engine, store) == 9  # three batches: 4, 4, 1
    for path in expired:
        assert _prefix(engine, path) is None and store.list_keys(str(prefixes[path])) == []
    for path in kept:
        assert _prefix(engine, path) is not None and store.list_keys(str(prefixes[path])) != []
    assert interactive_runs.expire_checkpoints(engine, store) == 0


def test_a_finished_calls_request_and_answer_are_let_go_after_the_retention(
    services: Services, live_url: str, tenant_a: TenantKeys, base_name: str
) -> None:
    """Kept an hour (the settings' default): what is older is emptied, the row stays, and a
    poll for it is told why; newer answers, waiting calls and failures' reasons are kept."""
    engine = services.engine
    base_id = _base_id(engine, base_name)
    session = interactive_session(engine, tenant_a.tenant_id, "isess-keep")
    model = interactive_model(engine, session, tenant_a.tenant_id, base_id, "imdl-keep")
    big = {"forward_backward_input": {"data": [{"tokens": list(range(5000))}]}}
    ages = {0: "2 hours", 1: "3 hours", 2: "10 minutes", 3: "90 minutes", 4: None}
    ids = {}
    for seq, age in ages.items():
        ids[seq] = ask_call(engine, model, tenant_a.tenant_id, base_id, "forward", seq, big)
        if age is None:
            continue  # still waiting
        status = "failed" if seq == 1 else "completed"
        with engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE interactive_calls SET status = :status, result = :result, "
                    "error = :error, finished_at = now() - CAST(:age AS interval) WHERE id = :id"
                ).bindparams(bindparam("result", type_=JSONB), bindparam("error", type_=JSONB)),
                {
                    "status": status,
                    "result": None if status == "failed" else {"logprobs": list(range(5000))},
                    "error": {"error": "bad shapes", "category": "user"}
                    if status == "failed"
                    else None,
                    "age": age,
                    "id": ids[seq],
                },
            )
    assert interactive_calls.forget_payloads(engine, 3600, batch=2) == 3  # batches of 2, 1
    with engine.connect() as conn:
        rows = {
            r.seq: r
            for r in conn.execute(
                text(
                    "SELECT seq, status, request, result, error, payload_dropped_at "
                    "FROM interactive_calls WHERE model_id = :m"
                ),
                {"m": model},
            )
        }
    for seq in (0, 1, 3):
        assert rows[seq].request == {} and rows[seq].result is None, seq
        assert rows[seq].payload_dropped_at is not None
    assert rows[1].status == "failed" and rows[1].error["error"] == "bad shapes"
    assert rows[2].request == big and rows[2].result["logprobs"][-1] == 4999
    assert rows[4].request == big and rows[4].status == "pending"
    assert rows[2].payload_dropped_at is None and rows[4].payload_dropped_at is None
    headers = {"X-API-Key": "tml-" + tenant_a.member}
    with httpx.Client(base_url=live_url + "/api/v1", headers=headers, timeout=30) as http:
        gone = http.post("/retrieve_future", json={"request_id": ids[0]}).json()
        assert gone["category"] == "user" and "was let go" in gone["error"]
        kept = http.post("/retrieve_future", json={"request_id": ids[2]}).json()
        assert kept["logprobs"][-1] == 4999
    assert tasks.forget_interactive_call_payloads.run() == 0  # the task: nothing left to let go
