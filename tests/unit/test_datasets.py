from __future__ import annotations

import hashlib
import io
import json
import pickle
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control_plane.datasets import (
    DatasetError,
    DatasetStats,
    detect_format,
    iter_examples,
    validate_jsonl,
)

LIMITS: dict[str, Any] = {"max_bytes": 10_000_000, "max_example_tokens": 4096}

CHAT = {
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
}
PROMPT = {"prompt": "2+2=", "completion": " 4"}
TEXT = {"text": "Once upon a time."}
PREFERENCE = {
    "input": {
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hello"},
        ]
    },
    "preferred_output": [{"role": "assistant", "content": "Hi! How can I help?"}],
    "non_preferred_output": [{"role": "assistant", "content": "What?"}],
}


def jsonl(*records: object) -> bytes:
    return b"".join(json.dumps(record).encode() + b"\n" for record in records)


def validate(data: bytes, **kwargs: Any) -> DatasetStats:
    return validate_jsonl(io.BytesIO(data), **{**LIMITS, **kwargs})


def refusal(data: bytes, **kwargs: Any) -> DatasetError:
    with pytest.raises(DatasetError) as caught:
        validate(data, **kwargs)
    return caught.value


def chat(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"messages": list(messages)}


# --- valid files -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "fmt", "tokens_each"),
    [
        # chat: 14 + 18 + 6 = 38 bytes of content -> 10 tokens; roles are not counted
        (CHAT, "chat", 10),
        (PROMPT, "prompt_completion", 2),  # 4 + 2 bytes -> 2
        (TEXT, "text", 5),  # 17 bytes -> 5
        # a pair: the conversation once and both replies, 8 + 5 + 19 + 5 = 37 bytes -> 10
        (PREFERENCE, "preference", 10),
    ],
)
def test_each_format_is_accepted_with_counts_and_checksum(
    record: dict[str, Any], fmt: str, tokens_each: int
) -> None:
    data = jsonl(record, record, record)
    stats = validate(data)
    assert stats == DatasetStats(
        format=fmt,  # type: ignore[arg-type]
        examples=3,
        tokens=3 * tokens_each,
        tokens_exact=False,
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        max_example_tokens=tokens_each,
    )


def test_approximate_tokens_count_utf8_bytes_not_characters() -> None:
    stats = validate(jsonl({"text": "é" * 5}))  # 10 UTF-8 bytes -> ceil(10 / 4)
    assert stats.tokens == 3
    assert stats.max_example_tokens == 3


def test_count_tokens_hook_is_used_and_makes_counts_exact() -> None:
    seen: list[dict[str, Any]] = []

    def count(record: dict[str, Any]) -> int:
        seen.append(record)
        return len(record["text"])

    stats = validate(jsonl({"text": "abc"}, {"text": "abcdefg"}), count_tokens=count)
    assert seen == [{"text": "abc"}, {"text": "abcdefg"}]
    assert (stats.tokens, stats.max_example_tokens, stats.tokens_exact) == (10, 7, True)


def test_chat_weights_and_multi_turn_are_accepted() -> None:
    record = chat(
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "bad answer", "weight": 0},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "good answer", "weight": 1},
    )
    assert validate(jsonl(record)).examples == 1


def test_blank_lines_are_skipped_but_counted_in_line_numbers() -> None:
    data = b"\n" + jsonl(TEXT) + b"   \n\t\n" + jsonl(TEXT) + b"\n" + b'{"text": 1}\n'
    error = refusal(data)
    assert (error.code, error.line) == ("invalid_example", 7)
    assert validate(data.rsplit(b"\n", 2)[0] + b"\n").examples == 2


def test_crlf_line_endings_and_a_missing_final_newline() -> None:
    data = jsonl(PROMPT, PROMPT).replace(b"\n", b"\r\n") + b'{"prompt": "a", "completion": "b"}'
    stats = validate(data)
    assert (stats.examples, stats.bytes) == (3, len(data))
    assert list(iter_examples(io.BytesIO(data)))[-1] == {"prompt": "a", "completion": "b"}


def test_utf8_bom_on_the_first_line_is_accepted_and_hashed() -> None:
    data = b"\xef\xbb\xbf" + jsonl(TEXT, TEXT)
    stats = validate(data)
    assert stats.examples == 2
    assert stats.sha256 == hashlib.sha256(data).hexdigest()
    assert list(iter_examples(io.BytesIO(data))) == [TEXT, TEXT]


