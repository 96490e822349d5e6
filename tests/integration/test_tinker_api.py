"""The Tinker-compatible API (`/api/v1`) driven by Thinking Machines' official `tinker` SDK on a
real socket and a real PostgreSQL: its handshake, a session, a LoRA model whose calls are future
rows in the model's order. Most tests answer each call themselves, with the executors' own claim
and finish (`control_plane.interactive_calls`), so that the SDK must read those answers as it
reads Tinker's (protobuf for a forward and a sample); the last runs the real executor on the
tiny test base. Tenants see only their own; a reader key, a bad body, an unloaded model and an
endpoint loraforge lacks are refused with their reason and nothing written."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, get_args

import httpx
import pytest
import tinker
from sqlalchemy import Engine, text
from tinker import types

from control_plane import interactive_calls, interactive_saves, trainers
from control_plane.api.tinker_schemas import LOSS_SETTINGS, LossFn
from control_plane.services import Services
from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.factories import (
    ask_call,
    interactive_model,
    interactive_session,
    make_base,
)
from tests.integration.test_metrics import scrape, value
from tests.tinker_harness import SEQUENCE, sdk_service, tinker_settings
from workers.interactive.losses import LOSSES

EXECUTOR = "test-executor"


def _executor_reports(engine: Engine, executor: str, base: str) -> None:
    """An executor holding `base` resident, as the registry hears of one."""
    with engine.begin() as conn:
        trainers.report(
            conn,
            trainers.TrainerReport(
                executor, "host", 1, "cpu", resident_base=base, kind="interactive"
            ),
        )


@pytest.fixture
def base_name(services: Services) -> str:
    """The harness's base, held by this module's stand-in executor (`_answer` answers for it)."""
    name = make_base(services.engine, "tiny-llama").name
    _executor_reports(services.engine, EXECUTOR, name)
    return name


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return tinker_settings(tmp_path)


pytestmark = pytest.mark.usefixtures("tinker_sdk_env")


@pytest.fixture
def http(live_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_url + "/api/v1", timeout=30) as client:
        yield client


def _rows(engine: Engine, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql), params)]


def _counts(engine: Engine) -> tuple[int, ...]:
    return _rows(
        engine,
        "SELECT (SELECT count(*) FROM interactive_sessions), "
        "(SELECT count(*) FROM interactive_models), (SELECT count(*) FROM interactive_calls)",
    )[0]


def _answer(
    engine: Engine,
    base_id: str,
    kind: str,
    result: dict[str, Any] | None = None,
    *,
    error: str | None = None,
    checkpoint: bool = False,
) -> interactive_calls.Call:
    """Take the next call on the base as an executor would, once the SDK has sent it, and
    answer it: `result`, or the user error `error`; with `checkpoint`, a save's weights are
    recorded under the name it asked for."""
    deadline = time.monotonic() + 20
    while True:
        with engine.begin() as conn:
            call = interactive_calls.claim_next(conn, EXECUTOR, base_id)
        if call is not None or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert call is not None and call.kind == kind, call
    with engine.begin() as conn:
        if error is not None:
            assert interactive_calls.fail(conn, call, EXECUTOR, error)
        else:
            saved = None
            if checkpoint:
                saved = interactive_saves.checkpoint_location(call, call.request["path"])
            assert interactive_calls.finish(conn, call, EXECUTOR, result or {}, checkpoint=saved)
    return call


def _base_id(engine: Engine, name: str) -> str:
    return str(_rows(engine, "SELECT id FROM base_models WHERE name = :n", n=name)[0][0])


def test_the_sdk_trains_saves_and_samples_through_future_rows_in_the_models_order(
    services: Services, live_url: str, tenant_a: TenantKeys, base_name: str
) -> None:
    """A member key drives the whole flow: the capabilities list the ready base; the create
    stays pending (try-again) until answered; forward_backward arrives as protobuf and its
    answer goes back as protobuf; a save for sampling gives a sampler whose sample is read
    the same way; a failed optim_step is the SDK's RequestFailedError, a user error; each
    call's seq follows the model's order, and the session's end unloads its model."""
    engine, base_id = services.engine, _base_id(services.engine, base_name)
    names = [
        m.model_name
        for m in tinker.RestClient(base_url=live_url, api_key="tml-" + tenant_a.member)
        .get_server_capabilities()
        .result(timeout=30)
        .supported_models
    ]
    assert names == [base_name]

    with sdk_service(live_url, tenant_a.member) as service:
        creating = service.create_lora_training_client(base_model=base_name, rank=4, seed=7)
        with pytest.raises(FutureTimeout):
            creating.result(timeout=1.5)  # pending: the SDK is told to try again
        [(session, sdk_version, tags)] = _rows(
            engine,
            "SELECT id, sdk_version, tags FROM interactive_sessions WHERE tenant_id = :t",
            t=tenant_a.tenant_id,
        )
        assert (sdk_version, tags) == (tinker.__version__, [])
        created = _answer(engine, base_id, "create_model", {"type": "create_model"})
        assert created.lora_config == {
            "rank": 4,
            "seed": 7,
            "train_mlp": True,
            "train_attn": True,
            "train_unembed": True,
        }
        training = creating.result(timeout=30)
        assert training.model_id == created.model_id
        info = training.get_info()
        assert (info.lora_rank, info.model_data.model_name) == (4, base_name)

        datum = types.Datum(
            model_input=types.ModelInput.from_ints([5, 6, 7]),
            loss_fn_inputs={"target_tokens": [6, 7, 8], "weights": [1.0, 1.0, 0.5]},
        )
        forward = training.forward_backward([datum], "cross_entropy")
        fb = _answer(
            engine,
            base_id,
            "forward_backward",
            {
                "loss_fn_output_type": "ArrayRecord",
                "loss_fn_outputs": [
                    {"logprobs": {"data": [-0.5, -1.0, -2.0], "dtype": "float32", "shape": [3]}}
                ],
                "metrics": {"loss:sum": 2.5},
            },
        )
        assert fb.request["forward_backward_input"]["data"][0]["model_input"] == {
            "chunks": [{"type": "encoded_text", "tokens": [5, 6, 7]}]
        }
        assert fb.request["forward_backward_input"]["loss_fn"] == "cross_entropy"
        output = forward.result(timeout=30)
        assert output.metrics == {"loss:sum": 2.5}
        assert output.loss_fn_outputs[0]["logprobs"].tolist() == [-0.5, -1.0, -2.0]

        saving = training.save_weights_for_sampler("step-1")
        saved = _answer(
            engine,
            base_id,
            "save_weights_for_sampler",
            {"path": f"tinker://{training.model_id}/sampler_weights/step-1"},
            checkpoint=True,
        )
        path = saving.result(timeout=30).path
        assert (saved.request["path"], path) == (
            "step-1",
            f"tinker://{training.model_id}/sampler_weights/step-1",
        )

        sampler = service.create_sampling_client(model_path=path)
        sampling = sampler.sample(
            types.ModelInput.from_ints([1, 2]), 2, types.SamplingParams(max_tokens=3)
        )
        sample = _answer(
            engine,
            base_id,
            "sample",
            {
                "sequences": [
                    {"tokens": [3, 4], "logprobs": [-0.1, -0.2], "stop_reason": "length"},
                    {"tokens": [9], "logprobs": None, "stop_reason": "stop"},
                ],
                "prompt_logprobs": None,
            },
        )
        assert (sample.model_kind, sample.model_path) == ("sampler", path)
        assert sample.request["num_samples"] == 2
        answered = sampling.result(timeout=30)
        assert [s.tokens for s in answered.sequences] == [[3, 4], [9]]
        assert [s.stop_reason for s in answered.sequences] == ["length", "stop"]
        assert answered.sequences[0].sequence_id == f"{sample.id}:0"

        # The cookbook's way: a save without a name comes back as a sampler on it.
        quick = training.save_weights_and_get_sampling_client()
        ephemeral = _answer(engine, base_id, "save_weights_for_sampler", {}, checkpoint=True)
        quick_sampler = quick.result(timeout=30)
        quick_sampling = quick_sampler.sample(
            types.ModelInput.from_ints([1]), 1, types.SamplingParams(max_tokens=1)
        )
        quick_sample = _answer(
            engine, base_id, "sample", {"sequences": [{"tokens": [2], "stop_reason": "length"}]}
        )
        assert quick_sample.model_id == ephemeral.request["sampling_session_id"]
        assert quick_sample.model_path == (
            f"tinker://{training.model_id}/sampler_weights/{ephemeral.request['path']}"
        )
        assert [s.tokens for s in quick_sampling.result(timeout=30).sequences] == [[2]]

        saving_state = training.save_state("state-1")
        state = f"tinker://{training.model_id}/weights/state-1"
        _answer(engine, base_id, "save_weights", {"path": state}, checkpoint=True)
        assert saving_state.result(timeout=30).path == state
        taken = httpx.post(
            live_url + "/api/v1/save_weights",
            json={"model_id": training.model_id, "path": "state-1"},
            headers={"X-API-Key": "tml-" + tenant_a.member},
        )
        assert (taken.status_code, taken.json()["error"]["param"]) == (400, "path")

        stepping = training.optim_step(types.AdamParams(learning_rate=1e-3))
        step = _answer(engine, base_id, "optim_step", error="learning rate refused")
        assert step.request["adam_params"]["learning_rate"] == 1e-3
        with pytest.raises(tinker.RequestFailedError) as failed:
            stepping.result(timeout=30)
        assert failed.value.category == types.RequestErrorCategory.User
        assert "learning rate refused" in str(failed.value)

    seqs = _rows(
        engine,
        "SELECT seq, kind, status FROM interactive_calls WHERE model_id = :m ORDER BY seq",
        m=training.model_id,
    )
    assert seqs == [
        (0, "create_model", "completed"),
        (1, "forward_backward", "completed"),
        (2, "save_weights_for_sampler", "completed"),
        (3, "save_weights_for_sampler", "completed"),
        (4, "save_weights", "completed"),
        (5, "optim_step", "failed"),
        (6, "unload_model", "pending"),  # the session's end (leaving `with`)
    ]
    assert _rows(
        engine,
        "SELECT count(*) FROM interactive_models WHERE session_id = :s AND unloaded_at IS NULL",
        s=session,
    ) == [(0,)]


