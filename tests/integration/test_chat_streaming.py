"""A chat completion streamed (`stream: true`) through the official `openai` SDK: on the real
interactive executor it streams, chunk by chunk, exactly the reply the same chat answers whole;
with the test in the executor's place (claiming the call and writing its text so far through
`interactive_calls`, as the executor does) each write reaches the client before the chat
finishes, a failure midway is an error the SDK raises, and text sampled again after it was sent
ends the stream rather than contradict it."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import text

from control_plane import chat_completions
from control_plane.api.routes import chat, chat_stream
from control_plane.services import Services
from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.factories import register_test_base
from tests.faults.tcp_proxy import CuttableProxy
from tests.tinker_harness import (
    CHAT_MESSAGES,
    PlayedExecutor,
    chat_let_go,
    openai_client,
    pausable_executor,
    publish_adapter_version,
    tinker_settings,
)
from workers.interactive import streaming
from workers.interactive.chat import SoFar
from workers.interactive.runner import InteractiveRunner
from workers.interactive.streaming import StreamWriter

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")

MESSAGES = CHAT_MESSAGES


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # The executor writes a streamed chat's text after every token.
    return tinker_settings(tmp_path).model_copy(update={"chat_stream_every_seconds": 0.0})


def _streamed(client: openai.OpenAI, **asked: Any) -> tuple[list[Any], dict[int, list[str]]]:
    """Every chunk of a streamed chat, and each choice's content deltas in order."""
    chunks = list(client.chat.completions.create(stream=True, **asked))
    deltas: dict[int, list[str]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.delta.content:
                deltas.setdefault(choice.index, []).append(choice.delta.content)
    return chunks, deltas


@pytest.mark.usefixtures("paced")
def test_a_streamed_chat_is_the_whole_reply_sent_as_it_is_sampled(
    services: Services, live_url: str, tenant_a: TenantKeys, executor: str, peft_adapter: Path
) -> None:
    model = publish_adapter_version(services, tenant_a.tenant_id, executor, peft_adapter, 4)
    client = openai_client(live_url, tenant_a.member)
    asked: dict[str, Any] = {"model": model, "messages": MESSAGES, "temperature": 0}
    whole = client.chat.completions.create(max_completion_tokens=24, **asked)
    chunks, deltas = _streamed(
        client, max_completion_tokens=24, stream_options={"include_usage": True}, **asked
    )
    [choice] = whole.choices
    assert choice.message.content
    # Sent as it was sampled, piece by piece, and the pieces are the whole reply.
    assert len(deltas[0]) >= 2, deltas
    assert "".join(deltas[0]) == choice.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" and c.model == model for c in chunks)
    assert all(len(c.choices) <= 1 for c in chunks)  # a choice a chunk, as OpenAI sends them
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finishes == [choice.finish_reason]
    # With include_usage: a last chunk with no choices and the usage; none before it.
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])

    # A stop string: never sent, not even its first characters before it was whole.
    content = choice.message.content
    stop = next(content[k : k + 2] for k in range(1, len(content) - 1) if content[k].strip())
    stopped = client.chat.completions.create(max_completion_tokens=24, stop=[stop], **asked)
    _, stop_deltas = _streamed(client, max_completion_tokens=24, stop=[stop], **asked)
    sent = ""
    for piece in stop_deltas.get(0, []):
        sent += piece
        assert stop not in sent and stopped.choices[0].message.content.startswith(sent)
    assert sent == stopped.choices[0].message.content

    # Several choices, seeded: each choice's pieces are that choice's whole reply.
    seeded: dict[str, Any] = {"temperature": 1.0, "seed": 5, "max_completion_tokens": 12, "n": 2}
    replies = client.chat.completions.create(model=model, messages=MESSAGES, **seeded)
    _, by_choice = _streamed(client, model=model, messages=MESSAGES, **seeded)
    assert all(reply.message.content for reply in replies.choices)
    for reply in replies.choices:
        assert "".join(by_choice.get(reply.index, [])) == reply.message.content

    # On the wire, without include_usage: no usage at all, and the stream's end said.
    with httpx.stream(
        "POST",
        f"{live_url}/v1/chat/completions",
        json={"max_completion_tokens": 4, "stream": True, **asked},
        headers=tenant_a.headers("member"),
        timeout=60,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all('"usage"' not in event for event in events)

    # Each streamed chat's messages and text were let go once read; its usage stays.
    with services.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT c.request, c.partial, c.usage FROM interactive_calls c "
                "JOIN interactive_models m ON m.id = c.model_id WHERE m.session_id = :s"
            ),
            {"s": chat_completions.session_id(tenant_a.tenant_id)},
        ).all()
    assert len(rows) == 7
    assert all(r.request == {} and r.partial is None and r.usage for r in rows)


