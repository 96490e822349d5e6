"""A chat's `logprobs.content` (`chat_logprobs`), read off real tokenizers: the tiny test base's
byte-level BPE, and a SentencePiece tokenizer with byte fallback (Llama 2's and Mistral's
decoding) built here. The tokens' texts join into the content and their bytes into its bytes,
a character split across tokens whole again; special tokens (the end of turn, and added ones
the decoding skips) and a stop string's tokens are left out; U+0000, which no JSON column
stores, is no token's text."""

from __future__ import annotations

import json
import random
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tests.fixtures.testbase import TEST_BASE_PATH
from workers.interactive.chat import chat_answer, chat_text_so_far
from workers.interactive.chat_logprobs import GrowingContent
from workers.interactive.sample_requests import read_sample_request


def _answer(
    tokens: list[int], tokenizer: PreTrainedTokenizerBase, stop: list[str] | None = None
) -> dict[str, Any]:
    """The chat's answer for a reply of `tokens` (logprobs -0.5, -1.5, ...; top-2 rows of the
    token itself and token 3), its stop strings `stop`, asked with logprobs: its sequence."""
    params: dict[str, Any] = {} if stop is None else {"stop": stop}
    parsed = read_sample_request(
        {
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5]}]},
            "sampling_params": params,
        },
        len(tokenizer),
        256,
        frozenset([tokenizer.eos_token_id]),
    )
    logprobs = [-0.5 - k for k in range(len(tokens))]
    sequence = {
        "tokens": tokens,
        "logprobs": logprobs,
        "stop_reason": "stop",
        "topk_logprobs": [[(t, lp), (3, lp - 1)] for t, lp in zip(tokens, logprobs, strict=True)],
    }
    answer = {"type": "sample", "sequences": [sequence], "prompt_logprobs": None}
    [read] = chat_answer(answer, parsed, tokenizer, logprobs=True)["sequences"]
    assert "topk_logprobs" not in read  # held by the entries, not stored twice
    return dict(read)


def _joined(entries: list[dict[str, Any]]) -> tuple[str, bytes]:
    return "".join(e["token"] for e in entries), bytes(b for e in entries for b in e["bytes"])


def test_a_byte_level_reply_split_characters_and_its_end() -> None:
    """An emoji the byte-level tokenizer writes in several tokens: the tokens before its last
    add no text, the last adds it, and each one's bytes are its own; the end of turn has no
    entry; every entry's alternatives are there."""
    tokenizer = AutoTokenizer.from_pretrained(TEST_BASE_PATH)
    reply = "ok 🙂 done"
    tokens = [*tokenizer.encode(reply, add_special_tokens=False), tokenizer.eos_token_id]
    read = _answer(tokens, tokenizer)
    entries = read["content_logprobs"]
    assert read["text"] == reply
    assert len(entries) == len(tokens) - 1
    assert [e["logprob"] for e in entries] == [-0.5 - k for k in range(len(tokens) - 1)]
    assert _joined(entries) == (reply, reply.encode())
    split = [e for e in entries if e["token"] == ""]
    assert split and all(len(e["bytes"]) < 4 for e in split)  # part of the emoji each
    assert all(
        [top["logprob"] for top in e["top_logprobs"]] == [e["logprob"], e["logprob"] - 1]
        for e in entries
    )


def test_a_stop_string_after_a_split_character_keeps_the_whole_character() -> None:
    """The content ends before the stop string; the entries are the tokens of that content,
    the emoji's last byte included, none of the stop string's."""
    tokenizer = AutoTokenizer.from_pretrained(TEST_BASE_PATH)
    tokens = tokenizer.encode("Hi 😀\n\nmore", add_special_tokens=False)
    read = _answer(tokens, tokenizer, stop=["\n\n"])
    assert read["text"] == "Hi 😀"
    assert _joined(read["content_logprobs"]) == ("Hi 😀", "Hi 😀".encode())


def test_special_tokens_the_decoding_skips_and_u0000_are_no_text() -> None:
    """`<|im_start|>` (an added special token, not among `all_special_ids`) has no entry; the
    byte-level token of byte 0 adds no text (the content drops it) but keeps its byte."""
    tokenizer = AutoTokenizer.from_pretrained(TEST_BASE_PATH)
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert start not in tokenizer.all_special_ids
    nul = tokenizer.convert_tokens_to_ids("Ā")  # byte-level's stand-in for byte 0
    h, i = (
        tokenizer.encode("H", add_special_tokens=False),
        tokenizer.encode("i", add_special_tokens=False),
    )
    read = _answer([*h, start, nul, *i], tokenizer)
    entries = read["content_logprobs"]
    assert read["text"] == "Hi"
    assert [e["token"] for e in entries] == ["H", "", "i"]
    assert entries[1]["bytes"] == [0]
    assert "\\u0000" not in json.dumps(read)


