"""OpenAI's Batch API (`/v1/batches`) through the official `openai` SDK, on the real interactive
executor holding the tiny test base: a file of chats or completions uploaded with purpose
`batch`, run a window at a time by the runner's passes (`api.batch_runner.run_due`, what the
beat runs every second), its answers in an output file equal to the same requests asked one by
one; refusals in the error file; a cancelled or expired batch ends with what was answered;
a file a line of which would be refused is refused whole, naming the line, and nothing is
written."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from sqlalchemy import text

from control_plane import chat_completions
from control_plane.api import batch_runner
from control_plane.services import Services
from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.factories import register_test_base
from tests.tinker_harness import (
    PlayedExecutor,
    openai_client,
    publish_adapter_version,
    serving_executor,
    tinker_settings,
)

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")

PROMPTS = ["The sky over the harbour was", "Once upon a time", "Rain fell on", "The old map"]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return tinker_settings(tmp_path)


def _upload(client: Any, lines: list[dict[str, Any]]) -> str:
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    return str(client.files.create(file=("requests.jsonl", data), purpose="batch").id)


def _create(client: Any, lines: list[dict[str, Any]]) -> Any:
    """A batch of chat `lines`, uploaded and created through the SDK."""
    return client.batches.create(
        input_file_id=_upload(client, lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )


def _chat_line(custom_id: str, model: str, prompt: str, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], **extra}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def _in_flight(services: Services, batch_id: str) -> int:
    """The calls of the batch's requests asked and not yet collected."""
    with services.engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT coalesce(sum(jsonb_array_length(calls)), 0) FROM batch_requests "
                    "WHERE batch_id = :b AND status = 'asked'"
                ),
                {"b": batch_id},
            ).scalar_one()
        )


def _rows_left(services: Services, batch_id: str) -> int:
    with services.engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM batch_requests WHERE batch_id = :b"), {"b": batch_id}
            ).scalar_one()
        )


def _run(services: Services, client: Any, batch_id: str, window: int) -> Any:
    """Passes of the runner until the batch is over (two minutes at most); never more than
    `window` of its requests in flight after any pass."""
    deadline = time.monotonic() + 120
    while True:
        batch_runner.run_due(services, window=window)
        assert _in_flight(services, batch_id) <= window
        batch = client.batches.retrieve(batch_id)
        if batch.status not in ("in_progress", "cancelling"):
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.1)


def _entries(client: Any, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def _unfinished_calls(services: Services) -> int:
    with services.engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM interactive_calls "
                    "WHERE status IN ('pending', 'running') OR payload_dropped_at IS NULL"
                )
            ).scalar_one()
        )


