"""Fixtures for driving the Tinker-compatible API with the official `tinker` SDK (a pytest
plugin; see `tests/conftest.py`): the SDK's environment, a service client, and the real
interactive executor on the tiny test base serving in a thread."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import tinker

from control_plane import trainers
from control_plane.base_catalog import get_base_model
from control_plane.services import Services
from control_plane.settings import Settings
from tests.factories import register_test_base

if TYPE_CHECKING:
    from workers.interactive.runner import InteractiveRunner

# Token ids of the test base's vocabulary: a sequence the tests train on.
SEQUENCE = [5 + (i * 37) % 700 for i in range(24)]
# One datum of it: each token predicting the next, weighted 1.
DATUM = tinker.types.Datum(
    model_input=tinker.types.ModelInput.from_ints(SEQUENCE[:-1]),
    loss_fn_inputs={"target_tokens": SEQUENCE[1:], "weights": [1.0] * (len(SEQUENCE) - 1)},
)


# A conversation the chat completions' tests ask.
CHAT_MESSAGES: list[Any] = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Name a colour."},
]
# A long chat (seconds of sampling where each token's step is paced, or on a bigger base) and a
# short one (greedy: the same reply on every executor).
LONG_CHAT: dict[str, Any] = {
    "messages": CHAT_MESSAGES,
    "temperature": 1.0,
    "seed": 1,
    "max_completion_tokens": 600,
}
SHORT_CHAT: dict[str, Any] = {
    "messages": CHAT_MESSAGES,
    "temperature": 0,
    "max_completion_tokens": 8,
}


def openai_client(url: str, key: str) -> Any:
    """The official `openai` SDK's client of the API at `url`, retrying nothing."""
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def tinker_settings(tmp_path: Path) -> Settings:
    """The API's settings for the SDK's tests: a short hold on polls (a pending future answers
    try-again within half a second)."""
    return Settings(
        home=tmp_path / "home",
        max_upload_bytes=1024 * 1024,
        lease_seconds=30,
        platform_operator_tenants=["default", "tenant-a"],
        tinker_retrieve_wait_seconds=0.5,
    )


@pytest.fixture
def tinker_sdk_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """The SDK sends no telemetry, and finds no key or server but the ones a test gives it;
    every client holder it made (a session's, a REST-only client's) is closed after the test,
    so none heartbeats against a server that is gone for the rest of the run."""
    from tinker.lib.internal_client_holder import InternalClientHolder

    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("TINKER_API_KEY", "TINKER_BASE_URL", "TINKER_CREDENTIAL_CMD", "TINKER_TAGS"):
        monkeypatch.delenv(name, raising=False)
    made: list[InternalClientHolder] = []
    own = InternalClientHolder.__init__

    def kept(holder: InternalClientHolder, *args: Any, **kwargs: Any) -> None:
        made.append(holder)
        own(holder, *args, **kwargs)

    monkeypatch.setattr(InternalClientHolder, "__init__", kept)
    yield
    for holder in made:
        holder.close()
    _close_sessionless_holders()


def _close_sessionless_holders() -> None:
    """A `RestClient` built from a URL and a key runs over a holder the SDK keeps for the life
    of the process, refreshing its JWT in the background; the test's server is gone after the
    test, so that holder would retry against it for the rest of the run (and log so)."""
    from tinker.lib.internal_client_holder import sessionless_holder_cache as cache

    with cache._lock:
        holders = list(cache._holders.values())
        cache._holders.clear()
    for holder in holders:
        holder.close()


def sdk_service(url: str, key: str) -> tinker.ServiceClient:
    """The SDK pointed at loraforge with a loraforge key (the SDK wants the `tml-` prefix)."""
    return tinker.ServiceClient(base_url=url, api_key="tml-" + key)


def sample_calls(services: Services) -> list[Any]:
    """Every sample call (a chat's), in the order asked: its model, state, executor, times,
    error, and the executor holding its model now."""
    from sqlalchemy import text

    with services.engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT c.id, c.model_id, c.status, c.claimed_by, c.started_at, "
                    "c.finished_at, c.error, m.held_by FROM interactive_calls c "
                    "JOIN interactive_models m ON m.id = c.model_id "
                    "WHERE c.kind = 'sample' ORDER BY c.created_at"
                )
            ).all()
        )


def served_bases(services: Services) -> set[str]:
    with services.engine.connect() as conn:
        return trainers.served_bases(conn, services.settings.lease_seconds)


@contextmanager
def serving_executor(
    services: Services, base_id: str, executor_id: str, work_dir: Path
) -> Iterator[None]:
    """The real interactive executor on `base_id`, serving in a thread until the block ends
    (a clean stop: its row leaves the trainer registry)."""
    from workers.interactive.runner import InteractiveRunner

    base = _base_name(services, base_id)
    runner = InteractiveRunner(services, executor_id, base_id, work_dir=work_dir)
    stop = threading.Event()
    thread = threading.Thread(target=runner.serve, args=(stop,), kwargs={"idle_wait": 0.5})
    thread.start()
    deadline = time.monotonic() + 30
    while base not in served_bases(services) and time.monotonic() < deadline:
        time.sleep(0.05)  # the executor reports itself as it starts serving
    try:
        yield
    finally:
        stop.set()
        thread.join(60)


def _base_name(services: Services, base_id: str) -> str:
    with services.engine.connect() as conn:
        base = get_base_model(conn, base_id)
    assert base is not None, base_id
    return base.name


@pytest.fixture
def executor(services: Services, tmp_path: Path) -> Iterator[str]:
    """The interactive executor on the tiny test base, serving in a thread: the base's name."""
    base = register_test_base(services.engine, "tiny-e2e")
    with serving_executor(services, base.id, "executor-e2e", tmp_path / "executor"):
        yield base.name