def _session_and_model(http: httpx.Client, key: str, base: str) -> tuple[str, str, str]:
    headers = {"X-API-Key": "tml-" + key}
    session = http.post("/create_session", json={"tags": [], "sdk_version": "t"}, headers=headers)
    assert session.status_code == 200, session.text
    session_id = session.json()["session_id"]
    created = http.post(
        "/create_model",
        json={
            "session_id": session_id,
            "model_seq_id": 0,
            "base_model": base,
            "lora_config": {"rank": 8},
        },
        headers=headers,
    )
    assert created.status_code == 200, created.text
    return session_id, created.json()["model_id"], created.json()["request_id"]


def _optim(http: httpx.Client, key: str, model: str, seq: int | None) -> httpx.Response:
    body: dict[str, Any] = {"model_id": model, "adam_params": {"learning_rate": 0.01}}
    if seq is not None:
        body["seq_id"] = seq
    return http.post("/optim_step", json=body, headers={"X-API-Key": "tml-" + key})


def test_a_models_calls_take_its_next_seqs_and_a_request_sent_again_is_not_run_twice(
    services: Services, http: httpx.Client, tenant_a: TenantKeys, base_name: str
) -> None:
    _, model, create = _session_and_model(http, tenant_a.admin, base_name)
    first = _optim(http, tenant_a.admin, model, 1).json()["request_id"]
    second = _optim(http, tenant_a.admin, model, 2).json()["request_id"]
    assert _optim(http, tenant_a.admin, model, 1).json()["request_id"] == first
    unnumbered = _optim(http, tenant_a.admin, model, None).json()["request_id"]
    reused = http.post(
        "/save_weights",
        json={"model_id": model, "path": "x", "seq_id": 2},
        headers={"X-API-Key": "tml-" + tenant_a.admin},
    )
    assert reused.status_code == 400 and reused.json()["error"]["param"] == "seq_id"
    assert _rows(
        services.engine,
        "SELECT id, seq, kind, status FROM interactive_calls WHERE model_id = :m ORDER BY seq",
        m=model,
    ) == [
        (create, 0, "create_model", "pending"),
        (first, 1, "optim_step", "pending"),
        (second, 2, "optim_step", "pending"),
        (unnumbered, 3, "optim_step", "pending"),
    ]
    retrieved = http.post(
        "/retrieve_future",
        json={"request_id": first},
        headers={"Authorization": "Bearer " + tenant_a.member},
    )
    assert retrieved.json() == {"type": "try_again", "request_id": first, "queue_state": "active"}


