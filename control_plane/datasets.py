"""Validation of uploaded JSONL training datasets, before a job is queued.

A dataset is checked in one streaming pass (the file is never held in memory whole) so that a user
learns about a bad line at upload time, not hours later when a trainer trips over it. The first
problem found stops the pass and is reported as a `DatasetError` whose `code` is stable for
machines and whose `message` names the line and says what to fix. Four formats are accepted, one
per file: chat (`{"messages": [...]}`, OpenAI's shape), prompt/completion, plain text, and
preference pairs for DPO (OpenAI's shape: `{"input": {"messages": [...]}, "preferred_output":
[...], "non_preferred_output": [...]}`, one pair an example).

This module is pure: no database, object store or HTTP. The celery task that validates uploads
and the trainers that read validated files both call it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal, NoReturn

DatasetFormat = Literal["chat", "prompt_completion", "text", "preference"]
Example = dict[str, Any]

CHAT_ROLES = ("system", "user", "assistant")

_FORMAT_LABELS: dict[str, str] = {
    "chat": "chat",
    "prompt_completion": "prompt/completion",
    "text": "text",
    "preference": "preference",
}
# A preference example: the conversation (`input`) and its two replies to it. OpenAI's tool fields
# are taken only when they ask for no tools: loraforge does not train tool calls.
_REPLY_KEYS = ("preferred_output", "non_preferred_output")
_INPUT_KEYS = ("messages", "tools", "parallel_tool_calls")
_ALLOWED_KEYS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("input", *_REPLY_KEYS),
}
_MESSAGE_KEYS = ("role", "content", "weight")
# A preference example's messages carry no weight: only its replies are learned from, whole.
_PLAIN_MESSAGE_KEYS = ("role", "content")
_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_READ_CHUNK = 1 << 20
_JSON_TYPE_NAMES: dict[type, str] = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


class DatasetError(Exception):
    """Why a dataset was refused: `code` for machines, `message` for the person who uploaded it."""

    def __init__(self, code: str, detail: str, line: int | None = None) -> None:
        self.code = code
        self.detail = detail
        self.line = line
        self.message = f"line {line}: {detail}" if line is not None else detail
        super().__init__(self.message)

    def __reduce__(self) -> tuple[type[DatasetError], tuple[str, str, int | None]]:
        # Celery and multiprocessing pickle exceptions; keep the three fields through the trip.
        return (type(self), (self.code, self.detail, self.line))

    def at_line(self, line: int) -> DatasetError:
        return DatasetError(self.code, self.detail, line)


@dataclass(frozen=True)
class DatasetStats:
    """What a valid dataset holds; recorded on the file and shown to the user."""

    format: DatasetFormat
    examples: int
    tokens: int
    tokens_exact: bool  # False: tokens were estimated as UTF-8 bytes of the text / 4
    bytes: int
    sha256: str
    max_example_tokens: int  # tokens in the longest example


def validate_jsonl(
    stream: BinaryIO,
    *,
    max_bytes: int,
    max_example_tokens: int,
    count_tokens: Callable[[Example], int] | None = None,
    min_examples: int = 1,
    max_examples: int | None = None,
) -> DatasetStats:
    """Check every line of a JSONL dataset read from a binary stream; raise at the first problem.

    `count_tokens` gives an example's exact token count under the job's tokenizer; without it the
    count is estimated (UTF-8 bytes of the text / 4, rounded up) and the stats say so.
    """
    if max_bytes < 1 or max_example_tokens < 1 or min_examples < 1:
        raise ValueError("max_bytes, max_example_tokens and min_examples must be positive")
    reader = _LineReader(stream, max_bytes=max_bytes)
    dataset_format: DatasetFormat | None = None
    first_line = 0
    examples = tokens = longest = 0
    for line_number, raw in reader:
        try:
            record = _parse_line(raw, first=line_number == 1)
            if record is None:
                continue
            found = detect_format(record)
            if dataset_format is None:
                dataset_format, first_line = found, line_number
            elif found != dataset_format:
                _refuse(
                    "mixed_formats",
                    f"expected a {_FORMAT_LABELS[dataset_format]} example like line {first_line}, "
                    f"got a {_FORMAT_LABELS[found]} example; a file holds one format only",
                )
            _check_example(record, found)
        except DatasetError as error:
            raise error.at_line(line_number) from None
        examples += 1
        if max_examples is not None and examples > max_examples:
            raise DatasetError(
                "too_many_examples",
                f"the file has more than {max_examples:,} examples, the most allowed",
                line_number,
            )
        size = count_tokens(record) if count_tokens is not None else _estimate_tokens(record)
        if size > max_example_tokens:
            how = "" if count_tokens is not None else " (estimated as UTF-8 bytes / 4)"
            raise DatasetError(
                "example_too_long",
                f"the example has {size:,} tokens{how}, over the limit of "
                f"{max_example_tokens:,}; shorten or split it",
                line_number,
            )
        tokens += size
        longest = max(longest, size)
    if dataset_format is None:
        raise DatasetError("empty_file", "the file holds no examples (it is empty or only blank)")
    if examples < min_examples:
        raise DatasetError(
            "too_few_examples",
            f"the file has {examples:,} example{'s' if examples != 1 else ''}; "
            f"at least {min_examples:,} are needed",
        )
    return DatasetStats(
        format=dataset_format,
        examples=examples,
        tokens=tokens,
        tokens_exact=count_tokens is not None,
        bytes=reader.bytes_read,
        sha256=reader.sha256.hexdigest(),
        max_example_tokens=longest,
    )


def iter_examples(stream: BinaryIO) -> Iterator[Example]:
    """Yield the parsed examples of a dataset that `validate_jsonl` has accepted, in file order."""
    for line_number, raw in _LineReader(stream, max_bytes=None):
        try:
            record = _parse_line(raw, first=line_number == 1)
        except DatasetError as error:
            raise error.at_line(line_number) from None
        if record is not None:
            yield record


def detect_format(record: Example) -> DatasetFormat:
    """Name the format an example is written in, from its keys alone; values are not checked."""
    if "messages" in record:
        return "chat"
    if "preferred_output" in record or "non_preferred_output" in record:
        return "preference"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    keys = ", ".join(repr(key) for key in list(record)[:5]) or "none"
    _refuse(
        "unknown_format",
        f"not a known example format (keys: {keys}); expected "
        '{"messages": [...]}, {"prompt": ..., "completion": ...}, {"text": ...} or '
        '{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}',
    )


class _LineReader:
    """Splits a binary stream into numbered lines, hashing and counting every byte read.

    Reads fixed-size chunks rather than calling `readline`, so any object with `read(n)` works
    (a boto3 body, a generator-backed stream) and memory stays bounded by the longest line,
    which is itself bounded by `max_bytes`.
    """

    def __init__(self, stream: BinaryIO, *, max_bytes: int | None) -> None:
        self._stream = stream
        self._max_bytes = max_bytes
        self.bytes_read = 0
        self.sha256 = hashlib.sha256()

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        line_number = 1
        pending: list[bytes] = []
        while True:
            want = _READ_CHUNK
            if self._max_bytes is not None:
                want = min(want, self._max_bytes + 1 - self.bytes_read)
            chunk = self._stream.read(want)
            if not isinstance(chunk, bytes):
                raise TypeError("datasets are read from binary streams: open the file with 'rb'")
            if not chunk:
                break
            self.bytes_read += len(chunk)
            self.sha256.update(chunk)
            over = self._max_bytes is not None and self.bytes_read > self._max_bytes
            parts = (chunk[:-1] if over else chunk).split(b"\n")
            for part in parts[:-1]:
                pending.append(part)
                yield line_number, b"".join(pending)
                pending = []
                line_number += 1
            pending.append(parts[-1])
            if over:
                # The byte past the limit belongs to the line that is being read now.
                raise DatasetError(
                    "file_too_large",
                    f"the file is larger than the limit of {self._max_bytes:,} bytes",
                    line_number,
                )
        if any(pending):
            yield line_number, b"".join(pending)


def _parse_line(raw: bytes, *, first: bool) -> Example | None:
    """Decode one line into a JSON object; None for a blank line."""
    if first:
        if raw.startswith(_UTF16_BOMS):
            _refuse("not_utf8", "the file is UTF-16 encoded; save it as UTF-8")
        raw = raw.removeprefix(_UTF8_BOM)
    if not raw.strip():
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        _refuse(
            "not_utf8",
            f"not valid UTF-8 (byte 0x{raw[error.start]:02x} at byte {error.start + 1} of the "
            "line); save the file as UTF-8",
        )
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as error:
        _refuse("invalid_json", f"not valid JSON ({error.msg} at column {error.colno})")
    except _DuplicateKeyError as error:
        _refuse("invalid_json", f"not valid JSON (key {error.args[0]!r} appears twice)")
    except RecursionError:
        _refuse("invalid_json", "not valid JSON (nested too deeply)")
    except ValueError as error:  # e.g. an integer past Python's digit limit
        _refuse("invalid_json", f"not valid JSON ({error})")
    if not isinstance(value, dict):
        _refuse("not_an_object", f"expected a JSON object, got {_json_type(value)}")
    return value


def _check_example(record: Example, dataset_format: DatasetFormat) -> None:
    allowed = _ALLOWED_KEYS[dataset_format]
    for key in record:
        if key not in allowed:
            _refuse(
                "invalid_example",
                f"unexpected key {key!r} in a {_FORMAT_LABELS[dataset_format]} example "
                f"(allowed: {', '.join(allowed)})",
            )
    if dataset_format == "chat":
        if not _check_messages(record["messages"]):
            _refuse(
                "invalid_example",
                "needs at least one assistant message with non-empty content (and weight 1 if set)",
            )
    elif dataset_format == "preference":
        _check_preference(record)
    elif dataset_format == "prompt_completion":
        for key in allowed:
            if key not in record:
                _refuse("invalid_example", f"missing key {key!r} (need 'prompt' and 'completion')")
            _require_string(record[key], key)
        if not record["completion"].strip():
            _refuse("invalid_example", "'completion' is empty; there is nothing to learn")
    else:
        _require_string(record["text"], "text")
        if not record["text"].strip():
            _refuse("invalid_example", "'text' is empty")


def _check_preference(record: Example) -> None:
    for key in _ALLOWED_KEYS["preference"]:
        if key not in record:
            _refuse(
                "invalid_example",
                f"missing key {key!r} (a preference example needs 'input', 'preferred_output' "
                "and 'non_preferred_output')",
            )
    given = record["input"]
    if not isinstance(given, dict):
        _refuse(
            "invalid_example",
            f"'input' must be an object {{\"messages\": [...]}}, got {_json_type(given)}",
        )
    for key in given:
        if key not in _INPUT_KEYS:
            _refuse(
                "invalid_example",
                f"unexpected key {key!r} in 'input' (allowed: {', '.join(_INPUT_KEYS)})",
            )
    if given.get("tools", []) != []:
        _refuse(
            "invalid_example",
            "input.tools must be empty or left out: loraforge does not train tool calls",
        )
    if given.get("parallel_tool_calls", True) is not True:
        _refuse(
            "invalid_example",
            "input.parallel_tool_calls must be true or left out: loraforge does not train tool "
            "calls",
        )
    if "messages" not in given:
        _refuse("invalid_example", "'input' has no 'messages' (the conversation to reply to)")
    _check_messages(given["messages"], "input.messages", keys=_PLAIN_MESSAGE_KEYS)
    for key in _REPLY_KEYS:
        if not _check_messages(record[key], key, roles=("assistant",), keys=_PLAIN_MESSAGE_KEYS):
            _refuse("invalid_example", f"'{key}' is empty: the reply needs non-empty content")
    if record["preferred_output"] == record["non_preferred_output"]:
        _refuse(
            "invalid_example",
            "'preferred_output' and 'non_preferred_output' are the same; a pair must prefer one "
            "reply over a different one",
        )


def _check_messages(
    messages: object,
    name: str = "messages",
    *,
    roles: tuple[str, ...] = CHAT_ROLES,
    keys: tuple[str, ...] = _MESSAGE_KEYS,
) -> bool:
    """Check an array of messages; whether one is trained on (an assistant's, with content, and
    weight 1 if weighted)."""
    if not isinstance(messages, list) or not messages:
        noun = "assistant messages" if roles == ("assistant",) else "messages"
        _refuse("invalid_example", f"'{name}' must be a non-empty array of {noun}")
    trained = False
    for index, message in enumerate(messages):
        where = f"{name}[{index}]"
        if not isinstance(message, dict):
            _refuse("invalid_example", f"{where} must be an object, got {_json_type(message)}")
        for key in message:
            if key not in keys:
                _refuse(
                    "invalid_example",
                    f"unexpected key {key!r} in {where} (allowed: {', '.join(keys)})",
                )
        role = message.get("role")
        if role not in roles:
            allowed = f"one of {', '.join(roles)}" if len(roles) > 1 else repr(roles[0])
            _refuse("invalid_example", f"{where}.role must be {allowed}, got {role!r}")
        if "content" not in message:
            _refuse("invalid_example", f"{where} has no 'content'")
        _require_string(message["content"], f"{where}.content")
        weight = message.get("weight", 1)
        if "weight" in message:
            if role != "assistant":
                _refuse("invalid_example", f"{where}.weight is only allowed on assistant messages")
            if type(weight) is not int or weight not in (0, 1):
                _refuse("invalid_example", f"{where}.weight must be 0 or 1, got {weight!r}")
        if role == "assistant" and weight == 1 and message["content"].strip():
            trained = True
    return trained


def _estimate_tokens(record: Example) -> int:
    if "messages" in record:
        texts = [message["content"] for message in record["messages"]]
    elif "preferred_output" in record:  # the conversation once, and both replies
        messages = [*record["input"]["messages"], *(m for k in _REPLY_KEYS for m in record[k])]
        texts = [message["content"] for message in messages]
    else:
        texts = [value for value in record.values() if isinstance(value, str)]
    size = sum(len(text.encode("utf-8")) for text in texts)
    return -(-size // 4)


class _DuplicateKeyError(ValueError):
    pass


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A repeated key is legal JSON but means one value is silently dropped: refuse it.
    record: dict[str, Any] = {}
    for key, value in pairs:
        if key in record:
            raise _DuplicateKeyError(key)
        record[key] = value
    return record


_DECODER = json.JSONDecoder(object_pairs_hook=_object_without_duplicates)


def _require_string(value: object, name: str) -> None:
    if not isinstance(value, str):
        _refuse("invalid_example", f"{name} must be a string, got {_json_type(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON may escape half a surrogate pair: no character, no text
        _refuse(
            "invalid_example",
            f"{name} holds a lone surrogate escape (\\ud800-\\udfff), half a character: write "
            "the whole character",
        )


def _json_type(value: object) -> str:
    return _JSON_TYPE_NAMES.get(type(value), "an object")


def _refuse(code: str, detail: str) -> NoReturn:
    raise DatasetError(code, detail)
