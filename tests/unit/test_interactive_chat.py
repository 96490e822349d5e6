"""A chat's prompt is what a job trained the reply after, it ends where a fine-tuned reply ends,
and its text is what OpenAI's content would be: on the tiny test base's real tokenizer, with its
chat template and without one."""

from __future__ import annotations

from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tests.fixtures.testbase import TEST_BASE_PATH
from workers.interactive.chat import (
    SoFar,
    chat_answer,
    chat_prompt,
    chat_text,
    chat_text_so_far,
    content_reader,
    end_of_turn_tokens,
    stream_steps,
)
from workers.interactive.completion import legacy_reader, streamed_text
from workers.interactive.losses import InteractiveError
from workers.interactive.sample_requests import read_sample_request
from workers.kernels.example import IGNORE_INDEX
from workers.training.formatting import tokenize_record

CONVERSATION = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "What colour is the sky?"},
    {"role": "assistant", "content": "Blue."},
]


def _tokenizer(template: bool) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(TEST_BASE_PATH)
    if not template:
        tokenizer.chat_template = None
    return tokenizer


def _prompt(tokenizer: PreTrainedTokenizerBase, messages: list[Any]) -> list[int]:
    request = chat_prompt({"messages": messages}, tokenizer)
    return list(request["prompt"]["chunks"][0]["tokens"])


@pytest.mark.parametrize("template", [True, False], ids=["chat template", "no template"])
@pytest.mark.parametrize("turns", [1, 2], ids=["one turn", "two turns"])
def test_a_chats_prompt_is_what_a_job_trained_its_reply_after(template: bool, turns: int) -> None:
    tokenizer = _tokenizer(template)
    conversation = (
        CONVERSATION
        + [
            {"role": "user", "content": "And at night?"},
            {"role": "assistant", "content": "Black."},
        ][: 2 * (turns - 1)]
    )
    example = tokenize_record({"messages": conversation}, tokenizer)
    # The last reply's trained tokens start after the last run of untrained ones.
    labels = example.labels
    last_trained = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    start = max(i for i in range(last_trained) if labels[i] == IGNORE_INDEX) + 1
    assert _prompt(tokenizer, conversation[:-1]) == list(example.input_ids[:start])


def test_a_chat_ends_at_its_templates_end_of_turn_though_the_base_ends_sequences_otherwise() -> (
    None
):
    tokenizer = _tokenizer(True)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # What a fine-tuned reply ends with: the token after the reply in the trained example.
    example = tokenize_record({"messages": CONVERSATION}, tokenizer)
    trained = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label >= 0]
    assert trained[-1] == end_of_turn
    assert end_of_turn_tokens(tokenizer) == {end_of_turn}
    # A base whose end of sequence is another token (Qwen2.5's <|endoftext|>, Llama 3's
    # <|end_of_text|>) still ends a chat at the end of turn.
    tokenizer.eos_token = "<|endoftext|>"
    assert tokenizer.eos_token_id != end_of_turn
    assert end_of_turn_tokens(tokenizer) == {end_of_turn}
    # Without a template a reply is trained to end with the EOS, which stops it anyway.
    plain = _tokenizer(False)
    assert end_of_turn_tokens(plain) == {plain.eos_token_id}


LINES = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}{{ SEP }}{{ m['content'] }}{{ END }}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{{ SEP }}{% endif %}"
)


def test_the_end_of_turn_is_found_past_whitespace_and_never_an_ordinary_token() -> None:
    marked = _tokenizer(True)  # a newline between the reply and its marker
    marked.chat_template = LINES.replace("{{ SEP }}", "\n").replace("{{ END }}", "\n<|im_end|>\n")
    assert end_of_turn_tokens(marked) == {marked.convert_tokens_to_ids("<|im_end|>")}
    unmarked = _tokenizer(True)  # turns end in a newline that is an added, ordinary token
    unmarked.add_tokens(["\n"])
    unmarked.chat_template = LINES.replace("{{ SEP }}", " ").replace("{{ END }}", "\n")
    assert end_of_turn_tokens(unmarked) == frozenset()  # a chat must not stop at a line break