def test_a_bom_after_the_first_line_is_refused() -> None:
    error = refusal(jsonl(TEXT) + b"\xef\xbb\xbf" + jsonl(TEXT))
    assert (error.code, error.line) == ("invalid_json", 2)


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"\n", b"  \r\n\n\t\n", b"\xef\xbb\xbf\n"])
def test_empty_file(data: bytes) -> None:
    error = refusal(data)
    assert (error.code, error.line) == ("empty_file", None)
    assert "no examples" in error.message


def test_invalid_json_names_line_and_column() -> None:
    data = jsonl(*[TEXT] * 11) + b'{"text": "abc" "def", "x": 1}\n' + jsonl(TEXT)
    error = refusal(data)
    assert (error.code, error.line) == ("invalid_json", 12)
    assert error.message == "line 12: not valid JSON (Expecting ',' delimiter at column 16)"
    assert str(error) == error.message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"text": "a", "text": "b"}', "key 'text' appears twice"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"text": "a"', "Expecting ',' delimiter"),
        (b'{"text": ' + b"9" * 5000 + b"}", "digits"),
    ],
)
def test_other_invalid_json(line: bytes, expected: str) -> None:
    error = refusal(jsonl(TEXT) + line + b"\n")
    assert (error.code, error.line) == ("invalid_json", 2)
    assert expected in error.message


@pytest.mark.parametrize(
    ("line", "got"),
    [(b"[1, 2]", "an array"), (b'"text"', "a string"), (b"3", "a number"), (b"null", "null")],
)
def test_not_an_object(line: bytes, got: str) -> None:
    error = refusal(jsonl(TEXT) + line + b"\n")
    assert (error.code, error.line) == ("not_an_object", 2)
    assert error.message == f"line 2: expected a JSON object, got {got}"


def test_not_utf8_names_the_byte() -> None:
    error = refusal(jsonl(TEXT) + '{"text": "café"}\n'.encode("latin-1"))
    assert (error.code, error.line) == ("not_utf8", 2)
    assert "byte 0xe9 at byte 14" in error.message


def test_utf16_file_is_refused_as_not_utf8() -> None:
    error = refusal(jsonl(TEXT).decode().encode("utf-16"))
    assert (error.code, error.line) == ("not_utf8", 1)
    assert "UTF-16" in error.message


def test_unknown_format_lists_the_keys() -> None:
    error = refusal(b'\n{"input": "a", "output": "b"}\n')
    assert (error.code, error.line) == ("unknown_format", 2)
    assert "'input', 'output'" in error.message


def test_a_preference_line_in_a_chat_file_is_a_mix_of_formats() -> None:
    error = refusal(jsonl(CHAT, PREFERENCE))
    assert (error.code, error.line) == ("mixed_formats", 2)
    assert "expected a chat example like line 1, got a preference example" in error.message


def test_mixed_formats_name_the_first_line() -> None:
    data = b"\n" + jsonl(CHAT, CHAT, CHAT, CHAT, CHAT, PROMPT)
    error = refusal(data)
    assert (error.code, error.line) == ("mixed_formats", 7)
    assert error.message.startswith(
        "line 7: expected a chat example like line 2, got a prompt/completion example"
    )


