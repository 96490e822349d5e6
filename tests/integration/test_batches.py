"""OpenAI's Batch API (`/v1/batches`) through the official `openai` SDK, on the real interactive
executor holding the tiny test base: a file of chats or completions uploaded with purpose
`batch`, run a window at a time by the runner's passes (`api.batch_runner.run_due`, what the
beat runs every second), its answers in an output file equal to the same requests asked one by
one; refusals in the error file; a cancelled or expired batch ends with what was answered;
a file a line of which would be refused is refused whole, naming the line, and nothing is
written."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from sqlalchemy import text

from control_plane.api import batch_runner
from control_plane.services import Services
from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.factories import register_test_base
from tests.tinker_harness import openai_client, serving_executor, tinker_settings

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")

PROMPTS = ["The sky over the harbour was", "Once upon a time", "Rain fell on", "The old map"]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return tinker_settings(tmp_path)


def _upload(client: Any, lines: list[dict[str, Any]]) -> str:
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    return str(client.files.create(file=("requests.jsonl", data), purpose="batch").id)


def _chat_line(custom_id: str, model: str, prompt: str, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], **extra}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def _in_flight(services: Services, batch_id: str) -> int:
    with services.engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM batch_requests WHERE batch_id = :b AND status = 'asked'"
                ),
                {"b": batch_id},
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
    # Every call of the batch was read and its payload let go; it is listed.
    assert _unfinished_calls(services) == 0
    assert done.id in [b.id for b in client.batches.list()]
    with pytest.raises(openai.ConflictError, match="completed"):
        client.batches.cancel(done.id)


def test_a_batch_of_completions_answers_refusals_in_its_error_file(
    services: Services, live_url: str, tenant_a: TenantKeys, executor: str
) -> None:
    client = openai_client(live_url, tenant_a.member)

    def line(custom_id: str, prompt: Any) -> dict[str, Any]:
        body = {"model": executor, "prompt": prompt, "max_tokens": 5, "temperature": 0}
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}

    lines = [line("two", PROMPTS[:2]), line("long", "word " * 5000), line("one", PROMPTS[2])]
    file_id = _upload(client, lines)
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/completions", completion_window="24h"
    )
    done = _run(services, client, batch.id, window=8)
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
    answered = {
        e["custom_id"]: e["response"]["body"] for e in _entries(client, done.output_file_id)
    }
    two = client.completions.create(model=executor, prompt=PROMPTS[:2], max_tokens=5, temperature=0)
    assert [c["text"] for c in answered["two"]["choices"]] == [c.text for c in two.choices]
    assert [c["index"] for c in answered["two"]["choices"]] == [0, 1]
    assert answered["two"]["object"] == "text_completion"
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
    batch = client.batches.create(
        input_file_id=_upload(client, lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
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


def test_an_expired_batch_ends_and_a_model_unknown_fails_each_request(
    services: Services, live_url: str, tenant_a: TenantKeys
) -> None:
    base = register_test_base(services.engine, "tiny-unserved")
    client = openai_client(live_url, tenant_a.member)
    lines = [_chat_line(f"row-{k}", base.name, "Hello") for k in range(3)]
    waiting = client.batches.create(
        input_file_id=_upload(client, lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
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

    unknown = [_chat_line(f"row-{k}", "nobody@1", "Hello") for k in range(2)]
    batch = client.batches.create(
        input_file_id=_upload(client, unknown),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    done = _run(services, client, batch.id, window=16)
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (0, 2)
    errors = _entries(client, done.error_file_id)
    assert [e["response"]["status_code"] for e in errors] == [404, 404]
    assert errors[0]["response"]["body"]["error"]["code"] == "model_not_found"


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


def test_a_batch_file_is_checked_at_upload_and_a_batch_needs_one(
    services: Services, live_url: str, tenant_a: TenantKeys
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
    with pytest.raises(openai.NotFoundError):
        client.batches.cancel("batch_nope")
    _nothing_written(services)