def test_a_chats_text_drops_special_tokens_and_is_cut_before_its_first_stop_string() -> None:
    tokenizer = _tokenizer(True)
    prompt = _prompt(tokenizer, CONVERSATION[:-1])
    body = tokenizer("Blue sky. Then rain.", add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    request = {
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
        "sampling_params": {"stop": ["rain", ". "]},
    }
    parsed = read_sample_request(request, len(tokenizer), 1024, frozenset([end]))
    answer = {"sequences": [{"tokens": [*body, end], "stop_reason": "stop"}]}
    [sequence] = chat_answer(answer, parsed, tokenizer)["sequences"]
    assert sequence["text"] == "Blue sky"  # ". " comes before "rain"
    assert chat_answer(answer, parsed, tokenizer)["prompt_tokens"] == len(prompt)
    unstopped = read_sample_request(
        {**request, "sampling_params": {}}, len(tokenizer), 1024, frozenset([end])
    )
    [plain] = chat_answer(answer, unstopped, tokenizer)["sequences"]
    assert plain["text"] == "Blue sky. Then rain."  # <|im_end|> is not text


@pytest.mark.parametrize(
    "stop", [None, ["rain", ". "], ["sky!"]], ids=["no stop", "stops", "unmet"]
)
def test_a_streamed_chats_text_so_far_always_begins_its_whole_text(stop: Any) -> None:
    """At every token, the text streamed so far is what the whole reply begins with: never a
    stop string or the start of one, never a character half decoded, never whitespace a later
    token may take back; and once a stop string is sampled, it is the whole text."""
    tokenizer = _tokenizer(True)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    params = {} if stop is None else {"stop": stop}
    request = {
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1]}]},
        "sampling_params": params,
    }
    parsed = read_sample_request(request, len(tokenizer), 1024, frozenset([end]))
    tokens = tokenizer("Blue sky. Then rain, né ☂ .", add_special_tokens=False)["input_ids"]
    whole = chat_text([*tokens, end], parsed, tokenizer)
    so_far = [chat_text_so_far(tokens[:k], parsed, tokenizer) for k in range(len(tokens) + 1)]
    for k, text in enumerate(so_far):
        assert whole.startswith(text), (k, text, whole)
        assert "\ufffd" not in text and text == text.rstrip()
        assert not any(text.endswith(s[:j]) for s in parsed.stop_strings for j in range(1, len(s)))
    assert so_far[-1] == whole.rstrip()
    if stop == ["rain", ". "]:
        stopped = so_far.index("Blue sky")
        assert all(text == "Blue sky" for text in so_far[stopped:])
        assert not any("sky." in text for text in so_far)  # ". " held back until it is one
    if stop is None:
        # Held back a token at a time: the text ending in "sky" waits for what follows its space.
        assert "Blue sky" in so_far and "Blue sky " not in so_far


