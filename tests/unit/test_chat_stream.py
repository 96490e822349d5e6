"""What a streamed chat sends of each text the executor writes (`stream_deltas.text_deltas`): only
what is new past what was sent; a text written again from its start is waited past; a text
that contradicts what was sent, or a whole answer that does not begin with it, ends the
stream. And how a stream ends (`chat_stream.events`, a chat's looks played): `data: [DONE]`
after a whole answer, nothing more once its client left (which stops the chat)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import replace
from typing import Any

import pytest

from control_plane import legacy_logprobs
from control_plane.api.errors import ApiError
from control_plane.api.routes.chat_stream import Streamed, _new_since, events
from control_plane.api.routes.stream_deltas import Resampled as _Resampled
from control_plane.api.routes.stream_deltas import text_deltas as _deltas
from control_plane.api.routes.stream_deltas import written as _written
from control_plane.interactive import CallRecord


def _contents(deltas: list[dict[str, object]]) -> list[tuple[object, object]]:
    return [(d["index"], d["delta"]) for d in deltas]


def test_only_what_is_new_is_sent_each_choice_its_own() -> None:
    sent = ["", ""]
    assert _contents(_deltas(sent, ["Hel", ""])) == [(0, {"content": "Hel"})]
    assert _contents(_deltas(sent, ["Hello", "Yes"])) == [
        (0, {"content": "lo"}),
        (1, {"content": "Yes"}),
    ]
    assert _deltas(sent, ["Hello", "Yes"]) == []  # nothing new, nothing sent
    assert sent == ["Hello", "Yes"]


def test_a_text_written_again_from_its_start_is_waited_past() -> None:
    sent = ["Hello wor"]
    assert _deltas(sent, ["H"]) == [] and _deltas(sent, ["Hello wo"]) == []
    assert sent == ["Hello wor"]
    assert _contents(_deltas(sent, ["Hello world"], whole=True)) == [(0, {"content": "ld"})]


@pytest.mark.parametrize(
    ("sent", "text", "whole"),
    [("abc", "xyz", False), ("Hello", "Help", False), ("Hello wor", "Hel", True)],
    ids=["other text", "a changed ending", "a whole answer shorter than what was sent"],
)
def test_text_that_contradicts_what_was_sent_ends_the_stream(
    sent: str, text: str, whole: bool
) -> None:
    with pytest.raises(_Resampled):
        _deltas([sent], [text], whole=whole)


def _call(status: str, partial: str | None = None, whole: str | None = None) -> CallRecord:
    result = None
    if whole is not None:
        answer = {"text": whole, "tokens": [1, 2], "stop_reason": "stop"}
        result = {"sequences": [answer], "prompt_tokens": 3}
    return CallRecord(
        id="fut-1",
        model_id="imdl-1",
        tenant_id="t",
        seq=0,
        kind="sample",
        request={},
        status=status,
        result=result,
        error=None,
        payload_dropped_at=None,
        partial=None if partial is None else {"texts": [partial]},
    )


def _played(looks: list[CallRecord], gone: bool) -> tuple[Streamed, list[str]]:
    """A stream whose looks find `looks` in turn (the last one again after), and what it did."""
    did: list[str] = []

    def look() -> CallRecord:
        return looks.pop(0) if len(looks) > 1 else looks[0]

    async def forget(call: CallRecord) -> None:
        did.append("forget")

    async def leave() -> None:
        did.append("leave")

    async def disconnected() -> bool:
        return gone

    def refusal(call: CallRecord) -> ApiError:
        return ApiError(503, "executor_failed", "failed")

    return Streamed(
        chunk_id="chatcmpl-fut-1",
        model="bot@1",
        choices=1,
        include_usage=True,
        look=look,
        look_past=None,
        wake=lambda: contextlib.nullcontext(None),
        forget=forget,
        leave=leave,
        disconnected=disconnected,
        refusal=refusal,
    ), did


async def _sent(streamed: Streamed, first: CallRecord) -> list[Any]:
    sent = [line async for line in events(streamed, first)]
    await asyncio.sleep(0.2)  # what a stream that ended early leaves to a task of the loop
    return [json.loads(s.removeprefix("data: ")) if s.startswith("data: {") else s for s in sent]


def test_a_whole_answer_ends_with_done() -> None:
    streamed, did = _played([_call("completed", whole="Hello")], gone=False)
    sent = asyncio.run(_sent(streamed, _call("running", partial="Hel")))
    contents = [c["choices"][0]["delta"].get("content") for c in sent[:-1] if c["choices"]]
    assert contents == ["", "Hel", "lo", None]
    assert sent[-2]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert sent[-1] == "data: [DONE]\n\n"
    assert did == ["forget"]


def test_a_text_completions_stream_sends_text_chunks_with_no_role_and_its_own_finish() -> None:
    whole = _call("completed", whole="Hello")
    assert whole.result is not None
    # A completion's answer: each sequence's finish said, its tokens counted, not listed.
    whole.result["sequences"] = [{"text": "Hello", "finish_reason": "length"}]
    whole.result["completion_tokens"] = 4
    streamed, did = _played([whole], gone=False)
    streamed = replace(streamed, chunk_id="cmpl-fut-1", text=True)
    sent = asyncio.run(_sent(streamed, _call("running", partial="Hel")))
    assert all(c["object"] == "text_completion" for c in sent[:-1])
    choices = [c["choices"][0] for c in sent[:-2]]
    assert choices == [
        {"index": 0, "text": "Hel", "logprobs": None, "finish_reason": None},
        {"index": 0, "text": "lo", "logprobs": None, "finish_reason": None},
        {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"},
    ]
    assert sent[-2]["choices"] == []
    assert sent[-2]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert sent[-1] == "data: [DONE]\n\n" and did == ["forget"]


def test_a_stream_whose_client_left_sends_nothing_more_and_stops_the_chat() -> None:
    streamed, did = _played([_call("completed", whole="Hello")], gone=True)
    sent = asyncio.run(_sent(streamed, _call("running", partial="Hel")))
    assert [c["choices"][0]["delta"] for c in sent] == [{"role": "assistant", "content": ""}]
    assert did == ["leave", "forget"]  # stopped, then let go once answered


def test_a_look_past_the_entries_sent_is_new_only_once_the_executor_wrote_again() -> None:
    """A stream with logprobs looks past the entries it sent, so the same write reads otherwise
    once they are sent: that is no new write (the stream would wake at once and look twice a
    write); a new text or another count stored is."""
    entry = {"token": "He", "logprob": -0.5, "bytes": [72, 101], "top_logprobs": []}
    first = {"texts": ["He"], "logprobs": [[entry]], "stored": [1], "run": "r1"}
    seen = _written(first)
    assert seen == {"texts": ["He"], "stored": [1], "run": "r1"}
    running = _call("running")
    assert not _new_since(seen)(replace(running, partial={**first, "logprobs": [[]]}))
    assert _new_since(seen)(replace(running, partial={**first, "stored": [2], "texts": ["Hel"]}))
    assert _new_since(seen)(_call("completed", whole="Hello"))
    assert _written(None) is None and _written({"texts": ["a"]}) == {"texts": ["a"]}


def _legacy(*tokens: str) -> list[dict[str, Any]]:
    """A completion's legacy entries (`control_plane.legacy_logprobs`) of tokens' texts."""
    return [
        {"token": t, "logprob": -1.0 - k, "top_logprobs": {t: -1.0 - k}}
        for k, t in enumerate(tokens)
    ]


def test_a_text_completions_logprobs_stream_with_its_text_and_join_into_the_whole_answers() -> None:
    """A completion streamed with logprobs: each chunk carries the entries written since those
    sent as OpenAI's legacy lists, `text_offset` carrying on from the entries before (a special
    token's entry with no text of its own still goes, in a chunk with no text); the rest comes
    with the whole answer, and the lists joined are its lists exactly."""
    entries = _legacy("He", "llo", "<eos>", " you")
    whole = _call("completed", whole="Hello you")
    assert whole.result is not None
    lists = legacy_logprobs.arrays(entries)
    whole.result["sequences"] = [{"text": "Hello you", "finish_reason": "stop", "logprobs": lists}]
    whole.result["completion_tokens"] = 4
    running = _call("running")
    looks = [
        replace(running, partial={"texts": ["Hello"], "logprobs": [entries[2:3]], "run": "r1"}),
        whole,
    ]
    streamed, did = _played(looks, gone=False)
    past: list[list[int]] = []

    def look_past(counted: list[int]) -> CallRecord:
        past.append(counted)
        return streamed.look()

    streamed = replace(streamed, chunk_id="cmpl-fut-1", text=True, look_past=look_past)
    first = replace(running, partial={"texts": ["Hel"], "logprobs": [entries[:2]], "run": "r1"})
    sent = asyncio.run(_sent(streamed, first))
    choices = [c["choices"][0] for c in sent[:-2]]
    assert [c["text"] for c in choices] == ["Hel", "lo", " you", ""]
    assert [c["logprobs"] and c["logprobs"]["tokens"] for c in choices] == [
        ["He", "llo"],
        ["<eos>"],
        [" you"],
        [],  # its finish: no entries, and its lists still there, empty
    ]
    assert [c["logprobs"]["text_offset"] for c in choices[:3]] == [[0, 2], [5], [10]]
    joined = {key: [v for c in choices[:3] for v in c["logprobs"][key]] for key in lists}
    assert joined == lists
    assert past[0] == [2]  # each look reads past the entries sent
    assert choices[-1]["finish_reason"] == "stop" and did == ["forget"]


@pytest.mark.parametrize("run", ["r1", "r2"], ids=["the same decoding", "another decoding"])
def test_a_completions_entries_sent_that_the_whole_answer_does_not_begin_with_end_its_stream(
    run: str,
) -> None:
    """Entries sent, then a whole answer whose first tokens are others (the call decoded again
    and sampled otherwise): the stream ends with its error rather than send a contradiction.
    Another decoding's entries written meanwhile are not sent."""
    whole = _call("completed", whole="Hi")
    assert whole.result is not None
    other = legacy_logprobs.arrays(_legacy("H", "i"))
    whole.result["sequences"] = [{"text": "Hi", "finish_reason": "stop", "logprobs": other}]
    running = _call("running")
    again = {"texts": ["H"], "logprobs": [_legacy("x")], "stored": [2], "run": run}
    looks = [replace(running, partial=again)]
    streamed, _ = _played([*looks, whole], gone=False)
    streamed = replace(streamed, text=True, look_past=lambda counted: streamed.look())
    once = {"texts": ["H"], "logprobs": [_legacy("Hx")], "stored": [1], "run": "r1"}
    sent = asyncio.run(_sent(streamed, replace(running, partial=once)))
    tokens = [
        c["choices"][0]["logprobs"]["tokens"]
        for c in sent
        if isinstance(c, dict) and c.get("choices") and c["choices"][0].get("logprobs")
    ]
    assert tokens == ([["Hx"], ["x"]] if run == "r1" else [["Hx"]])
    assert sent[-1]["error"]["code"] == "executor_failed" and "sampled again" in str(sent[-1])