def _sentencepiece() -> PreTrainedTokenizerFast:
    """A SentencePiece-style tokenizer with byte fallback, decoded as Llama 2's: a word's
    leading `▁` is its space, the first one dropped; an unknown character its UTF-8 bytes."""
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    pieces += [(f"<0x{b:02X}>", -20.0) for b in range(256)]
    pieces += [("▁Hello", -1.0), ("▁world", -1.0), ("▁", -2.0), ("▁a", -1.0), ("!", -1.0)]
    model = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    model.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    model.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=model, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def test_a_sentencepiece_reply_keeps_its_words_spaces_and_its_fallback_bytes() -> None:
    """Decoded alone, `▁world` is "world" and `<0xF0>` is U+FFFD: the entries say " world" and
    the emoji's bytes one a token, so they join into the content as it reads; an alternative
    keeps its word's space too."""
    tokenizer = _sentencepiece()
    reply = "Hello world 😀!"
    tokens = tokenizer.encode(reply, add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(tokens) == [
        "▁Hello",
        "▁world",
        "▁",
        "<0xF0>",
        "<0x9F>",
        "<0x98>",
        "<0x80>",
        "!",
    ]
    assert tokenizer.decode(tokens[1]) == "world"
    read = _answer([*tokens, tokenizer.eos_token_id], tokenizer)
    entries = read["content_logprobs"]
    assert read["text"] == reply
    assert [e["token"] for e in entries] == ["Hello", " world", " ", "", "", "", "😀", "!"]
    assert [e["bytes"] for e in entries[3:7]] == [[0xF0], [0x9F], [0x98], [0x80]]
    assert _joined(entries) == (reply, reply.encode())
    assert entries[1]["top_logprobs"][0]["token"] == " world"


def test_characters_in_a_row_each_written_in_fallback_bytes_are_each_whole_once() -> None:
    """The byte-fallback decoder reads a run of byte tokens at once (a character still open
    turns the whole run to U+FFFD): each character is the text of its last byte's token, once,
    however many come in a row."""
    tokenizer = _sentencepiece()
    entries = _answer(tokenizer.encode("你好", add_special_tokens=False), tokenizer)
    # "▁" (its space the first, dropped), then three bytes a character
    assert [e["token"] for e in entries["content_logprobs"]] == ["", "", "", "你", "", "", "好"]
    for reply in ("你好", "Hello 😀😀", "Hello 你好世界!"):
        tokens = tokenizer.encode(reply, add_special_tokens=False)
        assert _joined(_answer(tokens, tokenizer)["content_logprobs"]) == (reply, reply.encode())


def test_a_reply_cut_off_inside_a_character_ends_as_its_content_does() -> None:
    """`max_tokens` ends the reply inside an emoji: the content ends in U+FFFD, and so do the
    texts joined; the last tokens' bytes are the emoji's first ones, as sampled."""
    tokenizer = AutoTokenizer.from_pretrained(TEST_BASE_PATH)
    tokens = tokenizer.encode("ok 😀", add_special_tokens=False)[:-1]
    read = _answer(tokens, tokenizer)
    assert read["text"].startswith("ok ") and read["text"].endswith("\ufffd")
    entries = read["content_logprobs"]
    text, raw = _joined(entries)
    assert text == read["text"]
    assert raw.startswith(b"ok ") and raw[3:] == "😀".encode()[: len(raw) - 3]


def _content(tokens: list[int], tokenizer: PreTrainedTokenizerBase) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True).replace("\x00", "")


def test_bytes_that_are_no_utf8_read_as_the_content_reads_them() -> None:
    """A byte no character completes, or a character cut off: the texts still join into the
    content, whichever decoder: byte-level bytes read one lossy stream (an invalid byte one
    U+FFFD, the emoji after it whole once), a run of fallback bytes that is not UTF-8 read as
    one (each of its bytes U+FFFD, the characters in it too, as the decoder reads them)."""
    level = AutoTokenizer.from_pretrained(TEST_BASE_PATH)
    pieces = ["Ã", "ð", "Ł", "ĺ", "Ģ"]  # the byte-level stand-ins of C3 F0 9F 98 80
    invalid = level.convert_tokens_to_ids(pieces)
    space_hi = level.encode(" hi", add_special_tokens=False)
    fallback = _sentencepiece()
    byte = {b: fallback.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)}
    nihao = fallback.encode("你好", add_special_tokens=False)
    cases: list[tuple[PreTrainedTokenizerBase, list[int]]] = [
        (level, invalid),
        (level, [*invalid[1:], *space_hi]),  # a lone continuation byte first
        (fallback, [*nihao, byte[0xF0], byte[0x9F]]),  # max_tokens inside a third character
        (fallback, [*nihao[:4], byte[0x80], *fallback.encode("!", add_special_tokens=False)]),
        (
            fallback,
            [*fallback.encode(" ", add_special_tokens=False), byte[0xC3], byte[0xA9], byte[0xC3]],
        ),
    ]
    for tokenizer, tokens in cases:
        read = _answer(tokens, tokenizer)
        text = "".join(e["token"] for e in read["content_logprobs"])
        assert text == read["text"] == _content(tokens, tokenizer), tokens
    # The stop cut after them keeps the space before the stop string.
    stopped = _answer([*invalid[1:], *space_hi], level, stop=["hi"])
    assert "".join(e["token"] for e in stopped["content_logprobs"]) == stopped["text"]
    assert stopped["text"].endswith(" ")