def test_a_batchs_streamed_chats_are_handed_on_at_most_once_a_period_each_its_own_text() -> None:
    tokenizer = _tokenizer(True)
    request = {
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1]}]},
        "sampling_params": {},
    }
    parsed = read_sample_request(request, len(tokenizer), 1024, frozenset())
    words = [
        _row(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in ("Red sky", "Blue sea")
    ]
    sink = _Sink()
    # Rows of the batch's three requests; the first and the third are streamed.
    batch = [[words[0]], [words[1]], [words[1], words[0]]]
    often = stream_steps(sink, 0.0, {0: "call-a", 2: "call-c"}, [parsed] * 3, tokenizer)
    assert often is not None
    for _ in range(3):
        assert often(batch) == set()
    assert sink.handed == [{"call-a": ["Red sky"], "call-c": ["Blue sea", "Red sky"]}] * 3
    # The first stream's client left: that request stops, and its text is no longer handed.
    sink.gone = frozenset(["call-a"])
    assert often(batch) == {0}
    assert sink.handed[-1] == {"call-c": ["Blue sea", "Red sky"]}
    sink.handed.clear()
    seldom = stream_steps(sink, 60.0, {1: "call-b"}, [parsed] * 3, tokenizer)
    assert seldom is not None
    for _ in range(5):
        seldom(batch)
    assert sink.handed == [{"call-b": ["Blue sea"]}]  # the first at once, the rest a minute apart
    assert stream_steps(None, 0.0, {0: "call-a"}, [parsed], tokenizer) is None
    assert stream_steps(sink, 0.0, {}, [parsed], tokenizer) is None

    # The third asked with logprobs: each of its rows' entries so far is handed too, all but
    # the last token's (which the whole reply may read otherwise), and only its.
    sink = _Sink()
    entries = stream_steps(
        sink,
        0.0,
        {0: "call-a", 2: "call-c"},
        [parsed] * 3,
        tokenizer,
        logprobs={2: content_reader(tokenizer)},
    )
    assert entries is not None and entries(batch) == set()
    [handed] = sink.entries
    assert handed["call-a"] is None and handed["call-c"] is not None
    rows = handed["call-c"]
    assert [len(row) for row in rows] == [len(words[1]["tokens"]) - 1, len(words[0]["tokens"]) - 1]
    assert ["".join(e["token"] for e in row) for row in rows] == [
        tokenizer.decode(w["tokens"][:-1]) for w in (words[1], words[0])
    ]
    assert "".join(e["token"] for e in rows[0]).startswith("Blue ")
    assert all(e["logprob"] == -1.0 for row in rows for e in row)

    # Streamed completions: each one's text begins with what `leading` gives it (its echoed
    # prompt), and one scoring its prompt (max_tokens 0) hands that alone, not the token sampled.
    sink = _Sink()
    leading = {0: ("Say: ", True), 2: ("Score me", False)}
    completing = stream_steps(
        sink, 0.0, {0: "call-a", 1: "call-b", 2: "call-c"}, [parsed] * 3, tokenizer, leading=leading
    )
    assert completing is not None and completing(batch) == set()
    assert sink.handed == [
        {"call-a": ["Say: Red sky"], "call-b": ["Blue sea"], "call-c": ["Score me", "Score me"]}
    ]


class _Scored(list[list[dict[str, Any]]]):
    """A batch's rows as `Rows` gives them, with each place's prompt scores."""

    def __init__(self, rows: list[list[dict[str, Any]]], scores: list[dict[str, Any]]) -> None:
        super().__init__(rows)
        self.scored = scores

    def scores(self, r: int) -> dict[str, Any]:
        return self.scored[r]


def test_streamed_completions_with_logprobs_begin_with_their_own_places_prompt_entries() -> None:
    """Completions echoing their prompts with logprobs, one joining the batch as it runs: each
    call's entries so far begin with its own prompt's tokens and scores (its place's), then its
    own sampled tokens'."""
    tokenizer = _tokenizer(True)
    prompts = [tokenizer.encode(t) for t in ("Red sky", "Blue sea at dawn", "Green")]
    requests, parsed = [], []
    for prompt in prompts:
        request = {
            "completion": {"tokens": prompt, "echo": True, "logprobs": 1, "max_tokens": 8},
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
            "sampling_params": {},
        }
        requests.append(request)
        parsed.append(read_sample_request(request, len(tokenizer), 1024, frozenset()))
    scores = [
        {
            "prompt_logprobs": [None] + [-(k + 1) * 0.5 - p for p in range(len(prompt) - 1)],
            "topk_prompt_logprobs": None,
        }
        for k, prompt in enumerate(prompts)
    ]
    sampled = [_row(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in (" a b c",) * 3]
    sink = _Sink()
    streamed = {0: "call-a", 1: "call-b"}
    readers = {k: legacy_reader(requests[k], parsed[k], tokenizer, k) for k in range(2)}
    leading = {k: streamed_text(requests[k], parsed[k], tokenizer) for k in range(2)}
    places = parsed[:2]
    step = stream_steps(
        sink, 0.0, streamed, places, tokenizer, logprobs=readers, leading=leading, growing=True
    )
    assert step is not None and step(_Scored([[sampled[0]], [sampled[1]]], scores[:2])) == set()
    # The third joins the running batch at place 2.
    streamed[2] = "call-c"
    readers[2] = legacy_reader(requests[2], parsed[2], tokenizer, 2)
    leading[2] = streamed_text(requests[2], parsed[2], tokenizer)
    places.append(parsed[2])
    assert step(_Scored([[row] for row in sampled], scores)) == set()
    for k, key in enumerate(("call-a", "call-b", "call-c")):
        [entries] = sink.entries[-1][key]
        head = entries[: len(prompts[k])]
        assert [e["logprob"] for e in head] == scores[k]["prompt_logprobs"], key
        assert "".join(e["token"] for e in head) == tokenizer.decode(prompts[k])
        assert len(entries) > len(prompts[k])  # sampled tokens' entries follow
    assert sink.handed[-1]["call-c"] == ["Green a b c"]  # its echoed prompt first


def _row(tokens: list[int]) -> dict[str, Any]:
    """A row of a batch as sampled so far (a SampledSequence)."""
    return {"tokens": tokens, "logprobs": [-1.0] * len(tokens), "stop_reason": "length"}


class _Sink:
    """What a batch's streamed chats hand on (their texts; their entries apart), and the streams
    whose client left."""

    def __init__(self) -> None:
        self.handed: list[dict[str, list[str]]] = []
        self.entries: list[dict[str, list[list[dict[str, Any]]] | None]] = []
        self.gone: frozenset[str] = frozenset()

    def __call__(self, replies: dict[str, SoFar]) -> None:
        self.handed.append({key: reply.texts for key, reply in replies.items()})
        self.entries.append({key: reply.logprobs for key, reply in replies.items()})

    def left(self) -> frozenset[str]:
        return self.gone


@pytest.mark.parametrize(
    "messages",
    [[], [{"role": "tool", "content": "x"}], [{"role": "user", "content": 3}], "hello"],
)
def test_messages_a_chat_cannot_take_are_refused_by_what_is_wrong(messages: Any) -> None:
    with pytest.raises(InteractiveError, match="messages"):
        chat_prompt({"messages": messages}, _tokenizer(True))
