"""Formatting: which tokens a job learns from, for every dataset shape, on the shipped test base."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tests.fixtures.testbase import TEST_BASE_PATH
from workers.training.formatting import (
    IGNORE_INDEX,
    DatasetFormatError,
    TokenizedExample,
    tokenize_record,
    tokenize_records,
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(TEST_BASE_PATH)


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The same tokenizer without a chat template (a base, not an instruct, model)."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    return plain


def trained_text(example: TokenizedExample, tokenizer: PreTrainedTokenizerBase) -> str:
    ids = [i for i, label in zip(example.input_ids, example.labels, strict=True) if label != -100]
    return tokenizer.decode(ids)


def test_chat_trains_only_on_the_assistant_reply_and_its_end_marker(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    example = tokenize_record({"messages": messages}, tokenizer)

    assert trained_text(example, tokenizer) == "Paris.<|im_end|>"
    # The untrained prefix is exactly what an inference server feeds the model for this prompt.
    prompt = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert list(example.input_ids[: len(prompt_ids)]) == list(prompt_ids)
    assert set(example.labels[: len(prompt_ids)]) == {IGNORE_INDEX}
    # The whole sequence is the template's own rendering of the conversation.
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(example.input_ids) == full


def test_every_assistant_turn_is_trained_unless_weighted_zero(tokenizer):
    messages = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "first answer", "weight": 0},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "second answer"},
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": "third answer"},
    ]
    example = tokenize_record({"messages": messages}, tokenizer)
    assert trained_text(example, tokenizer) == "second answer<|im_end|>third answer<|im_end|>"


def test_prompt_completion_is_a_user_assistant_exchange(tokenizer):
    pair = tokenize_record({"prompt": "Say hi", "completion": "hi"}, tokenizer)
    chat = tokenize_record(
        {
            "messages": [
                {"role": "user", "content": "Say hi"},
                {"role": "assistant", "content": "hi"},
            ]
        },
        tokenizer,
    )
    assert pair == chat
    assert trained_text(pair, tokenizer) == "hi<|im_end|>"


def test_text_trains_on_every_token_and_ends_with_eos(tokenizer):
    example = tokenize_record({"text": "The capital of Peru is Lima."}, tokenizer)
    assert example.labels == example.input_ids
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example.input_ids) == "The capital of Peru is Lima.<|im_end|>"


def test_without_chat_template_completion_and_eos_are_trained(plain_tokenizer):
    example = tokenize_record({"prompt": "2 plus 2 is", "completion": " 4"}, plain_tokenizer)
    assert trained_text(example, plain_tokenizer) == " 4<|im_end|>"
    assert plain_tokenizer.decode(example.input_ids).startswith("2 plus 2 is")
    chat = tokenize_record(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        plain_tokenizer,
    )
    assert trained_text(chat, plain_tokenizer) == "yo<|im_end|>"


def test_truncation_and_dropping_are_counted(tokenizer):
    long_prompt = "word " * 200
    records = [
        {"prompt": "short", "completion": "kept"},
        # The reply starts beyond max_seq_length: nothing left to learn, dropped.
        {"prompt": long_prompt, "completion": "lost"},
        # Long text: truncated, kept.
        {"text": long_prompt},
        # No assistant turn at all: dropped.
        {"messages": [{"role": "user", "content": "anyone?"}]},
    ]
    dataset = tokenize_records(records, tokenizer, max_seq_length=32)
    assert len(dataset.examples) == 2
    assert dataset.dropped == 2
    assert dataset.truncated == 2
    assert all(len(e) <= 32 for e in dataset.examples)
    assert dataset.total_tokens == sum(len(e) for e in dataset.examples)
    assert trained_text(dataset.examples[0], tokenizer) == "kept<|im_end|>"


@pytest.mark.parametrize(
    "record",
    [
        {"messages": []},
        {"messages": [{"role": "user"}]},
        {"prompt": "no completion"},
        {"text": 3},
        {"input": "unknown shape"},
    ],
)
def test_malformed_records_are_refused(tokenizer, record):
    with pytest.raises(DatasetFormatError):
        tokenize_record(record, tokenizer)