def test_a_heartbeat_keeps_the_session_alive_and_its_end_unloads_its_models(
    services: Services, http: httpx.Client, tenant_a: TenantKeys, base_name: str
) -> None:
    session, model, _ = _session_and_model(http, tenant_a.member, base_name)
    key = {"X-API-Key": "tml-" + tenant_a.member}
    [(before,)] = _rows(services.engine, "SELECT last_heartbeat_at FROM interactive_sessions")
    beat = http.post("/session_heartbeat", json={"session_id": session}, headers=key)
    assert beat.json() == {"type": "session_heartbeat"}
    [(after,)] = _rows(services.engine, "SELECT last_heartbeat_at FROM interactive_sessions")
    assert after > before
    finished = http.post(
        f"/sessions/{session}/finish", json={"reason": {"type": "success"}}, headers=key
    )
    assert finished.status_code == 200, finished.text
    [unload] = finished.json()["unload_futures"]
    assert _rows(
        services.engine,
        "SELECT c.id, c.seq, c.kind, m.unloaded_at IS NOT NULL FROM interactive_calls c "
        "JOIN interactive_models m ON m.id = c.model_id WHERE c.seq > 0",
    ) == [(unload, 1, "unload_model", True)]
    assert model


def test_a_tenant_finds_none_of_anothers_sessions_models_or_futures(
    services: Services,
    http: httpx.Client,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    base_name: str,
) -> None:
    session, model, future = _session_and_model(http, tenant_a.admin, base_name)
    before = _counts(services.engine)
    b = {"X-API-Key": "tml-" + tenant_b.admin}
    for path, body, code in [
        ("/retrieve_future", {"request_id": future}, "future_not_found"),
        ("/cancel_future", {"request_id": future}, "future_not_found"),
        ("/get_info", {"model_id": model}, "model_not_found"),
        ("/optim_step", {"model_id": model, "adam_params": {}}, "model_not_found"),
        ("/unload_model", {"model_id": model}, "model_not_found"),
        ("/session_heartbeat", {"session_id": session}, "session_not_found"),
        (
            "/create_sampling_session",
            {"session_id": session, "sampling_session_seq_id": 0, "base_model": base_name},
            "session_not_found",
        ),
    ]:
        refused = http.post(path, json=body, headers=b)
        assert (refused.status_code, refused.json()["error"]["code"]) == (404, code), path
    assert http.get(f"/samplers/{model}", headers=b).status_code == 404
    assert _counts(services.engine) == before
    assert _rows(services.engine, "SELECT status FROM interactive_calls") == [("pending",)]