def test_a_batch_of_chats_runs_a_window_at_a_time_and_answers_as_the_chats_asked_one_by_one(
    services: Services, live_url: str, tenant_a: TenantKeys, tmp_path: Path
) -> None:
    base = register_test_base(services.engine, "tiny-batch")
    client = openai_client(live_url, tenant_a.member)
    asks = [{"max_completion_tokens": 6, "temperature": 0} for _ in PROMPTS]
    asks[1] = {**asks[1], "n": 2, "seed": 7, "temperature": 1.0}
    asks[2] = {**asks[2], "logprobs": True, "top_logprobs": 2}
    lines = [
        _chat_line(f"row-{k}", base.name, prompt, **ask)
        for k, (prompt, ask) in enumerate(zip(PROMPTS, asks, strict=True))
    ]
    batch = client.batches.create(
        input_file_id=_upload(client, lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"eval": "smoke"},
    )
    assert batch.status == "in_progress" and batch.model == base.name
    assert batch.request_counts is not None and batch.request_counts.total == 4
    assert batch.metadata == {"eval": "smoke"} and batch.expires_at - batch.created_at == 86400
    # No executor holds the base yet: nothing is asked, and the batch waits for one.
    batch_runner.run_due(services, window=2)
    assert _in_flight(services, batch.id) == 0
    assert client.batches.retrieve(batch.id).status == "in_progress"

    with serving_executor(services, base.id, "executor-batch", tmp_path / "executor"):
        done = _run(services, client, batch.id, window=2)
        singles = [
            client.chat.completions.create(
                model=base.name, messages=[{"role": "user", "content": prompt}], **ask
            )
            for prompt, ask in zip(PROMPTS, asks, strict=True)
        ]
    assert done.status == "completed" and done.error_file_id is None, _entries(
        client, done.error_file_id
    )
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (4, 0)
    assert done.completed_at is not None and done.in_progress_at is not None
    output = client.files.retrieve(done.output_file_id)
    assert output.purpose == "batch_output"
    entries = _entries(client, done.output_file_id)
    assert [e["custom_id"] for e in entries] == ["row-0", "row-1", "row-2", "row-3"]
    assert len({e["id"] for e in entries}) == 4
    for entry, single in zip(entries, singles, strict=True):
        assert entry["error"] is None and entry["response"]["status_code"] == 200
        body = entry["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == base.name
        assert [c["message"]["content"] for c in body["choices"]] == [
            c.message.content for c in single.choices
        ]
        assert body["usage"]["prompt_tokens"] == single.usage.prompt_tokens
    assert len(entries[1]["response"]["body"]["choices"]) == 2  # n=2, seeded
    tokens = entries[2]["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert [t["token"] for t in tokens] == [t.token for t in singles[2].choices[0].logprobs.content]
    # Every call of the batch was read and its payload let go, its rows (which the files now
    # hold) deleted; it is listed.
    assert _unfinished_calls(services) == 0 and _rows_left(services, batch.id) == 0
    assert done.id in [b.id for b in client.batches.list()]
    with pytest.raises(openai.ConflictError, match="completed"):
        client.batches.cancel(done.id)


def test_a_batch_of_completions_counts_calls_in_its_window_and_pins_its_adapter(
    services: Services,
    live_url: str,
    tenant_a: TenantKeys,
    executor: str,
    peft_adapter: Path,
) -> None:
    first = publish_adapter_version(services, tenant_a.tenant_id, executor, peft_adapter, 4)
    client = openai_client(live_url, tenant_a.member)

    def line(custom_id: str, prompt: Any) -> dict[str, Any]:
        body = {"model": "bot", "prompt": prompt, "max_tokens": 5, "temperature": 0}
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}

    lines = [
        line("three", PROMPTS[:3]),
        line("long", [PROMPTS[0], "word " * 5000]),
        line("one", PROMPTS[3]),
        line("two", PROMPTS[1:3]),
    ]
    batch = client.batches.create(
        input_file_id=_upload(client, lines), endpoint="/v1/completions", completion_window="24h"
    )
    # `bot` (its latest version) pinned to the version it names now: a later one changes
    # nothing for the batch.
    assert batch.model == first
    later = publish_adapter_version(services, tenant_a.tenant_id, executor, peft_adapter, 4)
    assert later != first
    # A window of 4 calls: the three prompts of the first line, then a line at a time.
    done = _run(services, client, batch.id, window=4)
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 1)
    answered = {
        e["custom_id"]: e["response"]["body"] for e in _entries(client, done.output_file_id)
    }
    assert list(answered) == ["three", "one", "two"]
    three = client.completions.create(model=first, prompt=PROMPTS[:3], max_tokens=5, temperature=0)
    assert [c["text"] for c in answered["three"]["choices"]] == [c.text for c in three.choices]
    assert [c["index"] for c in answered["three"]["choices"]] == [0, 1, 2]
    assert answered["three"]["object"] == "text_completion" and answered["three"]["model"] == "bot"
    # A prompt past the context: the executor's refusal (400), its sibling not left running.
    [refused] = _entries(client, done.error_file_id)
    assert refused["custom_id"] == "long" and refused["error"] is None
    assert refused["response"]["status_code"] == 400
    assert "context" in refused["response"]["body"]["error"]["message"]
    assert _unfinished_calls(services) == 0