@pytest.mark.usefixtures("paced")
def test_a_stream_its_client_leaves_stops_the_executor_sampling_its_chat(
    services: Services, live_url: str, tenant_a: TenantKeys, executor: str
) -> None:
    """A chat UI's "stop": the client closes the stream after its first text, and the shared
    executor stops sampling that chat rather than run it to its 900 tokens (paced, they take
    seconds)."""
    asked = {
        "model": executor,
        "messages": MESSAGES,
        "temperature": 1.0,  # the tiny base's draws: text from the first tokens on
        "seed": 1,
        "max_completion_tokens": 900,
        "stream": True,
    }
    with httpx.stream(
        "POST",
        f"{live_url}/v1/chat/completions",
        json=asked,
        headers=tenant_a.headers("member"),
        timeout=60,
    ) as response:
        for line in response.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # the client leaves with its first text
    row = chat_let_go(services)
    assert row.status == "completed" and row.stream_left_at is not None
    assert 0 < row.usage["sampled_tokens"] < 450, row.usage


@pytest.mark.usefixtures("paced")
def test_a_streamed_chat_decoded_in_one_batch_with_another_tenants_chat_streams_its_own_text(
    services: Services,
    live_url: str,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    peft_adapter: Path,
    tmp_path: Path,
) -> None:
    """Tenant A's streamed chat of its adapter and tenant B's chat of the base, taken by one
    claim and decoded in one batch: A's pieces are A's own reply, B's reply is as alone."""
    base = register_test_base(services.engine, "tiny-e2e")
    runner = InteractiveRunner(
        services, "executor-1", base.id, work_dir=tmp_path / "e1", precision="fp32"
    )
    model = publish_adapter_version(services, tenant_a.tenant_id, base.name, peft_adapter, 4)
    first, second = (
        openai_client(live_url, tenant_a.member),
        openai_client(live_url, tenant_b.member),
    )
    mine: dict[str, Any] = {"model": model, "messages": MESSAGES, "temperature": 0}
    theirs: dict[str, Any] = {
        "model": base.name,
        "messages": [{"role": "user", "content": "Count to three."}],
        "temperature": 0,
    }
    with pausable_executor(runner) as serving:
        serving.set()
        alone = [
            c.chat.completions.create(max_completion_tokens=16, **asked).choices[0].message
            for c, asked in ((first, mine), (second, theirs))
        ]
        assert alone[0].content and alone[0].content != alone[1].content
        serving.clear()
        time.sleep(0.2)  # a claim in flight finishes
        answers: queue.Queue[Any] = queue.Queue()
        streamer = threading.Thread(
            target=lambda: answers.put(("mine", _streamed(first, max_completion_tokens=16, **mine)))
        )
        waiter = threading.Thread(
            target=lambda: answers.put(
                ("theirs", second.chat.completions.create(max_completion_tokens=16, **theirs))
            )
        )
        streamer.start()
        waiter.start()
        deadline = time.monotonic() + 30
        while _sample_calls(services, "pending") < 2:
            assert time.monotonic() < deadline, "the two chats were not asked"
            time.sleep(0.05)
        serving.set()
        got = dict(answers.get(timeout=120) for _ in range(2))
        streamer.join(30)
        waiter.join(30)
    _, deltas = got["mine"]
    assert len(deltas[0]) >= 2 and "".join(deltas[0]) == alone[0].content
    assert got["theirs"].choices[0].message.content == alone[1].content
    with services.engine.connect() as conn:
        started = conn.execute(
            text(
                "SELECT DISTINCT started_at FROM interactive_calls WHERE kind = 'sample' "
                "ORDER BY started_at DESC LIMIT 1"
            )
        ).all()
        batched = conn.execute(
            text("SELECT count(*) FROM interactive_calls WHERE started_at = :at"),
            {"at": started[0].started_at},
        ).scalar_one()
    assert batched == 2  # one claim took both