def _fwdbwd_proto(model: str, chunk: str = "encoded_text") -> bytes:
    from tinker.proto.request_conv import forward_backward_request_to_proto

    tokens: types.ModelInputChunk = types.EncodedTextChunk(tokens=[1, 2])
    if chunk == "image":
        tokens = types.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=4)
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=[
                types.Datum(
                    model_input=types.ModelInput(chunks=[tokens]),
                    loss_fn_inputs={"target_tokens": [2, 3]},
                )
            ],
            loss_fn="cross_entropy",
        ),
        model_id=model,
        seq_id=1,
    )
    return forward_backward_request_to_proto(request).SerializeToString()


def test_bad_bodies_are_refused_naming_the_field_and_nothing_is_written(
    services: Services, http: httpx.Client, tenant_a: TenantKeys, base_name: str
) -> None:
    session, model, _ = _session_and_model(http, tenant_a.admin, base_name)
    before = _counts(services.engine)
    key = {"X-API-Key": "tml-" + tenant_a.admin}
    proto = {**key, "Content-Type": "application/x-protobuf"}
    create = {"session_id": session, "model_seq_id": 1, "base_model": base_name}
    sample = {
        "sampling_session_id": model,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1]}]},
        "sampling_params": {},
    }
    for path, body, status, param in [
        ("/create_model", {**create, "lora_config": {"rank": 0}}, 400, "lora_config.rank"),
        ("/create_model", {**create, "base_model": "nope", "lora_config": {"rank": 2}}, 404, None),
        (
            "/create_model",
            {**create, "lora_config": {"rank": 2}, "optimizer_config": {"type": "dimuon"}},
            400,
            "optimizer_config.type",
        ),
        ("/optim_step", {"model_id": model, "optimizer_params": {}}, 400, "adam_params"),
        ("/asample", {**sample, "prompt_alt_tokens_k": 21}, 400, "prompt_alt_tokens_k"),
        (
            "/asample",
            {**sample, "target_prompt_logprobs": {"data": [1], "dtype": "int64", "shape": [1, 1]}},
            400,
            "target_prompt_logprobs",
        ),
        ("/asample", {**sample, "prompt": {"chunks": []}}, 400, "prompt.chunks"),
        # A seed torch cannot take: refused here, not failed by the executor as its own error.
        ("/asample", {**sample, "sampling_params": {"seed": -1}}, 400, "sampling_params.seed"),
        ("/asample", {**sample, "sampling_params": {"seed": 2**64}}, 400, "sampling_params.seed"),
        ("/save_weights", {"model_id": model, "path": "../up"}, 400, "path"),
        (
            "/load_weights",
            {"model_id": model, "path": "tinker://x/weights/y", "optimizer": True},
            404,
            None,
        ),
        (
            "/create_sampling_session",
            {"session_id": session, "sampling_session_seq_id": 0},
            400,
            None,
        ),
    ]:
        refused = http.post(path, json=body, headers=key)
        assert refused.status_code == status, (path, refused.text)
        if param is not None:
            assert refused.json()["error"]["param"] == param, (path, refused.text)
    for body, says in [
        (_fwdbwd_proto(model, "image"), "only encoded_text chunks"),
        (b"\xff\xff\xff", "cannot be read"),
        (_fwdbwd_proto(model)[:-3], "cannot be read"),
    ]:
        refused = http.post("/forward_backward", content=body, headers=proto)
        assert refused.status_code == 400 and says in refused.json()["error"]["message"], (
            refused.text
        )
    bad_loss = http.post(
        "/forward_backward",
        json={
            "model_id": model,
            "forward_backward_input": {
                "data": [{"model_input": {"chunks": [{"tokens": [1]}]}}],
                "loss_fn": "stable_reinforce",
            },
        },
        headers=key,
    )
    assert bad_loss.status_code == 400, bad_loss.text
    assert bad_loss.json()["error"]["param"] == "forward_backward_input.loss_fn"
    assert (
        "loss_fn 'stable_reinforce' is not supported here; use one of ['cispo', 'cross_entropy', "
        "'dro', 'gspo', 'importance_sampling', 'ppo'] (or forward_backward_custom"
    ) in bad_loss.json()["error"]["message"]
    bad_setting = http.post(
        "/forward_backward",
        json={
            "model_id": model,
            "forward_backward_input": {
                "data": [{"model_input": {"chunks": [{"tokens": [1]}]}}],
                "loss_fn": "ppo",
                "loss_fn_config": {"beta": 0.1},
            },
        },
        headers=key,
    )
    assert bad_setting.status_code == 400, bad_setting.text
    assert (
        "ppo's loss_fn_config reads ['clip_high_threshold', 'clip_low_threshold'], not ['beta']"
        in (bad_setting.json()["error"]["message"])
    )
    assert _counts(services.engine) == before
    # The losses the API takes are the ones the executor computes, with the settings it reads,
    # and a session's own (`custom`, its loss named by id).
    assert set(get_args(LossFn)) == set(LOSSES) | {"custom"}
    assert {name: frozenset(loss.defaults) for name, loss in LOSSES.items()} == {
        name: reads for name, reads in LOSS_SETTINGS.items() if name != "custom"
    }