USER = {"role": "user", "content": "q"}
ANSWER = {"role": "assistant", "content": "a"}


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({**CHAT, "id": 7}, "unexpected key 'id' in a chat example"),
        ({**PROMPT, "meta": {}}, "unexpected key 'meta'"),
        ({**TEXT, "source": "x"}, "unexpected key 'source'"),
        ({"messages": []}, "non-empty array"),
        ({"messages": "hello"}, "non-empty array"),
        (chat(USER, "hi"), "messages[1] must be an object, got a string"),
        (chat({"role": "tool", "content": "x"}, ANSWER), "messages[0].role must be one of"),
        (chat(USER, {"content": "a"}), "messages[1].role must be one of"),
        (chat(USER, {"role": "assistant"}), "messages[1] has no 'content'"),
        (chat(USER, {"role": "assistant", "content": None}), "content must be a string, got null"),
        (chat(USER, {**ANSWER, "name": "bot"}), "unexpected key 'name' in messages[1]"),
        (chat(USER), "at least one assistant message"),
        (chat(USER, {"role": "assistant", "content": "  "}), "at least one assistant message"),
        (chat(USER, {**ANSWER, "weight": 0}), "at least one assistant message"),
        (chat({**USER, "weight": 1}, ANSWER), "only allowed on assistant messages"),
        (chat(USER, {**ANSWER, "weight": 2}), "weight must be 0 or 1, got 2"),
        (chat(USER, {**ANSWER, "weight": True}), "weight must be 0 or 1, got True"),
        (chat(USER, {**ANSWER, "weight": 1.0}), "weight must be 0 or 1, got 1.0"),
        ({"prompt": "x"}, "missing key 'completion'"),
        ({"completion": "x"}, "missing key 'prompt'"),
        ({"prompt": 1, "completion": "x"}, "prompt must be a string, got a number"),
        ({"prompt": "x", "completion": " \n"}, "'completion' is empty"),
        ({"text": ""}, "'text' is empty"),
        ({"text": ["a"]}, "text must be a string, got an array"),
        # JSON can escape half a surrogate pair; no tokenizer (nor UTF-8) takes it
        ({"text": "ok \ud800"}, "text holds a lone surrogate escape"),
        (chat(USER, {"role": "assistant", "content": "\udfff"}), "messages[1].content holds a"),
    ],
)
def test_invalid_example(record: dict[str, Any], expected: str) -> None:
    first = {"chat": CHAT, "prompt_completion": PROMPT, "text": TEXT, "preference": PREFERENCE}[
        detect_format(record)
    ]
    error = refusal(jsonl(first, first, record, first))
    assert (error.code, error.line) == ("invalid_example", 3)
    assert error.message.startswith("line 3: ")
    assert expected in error.message


def test_example_too_long_with_estimate_and_with_hook() -> None:
    data = jsonl(TEXT, {"text": "x" * 401})
    error = refusal(data, max_example_tokens=100)
    assert (error.code, error.line) == ("example_too_long", 2)
    assert "101 tokens (estimated" in error.message
    assert validate(data, max_example_tokens=101).max_example_tokens == 101

    error = refusal(data, max_example_tokens=100, count_tokens=lambda record: 1000)
    assert (error.code, error.line) == ("example_too_long", 1)
    assert "1,000 tokens, over the limit of 100" in error.message


def test_file_too_large_names_the_line_that_crosses_the_limit() -> None:
    data = jsonl(TEXT, TEXT) + b'{"text": "' + b"x" * 10_000 + b'"}\n' + jsonl(TEXT)
    error = refusal(data, max_bytes=1000)
    assert (error.code, error.line) == ("file_too_large", 3)
    assert "1,000 bytes" in error.message
    # a file of exactly max_bytes is fine; one byte more is not
    assert validate(data, max_bytes=len(data)).bytes == len(data)
    assert refusal(data, max_bytes=len(data) - 1).line == 4


def test_a_size_limit_reached_on_a_newline_blames_that_line() -> None:
    data = jsonl(TEXT, TEXT)
    assert refusal(data, max_bytes=len(data) - 1).line == 2
    assert refusal(data, max_bytes=len(jsonl(TEXT))).line == 2


def test_the_first_error_wins() -> None:
    data = jsonl(TEXT) + b"not json\n" + b"[1]\n" + b"x" * 10_000
    error = refusal(data, max_bytes=1000)
    assert (error.code, error.line) == ("invalid_json", 2)


def test_too_few_and_too_many_examples() -> None:
    data = jsonl(TEXT, TEXT, TEXT)
    error = refusal(data, min_examples=5)
    assert (error.code, error.line) == ("too_few_examples", None)
    assert error.message == "the file has 3 examples; at least 5 are needed"
    error = refusal(data, max_examples=2)
    assert (error.code, error.line) == ("too_many_examples", 3)
    assert validate(data, min_examples=3, max_examples=3).examples == 3


def test_bad_arguments_and_text_streams_are_programming_errors() -> None:
    with pytest.raises(ValueError, match="positive"):
        validate(jsonl(TEXT), max_bytes=0)
    with pytest.raises(TypeError, match="binary"):
        validate_jsonl(io.StringIO("{}"), **LIMITS)  # type: ignore[arg-type]


def test_error_survives_pickling_for_celery() -> None:
    error = refusal(b"[1]\n")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.code, copy.line, copy.message) == (error.code, error.line, error.message)


# --- preference pairs (DPO) --------------------------------------------------------------------