def test_a_cancelled_batch_ends_with_what_was_answered_and_withdraws_the_rest(
    services: Services, live_url: str, tenant_a: TenantKeys, executor: str
) -> None:
    client = openai_client(live_url, tenant_a.member)
    lines = [
        _chat_line(f"row-{k}", executor, f"Count to {k}", max_completion_tokens=4) for k in range(8)
    ]
    batch = _create(client, lines)
    batch_runner.run_due(services, window=2)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    ended = _run(services, client, batch.id, window=2)
    assert ended.status == "cancelled" and ended.cancelled_at is not None
    answered = _entries(client, ended.output_file_id)
    refused = _entries(client, ended.error_file_id)
    # Every line once, in one file or the other; at most the two asked were answered.
    assert sorted(e["custom_id"] for e in answered + refused) == sorted(
        line["custom_id"] for line in lines
    )
    assert len(answered) <= 2 and len(refused) >= 6
    assert all(e["error"]["code"] == "batch_cancelled" for e in refused)
    assert ended.request_counts is not None
    assert ended.request_counts.completed == len(answered)
    assert ended.request_counts.failed == len(refused)
    assert _unfinished_calls(services) == 0
    # Cancelling again answers it as it is.
    assert client.batches.cancel(batch.id).status == "cancelled"


def test_an_expired_batch_ends_and_a_model_unknown_is_refused_at_create(
    services: Services, live_url: str, tenant_a: TenantKeys, tenant_b: TenantKeys
) -> None:
    base = register_test_base(services.engine, "tiny-unserved")
    client = openai_client(live_url, tenant_a.member)
    lines = [_chat_line(f"row-{k}", base.name, "Hello") for k in range(3)]
    waiting = _create(client, lines)
    # Another tenant neither sees it nor cancels it.
    theirs = openai_client(live_url, tenant_b.member)
    with pytest.raises(openai.NotFoundError):
        theirs.batches.retrieve(waiting.id)
    with pytest.raises(openai.NotFoundError):
        theirs.batches.cancel(waiting.id)
    assert list(theirs.batches.list()) == []
    # No executor holds its base: it waits, then its window passes.
    batch_runner.run_due(services)
    with services.engine.begin() as conn:
        conn.execute(
            text("UPDATE batches SET expires_at = now() - interval '1 second' WHERE id = :b"),
            {"b": waiting.id},
        )
    expired = _run(services, client, waiting.id, window=16)
    assert expired.status == "expired" and expired.expired_at is not None
    assert expired.output_file_id is None
    errors = _entries(client, expired.error_file_id)
    assert [e["error"]["code"] for e in errors] == ["batch_expired"] * 3
    assert expired.request_counts is not None and expired.request_counts.failed == 3

    # A model the tenant may not chat with is refused when the batch is created.
    unknown = [_chat_line(f"row-{k}", "nobody@1", "Hello") for k in range(2)]
    with pytest.raises(openai.NotFoundError, match="nobody@1") as refused:
        _create(client, unknown)
    assert refused.value.code == "model_not_found"
    assert [b.id for b in client.batches.list()] == [waiting.id]