def test_a_reader_key_or_an_unknown_one_cannot_open_a_session(
    services: Services, live_url: str, tenant_a: TenantKeys, base_name: str
) -> None:
    # Each client closed (`with`): an open one heartbeats its session past the server's life.
    with (
        sdk_service(live_url, tenant_a.reader) as reader,
        pytest.raises(tinker.PermissionDeniedError),
    ):
        reader.create_lora_training_client(base_model=base_name)
    with (
        sdk_service(live_url, "lf-not-a-key") as stranger,
        pytest.raises(tinker.AuthenticationError),
    ):
        stranger.create_lora_training_client(base_model=base_name)
    assert _counts(services.engine) == (0, 0, 0)


def test_an_unloaded_model_takes_no_call_and_an_endpoint_loraforge_lacks_says_so(
    services: Services, http: httpx.Client, tenant_a: TenantKeys, base_name: str
) -> None:
    _, model, _ = _session_and_model(http, tenant_a.admin, base_name)
    key = {"X-API-Key": "tml-" + tenant_a.admin}
    unload = http.post("/unload_model", json={"model_id": model}, headers=key)
    assert unload.status_code == 200, unload.text
    gone = _optim(http, tenant_a.admin, model, None)
    assert (gone.status_code, gone.json()["error"]["code"]) == (410, "model_unloaded")
    lacking = http.post("/copy_weights", json={}, headers=key)
    assert lacking.status_code == 404
    assert lacking.json()["error"]["code"] == "tinker_endpoint_not_supported"
    assert http.get("/healthz").json() == {"status": "ok"}
    dropped = http.post("/telemetry", json={"events": [{"event": "x"}]}, headers=key)
    assert dropped.json() == {"status": "accepted"}
    assert _rows(
        services.engine,
        "SELECT kind FROM interactive_calls WHERE model_id = :m ORDER BY seq",
        m=model,
    ) == [("create_model",), ("unload_model",)]