def pair(**changes: Any) -> dict[str, Any]:
    """PREFERENCE with top-level keys replaced (None: left out)."""
    return {k: v for k, v in {**PREFERENCE, **changes}.items() if v is not None}


def conversation(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"messages": list(messages), **fields}


def reply(*contents: Any, role: str = "assistant") -> list[dict[str, Any]]:
    return [{"role": role, "content": content} for content in contents]


def test_a_preference_pair_takes_openais_empty_tool_fields_and_any_conversation() -> None:
    records = [
        # OpenAI's own example: no tools asked for, which loraforge takes and ignores
        pair(input=conversation(USER, tools=[], parallel_tool_calls=True)),
        # a conversation that ends with the assistant, and replies of several messages
        pair(input=conversation(USER, ANSWER), preferred_output=reply("a", "b")),
        pair(input=conversation({"role": "system", "content": ""}, USER)),
        # a reply may hold an empty message beside one with text
        pair(non_preferred_output=reply("", "no")),
    ]
    stats = validate(jsonl(*records))
    assert (stats.format, stats.examples) == ("preference", 4)


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (pair(input=None), "missing key 'input' (a preference example needs 'input', "),
        (pair(preferred_output=None), "missing key 'preferred_output'"),
        (pair(non_preferred_output=None), "missing key 'non_preferred_output'"),
        (pair(id=3), "unexpected key 'id' in a preference example"),
        (pair(messages=[USER]), "unexpected key 'input' in a chat example"),
        (pair(input=[USER]), "'input' must be an object {\"messages\": [...]}, got an array"),
        (pair(input={}), "'input' has no 'messages'"),
        (pair(input=conversation(USER, model="x")), "unexpected key 'model' in 'input'"),
        (pair(input=conversation()), "'input.messages' must be a non-empty array of messages"),
        (pair(input=conversation({"role": "tool", "content": "x"})), "input.messages[0].role"),
        (pair(input=conversation({**USER, "weight": 1})), "unexpected key 'weight' in input"),
        (pair(input=conversation({"role": "user", "content": 5})), "content must be a string"),
        (
            pair(input=conversation(USER, tools=[{"type": "function"}])),
            "input.tools must be empty or left out: loraforge does not train tool calls",
        ),
        (pair(input=conversation(USER, tools=None)), "input.tools must be empty"),
        (
            pair(input=conversation(USER, parallel_tool_calls=False)),
            "input.parallel_tool_calls must be true or left out",
        ),
        (pair(preferred_output=[]), "'preferred_output' must be a non-empty array of assistant"),
        (pair(non_preferred_output="no"), "'non_preferred_output' must be a non-empty array"),
        (pair(preferred_output=reply(" \n")), "'preferred_output' is empty: the reply needs"),
        (pair(non_preferred_output=reply("")), "'non_preferred_output' is empty"),
        (
            pair(preferred_output=reply("hi", role="user")),
            "preferred_output[0].role must be 'assistant', got 'user'",
        ),
        (pair(non_preferred_output=[{"content": "x"}]), "non_preferred_output[0].role must be"),
        (pair(preferred_output=reply(None)), "preferred_output[0].content must be a string, got"),
        (pair(preferred_output=reply(["a"])), "content must be a string, got an array"),
        (pair(preferred_output=["hi"]), "preferred_output[0] must be an object, got a string"),
        (
            pair(preferred_output=[{**ANSWER, "weight": 1}]),
            "unexpected key 'weight' in preferred_output[0] (allowed: role, content)",
        ),
        (
            pair(non_preferred_output=PREFERENCE["preferred_output"]),
            "'preferred_output' and 'non_preferred_output' are the same",
        ),
    ],
)
def test_a_bad_preference_pair_is_refused_with_its_line_and_what_to_fix(
    record: dict[str, Any], expected: str
) -> None:
    test_invalid_example(record, expected)


def test_a_conversation_with_no_replies_is_not_a_known_format() -> None:
    error = refusal(jsonl({"input": conversation(USER)}))
    assert (error.code, error.line) == ("unknown_format", 1)
    assert '"preferred_output": [...], "non_preferred_output": [...]}' in error.message


_TEXTS = st.text(max_size=30)


