"""`sample`: Tinker's SampleRequests decoded by a plain KV-cached loop on the resident model.

A tenant's samples between training steps do not justify a serving engine beside the trainer:
the adapter being trained is sampled where it lives, with no export. Several requests (an RL
loop's prompts, other tenants' models) are decoded together, one forward pass a token for
their rows still decoding (within SAMPLE_TOKENS; a row that has stopped leaves the batch):
prompts left-padded and masked, each row at its own positions and through its own adapter, so
each request reads what it would alone. Semantics follow Tinker's SamplingParams:

- `temperature` 0 is greedy; otherwise `top_k` (-1 or 0: no limit) and `top_p` narrow the
  tempered distribution before drawing.
- `max_tokens` None runs to the end of the base's context (unless a stop comes first).
- `seed` makes a request reproducible: one generator, seeded, draws for all its samples,
  whatever else shares its batch.
- `stop`: None stops at the tokenizer's end-of-sequence tokens; a list replaces them (token ids,
  or strings matched in the decoded completion), and `[]` stops only at `max_tokens`. The token
  that stops a sequence is kept in it, as vLLM keeps it in `token_ids`.
- The logprob returned for a token is the model's own (temperature 1, before top-k/top-p), as
  vLLM returns by default: the same quantity `forward` computes, so an importance ratio of an
  on-policy sample starts at 1.
- `topk_sample_logprobs` k: one row per generated token (a sequence's `topk_logprobs`): its
  k most likely tokens, each a (token, logprob) pair, most likely first, from the same distribution as its `logprobs`: the model's own, before temperature, top-k and
  top-p narrow it. At temperature 0 a token is the first of its row (or tied with it).
- The prompt's own scores (`prompt_logprobs`, `topk_prompt_logprobs`, `target_prompt_logprobs`,
  `prompt_alt_tokens_k`): `prompt_scores`.
Each of these is computed only for the requests that ask for it: the others cost what they did.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from peft import PeftModel
from torch import nn
from transformers import Cache, PreTrainedTokenizerBase

from workers.interactive.prompt_scores import TopkRow, prompt_scores, seeded_generator, topk_rows
from workers.interactive.routing import routed
from workers.interactive.sample_requests import SamplingRequest

# Most (padded) tokens decoded together: a batch's rows times its longest row (prompt and
# max_tokens), which bounds its KV caches and logits; a request past it runs alone.
SAMPLE_TOKENS = 32768


def sample_batches(sizes: dict[int, tuple[int, int]]) -> Iterator[list[int]]:
    """The requests' keys in order, each with its (rows, tokens a row), grouped while a group's
    rows times its longest row stay within SAMPLE_TOKENS."""
    group: list[int] = []
    rows = longest = 0
    for key, (request_rows, length) in sizes.items():
        if group and (rows + request_rows) * max(longest, length) > SAMPLE_TOKENS:
            yield group
            group, rows, longest = [], 0, 0
        group.append(key)
        rows, longest = rows + request_rows, max(longest, length)
    if group:
        yield group


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for a while (peft routes a mixed batch only then; the models'
    LoRA dropout is 0, so the numbers are the same), as it was after."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


@torch.no_grad()
def generate(
    model: nn.Module,
    requests: list[SamplingRequest],
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
    *,
    adapters: list[str] | None = None,
    on_step: OnStep | None = None,
    on_done: OnDone | None = None,
) -> list[dict[str, Any]]:
    """Decode every request's `num_samples` continuations in one batch (a SampleResponse
    each): the prompts left-padded to the longest, masked, and each row placed by its own
    positions, so a request's rows read what they would alone. Each request draws from its own
    generator and keeps its own parameters and stops; a row that has stopped leaves the batch
    (its cache with it, where the cache can be narrowed: `_narrowable`), so the passes after it
    cost the rows still decoding, not the batch's first size. `adapters` (a peft model's
    adapter names, one a request) has each request's rows read through its own adapter.
    `on_step` is given each request's rows' tokens so far after every token sampled but the
    last, and answers the requests (by place) to stop sampling now (their rows end as at
    `max_tokens`). `on_done` is given each request's SampleResponse (by place) as soon as its
    rows are done, before the rows still decoding go on: its answer need not wait for the
    batch's longest row."""
    owner = [r for r, request in enumerate(requests) for _ in range(request.num_samples)]
    if adapters is None:
        return _generate(model, requests, owner, tokenizer, device, on_step, on_done, None)
    row_adapters = [adapters[r] for r in owner]
    with routed(cast(PeftModel, model), row_adapters) as route:

        def reroute(live: list[int]) -> None:  # the passes by the rows still in the batch
            route([row_adapters[row] for row in live])

        return _generate(model, requests, owner, tokenizer, device, on_step, on_done, reroute)