def test_the_sdk_fine_tunes_the_test_base_and_samples_it_on_a_real_executor(
    live_url: str, tenant_a: TenantKeys, executor: str
) -> None:
    """Unmodified SDK, real executor (torch + peft on CPU): the loss of a datum trained on
    falls, the weights saved for sampling sample, and the state saved is named where the SDK
    expects it."""
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(SEQUENCE[:-1]),
        loss_fn_inputs={"target_tokens": SEQUENCE[1:], "weights": [1.0] * (len(SEQUENCE) - 1)},
    )
    with sdk_service(live_url, tenant_a.member) as service:
        training = service.create_lora_training_client(base_model=executor, rank=4, seed=0)
        training = training.result(timeout=120)
        losses = []
        for _ in range(4):
            forward = training.forward_backward([datum], "cross_entropy")
            step = training.optim_step(types.AdamParams(learning_rate=1e-2))
            output = forward.result(timeout=120)
            assert output.loss_fn_outputs[0]["logprobs"].shape == [len(SEQUENCE) - 1]
            losses.append(output.metrics["loss:sum"])
            step.result(timeout=120)
        assert losses[-1] < losses[0], losses

        path = training.save_weights_for_sampler("e2e").result(timeout=120).path
        sampler = service.create_sampling_client(model_path=path)
        params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=1)
        sampled = sampler.sample(types.ModelInput.from_ints(SEQUENCE[:5]), 2, params)
        sequences = sampled.result(timeout=120).sequences
        assert len(sequences) == 2 and all(1 <= len(s.tokens) <= 4 for s in sequences)

        state = training.save_state("state-1").result(timeout=120).path
        assert state == f"tinker://{training.model_id}/weights/state-1"


