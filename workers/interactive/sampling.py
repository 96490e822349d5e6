"""`sample`: Tinker's SampleRequests decoded by a plain KV-cached loop on the resident model.

A tenant's samples between training steps do not justify a serving engine beside the trainer:
the adapter being trained is sampled where it lives, with no export. Several requests (an RL
loop's prompts, other tenants' models) are decoded together, one forward pass a token for all
their rows (within SAMPLE_TOKENS): prompts left-padded and masked, each row at its own positions
and through its own adapter, so each request reads what it would alone. Semantics follow
Tinker's SamplingParams:

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
- `prompt_logprobs`: one entry per prompt token, None for the first (it has no context) and for
  those before the last `prompt_logprobs_last_n`.
- `topk_prompt_logprobs` k: one row per prompt token, aligned as `prompt_logprobs` (None for the
  first and for those before the last `prompt_logprobs_last_n`): row p holds the k most likely
  tokens of the model's next-token distribution at position p - 1 (the candidates for token p),
  each a (token, logprob) pair, most likely first (in JSON `[token, logprob]`).
- `topk_sample_logprobs` k: one such row per generated token (a sequence's `topk_logprobs`),
  from the same distribution as its `logprobs`: the model's own, before temperature, top-k and
  top-p narrow it. At temperature 0 a token is the first of its row (or tied with it).
Each top-k is computed only for the requests that ask for it: the others cost what they did.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from control_plane.interactive import MAX_TOPK_LOGPROBS
from workers.interactive.losses import InteractiveError, read_tokens, target_logprobs
from workers.interactive.routing import routed

# Request fields of features this engine does not compute, with the value that means "off".
_UNSUPPORTED = {
    "target_prompt_logprobs": None,
    "prompt_alt_tokens_k": 0,
    "record_stability_info": None,
}

# A position's top-k logprobs: (token, logprob) pairs, the most likely first.
TopkRow = list[tuple[int, float]]


@dataclass(frozen=True)
class SamplingRequest:
    """A SampleRequest, checked: what `generate` needs and nothing else."""

    prompt: list[int]
    num_samples: int
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop_tokens: frozenset[int]
    stop_strings: tuple[str, ...]
    prompt_logprobs: bool
    prompt_logprobs_last_n: int | None
    topk_prompt_logprobs: int
    topk_sample_logprobs: int


def read_sample_request(
    request: Any, vocab_size: int, context_length: int, eos_token_ids: frozenset[int]
) -> SamplingRequest:
    """Read a SampleRequest's JSON; fields this engine has no use for (session ids, paths) are
    ignored, features it cannot compute are refused by name."""
    if not isinstance(request, Mapping):
        raise InteractiveError("the request must be a SampleRequest object")
    for field, off in _UNSUPPORTED.items():
        if request.get(field, off) not in (off, None, False):
            raise InteractiveError(f"{field} is not supported by this service; leave it unset")
    prompt = read_tokens(request.get("prompt"), vocab_size, "prompt")
    params = request.get("sampling_params")
    if not isinstance(params, Mapping):
        raise InteractiveError("sampling_params must be a SamplingParams object")
    num_samples = _integer(request.get("num_samples", 1), "num_samples", minimum=1)
    room = context_length - len(prompt)
    max_tokens = params.get("max_tokens")
    max_tokens = room if max_tokens is None else _integer(max_tokens, "max_tokens", minimum=1)
    if max_tokens > room:
        raise InteractiveError(
            f"the prompt ({len(prompt)} tokens) and max_tokens ({max_tokens}) exceed this "
            f"base's context of {context_length} tokens; lower max_tokens to at most {room}"
        )
    temperature, top_p = _number(params, "temperature", 1.0), _number(params, "top_p", 1.0)
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InteractiveError("temperature must be a number >= 0 (0: greedy)")
    if not 0 < top_p <= 1:
        raise InteractiveError("top_p must be in (0, 1]")
    seed = params.get("seed")
    last_n = request.get("prompt_logprobs_last_n")
    if last_n is not None:
        last_n = _integer(last_n, "prompt_logprobs_last_n", minimum=1)
        if last_n > len(prompt) - 1 or not request.get("prompt_logprobs"):
            raise InteractiveError(
                "prompt_logprobs_last_n needs prompt_logprobs and must be between 1 and "
                f"len(prompt) - 1 = {len(prompt) - 1}"
            )
    stop_tokens, stop_strings = _stops(params.get("stop"), eos_token_ids)
    return SamplingRequest(
        prompt=prompt,
        num_samples=num_samples,
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=_integer(_or(params.get("top_k"), -1), "top_k", minimum=-1),
        top_p=top_p,
        seed=None if seed is None else _integer(seed, "seed", minimum=0),
        stop_tokens=stop_tokens,
        stop_strings=stop_strings,
        prompt_logprobs=bool(request.get("prompt_logprobs")),
        prompt_logprobs_last_n=last_n,
        topk_prompt_logprobs=_top_k(request, "topk_prompt_logprobs"),
        topk_sample_logprobs=_top_k(request, "topk_sample_logprobs"),
    )


def _top_k(request: Mapping[str, Any], name: str) -> int:
    k = _integer(_or(request.get(name), 0), name, minimum=0)
    if k > MAX_TOPK_LOGPROBS:
        raise InteractiveError(f"{name} must be at most {MAX_TOPK_LOGPROBS}, got {k}")
    return k


def _integer(value: Any, name: str, *, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InteractiveError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _number(params: Mapping[str, Any], name: str, default: float) -> float:
    value = _or(params.get(name), default)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InteractiveError(f"{name} must be a number, got {value!r}")
    return float(value)


def _or(value: Any, default: Any) -> Any:
    """A field's value, or its default where the JSON has it null."""
    return default if value is None else value