# Each request's rows' tokens so far (a list a request, in the order of its rows) in; the
# requests to stop now out.
OnStep = Callable[[list[list[list[int]]]], set[int]]
# A request's place in the batch and its SampleResponse, once every row of it is done.
OnDone = Callable[[int, dict[str, Any]], None]


def _generate(
    model: nn.Module,
    requests: list[SamplingRequest],
    owner: list[int],
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
    on_step: OnStep | None,
    on_done: OnDone | None,
    reroute: Callable[[list[int]], None] | None,
) -> list[dict[str, Any]]:
    rows_of = [[row for row, o in enumerate(owner) if o == r] for r in range(len(requests))]
    width = max(len(request.prompt) for request in requests)
    ids = torch.zeros((len(owner), width), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, r in enumerate(owner):
        prompt = requests[r].prompt
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    output = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    scores = [
        prompt_scores(output.logits[rows_of[r][0], width - len(request.prompt) :], request)
        for r, request in enumerate(requests)
    ]
    generators = [seeded_generator(request.seed, device) for request in requests]
    tokens: list[list[int]] = [[] for _ in owner]
    logprobs: list[list[float]] = [[] for _ in owner]
    widths = [requests[r].topk_sample_logprobs for r in owner]
    topk: list[list[TopkRow]] = [[] for _ in owner]
    stopped, done = [False] * len(owner), [False] * len(owner)
    live = list(range(len(owner)))  # the rows in the batch, by place: those still decoding
    places_of = rows_of  # each request's rows' places in the batch
    answers: list[dict[str, Any] | None] = [None] * len(requests)

    def answer_the_finished() -> None:  # each request once, as soon as its rows are done
        for r, rows in enumerate(rows_of):
            if answers[r] is None and all(done[row] for row in rows):
                sequences = [
                    _sequence(tokens[row], logprobs[row], stopped[row], topk[row], widths[row])
                    for row in rows
                ]
                answer = {"type": "sample", "sequences": sequences, **scores[r]}
                answers[r] = answer
                if on_done is not None:
                    on_done(r, answer)

    while True:
        logits = output.logits[:, -1].float()
        chosen = torch.empty(len(live), dtype=torch.int64, device=device)
        for r, request in enumerate(requests):
            if places_of[r]:  # a request draws for its rows still decoding, alone or not
                chosen[places_of[r]] = _choose(logits[places_of[r]], request, generators[r])
        every = torch.log_softmax(logits, dim=-1)
        own = every.gather(-1, chosen[:, None]).squeeze(-1)
        tops = _sample_topk(every, [widths[row] for row in live])
        pairs = zip(live, chosen.tolist(), own.tolist(), strict=True)
        for place, (row, token, logprob) in enumerate(pairs):
            if done[row]:
                continue  # a row running along with a cache it cannot leave: tokens dropped
            request = requests[owner[row]]
            tokens[row].append(token)
            logprobs[row].append(logprob)
            if widths[row]:
                topk[row].append(tops[place])
            stopped[row] = token in request.stop_tokens or _ends_in_stop_string(
                tokens[row], request.stop_strings, tokenizer
            )
            done[row] = stopped[row] or len(tokens[row]) == request.max_tokens
        answer_the_finished()
        if all(done):
            break
        if on_step is not None:
            for r in on_step([[tokens[row] for row in rows] for rows in rows_of]):
                for row in rows_of[r]:
                    done[row] = True
            answer_the_finished()
            if all(done):
                break
        kept = [place for place, row in enumerate(live) if not done[row]]
        if len(kept) < len(live) and _narrowable(output.cache):  # finished rows leave
            index = torch.tensor(kept, device=device)
            output.cache.reorder_cache(index)
            mask, positions, chosen = mask[index], positions[index], chosen[index]
            live = [live[place] for place in kept]
            places_of = [
                [p for p, row in enumerate(live) if owner[row] == r] for r in range(len(requests))
            ]
            if reroute is not None:
                reroute(live)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        positions = positions[:, -1:] + 1
        output = model(
            input_ids=chosen[:, None],
            attention_mask=mask,
            position_ids=positions,
            cache=output.cache,
            use_cache=True,
        )
    finished = [answer for answer in answers if answer is not None]
    assert len(finished) == len(requests)  # the loop ends once every row is done
    return finished


def _sequence(
    tokens: list[int], logprobs: list[float], stopped: bool, topk: list[TopkRow], width: int
) -> dict[str, Any]:
    """A row's SampledSequence: `topk_logprobs` only where the request asked for them."""
    return {
        "tokens": tokens,
        "logprobs": logprobs,
        "stop_reason": "stop" if stopped else "length",
        **({"topk_logprobs": topk} if width else {}),
    }


def _narrowable(cache: Any) -> bool:
    """Whether finished rows can leave a cache: `reorder_cache` narrows each of its layers'
    states (keys and values, and a hybrid base's convolution and recurrent states, which a mixed
    layer's `batch_select_indices` leaves behind and a convolution layer has no such method
    for). A cache class of a model's own may keep a state outside its layers (MiniMax's
    lightning attention, whose own `batch_select_indices` fails on a mixed stack): its rows run
    along with the batch to its end, as every row did before they could leave."""
    return isinstance(cache, Cache) and all(
        getattr(type(cache), method) is getattr(Cache, method)
        for method in ("reorder_cache", "batch_select_indices")
    )


def _choose(
    logits: torch.Tensor, request: SamplingRequest, generator: torch.Generator
) -> torch.Tensor:
    """The next token of each row: argmax at temperature 0, else a draw from the tempered
    distribution narrowed to the top k tokens and then to the top_p probability mass."""
    if request.temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits / request.temperature
    if 0 < request.top_k < scaled.shape[-1]:
        kth = scaled.topk(request.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    if request.top_p < 1:
        ordered, order = scaled.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p (the first stays)
        drop = probs.cumsum(dim=-1) - probs > request.top_p
        scaled = scaled.scatter(-1, order, ordered.masked_fill(drop, -math.inf))
    return torch.multinomial(scaled.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _ends_in_stop_string(
    tokens: list[int], stop_strings: tuple[str, ...], tokenizer: PreTrainedTokenizerBase
) -> bool:
    if not stop_strings:
        return False
    text = tokenizer.decode(tokens)
    return any(stop in text for stop in stop_strings)


def _sample_topk(logprobs: torch.Tensor, widths: list[int]) -> dict[int, TopkRow]:
    """The rows' top `widths[row]` tokens of their next-token logprobs, by row, for the rows
    whose width is not 0: one topk over those rows, at the widest."""
    asking = [row for row, k in enumerate(widths) if k]
    if not asking:
        return {}
    top = logprobs[asking].topk(max(widths), dim=-1)
    rows = topk_rows(top.indices, top.values)
    return {row: pairs[: widths[row]] for row, pairs in zip(asking, rows, strict=True)}