def test_a_model_is_refused_on_a_base_no_live_executor_holds(
    services: Services, live_url: str, tenant_a: TenantKeys, base_name: str
) -> None:
    """Its calls would wait for ever: the create is refused at once, naming the base and the
    bases served, and the capabilities list only what a live executor holds."""
    engine = services.engine
    idle = make_base(engine, "idle-base").name
    rest = tinker.RestClient(base_url=live_url, api_key="tml-" + tenant_a.member)
    capable = rest.get_server_capabilities().result(timeout=30).supported_models
    assert [m.model_name for m in capable] == [base_name]
    before = _counts(engine)
    with sdk_service(live_url, tenant_a.member) as service:
        with pytest.raises(
            tinker.BadRequestError, match="no interactive executor holds base 'idle-base'"
        ) as refused:
            service.create_lora_training_client(base_model=idle, rank=4).result(timeout=30)
        assert base_name in str(refused.value)
        with pytest.raises(tinker.BadRequestError, match="idle-base"):
            service.create_sampling_client(base_model=idle).result(timeout=30)
    assert _counts(engine)[1:] == before[1:]  # no model, no call (the session is the SDK's)
    # The executor goes silent past a lease: its base is no longer offered nor taken.
    with engine.begin() as conn:
        conn.execute(text("UPDATE trainers SET last_heartbeat_at = now() - interval '1 hour'"))
    assert rest.get_server_capabilities().result(timeout=30).supported_models == []
    # A job trainer holding the base resident does not serve interactive calls either.
    with engine.begin() as conn:
        trainers.report(
            conn, trainers.TrainerReport("job-trainer", "h", 2, "cpu", resident_base=base_name)
        )
    assert rest.get_server_capabilities().result(timeout=30).supported_models == []


def test_a_scrape_shows_each_bases_waiting_calls_their_age_and_its_executors(
    services: Services, live_url: str, tenant_a: TenantKeys, base_name: str
) -> None:
    """What an operator is paged on: calls waiting with no executor, or waiting longer."""
    engine = services.engine
    base_id = _base_id(engine, base_name)
    idle_id = make_base(engine, "idle-base").id
    session = interactive_session(engine, tenant_a.tenant_id, "sess-metrics")
    served = interactive_model(engine, session, tenant_a.tenant_id, base_id, "imdl-served")
    stranded = interactive_model(engine, session, tenant_a.tenant_id, idle_id, "imdl-stranded")
    for seq in range(2):
        ask_call(engine, served, tenant_a.tenant_id, base_id, "forward", seq)
    ask_call(engine, stranded, tenant_a.tenant_id, idle_id, "forward", 0)
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE interactive_calls SET created_at = now() - interval '90 s' WHERE seq = 0")
        )
    samples = scrape(live_url)
    pending = {
        b: value(samples, "loraforge_interactive_calls_pending", base=b)
        for b in (base_name, "idle-base")
    }
    assert pending == {base_name: 2, "idle-base": 1}
    for base in (base_name, "idle-base"):
        age = value(samples, "loraforge_interactive_oldest_pending_seconds", base=base)
        assert age is not None and 90 <= age < 120
    assert value(samples, "loraforge_interactive_executors_alive", base=base_name) == 1
    assert value(samples, "loraforge_interactive_executors_alive", base="idle-base") == 0
    _answer(engine, base_id, "forward", {})
    _answer(engine, base_id, "forward", {})
    samples = scrape(live_url)
    assert value(samples, "loraforge_interactive_calls_pending", base=base_name) == 0
    assert value(samples, "loraforge_interactive_oldest_pending_seconds", base=base_name) == 0
    assert value(samples, "loraforge_interactive_executors_alive", base=base_name) == 1