def chat_let_go(services: Services) -> Any:
    """The one chat's sample call, once its messages and text are let go (at most a minute)."""
    from sqlalchemy import text

    deadline = time.monotonic() + 60
    while True:
        with services.engine.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT status, request, usage, stream_left_at, payload_dropped_at "
                    "FROM interactive_calls WHERE kind = 'sample'"
                )
            ).one()
        if row.payload_dropped_at is not None:
            return row
        assert time.monotonic() < deadline, row
        time.sleep(0.05)


@pytest.fixture
def paced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each token's step of an executor's sample batch held 10 ms (the engine asks its writer
    which streams were left at every step of a batch that holds a streamed chat or may take
    one), as a bigger base on a busier machine would take it: the tiny base otherwise samples a
    reply before the API first looks at it."""
    from workers.interactive.streaming import StreamWriter

    own = StreamWriter.left

    def left(writer: StreamWriter) -> frozenset[str]:
        time.sleep(0.01)
        return own(writer)

    monkeypatch.setattr(StreamWriter, "left", left)


@contextmanager
def pausable_executor(runner: InteractiveRunner) -> Iterator[threading.Event]:
    """The executor's loop in a thread, running calls while the event it yields is set (it
    keeps its models and its place in the trainer registry while paused)."""
    serving, stop = threading.Event(), threading.Event()

    def loop() -> None:
        reported = 0.0
        while not stop.is_set():
            if time.monotonic() - reported > 5:
                with runner.services.engine.begin() as conn:
                    trainers.report(conn, runner.snapshot())
                reported = time.monotonic()
            if not (serving.is_set() and runner.run_once()):
                time.sleep(0.02)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        yield serving
    finally:
        stop.set()
        thread.join(60)
        runner.stream_writer.close()


def counted(app: Any) -> Counter[str]:
    """The requests `app` answers from now on, counted by path."""
    hits: Counter[str] = Counter()

    @app.middleware("http")
    async def count(request: Any, call_next: Any) -> Any:
        hits[request.url.path] += 1
        return await call_next(request)

    return hits


def publish_adapter_version(
    services: Services, tenant_id: str, base: str, adapter_dir: Path, rank: int
) -> str:
    """A job's adapter (a PEFT directory) published as the next version of the tenant's `bot`
    on `base`, as its trainer publishes it: the version's `name@N`."""
    from sqlalchemy import text

    from control_plane import registry
    from tests.factories import enqueue_jobs, make_file

    engine = services.engine
    with engine.connect() as conn:
        found = get_base_model(conn, base)
    assert found is not None
    [job_id] = enqueue_jobs(engine, tenant_id, found.id, make_file(engine, tenant_id).id, 1)
    with engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET adapter_name = 'bot' WHERE id = :id"), {"id": job_id})
    job = services.queue.claim("worker-1")
    assert job is not None and job.id == job_id
    published = registry.publish_job_adapter(
        services,
        job=job,
        worker_id="worker-1",
        adapter_dir=adapter_dir,
        lineage={"hyperparameters": {"lora_rank": rank}},
        metrics={},
    )
    assert published is not None
    return published.version.model_id


class PlayedExecutor:
    """The test in an interactive executor's place on a base no real executor serves
    (`tiny-played`): it takes a chat's call and writes its reply so far and its end through
    `interactive_calls`, as the executor does."""

    def __init__(self, services: Services, base_id: str) -> None:
        self.services = services
        self.base_id = base_id
        with services.engine.begin() as conn:
            trainers.report(
                conn,
                trainers.TrainerReport(
                    "exec-played", "h", 1, "cpu", resident_base="tiny-played", kind="interactive"
                ),
            )

    def take(self) -> Any:
        """The next chat asked (an `interactive_calls.Call`), once one is."""
        from control_plane import interactive_calls as calls

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with self.services.engine.begin() as conn:
                call = calls.claim_next(conn, "exec-played", self.base_id)
            if call is not None:
                return call
            time.sleep(0.05)
        raise AssertionError("no chat was asked")

    def progress(self, call: Any, body: dict[str, Any]) -> Any:
        """A reply so far written (`interactive_calls.progress`): what the write found."""
        from control_plane import interactive_calls as calls

        with self.services.engine.begin() as conn:
            written = calls.progress(conn, "exec-played", {call.id: body})
        assert list(written) == [call.id]
        return written[call.id]

    def write(self, call: Any, so_far: str) -> bool:
        """The text so far written; whether the stream's client left."""
        written = self.progress(call, {"texts": [so_far]})
        assert written.entries is None
        return bool(written.left)

    def finish(self, call: Any, whole: str, **answer: Any) -> None:
        """The chat answered `whole` (and `answer`'s fields: its tokens, its logprobs)."""
        from control_plane import interactive_calls as calls

        sequence = {"tokens": [5, 6, 7], "logprobs": [0.0] * 3, "stop_reason": "stop"}
        sequence |= {"text": whole, **answer}
        with self.services.engine.begin() as conn:
            assert calls.finish(
                conn, call, "exec-played", {"sequences": [sequence], "prompt_tokens": 9}
            )

    def fail(self, call: Any, message: str) -> None:
        from control_plane import interactive_calls as calls

        with self.services.engine.begin() as conn:
            assert calls.fail(conn, call, "exec-played", message, category="server")

    def partial(self, call: Any) -> Any:
        """The call's reply so far, as stored."""
        from sqlalchemy import text

        with self.services.engine.connect() as conn:
            return conn.execute(
                text("SELECT partial FROM interactive_calls WHERE id = :id"), {"id": call.id}
            ).scalar_one()
