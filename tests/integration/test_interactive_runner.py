"""The interactive executor on real PostgreSQL, a real object store and the tiny test base: it
runs a model's calls in order and answers each future; saved weights land in the store before
their path is answered, and load, sample and publish from there; two executors share a base's
models and one that stops has its models' calls answered by the other."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import bindparam, text

from control_plane import registry, trainers
from control_plane.services import Services, build_services
from control_plane.settings import Settings
from control_plane.storage import LocalObjectStore
from tests.factories import (
    ask_call,
    interactive_model,
    interactive_session,
    make_tenant,
    register_test_base,
)
from tests.faults.tcp_proxy import CuttableProxy
from workers.interactive.engine import InteractiveEngine, InteractiveError
from workers.interactive.runner import InteractiveRunner
from workers.interactive.sample_run import More, OnAnswer
from workers.training.resident import ResidentBase

SEQUENCE = [5 + (i * 37) % 700 for i in range(24)]


def _tensor(values: list[Any], dtype: str) -> dict[str, Any]:
    return {"data": values, "dtype": dtype, "shape": [len(values)]}


def _tokens(tokens: list[int]) -> dict[str, Any]:
    return {"chunks": [{"type": "encoded_text", "tokens": tokens}]}


FB = {
    "forward_backward_input": {
        "loss_fn": "cross_entropy",
        "data": [
            {
                "model_input": _tokens(SEQUENCE[:-1]),
                "loss_fn_inputs": {
                    "target_tokens": _tensor(SEQUENCE[1:], "int64"),
                    "weights": _tensor([1.0] * (len(SEQUENCE) - 1), "float32"),
                },
            }
        ],
    }
}
STEP = {"adam_params": {"learning_rate": 5e-3}}
SAMPLE = {
    "prompt": _tokens(SEQUENCE[:6]),
    "num_samples": 1,
    "sampling_params": {"max_tokens": 5, "temperature": 0.0},
}


@pytest.fixture
def services(database_url: str, tmp_path: Path) -> Iterator[Services]:
    settings = Settings(home=tmp_path / "home", lease_seconds=30)
    built = build_services(
        settings, database_url=database_url, store=LocalObjectStore(tmp_path / "objects")
    )
    yield built
    built.close()


@pytest.fixture
def world(services: Services) -> dict[str, str]:
    tenant = make_tenant(services.engine, "acme")
    base = register_test_base(services.engine)
    session = interactive_session(services.engine, tenant.id, "sess-1")
    return {"tenant": tenant.id, "base": base.id, "session": session}


def _runner(
    services: Services,
    world: dict[str, str],
    name: str,
    tmp: Path,
    engine_factory: Callable[[ResidentBase], InteractiveEngine] = InteractiveEngine,
) -> InteractiveRunner:
    """An executor on the tiny base, in the trainer registry as `serve` puts it there (its
    models would be taken for a lost executor's otherwise)."""
    runner = InteractiveRunner(
        services,
        name,
        world["base"],
        work_dir=tmp / name,
        precision="fp32",
        engine_factory=engine_factory,
    )
    with services.engine.begin() as conn:
        trainers.report(conn, runner.snapshot())
    return runner


def _ask_in_order(
    services: Services, world: dict[str, str], model: str, calls: list[tuple[str, dict[str, Any]]]
) -> list[str]:
    """Each (kind, request) asked of `model` as its next calls, from seq 0: their ids."""
    return [
        ask_call(services.engine, model, world["tenant"], world["base"], kind, seq, request)
        for seq, (kind, request) in enumerate(calls)
    ]


def _answer(services: Services, call_id: str) -> tuple[str, Any]:
    with services.engine.connect() as conn:
        row = conn.execute(
            text("SELECT status, result, error FROM interactive_calls WHERE id = :id"),
            {"id": call_id},
        ).one()
    return row.status, row.result if row.status == "completed" else row.error


def _drain(runner: InteractiveRunner) -> int:
    """Run what can run: how many calls it answered (sample calls run several at once)."""
    before = runner.calls_run
    while runner.run_once():
        pass
    return runner.calls_run - before


def _loss(result: dict[str, Any]) -> float:
    return float(result["metrics"]["loss:sum"])


def test_a_model_trains_saves_samples_loads_and_is_published_from_its_checkpoint(
    services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    tenant, base, session = world["tenant"], world["base"], world["session"]
    model = interactive_model(services.engine, session, tenant, base, "imdl-a")
    calls = [("create_model", {})]
    for _ in range(4):
        calls += [("forward_backward", FB), ("optim_step", STEP)]
    calls += [
        ("forward", {"forward_input": FB["forward_backward_input"]}),
        ("save_weights_for_sampler", {"path": "first"}),
        ("save_weights", {"path": "state-1"}),
        ("sample", SAMPLE),
    ]
    ids = _ask_in_order(services, world, model, calls)
    runner = _runner(services, world, "exec-a", tmp_path)
    assert _drain(runner) == len(calls)
    answers = [_answer(services, call_id) for call_id in ids]
    assert all(status == "completed" for status, _ in answers), answers
    assert answers[0][1] == {"model_id": model, "type": "create_model"}
    losses = [_loss(answers[i][1]) for i in (1, 3, 5, 7, 9)]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.8 * losses[0], losses
    sampler_path, state_path = answers[10][1]["path"], answers[11][1]["path"]
    assert sampler_path == f"tinker://{model}/sampler_weights/first"
    assert state_path == f"tinker://{model}/weights/state-1"
    trained_tokens = answers[12][1]["sequences"][0]["tokens"]
    assert len(trained_tokens) == 5

    # The saved adapter is in the store, a PEFT directory; the state also has the optimizer.
    with services.engine.connect() as conn:
        saved = dict(
            conn.execute(text("SELECT path, storage_prefix FROM interactive_checkpoints"))
            .tuples()
            .all()
        )
    sampler_files = services.store.list_keys(saved[sampler_path])
    assert {k.rsplit("/", 1)[1] for k in sampler_files} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    assert len(services.store.list_keys(saved[state_path])) > len(sampler_files)

    # A sampler of the saved weights samples as the trained model did; the base alone differs.
    sampler = interactive_model(
        services.engine, session, tenant, base, "imdl-s", kind="sampler", model_path=sampler_path
    )
    plain = interactive_model(services.engine, session, tenant, base, "imdl-base", kind="sampler")
    from_saved = ask_call(services.engine, sampler, tenant, base, "sample", 0, SAMPLE)
    from_base = ask_call(services.engine, plain, tenant, base, "sample", 0, SAMPLE)
    # A new model loads the state and continues where the first one is.
    resumed = interactive_model(services.engine, session, tenant, base, "imdl-b")
    load = ask_call(
        services.engine,
        resumed,
        tenant,
        base,
        "load_weights",
        0,
        {"path": state_path, "optimizer": True},
    )
    again = ask_call(
        services.engine,
        resumed,
        tenant,
        base,
        "forward",
        1,
        {"forward_input": FB["forward_backward_input"]},
    )
    missing = ask_call(
        services.engine,
        resumed,
        tenant,
        base,
        "load_weights",
        2,
        {"path": f"tinker://{model}/weights/nope", "optimizer": False},
    )
    assert _drain(runner) == 5
    assert _answer(services, from_saved)[1]["sequences"][0]["tokens"] == trained_tokens
    assert _answer(services, from_base)[1]["sequences"][0]["tokens"] != trained_tokens
    assert _answer(services, load)[0] == "completed"
    assert _loss(_answer(services, again)[1]) == pytest.approx(_loss(answers[9][1]), rel=1e-4)
    status, error = _answer(services, missing)
    assert status == "failed" and error["category"] == "user" and "nope" in error["error"]

    # Published from the checkpoint: a registry version with the session as its lineage, once.
    first = registry.publish_checkpoint(
        services, tenant_id=tenant, path=sampler_path, adapter_name="chat"
    )
    assert first.created and first.version.model_id == "chat@1"
    assert first.version.lineage["session_id"] == session
    assert first.version.lineage["model_id"] == model
    assert first.version.lineage["lora"]["rank"] == 4
    assert first.version.job_id is None
    twice = registry.publish_checkpoint(
        services, tenant_id=tenant, path=sampler_path, adapter_name="other"
    )
    assert not twice.created and twice.version.id == first.version.id
    stored = services.store.list_keys(first.version.object_prefix)
    assert {k.rsplit("/", 1)[1] for k in stored} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
    }
    other_tenant = make_tenant(services.engine, "other")
    with pytest.raises(registry.CheckpointNotFoundError):
        registry.publish_checkpoint(
            services, tenant_id=other_tenant.id, path=sampler_path, adapter_name="x"
        )


def test_a_bad_call_fails_alone_and_the_model_goes_on(
    services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    tenant, base, session = world["tenant"], world["base"], world["session"]
    model = interactive_model(services.engine, session, tenant, base, "imdl-a")
    bad = {"forward_backward_input": {**FB["forward_backward_input"], "loss_fn": "hinge"}}
    calls = [("create_model", {}), ("forward_backward", bad), ("forward_backward", FB)]
    calls += [("save_weights", {"path": "a/b"}), ("unload_model", {})]
    ids = _ask_in_order(services, world, model, calls)
    runner = _runner(services, world, "exec-a", tmp_path)
    assert _drain(runner) == len(calls)
    answers = [_answer(services, call_id) for call_id in ids]
    assert answers[1][0] == "failed" and "cross_entropy" in answers[1][1]["error"]
    assert answers[1][1]["category"] == "user"
    assert answers[2][0] == "completed"
    assert answers[3][0] == "failed" and "'/'" in answers[3][1]["error"]
    assert answers[4] == ("completed", {"model_id": model, "type": "unload_model"})
    assert not runner.engine.has(model)
    with services.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM interactive_checkpoints")).scalar_one() == 0


def test_two_executors_share_a_bases_models_and_a_stopped_ones_calls_are_answered(
    services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    tenant, base, session = world["tenant"], world["base"], world["session"]
    first = _runner(services, world, "exec-a", tmp_path)
    second = _runner(services, world, "exec-b", tmp_path)
    models = [
        interactive_model(services.engine, session, tenant, base, f"imdl-{i}") for i in range(4)
    ]
    # Each executor creates two of the models: they are its own from then on.
    for model in models:
        ask_call(services.engine, model, tenant, base, "create_model", 0)
    assert first.run_once() and first.run_once()
    assert _drain(second) == 2
    stop = {name: threading.Event() for name in ("exec-a", "exec-b")}
    threads = {
        runner.executor_id: threading.Thread(
            target=runner.serve, args=(stop[runner.executor_id],), kwargs={"idle_wait": 0.2}
        )
        for runner in (first, second)
    }
    for thread in threads.values():
        thread.start()
    try:
        for model in models:
            ask_call(services.engine, model, tenant, base, "forward_backward", 1, FB)
        _wait_for(services, "SELECT count(*) = 8 FROM interactive_calls WHERE status = 'completed'")
        with services.engine.connect() as conn:
            ran = dict(
                conn.execute(
                    text("SELECT model_id, claimed_by FROM interactive_calls WHERE seq = 1")
                )
                .tuples()
                .all()
            )
            holders = dict(
                conn.execute(text("SELECT id, held_by FROM interactive_models")).tuples().all()
            )
        assert holders == dict.fromkeys(models[:2], "exec-a") | dict.fromkeys(models[2:], "exec-b")
        assert ran == holders, "each model's calls run where its weights are"
    finally:
        for event in stop.values():
            event.set()
        for thread in threads.values():
            thread.join(timeout=30)

    # exec-a dies (its presence ages past a lease) with a call asked of each of its models and
    # of exec-b's: exec-b runs its own, and its idle pass answers exec-a's with a server error.
    # (Stepped here, not served: a clean stop removes an executor's row at once.)
    with services.engine.begin() as conn:
        for runner in (first, second):
            trainers.report(conn, runner.snapshot())
    fresh = [
        interactive_model(services.engine, session, tenant, base, f"imdl-late-{i}")
        for i in range(4)
    ]
    for model in fresh:
        ask_call(services.engine, model, tenant, base, "create_model", 0)
    assert first.run_once() and first.run_once()
    assert _drain(second) == 2
    lost, kept = fresh[:2], fresh[2:]
    pending = [ask_call(services.engine, m, tenant, base, "forward_backward", 1, FB) for m in fresh]
    with services.engine.begin() as conn:
        conn.execute(
            text("UPDATE trainers SET last_heartbeat_at = now() - :ago WHERE id = 'exec-a'"),
            {"ago": timedelta(seconds=120)},
        )
    assert _drain(second) == 2  # its own models' calls; exec-a's are not its to take
    second.tidy()
    for model, call_id in zip(lost + kept, pending, strict=True):
        status, answer = _answer(services, call_id)
        if model in lost:
            assert status == "failed" and answer["category"] == "server", answer
            assert "save_state" in answer["error"]
        else:
            assert status == "completed"


def _wait_for(services: Services, query: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with services.engine.connect() as conn:
            if conn.execute(text(query)).scalar_one():
                return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {query}")


def test_a_silent_sessions_weights_leave_the_executor_on_its_idle_pass(
    services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    tenant, base, session = world["tenant"], world["base"], world["session"]
    other = interactive_session(services.engine, tenant, "sess-2")
    model = interactive_model(services.engine, session, tenant, base, "imdl-a")
    kept = interactive_model(services.engine, other, tenant, base, "imdl-b")
    for name in (model, kept):
        ask_call(services.engine, name, tenant, base, "create_model", 0)
    runner = _runner(services, world, "exec-a", tmp_path)
    assert _drain(runner) == 2
    runner.tidy()
    assert runner.engine.has(model) and runner.engine.has(kept)
    with services.engine.begin() as conn:
        conn.execute(
            text("UPDATE interactive_sessions SET last_heartbeat_at = now() - :ago WHERE id = :s"),
            {"ago": timedelta(hours=1), "s": session},
        )
    runner.tidy()
    assert not runner.engine.has(model) and runner.engine.has(kept)


@pytest.mark.faults
def test_a_serving_executor_waits_out_a_database_outage_and_answers_what_was_asked_meanwhile(
    services: Services,
    world: dict[str, str],
    proxied_url: str,
    proxy: CuttableProxy,
    tmp_path: Path,
) -> None:
    """The executor reaches PostgreSQL through a proxy that is cut for a few seconds while calls
    are asked (by the API, whose own connections are up): it keeps its model's weights, and
    answers those calls in their order once the database is back, still serving."""
    settings = Settings(home=tmp_path / "exec-home", lease_seconds=30)
    through = build_services(settings, database_url=proxied_url, store=services.store)
    runner = InteractiveRunner(
        through, "exec-a", world["base"], work_dir=tmp_path / "exec-a", precision="fp32"
    )
    stop = threading.Event()
    thread = threading.Thread(target=runner.serve, args=(stop,), kwargs={"idle_wait": 0.3})
    tenant, base = world["tenant"], world["base"]
    model = interactive_model(services.engine, world["session"], tenant, base, "imdl-a")
    try:
        thread.start()
        first = [
            ask_call(services.engine, model, tenant, base, kind, seq, request)
            for seq, (kind, request) in enumerate(
                [("create_model", {}), ("forward_backward", FB), ("optim_step", STEP)]
            )
        ]
        _wait_for(
            services, f"SELECT status = 'completed' FROM interactive_calls WHERE id = '{first[-1]}'"
        )
        proxy.cut()
        later = [
            ask_call(services.engine, model, tenant, base, kind, seq, request)
            for seq, (kind, request) in enumerate(
                [
                    ("forward_backward", FB),
                    ("optim_step", STEP),
                    ("forward", {"forward_input": FB["forward_backward_input"]}),
                ],
                start=3,
            )
        ]
        time.sleep(4)  # the executor's claims, its idle pass and its LISTEN all fail meanwhile
        assert thread.is_alive()
        proxy.restore()
        # answered in order: the last call over (not only taken) is every call over
        over = "status IN ('completed', 'failed')"
        _wait_for(services, f"SELECT {over} FROM interactive_calls WHERE id = '{later[-1]}'")
        assert thread.is_alive() and runner.engine.has(model)
        answers = [_answer(services, call) for call in first + later]
        assert [status for status, _ in answers] == ["completed"] * 6, answers
        # The weights the outage found are the ones trained on after it: the loss kept falling.
        assert _loss(answers[5][1]) < _loss(answers[3][1]) < _loss(answers[1][1])
    finally:
        stop.set()
        thread.join(60)
        through.close()


def test_an_executor_keeps_the_samplers_used_last_and_loads_a_dropped_one_again(
    services: Services, world: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    """An RL loop makes a sampler each iteration: the executor keeps two (set so here), the
    least recently sampled dropped first; one dropped samples as before once loaded again from
    the object store. The training model is never dropped."""
    settings = Settings(
        home=tmp_path / "exec-home", lease_seconds=30, interactive_samplers_per_executor=2
    )
    kept_two = build_services(settings, database_url=database_url, store=services.store)
    tenant, base, session = world["tenant"], world["base"], world["session"]
    model = interactive_model(services.engine, session, tenant, base, "imdl-a")
    calls: list[tuple[str, dict[str, Any]]] = [("create_model", {})]
    for step in range(3):
        calls += [
            ("forward_backward", FB),
            ("optim_step", STEP),
            ("save_weights_for_sampler", {"path": f"step-{step}"}),
        ]
    _ask_in_order(services, world, model, calls)
    runner = _runner(kept_two, world, "exec-a", tmp_path)
    try:
        assert _drain(runner) == len(calls)
        samplers = [
            interactive_model(
                services.engine,
                session,
                tenant,
                base,
                f"imdl-s{step}",
                kind="sampler",
                model_path=f"tinker://{model}/sampler_weights/step-{step}",
            )
            for step in range(3)
        ]
        sampled: list[list[int]] = []
        for seq, sampler in enumerate([*samplers, samplers[0]]):
            asked = ask_call(services.engine, sampler, tenant, base, "sample", seq // 3, SAMPLE)
            assert _drain(runner) == 1
            status, result = _answer(services, asked)
            assert status == "completed", result
            sampled.append(result["sequences"][0]["tokens"])
            loaded = set(runner.engine.loaded())
            assert model in loaded and len(loaded - {model}) <= 2, loaded
        # The third sampler dropped the first; sampled again, the first was loaded again.
        assert not runner.engine.has(samplers[1]) and runner.engine.has(samplers[0])
        assert runner.samplers_loaded == 4
        assert sampled[3] == sampled[0]

        # Asked of all three at once: decoded together, but never more saved samplers in one
        # batch than the executor keeps (one loaded for the batch would drop another of it).
        asked_all = [
            ask_call(services.engine, sampler, tenant, base, "sample", seq, SAMPLE)
            for sampler, seq in zip(samplers, (2, 1, 1), strict=True)
        ]
        done = []
        while runner.run_once():
            done.append(sum(_answer(services, c)[0] == "completed" for c in asked_all))
        assert done == [2, 3]
        for asked, tokens in zip(asked_all, sampled[:3], strict=True):
            assert _answer(services, asked)[1]["sequences"][0]["tokens"] == tokens
    finally:
        kept_two.close()


def test_a_models_sample_calls_run_together_and_never_past_a_call_that_changes_it(
    services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    """An RL loop asks a sampler for many prompts at once: the executor takes a sample call with
    the model's next ones (up to its batch, 3 here) and decodes them together, never past a call
    of another kind, so each sample reads the weights it would have read in order."""
    runner = _runner(services, world, "exec-1", tmp_path)
    runner.sample_batch = 3
    model = interactive_model(
        services.engine, world["session"], world["tenant"], world["base"], "m"
    )
    samples = [{**SAMPLE, "prompt": _tokens(SEQUENCE[k : k + 4 + k])} for k in range(7)]
    step = {"adam_params": {"learning_rate": 5e-2}}
    asked = [("create_model", {}), *[("sample", s) for s in samples[:5]], ("forward_backward", FB)]
    asked += [("optim_step", step), *[("sample", s) for s in samples[5:]]]
    ids = _ask_in_order(services, world, model, asked)

    def answered() -> int:
        return sum(_answer(services, call)[0] == "completed" for call in ids)

    taken_together = []
    while runner.run_once():
        taken_together.append(answered() - sum(taken_together))
    assert taken_together == [1, 3, 2, 1, 1, 2]
    with services.engine.connect() as conn:
        started = conn.execute(
            text(
                "SELECT count(DISTINCT started_at) FROM interactive_calls WHERE id IN :ids"
            ).bindparams(bindparam("ids", expanding=True)),
            {"ids": ids[1:4]},
        ).scalar_one()
    assert started == 1  # taken in one statement

    # A new model's adapter adds nothing: before the step, each answer is the base's own; after
    # it, the trained model's.
    before, after = (
        [_answer(services, c)[1] for c in ids[1:6]],
        [_answer(services, c)[1] for c in ids[8:]],
    )
    for answer, request in zip(before, samples[:5], strict=True):
        alone = runner.engine.sample(None, request)["sequences"][0]
        assert answer["sequences"][0]["tokens"] == alone["tokens"]
        assert answer["sequences"][0]["logprobs"] == pytest.approx(alone["logprobs"], abs=1e-4)
    for answer, request in zip(after, samples[5:], strict=True):
        alone = runner.engine.sample(model, request)["sequences"][0]
        assert answer["sequences"][0]["tokens"] == alone["tokens"]
        assert answer["sequences"][0]["logprobs"] == pytest.approx(alone["logprobs"], abs=1e-4)
        base = runner.engine.sample(None, request)["sequences"][0]
        assert answer["sequences"][0]["logprobs"] != pytest.approx(base["logprobs"], abs=1e-4)


def test_tenants_sample_calls_share_a_batch_each_through_its_own_model(
    services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    """Two tenants' models sampled at once: one claim takes both tenants' sample calls (each
    tenant's first in their turns, then a next call of each model a round, up to the batch)
    into one forward pass a token; each answers what its model answers alone, and a model's
    call of another kind stays out of it."""
    runner = _runner(services, world, "exec-1", tmp_path)
    runner.sample_batch = 4
    other = make_tenant(services.engine, "globex")
    other_session = interactive_session(services.engine, other.id, "sess-2")
    mine = interactive_model(services.engine, world["session"], world["tenant"], world["base"], "a")
    theirs = interactive_model(services.engine, other_session, other.id, world["base"], "b")
    ask_call(services.engine, mine, world["tenant"], world["base"], "create_model", 0, {})
    ask_call(services.engine, theirs, other.id, world["base"], "create_model", 0, {})
    ask_call(services.engine, theirs, other.id, world["base"], "forward_backward", 1, FB)
    ask_call(services.engine, theirs, other.id, world["base"], "optim_step", 2, STEP)
    assert _drain(runner) == 4
    prompts = [{**SAMPLE, "prompt": _tokens(SEQUENCE[k : 2 * k + 3])} for k in range(5)]
    asked = [
        ask_call(services.engine, mine, world["tenant"], world["base"], "sample", 1 + k, p)
        for k, p in enumerate(prompts[:3])
    ]
    asked += [
        ask_call(services.engine, theirs, other.id, world["base"], "sample", 3 + k, p)
        for k, p in enumerate(prompts[3:])
    ]
    ask_call(services.engine, theirs, other.id, world["base"], "forward_backward", 5, FB)

    def answered() -> list[str]:
        return [c for c in asked if _answer(services, c)[0] == "completed"]

    assert runner.run_once()
    first = answered()
    # Each tenant's first call (a, served least recently, first), then a next call of each.
    assert first == [asked[0], asked[1], asked[3], asked[4]]
    assert runner.run_once() and len(answered()) == 5
    assert runner.run_once()  # the forward_backward, alone
    for call, model, prompt in zip(asked, [mine] * 3 + [theirs] * 2, prompts, strict=True):
        alone = runner.engine.sample(model, prompt)["sequences"][0]
        answer = _answer(services, call)[1]["sequences"][0]
        assert answer["tokens"] == alone["tokens"]
        assert answer["logprobs"] == pytest.approx(alone["logprobs"], abs=1e-4)


class _OutOfMemoryWithTheLongPrompt(InteractiveEngine):
    """The real engine, but a batch holding a prompt longer than 10 tokens runs out of memory,
    as a batch too big for a GPU does (the long prompt alone too: it is the culprit)."""

    def sample_many(
        self,
        asked: list[tuple[str | None, dict[str, Any]]],
        on_answer: OnAnswer | None = None,
        more: More | None = None,
    ) -> list[dict[str, Any] | InteractiveError]:
        for _, request in asked:
            if len(request["prompt"]["chunks"][0]["tokens"]) > 10:
                raise RuntimeError("CUDA out of memory (a test's stand-in)")
        return super().sample_many(asked, on_answer, more)


def test_a_sample_batch_that_fails_is_run_again_a_call_at_a_time(
    services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    """A batch that fails (out of memory) is not every tenant's failure: its calls run again
    one at a time, and only the one that fails alone is answered with the error."""
    runner = _runner(services, world, "exec-oom", tmp_path, _OutOfMemoryWithTheLongPrompt)
    model = interactive_model(
        services.engine, world["session"], world["tenant"], world["base"], "m"
    )
    prompts = [SEQUENCE[:6], SEQUENCE[:16], SEQUENCE[2:8]]
    asked = [("create_model", {})] + [("sample", {**SAMPLE, "prompt": _tokens(p)}) for p in prompts]
    ids = _ask_in_order(services, world, model, asked)
    assert _drain(runner) == 4
    long_prompt = _answer(services, ids[2])
    assert long_prompt[0] == "failed" and long_prompt[1]["category"] == "server"
    assert "out of memory" in long_prompt[1]["error"]
    for call, prompt in ((ids[1], prompts[0]), (ids[3], prompts[2])):
        status, result = _answer(services, call)
        alone = runner.engine.sample(model, {**SAMPLE, "prompt": _tokens(prompt)})
        assert status == "completed" and result["sequences"] == alone["sequences"]


def test_tenants_forward_calls_share_a_pass_each_through_its_own_model(
    services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    """Three models of two tenants asked a forward_backward, a forward and a forward_backward
    at once: one claim takes the three (the tenants in turn) and runs them together, each
    answering what its model answers alone; a model's optim_step after its forward_backward
    waits for it and then finds its gradient; a call of another kind stays out of the batch."""
    runner = _runner(services, world, "exec-1", tmp_path)
    other = make_tenant(services.engine, "globex")
    other_session = interactive_session(services.engine, other.id, "sess-2")
    owners = {"a": world["tenant"], "b": other.id, "c": world["tenant"]}
    sessions = {"a": world["session"], "b": other_session, "c": world["session"]}
    models = {
        name: interactive_model(services.engine, sessions[name], owner, world["base"], name)
        for name, owner in owners.items()
    }

    def ask(name: str, kind: str, seq: int, request: dict[str, Any]) -> str:
        return ask_call(
            services.engine, models[name], owners[name], world["base"], kind, seq, request
        )

    for name in models:
        ask(name, "create_model", 0, {})
    ask("b", "forward_backward", 1, FB)  # b's model differs from the others' (same seed)
    ask("b", "optim_step", 2, STEP)
    assert _drain(runner) == 5
    inputs = {
        "a": FB,
        "b": {"forward_input": {**FB["forward_backward_input"]}},
        "c": {
            "forward_backward_input": {
                **FB["forward_backward_input"],
                "data": [{**FB["forward_backward_input"]["data"][0]}] * 2,
            }
        },
    }
    asked = {
        "a": ask("a", "forward_backward", 1, inputs["a"]),
        "b": ask("b", "forward", 3, inputs["b"]),
        "c": ask("c", "forward_backward", 1, inputs["c"]),
    }
    step = ask("a", "optim_step", 2, STEP)
    sample = ask("c", "sample", 2, SAMPLE)
    assert runner.run_once()
    assert all(_answer(services, call)[0] == "completed" for call in asked.values())
    assert _answer(services, step)[0] == _answer(services, sample)[0] == "pending"
    with services.engine.connect() as conn:
        claims = conn.execute(
            text(
                "SELECT count(DISTINCT started_at) FROM interactive_calls WHERE id IN :ids"
            ).bindparams(bindparam("ids", expanding=True)),
            {"ids": list(asked.values())},
        ).scalar_one()
    assert claims == 1  # one claim's statement took the three
    for name, call in asked.items():
        data = inputs[name].get("forward_backward_input") or inputs[name]["forward_input"]
        alone = runner.engine.forward(models[name], data)
        answer = _answer(services, call)[1]
        assert _loss(answer) == pytest.approx(_loss(alone), rel=1e-5)
        for mine, theirs in zip(answer["loss_fn_outputs"], alone["loss_fn_outputs"], strict=True):
            assert mine["logprobs"]["data"] == pytest.approx(theirs["logprobs"]["data"], abs=1e-5)
    assert _loss(_answer(services, asked["b"])[1]) != pytest.approx(
        _loss(_answer(services, asked["a"])[1]), rel=1e-3
    )  # b's row went through b's trained adapter, not a's
    assert _drain(runner) == 2
    status, result = _answer(services, step)
    assert status == "completed" and result["metrics"]["grad_norm:mean"] > 0


def test_a_forward_batch_gathers_calls_until_it_holds_its_tokens(
    services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    """A claim joins other models' forward calls while the batch's datums hold fewer than
    `forward_batch_tokens` (23 tokens a call here, a budget of 40: two calls, then the third
    alone); on a CPU the default budget is small, so calls that keep its cores busy alone run
    alone."""
    runner = _runner(services, world, "exec-1", tmp_path)
    assert runner.forward_batch_tokens == 256  # this test runs on a CPU
    runner.forward_batch_tokens = 40
    models = [
        interactive_model(services.engine, world["session"], world["tenant"], world["base"], name)
        for name in ("a", "b", "c")
    ]
    for model in models:
        ask_call(services.engine, model, world["tenant"], world["base"], "create_model", 0, {})
    assert _drain(runner) == 3
    asked = [
        ask_call(services.engine, model, world["tenant"], world["base"], "forward_backward", 1, FB)
        for model in models
    ]
    assert runner.run_once()
    assert [_answer(services, call)[0] for call in asked].count("completed") == 2
    assert runner.run_once()
    assert all(_answer(services, call)[0] == "completed" for call in asked)


def test_a_models_next_forward_calls_join_its_batch_until_another_kind(
    services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    """A model asked two forward_backward calls, an optim_step and a third: one claim takes
    the first two (the same weights: their gradients add up as one after the other), never the
    third past the optim_step, which then finds the two calls' gradient."""
    runner = _runner(services, world, "exec-1", tmp_path)
    model = interactive_model(
        services.engine, world["session"], world["tenant"], world["base"], "m"
    )
    step: list[tuple[str, dict[str, Any]]] = [
        ("create_model", {}),
        ("forward_backward", FB),
        ("forward_backward", FB),
        ("optim_step", STEP),
    ]
    ids = _ask_in_order(services, world, model, [*step, ("forward_backward", FB)])
    assert runner.run_once()  # the create
    assert runner.run_once()
    assert [_answer(services, call)[0] for call in ids[1:]] == [
        "completed",
        "completed",
        "pending",
        "pending",
    ]
    first, second = (_answer(services, call)[1] for call in ids[1:3])
    assert _loss(first) == pytest.approx(_loss(second), rel=1e-6)  # the same weights
    assert _drain(runner) == 2
    alone = _runner(services, world, "exec-2", tmp_path)
    other = interactive_model(
        services.engine, world["session"], world["tenant"], world["base"], "n"
    )
    reference = _ask_in_order(services, world, other, step)
    alone.forward_batch = 1
    assert _drain(alone) == 4
    found, expected = _answer(services, ids[3])[1], _answer(services, reference[3])[1]
    assert found["metrics"]["grad_norm:mean"] == pytest.approx(
        expected["metrics"]["grad_norm:mean"], rel=1e-4
    )
