"""What a chat completion costs beside the Tinker sample that it is: the `openai` SDK's
`chat.completions.create` against the tinker SDK sampling the same tokens.

    python -m benchmarks.chat_completions [--chats 30] [--tokens 16] [--rounds 3]
        [--base-dir DIR] [--logprobs K] [--completions] [--batch K]

The API on a socket of its own, with the real executor (`workers.interactive.runner`, serving on
connections of its own) on the tiny test base or the Hugging Face directory `--base-dir` (e.g.
the demo's SmolLM2-135M-Instruct). Each round, in a process of its own as a user's script: the
official `openai` SDK asks `--chats` chat completions of the base, one after another, greedy,
at most `--tokens` tokens each (the base's end of sequence may stop both sides sooner: the line
says how many tokens each side sampled); then the official `tinker` SDK samples the same
chat-template tokens (rendered by the client's own tokenizer, as a Tinker user does) from a
sampling client of the same base, with the same parameters. Alternating sides in one process;
one JSON line: the chat's median seconds from the ask to the answer beside the sample's. Then
the same chats streamed (`stream: true`, the executor writing the text so far every
`chat_stream_every_seconds`): a line for the first text's median beside the awaited chat's
answer, and one for the streamed chat's end beside it (what streaming costs). With
`--logprobs K`, the same chats streamed with `logprobs` and `top_logprobs` K too: a line for
their end beside the plain stream's (what sending each token's entry with its text costs).
With `--completions`, text completions (`POST /v1/completions`) of PROMPT too, awaited whole and
streamed: a line for the streamed one's first text beside the awaited one's answer (what a load
generator such as vLLM's `benchmark_serving` reads as the time to the first token), and one for
its end beside it; with `--logprobs K` too, the completion streamed with `logprobs` K: a line for
its end beside the plain stream's (each chunk carrying its tokens' legacy lists); with `--batch K`
too, a batch of K prompts in one request, awaited whole and streamed: a line for the stream's
first text (any prompt's) beside the batch's answer, and one for its end beside it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.interactive import in_own_process, sdk_bench, served_with
from benchmarks.queue import add_database_url_argument, emit_beside, percentile, progress
from tests.fixtures.testbase import TEST_BASE_PATH
from tests.tinker_harness import pausable_executor

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write one sentence about the sea."},
]
PROMPT = "The sea at night is"
# A side's asks: each one's seconds, and the tokens it sampled.
Side = tuple[list[float], list[int]]


def _timed(ask: Callable[[], int], times: int) -> tuple[list[float], list[int]]:
    """`ask` `times` times, one after another: each ask's seconds, and the tokens it sampled."""
    seconds, sampled = [], []
    for _ in range(times):
        started = time.monotonic()
        sampled.append(ask())
        seconds.append(time.monotonic() - started)
    return seconds, sampled


def _chats(url: str, key: str, base: str, chats: int, tokens: int, done: Any) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)

    def ask() -> int:
        reply = client.chat.completions.create(
            model=base, messages=MESSAGES, max_completion_tokens=tokens, temperature=0
        )
        assert reply.usage is not None
        return reply.usage.completion_tokens

    ask()  # warm: the chat session and its sampler
    done.put(_timed(ask, chats))


def _streams(
    url: str, key: str, base: str, chats: int, tokens: int, top: int | None, done: Any
) -> None:
    """The same chats streamed (with `top`, with logprobs and that many alternatives): each
    one's seconds to its end and to its first text."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    firsts: list[float] = []
    asked: dict[str, Any] = {} if top is None else {"logprobs": True, "top_logprobs": top}

    def ask() -> int:
        started, first = time.monotonic(), None
        chunks = client.chat.completions.create(
            model=base,
            messages=MESSAGES,
            max_completion_tokens=tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            **asked,
        )
        usage, entries = None, 0
        for chunk in chunks:
            if first is None and any(c.delta.content for c in chunk.choices):
                first = time.monotonic() - started
            usage = chunk.usage or usage
            entries += sum(len(c.logprobs.content or []) for c in chunk.choices if c.logprobs)
        assert usage is not None and first is not None
        assert top is None or entries > 0  # each token's entry came with its text
        firsts.append(first)
        return usage.completion_tokens

    ask()  # warm
    firsts.clear()
    seconds, sampled = _timed(ask, chats)
    done.put((seconds, sampled, firsts))


def _completions(
    url: str,
    key: str,
    base: str,
    chats: int,
    tokens: int,
    stream: bool,
    top: int | None,
    batch: int,
    done: Any,
) -> None:
    """Text completions of PROMPT (with `batch` above 1, a batch of that many prompts in one
    request), awaited whole or streamed (with `top`, with `logprobs` that many): each one's
    seconds to its end and, streamed, to its first text."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    firsts: list[float] = []
    prompt: str | list[str] = PROMPT if batch == 1 else [f"{PROMPT} {k}" for k in range(batch)]
    asked: dict[str, Any] = {"model": base, "prompt": prompt, "max_tokens": tokens}
    if top is not None:
        asked["logprobs"] = top

    def ask() -> int:
        started = time.monotonic()
        if not stream:
            reply = client.completions.create(temperature=0, **asked)
            assert reply.usage is not None and reply.choices[0].text
            return reply.usage.completion_tokens
        usage, first, entries = None, None, 0
        chunks = client.completions.create(
            temperature=0, stream=True, stream_options={"include_usage": True}, **asked
        )
        for chunk in chunks:
            if first is None and any(c.text for c in chunk.choices):
                first = time.monotonic() - started
            usage = chunk.usage or usage
            entries += sum(len(c.logprobs.tokens or []) for c in chunk.choices if c.logprobs)
        assert usage is not None and first is not None
        assert top is None or entries == usage.completion_tokens  # every token's lists came
        firsts.append(first)
        return usage.completion_tokens

    ask()  # warm
    firsts.clear()
    seconds, sampled = _timed(ask, chats)
    done.put((seconds, sampled, firsts))