def test_the_beats_run_carries_a_batch_through_its_windows_one_runner_at_a_time(
    services: Services, live_url: str, tenant_a: TenantKeys, executor: str
) -> None:
    client = openai_client(live_url, tenant_a.member)
    lines = [_chat_line(f"row-{k}", executor, f"Count to {k}", max_tokens=3) for k in range(6)]
    batch = _create(client, lines)
    # Another runner holds the lock: this one returns at once, nothing asked.
    with services.engine.connect() as other:
        other.execute(text("SELECT pg_advisory_lock(:k)"), {"k": batch_runner.LOCK_KEY})
        assert batch_runner.run_for(services, 30, window=2) == 0
        assert _in_flight(services, batch.id) == 0
        # Behind a pooler that keeps no session (no LISTEN, no session's lock): one pass.
        pooled = dataclasses.replace(
            services, settings=services.settings.model_copy(update={"tinker_wake_on_finish": False})
        )
        assert batch_runner.run_for(pooled, 30, window=2) == 1
        assert _in_flight(services, batch.id) == 2
        other.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": batch_runner.LOCK_KEY})
        other.commit()
    # One run steps it window after window until it is over, then returns.
    steps = batch_runner.run_for(services, 120, window=2)
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed" and done.request_counts is not None
    assert done.request_counts.completed == 6 and steps >= 3
    # The lock was let go: no session of this database holds an advisory lock.
    with services.engine.connect() as conn:
        held = conn.execute(
            text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())"
            )
        ).scalar_one()
    assert held == 0


def _status(services: Services, batch_id: str) -> list[tuple[str, int]]:
    with services.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT status, attempts FROM batch_requests WHERE batch_id = :b ORDER BY line"),
            {"b": batch_id},
        ).all()
    return [(row.status, row.attempts) for row in rows]


def test_a_request_the_platform_failed_is_asked_again_and_a_cancel_waits_for_what_runs(
    services: Services, live_url: str, tenant_a: TenantKeys
) -> None:
    base = register_test_base(services.engine, "tiny-played")
    played = PlayedExecutor(services, base.id)
    client = openai_client(live_url, tenant_a.member)
    lines = [_chat_line(f"row-{k}", base.name, "Hello") for k in range(3)]
    batch = _create(client, lines)
    batch_runner.run_due(services, window=1)
    assert _status(services, batch.id) == [("asked", 1), ("pending", 0), ("pending", 0)]
    # Its executor lost: the platform's failure, so the same pass asks it again.
    played.fail(played.take(), "the executor stopped")
    batch_runner.run_due(services, window=1)
    assert _status(services, batch.id) == [("asked", 2), ("pending", 0), ("pending", 0)]
    played.finish(played.take(), "first")
    batch_runner.run_due(services, window=1)
    assert _status(services, batch.id) == [("done", 2), ("asked", 1), ("pending", 0)]
    running = played.take()
    client.batches.cancel(batch.id)
    # The call an executor runs is awaited, not dropped; the line never asked ends at once.
    batch_runner.run_due(services, window=1)
    assert _status(services, batch.id) == [("done", 2), ("asked", 1), ("failed", 0)]
    assert client.batches.retrieve(batch.id).status == "cancelling"
    played.finish(running, "second")
    ended = _run(services, client, batch.id, window=1)
    assert ended.status == "cancelled" and ended.request_counts is not None
    assert (ended.request_counts.completed, ended.request_counts.failed) == (2, 1)
    texts = [
        e["response"]["body"]["choices"][0]["message"]["content"]
        for e in _entries(client, ended.output_file_id)
    ]
    assert texts == ["first", "second"]
    [unrun] = _entries(client, ended.error_file_id)
    assert unrun["custom_id"] == "row-2" and unrun["error"]["code"] == "batch_cancelled"

    # An answer let go before the runner read it (held up past the payloads' retention) is
    # asked again; a cancel withdraws the calls no executor took, and awaits none.
    dropped = _create(client, lines[:2])
    batch_runner.run_due(services, window=2)
    assert _status(services, dropped.id) == [("asked", 1), ("asked", 1)]
    answered = played.take()
    played.finish(answered, "let go")
    with services.engine.begin() as conn:
        conn.execute(
            text("UPDATE interactive_calls SET payload_dropped_at = now() WHERE id = :id"),
            {"id": answered.id},
        )
    batch_runner.run_due(services, window=2)
    assert _status(services, dropped.id) == [("asked", 2), ("asked", 1)]
    client.batches.cancel(dropped.id)
    batch_runner.run_due(services, window=2)
    withdrawn = client.batches.retrieve(dropped.id)
    assert withdrawn.status == "cancelled" and withdrawn.output_file_id is None
    codes = [e["error"]["code"] for e in _entries(client, withdrawn.error_file_id)]
    assert codes == ["batch_cancelled", "batch_cancelled"]
    assert _unfinished_calls(services) == 0

    # A completion of two prompts, the batch cancelled while one runs: the other is withdrawn
    # (not taken for the executor's refusal), the running one awaited, and the line ends
    # batch_cancelled.
    body = {"model": base.name, "prompt": ["one", "two"], "max_tokens": 3}
    pair = client.batches.create(
        input_file_id=_upload(
            client,
            [{"custom_id": "pair", "method": "POST", "url": "/v1/completions", "body": body}],
        ),
        endpoint="/v1/completions",
        completion_window="24h",
    )
    batch_runner.run_due(services, window=2)
    first_prompt = played.take()
    client.batches.cancel(pair.id)
    batch_runner.run_due(services, window=2)
    batch_runner.run_due(services, window=2)
    assert _status(services, pair.id) == [("asked", 1)]
    played.finish(first_prompt, "half")
    ended_pair = _run(services, client, pair.id, window=2)
    assert ended_pair.status == "cancelled" and ended_pair.output_file_id is None
    [line] = _entries(client, ended_pair.error_file_id)
    assert line["response"] is None and line["error"]["code"] == "batch_cancelled"

    # Failed by the platform MAX_ATTEMPTS times: its failure is its answer (503).
    again = _create(client, lines[:1])
    for _ in range(batch_runner.MAX_ATTEMPTS):
        batch_runner.run_due(services, window=1)
        played.fail(played.take(), "the executor stopped")
    assert _status(services, again.id) == [("asked", batch_runner.MAX_ATTEMPTS)]
    done = _run(services, client, again.id, window=1)
    [failed] = _entries(client, done.error_file_id)
    assert failed["response"]["status_code"] == 503
    assert failed["response"]["body"]["error"]["message"] == "the executor stopped"
    assert _rows_left(services, again.id) == 0