def test_the_texts_join_into_the_content_of_random_replies() -> None:
    """Random replies over words, spaces, line breaks, accents, CJK and emoji, and random token
    slices of them (cut anywhere, inside a character too), on both tokenizers."""
    alphabet = ["你", "好", "😀", "é", " ", "a", "\n", "!", "Hello", " world", "🙂", "\U0001d518"]
    generator = random.Random(7)
    for tokenizer in (AutoTokenizer.from_pretrained(TEST_BASE_PATH), _sentencepiece()):
        for _ in range(150):
            reply = "".join(generator.choice(alphabet) for _ in range(generator.randint(1, 12)))
            tokens = tokenizer.encode(reply, add_special_tokens=False)
            low = generator.randint(0, len(tokens) - 1)
            tokens = tokens[low : generator.randint(low + 1, len(tokens))]
            read = _answer(tokens, tokenizer)
            text, _ = _joined(read["content_logprobs"])
            assert text == read["text"] == _content(tokens, tokenizer), (reply, tokens)


def test_a_streamed_replys_entries_so_far_are_always_the_whole_replys_first() -> None:
    """`GrowingContent`, read after every token of random replies on both tokenizers (stop
    strings, split characters, a fallback run no character completes): what it gives is always
    the first of the entries the whole reply's answer holds, exactly, its texts joined a start of
    the text so far (`chat_text_so_far`); on a reply of plain words, every entry but the last
    token's as soon as the text so far holds its text."""
    alphabet = ["你", "好", "😀", "é", " ", "a", "\n", "!", "Hello", " world", "🙂", " .", "END"]
    generator = random.Random(11)
    for tokenizer in (AutoTokenizer.from_pretrained(TEST_BASE_PATH), _sentencepiece()):
        # F0 9F, a character begun and never finished: byte-level stand-ins, or fallback bytes
        pieces = ["ð", "Ł"] if tokenizer.unk_token_id is None else ["<0xF0>", "<0x9F>"]
        dangling = tokenizer.convert_tokens_to_ids(pieces)
        assert tokenizer.decode(dangling) == "\ufffd" * (1 + (tokenizer.unk_token_id is not None))
        for _ in range(120):
            reply = "".join(generator.choice(alphabet) for _ in range(generator.randint(1, 14)))
            tokens = tokenizer.encode(reply, add_special_tokens=False)
            if generator.random() < 0.3:
                k = generator.randint(0, len(tokens))
                tokens[k:k] = dangling
            stop = ["END"] if generator.random() < 0.5 else None
            _growing_reads(tokens, tokenizer, stop)
    level = AutoTokenizer.from_pretrained(TEST_BASE_PATH)
    words = level.encode("Hello world, how are you today", add_special_tokens=False)
    for length, given in enumerate(_growing_reads(words, level, None), start=1):
        assert len(given) >= length - 2  # the last token, and a word's space held back


def _growing_reads(
    tokens: list[int], tokenizer: PreTrainedTokenizerBase, stop: list[str] | None
) -> list[list[dict[str, Any]]]:
    """What `GrowingContent` gives after each token of a reply, each checked against the whole
    reply's entries."""
    whole = _answer(tokens, tokenizer, stop)
    final = whole["content_logprobs"]
    parsed = read_sample_request(
        {
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5]}]},
            "sampling_params": {} if stop is None else {"stop": stop},
        },
        len(tokenizer),
        256,
        frozenset([tokenizer.eos_token_id]),
    )
    sequence = {key: whole[key] for key in ("tokens", "logprobs")}
    sequence["topk_logprobs"] = [
        [(t, lp), (3, lp - 1)] for t, lp in zip(tokens, whole["logprobs"], strict=True)
    ]
    growing = GrowingContent(tokenizer)
    reads = []
    for length in range(1, len(tokens) + 1):
        so_far = {key: value[:length] for key, value in sequence.items()}
        sure = chat_text_so_far(tokens[:length], parsed, tokenizer)
        given = growing.read(so_far, len(sure))
        assert given == final[: len(given)], (tokens, length)
        assert sure.startswith("".join(e["token"] for e in given)), (tokens, length)
        reads.append(given)
    return reads