def _samples(
    url: str, key: str, base: str, base_dir: str, chats: int, tokens: int, done: Any
) -> None:
    import tinker
    from tinker import types
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    prompt = tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    params = types.SamplingParams(max_tokens=tokens, temperature=0.0)
    with tinker.ServiceClient(base_url=url, api_key="tml-" + key) as service:
        sampler = service.create_sampling_client(base_model=base).result(timeout=120)

        def ask() -> int:
            answer = sampler.sample(types.ModelInput.from_ints(prompt), 1, params)
            sequence = answer.result(timeout=300).sequences[0]
            tokenizer.decode(sequence.tokens, skip_special_tokens=True)  # the text, as a chat's
            return len(sequence.tokens)

        ask()  # warm
        found = _timed(ask, chats)
    done.put(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.chat_completions", description=__doc__
    )
    parser.add_argument("--chats", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base-dir", type=Path, default=None)
    parser.add_argument(
        "--logprobs",
        type=int,
        default=None,
        help="also stream the chat with logprobs and this many top_logprobs (0 to 20)",
    )
    parser.add_argument(
        "--completions",
        action="store_true",
        help="also text completions of a prompt, awaited whole and streamed",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="with --completions, also a batch of this many prompts, awaited whole and streamed",
    )
    add_database_url_argument(parser)
    args = parser.parse_args(argv)
    if args.batch is not None and (args.batch < 2 or not args.completions):
        parser.error("--batch takes 2 prompts or more, with --completions")
    base_dir = str(args.base_dir or TEST_BASE_PATH)
    sides: dict[str, tuple[list[float], list[int]]] = {
        "chat": ([], []),
        "sample": ([], []),
        "stream": ([], []),
        "stream_logprobs": ([], []),
        "completion": ([], []),
        "completion_stream": ([], []),
        "completion_stream_logprobs": ([], []),
        "completion_batch": ([], []),
        "completion_batch_stream": ([], []),
    }
    firsts: list[float] = []  # a streamed chat's seconds to its first text
    completion_firsts: list[float] = []  # a streamed completion's
    batch_firsts: list[float] = []  # a streamed batch's
    with sdk_bench(args.database_url, args.base_dir) as bench:
        machine, base = bench.machine, bench.base.name
        with pausable_executor(bench.runner) as serving, served_with(bench.services) as url:
            serving.set()
            progress(f"{machine}; {args.rounds} rounds a side")
            for index in range(args.rounds):  # alternating: the machine's load drifts
                for side in sides:
                    if side.endswith("stream_logprobs") and args.logprobs is None:
                        continue
                    if side.startswith("completion") and not args.completions:
                        continue
                    if side.startswith("completion_batch") and args.batch is None:
                        continue
                    if side.startswith("completion"):
                        stream = side.endswith(("stream", "stream_logprobs"))
                        top = args.logprobs if side == "completion_stream_logprobs" else None
                        batch = args.batch if side.startswith("completion_batch") else 1
                        found = in_own_process(
                            _completions,
                            url,
                            bench.key,
                            base,
                            args.chats,
                            args.tokens,
                            stream,
                            top,
                            batch,
                        )
                        if side == "completion_stream":
                            completion_firsts.extend(found[2])
                        if side == "completion_batch_stream":
                            batch_firsts.extend(found[2])
                    elif side == "chat":
                        found = in_own_process(
                            _chats, url, bench.key, base, args.chats, args.tokens
                        )
                    elif side == "stream":
                        found = in_own_process(
                            _streams, url, bench.key, base, args.chats, args.tokens, None
                        )
                        firsts.extend(found[2])
                    elif side == "stream_logprobs":
                        found = in_own_process(
                            _streams, url, bench.key, base, args.chats, args.tokens, args.logprobs
                        )
                    else:
                        found = in_own_process(
                            _samples, url, bench.key, base, base_dir, args.chats, args.tokens
                        )
                    sides[side][0].extend(found[0])
                    sides[side][1].extend(found[1])
                    progress(
                        f"round {index}, {side}: p50 {statistics.median(found[0]) * 1000:.1f} ms"
                    )
    ours, theirs = sides["chat"], sides["sample"]
    emit_beside(
        "chat_completion",
        statistics.median(ours[0]) * 1000,
        "the tinker SDK sampling the same chat-template tokens (tokenized by the client)",
        statistics.median(theirs[0]) * 1000,
        machine,
        base=bench.label,
        what=f"one chat of the base, greedy, at most {args.tokens} tokens, awaited",
        chats=len(ours[0]),
        tokens_sampled=statistics.median(ours[1]),
        baseline_tokens_sampled=statistics.median(theirs[1]),
        p99_ms=round(percentile(ours[0], 99) * 1000, 3),
        baseline_p99_ms=round(percentile(theirs[0], 99) * 1000, 3),
        statistic="median and p99 over every round's asks, ms from the ask to the answer",
    )
    streamed = sides["stream"]
    emit_beside(
        "chat_stream_first_text",
        statistics.median(firsts) * 1000,
        "the same chat awaited whole (nothing to read before its end)",
        statistics.median(ours[0]) * 1000,
        machine,
        base=bench.label,
        what=f"one chat streamed, greedy, at most {args.tokens} tokens: ms to its first text",
        chats=len(firsts),
        p99_ms=round(percentile(firsts, 99) * 1000, 3),
        statistic="median and p99 over every round's asks",
    )

    def line(name: str, found: Side, beside: str, baseline: Side, what: str, **more: Any) -> None:
        """A line of `found` beside `baseline`: their medians, p99s and tokens sampled."""
        emit_beside(
            name,
            statistics.median(found[0]) * 1000,
            beside,
            statistics.median(baseline[0]) * 1000,
            machine,
            base=bench.label,
            what=what,
            **more,
            **({"tokens_sampled": statistics.median(found[1])} if found[1] else {}),
            baseline_tokens_sampled=statistics.median(baseline[1]),
            p99_ms=round(percentile(found[0], 99) * 1000, 3),
            baseline_p99_ms=round(percentile(baseline[0], 99) * 1000, 3),
            statistic="median and p99 over every round's asks",
        )

    line(
        "chat_stream_whole",
        streamed,
        "the same chat awaited whole",
        ours,
        f"one chat streamed, greedy, at most {args.tokens} tokens: ms to its end",
        chats=len(streamed[0]),
    )
    with_entries = sides["stream_logprobs"]
    if with_entries[0]:
        line(
            "chat_stream_logprobs_whole",
            with_entries,
            "the same chat streamed without logprobs",
            streamed,
            f"one chat streamed with logprobs, top_logprobs {args.logprobs}, greedy, "
            f"at most {args.tokens} tokens: ms to its end",
            chats=len(with_entries[0]),
        )
    if not args.completions:
        return 0
    whole, streamed_text = sides["completion"], sides["completion_stream"]
    whole_batch = sides["completion_batch"]
    one = f"one text completion streamed, greedy, at most {args.tokens} tokens: ms to"
    batch = f"a batch of {args.batch} prompts in one request, streamed, greedy, at most "
    batch += f"{args.tokens} tokens each: ms to"
    for name, found, beside, baseline, what in (
        ("completion_stream_first_text", (completion_firsts, []), "completion", whole, one),
        ("completion_stream_whole", streamed_text, "completion", whole, one),
        ("completion_batch_stream_first_text", (batch_firsts, []), "batch", whole_batch, batch),
        (
            "completion_batch_stream_whole",
            sides["completion_batch_stream"],
            "batch",
            whole_batch,
            batch,
        ),
    ):
        if found[0]:
            end = "its first text" if name.endswith("first_text") else "its end"
            line(
                name,
                found,
                f"the same {beside} awaited whole",
                baseline,
                f"{what} {end}",
                asks=len(found[0]),
            )
    with_lists = sides["completion_stream_logprobs"]
    if with_lists[0]:
        line(
            "completion_stream_logprobs_whole",
            with_lists,
            "the same completion streamed without logprobs",
            streamed_text,
            f"one text completion streamed with logprobs {args.logprobs}, greedy, at "
            f"most {args.tokens} tokens: ms to its end",
            asks=len(with_lists[0]),
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