def test_a_request_no_answer_can_be_made_of_fails_alone_and_the_session_is_kept_alive(
    services: Services, live_url: str, tenant_a: TenantKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = register_test_base(services.engine, "tiny-played")
    played = PlayedExecutor(services, base.id)
    client = openai_client(live_url, tenant_a.member)
    lines = [_chat_line(f"row-{k}", base.name, "Hello") for k in range(2)]
    batch = _create(client, lines)
    batch_runner.run_due(services, window=1)
    # Waiting on its calls (an executor's outage), it heartbeats the chat session, so the
    # session's expiry does not take the samplers its calls wait on.
    session = chat_completions.session_id(tenant_a.tenant_id)
    with services.engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE interactive_sessions SET last_heartbeat_at = now() - interval '1 hour' "
                "WHERE id = :id"
            ),
            {"id": session},
        )
    batch_runner.run_due(services, window=1)
    with services.engine.connect() as conn:
        assert conn.execute(
            text(
                "SELECT last_heartbeat_at > now() - interval '1 minute' "
                "FROM interactive_sessions WHERE id = :id"
            ),
            {"id": session},
        ).scalar_one()
    # An answer the runner cannot make (a bug): that request fails alone (500), the next runs.
    played.finish(played.take(), "first")

    def broken(body: Any, calls: Any) -> Any:
        raise RuntimeError("no answer")

    monkeypatch.setattr(batch_runner, "answer", broken)
    batch_runner.run_due(services, window=1)
    assert _status(services, batch.id) == [("failed", 1), ("asked", 1)]
    monkeypatch.undo()
    played.finish(played.take(), "second")
    done = _run(services, client, batch.id, window=1)
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    [failed] = _entries(client, done.error_file_id)
    assert failed["custom_id"] == "row-0" and failed["response"]["status_code"] == 500