def _sample_calls(services: Services, status: str) -> int:
    with services.engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM interactive_calls WHERE kind = 'sample' AND status = :s"
                ),
                {"s": status},
            ).scalar_one()
        )


def test_the_executors_writes_pause_through_a_database_outage_and_go_on_after_it(
    services: Services,
    proxy: CuttableProxy,
    proxied_url: str,
    settings: Settings,
    tenant_a: TenantKeys,
    live_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The executor's writer of streamed text, cut off from the database: the decoding loop
    that hands it text never waits or fails, and once the database is back it writes again."""
    from control_plane.services import build_services

    monkeypatch.setattr(streaming, "PAUSE_AFTER_FAILURE_S", 0.5)
    base = register_test_base(services.engine, "tiny-played")
    played = PlayedExecutor(services, base.id)
    listener = threading.Thread(
        target=_listen, args=(openai_client(live_url, tenant_a.member), queue.Queue())
    )
    listener.start()
    call = played.take()
    cut_off = build_services(settings, database_url=proxied_url)
    try:
        writer = StreamWriter(cut_off, "exec-played")
        writer({call.id: SoFar(["first"])})
        _partial_becomes(services, call.id, ["first"])
        proxy.cut()
        started = time.monotonic()
        for k in range(20):  # what the decoding loop hands over meanwhile
            writer({call.id: SoFar([f"first {k}"])})
        assert time.monotonic() - started < 1.0  # handed over, never waited on
        time.sleep(1.0)
        proxy.restore()
        deadline = time.monotonic() + 30
        while True:  # the newest text, once the writer tries again
            writer({call.id: SoFar(["first and last"])})
            try:
                _partial_becomes(services, call.id, ["first and last"], wait=0.5)
                break
            except AssertionError:
                assert time.monotonic() < deadline, "the writer never wrote again"
        assert writer.written >= 2
        # Stopped (the executor stops it when it stops serving), its thread ends.
        writer.close()
        assert not [t for t in threading.enumerate() if t.name == "stream-exec-played"]
        writer({call.id: SoFar(["after"])})  # handed over after it stopped: dropped, not kept
        assert not [t for t in threading.enumerate() if t.name == "stream-exec-played"]
        assert writer._newest == {}
    finally:
        cut_off.close()
    played.finish(call, "first and last")
    listener.join(30)


def _partial_becomes(
    services: Services, call_id: str, texts: list[str], wait: float = 10.0
) -> None:
    deadline = time.monotonic() + wait
    while True:
        with services.engine.connect() as conn:
            partial = conn.execute(
                text("SELECT partial FROM interactive_calls WHERE id = :id"), {"id": call_id}
            ).scalar_one()
        if partial == {"texts": texts}:
            return
        assert time.monotonic() < deadline, partial
        time.sleep(0.05)


def test_a_streamed_chat_refused_before_it_began_is_the_plain_error(
    live_url: str, tenant_a: TenantKeys, executor: str
) -> None:
    client = openai_client(live_url, tenant_a.member)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nobody", messages=MESSAGES, stream=True)
    # The executor's own refusal, as it read the request: a 400 with its words, not a stream.
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(
            model=executor, messages=[{"role": "user", "content": "word " * 5000}], stream=True
        )
    sent = httpx.post(
        f"{live_url}/v1/chat/completions",
        json={"model": executor, "messages": MESSAGES, "stream_options": {"include_usage": True}},
        headers=tenant_a.headers("member"),
    )
    assert sent.status_code == 400 and sent.json()["error"]["param"] == "stream_options"


def _listen(client: openai.OpenAI, received: queue.Queue[Any]) -> None:
    """Stream a chat in a thread: each content delta as it comes, then "end" (or the error)."""
    try:
        stream = client.chat.completions.create(model="tiny-played", messages=MESSAGES, stream=True)
        for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    received.put(choice.delta.content)
                if choice.finish_reason:
                    received.put(("finish", choice.finish_reason))
        received.put("end")
    except Exception as error:  # the SDK's, raised while iterating
        received.put(error)


def test_each_write_of_the_executor_reaches_the_client_before_the_chat_ends(
    services: Services, live_url: str, tenant_a: TenantKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = register_test_base(services.engine, "tiny-played")
    played = PlayedExecutor(services, base.id)
    client = openai_client(live_url, tenant_a.member)

    received: queue.Queue[Any] = queue.Queue()
    listener = threading.Thread(target=_listen, args=(client, received))
    listener.start()
    call = played.take()
    played.write(call, "Hel")
    assert received.get(timeout=30) == "Hel"  # sent while the chat still runs
    played.write(call, "Hello wor")
    assert received.get(timeout=30) == "lo wor"
    # Written again from its start (a batch run again a call at a time): waited past.
    played.write(call, "Hel")
    time.sleep(0.5)  # the stream reads it
    played.finish(call, "Hello world")
    assert received.get(timeout=30) == "ld"
    assert received.get(timeout=30) == ("finish", "stop")
    assert received.get(timeout=30) == "end"
    listener.join(30)

    # A failure after the stream began: the SDK raises it, after what was sent.
    listener = threading.Thread(target=_listen, args=(client, received))
    listener.start()
    call = played.take()
    played.write(call, "Partial")
    assert received.get(timeout=30) == "Partial"
    played.fail(call, "the executor ran out of memory")
    error = received.get(timeout=30)
    assert isinstance(error, openai.APIError) and "out of memory" in str(error), error
    listener.join(30)

    # Text that no longer begins with what was sent (the chat sampled again) ends the stream
    # with an error rather than contradict it; while nothing is new, a comment line keeps the
    # connection open.
    monkeypatch.setattr(chat_stream, "KEEPALIVE_SECONDS", 0.2)
    lines: queue.Queue[str] = queue.Queue()

    reader = threading.Thread(target=_raw_stream, args=(live_url, tenant_a, lines))
    reader.start()
    call = played.take()
    played.write(call, "abc")
    seen = _until(lines, lambda line: '"content": "abc"' in line)
    _until(lines, lambda line: line == ": keep-alive")
    played.write(call, "xyz")
    seen = _until(lines, lambda line: line == "closed")
    errors = [line for line in seen if '"error"' in line]
    assert len(errors) == 1 and "sampled again" in errors[0], seen
    assert not any("xyz" in line or "[DONE]" in line for line in seen)
    reader.join(30)
    with services.engine.connect() as conn:
        kept = conn.execute(
            text("SELECT partial FROM interactive_calls WHERE id = :id"), {"id": call.id}
        ).scalar_one()
    assert kept == {"texts": ["xyz"]}  # the executor's last write, until it finishes


def test_a_stream_its_client_leaves_lets_the_chat_go_once_it_is_answered(
    services: Services, live_url: str, tenant_a: TenantKeys
) -> None:
    base = register_test_base(services.engine, "tiny-played")
    played = PlayedExecutor(services, base.id)
    lines: queue.Queue[str] = queue.Queue()
    leave = threading.Event()

    reader = threading.Thread(target=_raw_stream, args=(live_url, tenant_a, lines, leave))
    reader.start()
    call = played.take()
    assert not played.write(call, "Once")
    _until(lines, lambda line: '"content": "Once"' in line)
    leave.set()
    played.write(call, "Once upon")
    reader.join(30)
    # The executor's next write learns that the client left (and it stops sampling).
    deadline = time.monotonic() + 30
    while not played.write(call, "Once upon a"):
        assert time.monotonic() < deadline, "the executor was never told the client left"
        time.sleep(0.05)
    played.finish(call, "Once upon a")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with services.engine.connect() as conn:
            row = conn.execute(
                text("SELECT request, payload_dropped_at FROM interactive_calls WHERE id = :id"),
                {"id": call.id},
            ).one()
        if row.payload_dropped_at is not None:
            break
        time.sleep(0.1)
    assert row.request == {} and row.payload_dropped_at is not None  # not kept for an hour


def _raw_stream(
    url: str, tenant: TenantKeys, lines: queue.Queue[str], leave: threading.Event | None = None
) -> None:
    """A streamed chat of "tiny-played" read line by line off the wire into `lines`, then
    "closed"; with `leave`, the client leaves (closes the connection) once it is set."""
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json={"model": "tiny-played", "messages": MESSAGES, "stream": True},
        headers=tenant.headers("member"),
        timeout=60,
    ) as response:
        for line in response.iter_lines():
            lines.put(line)
            if leave is not None and leave.is_set():
                break
    lines.put("closed")


def _until(lines: queue.Queue[str], found: Any) -> list[str]:
    """The lines read until one is `found` (that one included)."""
    seen: list[str] = []
    while True:
        line = lines.get(timeout=30)
        seen.append(line)
        if found(line):
            return seen


def test_a_chat_no_executor_takes_is_withdrawn_before_its_stream_begins(
    services: Services, live_url: str, tenant_a: TenantKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = register_test_base(services.engine, "tiny-played")
    PlayedExecutor(services, base.id)  # reported, but never takes anything
    monkeypatch.setattr(chat, "TAKE_SECONDS", 1.0)
    with pytest.raises(openai.InternalServerError) as busy:
        openai_client(live_url, tenant_a.member).chat.completions.create(
            model="tiny-played", messages=MESSAGES, stream=True
        )
    assert busy.value.status_code == 503 and busy.value.code == "executor_busy"
    with services.engine.connect() as conn:
        withdrawn = conn.execute(text("SELECT status, request FROM interactive_calls")).one()
    assert (withdrawn.status, withdrawn.request) == ("failed", {})


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "awaited"])
def test_a_chat_whose_client_leaves_before_an_executor_takes_it_is_withdrawn(
    services: Services, live_url: str, tenant_a: TenantKeys, stream: bool
) -> None:
    """A client that gives up while its chat waits for an executor (its own timeout, shorter
    than the chat's 300 s wait): the chat is withdrawn within seconds, not sampled for no one
    whenever an executor comes to it."""
    base = register_test_base(services.engine, "tiny-played")
    PlayedExecutor(services, base.id)  # reported, but never takes anything
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{live_url}/v1/chat/completions",
            json={"model": "tiny-played", "messages": MESSAGES, "stream": stream},
            headers=tenant_a.headers("member"),
            timeout=httpx.Timeout(10, read=1.0),
        )
    deadline = time.monotonic() + 15
    while True:
        with services.engine.connect() as conn:
            call = conn.execute(text("SELECT status, request FROM interactive_calls")).one()
        if call.status != "pending":
            break
        assert time.monotonic() < deadline, "the chat still waits for an executor"
        time.sleep(0.1)
    assert (call.status, call.request) == ("failed", {})