@given(
    context=st.lists(
        st.tuples(st.sampled_from(["system", "user", "assistant"]), _TEXTS), min_size=1, max_size=4
    ),
    preferred=st.lists(_TEXTS, min_size=1, max_size=3).filter(lambda r: "".join(r).strip()),
    other=st.lists(_TEXTS, min_size=1, max_size=3).filter(lambda r: "".join(r).strip()),
)
def test_any_pair_of_different_replies_is_one_example_counted_in_full(
    context: list[tuple[str, str]], preferred: list[str], other: list[str]
) -> None:
    record = pair(
        input=conversation(*({"role": role, "content": text} for role, text in context)),
        preferred_output=reply(*preferred),
        non_preferred_output=reply(*other),
    )
    if preferred == other:
        assert "are the same" in refusal(jsonl(record)).message
        return
    stats = validate(jsonl(record, record))
    size = sum(len(t.encode()) for t in [*(text for _, text in context), *preferred, *other])
    assert (stats.format, stats.examples) == ("preference", 2)
    assert stats.max_example_tokens == -(-size // 4)
    assert stats.tokens == 2 * stats.max_example_tokens


# --- detect_format and iter_examples -----------------------------------------------------------


def test_detect_format() -> None:
    assert detect_format(CHAT) == "chat"
    assert detect_format(PROMPT) == "prompt_completion"
    assert detect_format({"completion": "x"}) == "prompt_completion"
    assert detect_format(TEXT) == "text"
    assert detect_format(PREFERENCE) == "preference"
    assert detect_format({"non_preferred_output": []}) == "preference"
    with pytest.raises(DatasetError) as caught:
        detect_format({})
    assert (caught.value.code, caught.value.line) == ("unknown_format", None)
    assert "keys: none" in caught.value.message


def test_iter_examples_yields_records_in_order_skipping_blank_lines() -> None:
    data = jsonl(CHAT) + b"\r\n\n" + jsonl(CHAT).replace(b"\n", b"\r\n")
    assert list(iter_examples(io.BytesIO(data))) == [CHAT, CHAT]


def test_iter_examples_raises_with_the_line_on_a_bad_file() -> None:
    with pytest.raises(DatasetError) as caught:
        list(iter_examples(io.BytesIO(jsonl(TEXT) + b"\n{oops\n")))
    assert (caught.value.code, caught.value.line) == ("invalid_json", 3)


# --- streaming ---------------------------------------------------------------------------------


class _GeneratedStream(io.RawIOBase):
    """A read-only stream whose bytes come from a generator, never all in memory at once."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._left = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._left:
            self._left = next(self._chunks, b"")
            if not self._left:
                return 0
        size = min(len(buffer), len(self._left))
        buffer[:size] = self._left[:size]
        self._left = self._left[size:]
        return size


def _generated_dataset(megabytes: int) -> tuple[io.BufferedReader, int, Any]:
    """A chat dataset of about `megabytes` MiB, produced as it is read; also its example count."""
    line = jsonl(chat(USER, {"role": "assistant", "content": "y" * 1000}))
    lines_per_chunk = 256
    chunk_count = megabytes * 2**20 // (len(line) * lines_per_chunk) + 1
    hasher = hashlib.sha256()

    def chunks() -> Iterator[bytes]:
        for _ in range(chunk_count):
            block = line * lines_per_chunk
            hasher.update(block)
            yield block

    stream = io.BufferedReader(_GeneratedStream(chunks()))
    return stream, chunk_count * lines_per_chunk, hasher


def test_memory_stays_bounded_while_streaming() -> None:
    stream, examples, hasher = _generated_dataset(megabytes=16)
    tracemalloc.start()
    try:
        stats = validate_jsonl(stream, max_bytes=2**30, max_example_tokens=4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (stats.examples, stats.sha256) == (examples, hasher.hexdigest())
    # About 4 MiB: a read chunk, its lines, the buffered reader; never the 16 MiB file.
    assert peak < 8 * 2**20, f"peak memory {peak:,} bytes for a 16 MiB file: it was not streamed"


def test_a_50_mb_file_is_validated_quickly() -> None:
    stream, examples, hasher = _generated_dataset(megabytes=50)
    started = time.perf_counter()
    stats = validate_jsonl(stream, max_bytes=2**30, max_example_tokens=4096)
    elapsed = time.perf_counter() - started
    assert stats.bytes >= 50 * 2**20
    assert (stats.examples, stats.sha256) == (examples, hasher.hexdigest())
    assert elapsed < 60, f"{elapsed:.1f} s for 50 MiB"