def _nothing_written(services: Services) -> None:
    with services.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM batches")).scalar_one() == 0
        assert conn.execute(text("SELECT count(*) FROM batch_requests")).scalar_one() == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"url": "/v1/completions"}, "line 2: url /v1/completions is not the batch's endpoint"),
        ({"body": {"model": "m"}}, "line 2: messages: Field required"),
        ({"body": {"model": "m", "messages": [], "stream": True}}, "line 2: messages"),
        (
            {
                "body": {
                    "model": "m",
                    "messages": [{"role": "user", "content": "x"}],
                    "stream": True,
                }
            },
            "line 2: stream is not taken in a batch",
        ),
        (
            {"body": {"model": "other", "messages": [{"role": "user", "content": "x"}]}},
            "line 2: model 'other' is not the earlier lines' 'm'",
        ),
        (
            {
                "body": {
                    "model": "m",
                    "messages": [{"role": "user", "content": "x"}],
                    "top_logprobs": 2,
                }
            },
            "line 2: top_logprobs is taken only with logprobs",
        ),
    ],
)
def test_a_batch_a_line_of_which_would_be_refused_is_refused_whole_naming_the_line(
    services: Services, live_url: str, tenant_a: TenantKeys, change: dict[str, Any], message: str
) -> None:
    client = openai_client(live_url, tenant_a.member)
    good = _chat_line("a", "m", "Hello")
    file_id = _upload(client, [good, {**_chat_line("b", "m", "Hi"), **change}])
    with pytest.raises(openai.BadRequestError, match=message) as refused:
        client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert refused.value.code == "invalid_batch_input"
    _nothing_written(services)


def test_a_batch_file_is_checked_at_upload_and_a_batch_needs_one_of_its_tenant(
    services: Services, live_url: str, tenant_a: TenantKeys, tenant_b: TenantKeys
) -> None:
    client = openai_client(live_url, tenant_a.member)
    good = _chat_line("a", "m", "Hello")
    for lines, message in [
        ([good, good], "line 2: custom_id 'a' is used by an earlier line"),
        ([good, {**good, "custom_id": "b", "method": "GET"}], "line 2: method must be 'POST'"),
        ([{**good, "url": "/v1/embeddings"}], "line 1: url must be one of"),
        ([{**good, "extra": 1}], "line 1: unknown field"),
        ([{**good, "custom_id": ""}], "line 1: custom_id must be a string"),
    ]:
        with pytest.raises(openai.BadRequestError, match=message):
            _upload(client, lines)
    with pytest.raises(openai.BadRequestError, match="line 2: not a JSON object"):
        client.files.create(
            file=("x.jsonl", json.dumps(good).encode() + b"\n{oops\n"), purpose="batch"
        )
    deep = b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": ' + (
        b"[" * 100_000
    )
    for data, message in [
        (deep, "line 1: not a JSON object"),
        (b'{"custom_id": "a", "body": ' + b"9" * 5000 + b"}", "line 1: not a JSON object"),
        (json.dumps({**good, "custom_id": "a\u0000"}).encode(), "line 1: a string holds a NUL"),
        (
            json.dumps(_chat_line("a", "m", "\ud800")).encode(),
            "line 1: a string holds a lone surrogate",
        ),
        (b"\xff\xfe{}", "line 1: not a JSON object"),
    ]:
        with pytest.raises(openai.BadRequestError, match=message):
            client.files.create(file=("x.jsonl", data), purpose="batch")
    assert list(client.files.list(purpose="batch")) == []

    dataset = (
        b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
    )
    tuning = client.files.create(file=("d.jsonl", dataset), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="not 'batch'"):
        client.batches.create(
            input_file_id=tuning.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.NotFoundError):
        client.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    # Another tenant's file is as unknown as a made-up one, and so is its batch.
    theirs = openai_client(live_url, tenant_b.member)
    with pytest.raises(openai.NotFoundError):
        theirs.batches.create(
            input_file_id=_upload(client, [good]),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
    with pytest.raises(openai.NotFoundError):
        client.batches.cancel("batch_nope")
    _nothing_written(services)