def _stops(stop: Any, eos_token_ids: frozenset[int]) -> tuple[frozenset[int], tuple[str, ...]]:
    if stop is None:
        return eos_token_ids, ()
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, list) and all(isinstance(s, str) and s for s in stop):
        return frozenset(), tuple(stop)
    if isinstance(stop, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in stop):
        return frozenset(stop), ()
    raise InteractiveError("stop must be null, a string, a list of strings or a list of token ids")


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
) -> list[dict[str, Any]]:
    """Decode every request's `num_samples` continuations in one batch (a SampleResponse
    each): the prompts left-padded to the longest, masked, and each row placed by its own
    positions, so a request's rows read what they would alone. Each request draws from its own
    generator and keeps its own parameters and stops; a row that stopped runs along with the
    batch, its tokens dropped, until every row has. `adapters` (a peft model's adapter names,
    one a request) has each request's rows read through its own adapter."""
    owner = [r for r, request in enumerate(requests) for _ in range(request.num_samples)]
    if adapters is None:
        return _generate(model, requests, owner, tokenizer, device)
    with routed(cast(PeftModel, model), [adapters[r] for r in owner]):
        return _generate(model, requests, owner, tokenizer, device)


def _generate(
    model: nn.Module,
    requests: list[SamplingRequest],
    owner: list[int],
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
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
    prompt_scores = [
        _prompt_scores(output.logits[rows_of[r][0], width - len(request.prompt) :], request)
        for r, request in enumerate(requests)
    ]
    generators = [_generator(request.seed, device) for request in requests]
    tokens: list[list[int]] = [[] for _ in owner]
    logprobs: list[list[float]] = [[] for _ in owner]
    widths = [requests[r].topk_sample_logprobs for r in owner]
    topk: list[list[TopkRow]] = [[] for _ in owner]
    stopped, done = [False] * len(owner), [False] * len(owner)
    while True:
        logits = output.logits[:, -1].float()
        chosen = torch.empty(len(owner), dtype=torch.int64, device=device)
        for r, request in enumerate(requests):
            chosen[rows_of[r]] = _choose(logits[rows_of[r]], request, generators[r])
        every = torch.log_softmax(logits, dim=-1)
        own = every.gather(-1, chosen[:, None]).squeeze(-1)
        tops = _sample_topk(every, widths)
        for row, (token, logprob) in enumerate(zip(chosen.tolist(), own.tolist(), strict=True)):
            if done[row]:
                continue  # a finished row runs along with the batch; its tokens are dropped
            request = requests[owner[row]]
            tokens[row].append(token)
            logprobs[row].append(logprob)
            if widths[row]:
                topk[row].append(tops[row])
            stopped[row] = token in request.stop_tokens or _ends_in_stop_string(
                tokens[row], request.stop_strings, tokenizer
            )
            done[row] = stopped[row] or len(tokens[row]) == request.max_tokens
        if all(done):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        positions = positions[:, -1:] + 1
        output = model(
            input_ids=chosen[:, None],
            attention_mask=mask,
            position_ids=positions,
            cache=output.cache,
            use_cache=True,
        )
    return [
        {
            "type": "sample",
            "sequences": [
                {
                    "tokens": tokens[row],
                    "logprobs": logprobs[row],
                    "stop_reason": "stop" if stopped[row] else "length",
                    **({"topk_logprobs": topk[row]} if widths[row] else {}),
                }
                for row in rows_of[r]
            ],
            **prompt_scores[r],
        }
        for r in range(len(requests))
    ]


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A request's own draws: seeded, the same whatever else shares its batch."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


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


def _prompt_scores(logits: torch.Tensor, request: SamplingRequest) -> dict[str, Any]:
    """A response's prompt fields from the logits at its prompt's positions: `prompt_logprobs`
    (None unless asked), and `topk_prompt_logprobs` where asked. The logits at a position score
    the token after it, so position p is scored by the logits at p - 1."""
    scores: dict[str, Any] = {"prompt_logprobs": None}
    if not (request.prompt_logprobs or request.topk_prompt_logprobs):
        return scores
    first = _first_scored(request)
    scored = logits[first - 1 : -1].float()
    if request.prompt_logprobs:
        prompt = torch.tensor(request.prompt[first:], device=logits.device)
        scores["prompt_logprobs"] = [None] * first + target_logprobs(scored, prompt).tolist()
    if request.topk_prompt_logprobs:
        # Gathered minus the logsumexp, as `target_logprobs`: the (N, V) log-softmax is never
        # materialised, and a prompt token's logprob reads the same in both fields.
        top = scored.topk(request.topk_prompt_logprobs, dim=-1)
        norm = torch.logsumexp(scored, dim=-1, keepdim=True)
        scores["topk_prompt_logprobs"] = [None] * first + _rows(top.indices, top.values - norm)
    return scores


def _first_scored(request: SamplingRequest) -> int:
    """The first prompt position scored: 1 (position 0 has no context), or the first of the
    last `prompt_logprobs_last_n`."""
    if request.prompt_logprobs_last_n is None:
        return 1
    return len(request.prompt) - request.prompt_logprobs_last_n


def _sample_topk(logprobs: torch.Tensor, widths: list[int]) -> dict[int, TopkRow]:
    """The rows' top `widths[row]` tokens of their next-token logprobs, by row, for the rows
    whose width is not 0: one topk over those rows, at the widest."""
    asking = [row for row, k in enumerate(widths) if k]
    if not asking:
        return {}
    top = logprobs[asking].topk(max(widths), dim=-1)
    rows = _rows(top.indices, top.values)
    return {row: pairs[: widths[row]] for row, pairs in zip(asking, rows, strict=True)}


def _rows(tokens: torch.Tensor, logprobs: torch.Tensor) -> list[TopkRow]:
    """(N, k) tokens and their logprobs as N rows of `(token, logprob)`."""
    return [
        list(zip(ids, values, strict=True))
        for ids, values in zip(tokens.tolist(), logprobs.tolist(), strict=True)
    ]
