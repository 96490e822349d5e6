"""A sample request's scores of its own prompt, from the logits of the pass that reads it.

- `prompt_logprobs`: one entry per prompt token, None for the first (it has no context) and for
  those before the last `prompt_logprobs_last_n`.
- `topk_prompt_logprobs` k: one row per prompt token, aligned as `prompt_logprobs` (None for the
  first and for those before the last `prompt_logprobs_last_n`): row p holds the k most likely
  tokens of the model's next-token distribution at position p - 1 (the candidates for token p),
  each a (token, logprob) pair, most likely first (in JSON `[token, logprob]`).
- `target_prompt_logprobs`: token ids, an int64 [len(prompt) - 1, K] TensorData (K <= 20),
  dense or sparse CSR: the answer has its shape and layout, cell [i, j] the model's logprob of
  token ids[i, j] at prompt position i + 1 (row i: the distribution after token i), 0.0 where
  the cell is -1 or, sparse, unlisted. Every position is scored, whatever
  `prompt_logprobs_last_n` says.
- `prompt_alt_tokens_k` k (<= 20): at each position after the first, k tokens drawn from the
  model's next-token distribution there, independently and with replacement, at the request's
  temperature, with their logprobs under the model's own distribution (as a sampled token's);
  two [len(prompt) - 1, k] TensorData, `tokens` and `logprobs`. The SDK says only "at the
  request's temperature", so `top_k` and `top_p`, which narrow the sequences' draws, do not
  narrow these: they are alternatives over the whole tempered distribution. Temperature 0 is
  the limit of that distribution, its mass all on the argmax: each of the k draws is the
  argmax. The draws have a generator of their own, seeded from the request's `seed`, so the
  same request draws the same tokens, and asking for them changes none of its samples.
Each of these is computed only for the requests that ask for it: the others cost what they did.
"""

from __future__ import annotations

from typing import Any

import torch

from control_plane.prompt_targets import NOTHING
from workers.interactive.losses import target_logprobs, tensor_data
from workers.interactive.sample_requests import PromptTargets, SamplingRequest

# A position's top-k logprobs: (token, logprob) pairs, the most likely first.
TopkRow = list[tuple[int, float]]


def seeded_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A request's own draws: seeded, the same whatever else shares its batch."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def prompt_scores(logits: torch.Tensor, request: SamplingRequest) -> dict[str, Any]:
    """A response's prompt fields from the logits at its prompt's positions: `prompt_logprobs`
    (None unless asked), and `topk_prompt_logprobs`, `target_prompt_logprobs` and
    `prompt_alt_tokens` where asked. The logits at a position score the token after it, so
    position p is scored by the logits at p - 1. The last two cover every position after the
    first, whatever `prompt_logprobs_last_n` says, as the SDK has it."""
    scores: dict[str, Any] = {"prompt_logprobs": None}
    if request.prompt_targets is not None or request.prompt_alt_tokens_k:
        every = logits[:-1].float()  # row i scores prompt position i + 1
        if request.prompt_targets is not None:
            scores["target_prompt_logprobs"] = _target_scores(every, request.prompt_targets)
        if request.prompt_alt_tokens_k:
            scores["prompt_alt_tokens"] = _alternatives(every, request)
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
        scores["topk_prompt_logprobs"] = [None] * first + topk_rows(top.indices, top.values - norm)
    return scores


def _target_scores(logits: torch.Tensor, targets: PromptTargets) -> dict[str, Any]:
    """`target_prompt_logprobs` from the logits of positions 0 to len(prompt) - 2: cell [i, j]
    the logprob of token `ids[i, j]` at row i (the candidates for prompt token i + 1), 0.0
    where the cell asks nothing; dense, or as the request came, its CSR indices kept and the
    values of the cells they list."""
    ids = targets.ids.to(logits.device)
    values = target_logprobs(logits, ids.clamp(min=0)).masked_fill(ids == NOTHING, 0.0).cpu()
    if targets.crow is None or targets.col is None:
        return tensor_data(values)
    crow = torch.tensor(targets.crow, dtype=torch.int64)
    rows = torch.repeat_interleave(torch.arange(len(crow) - 1), crow.diff())
    listed = values[rows, torch.tensor(targets.col, dtype=torch.int64)]
    return {
        **tensor_data(listed),
        "shape": list(values.shape),
        "sparse_crow_indices": targets.crow,
        "sparse_col_indices": targets.col,
    }


# Mixed into a request's seed for the generator of its alternative prompt tokens: a stream of
# their own, so that asking for them leaves the request's samples as they were.
_ALTERNATIVES_SEED = 0x5EED_A17E_2B0C_C0DE


def _alternatives(logits: torch.Tensor, request: SamplingRequest) -> dict[str, Any]:
    """`prompt_alt_tokens` (the module's docstring says why so): at each row of the logits
    (the candidates for prompt token i + 1), k draws with replacement at the request's
    temperature alone, or the argmax k times at temperature 0, each with the model's own
    logprob of it."""
    k = request.prompt_alt_tokens_k
    if request.temperature == 0:
        tokens = logits.argmax(dim=-1, keepdim=True).expand(-1, k)
    else:
        seed = None if request.seed is None else request.seed ^ _ALTERNATIVES_SEED
        probs = (logits / request.temperature).softmax(dim=-1)
        generator = seeded_generator(seed, logits.device)
        tokens = torch.multinomial(probs, k, replacement=True, generator=generator)
    return {"tokens": tensor_data(tokens), "logprobs": tensor_data(target_logprobs(logits, tokens))}


def _first_scored(request: SamplingRequest) -> int:
    """The first prompt position scored: 1 (position 0 has no context), or the first of the
    last `prompt_logprobs_last_n`."""
    if request.prompt_logprobs_last_n is None:
        return 1
    return len(request.prompt) - request.prompt_logprobs_last_n


def topk_rows(tokens: torch.Tensor, logprobs: torch.Tensor) -> list[TopkRow]:
    """(N, k) tokens and their logprobs as N rows of `(token, logprob)`."""
    return [
        list(zip(ids, values, strict=True))
        for ids, values in zip(tokens.tolist(), logprobs.tolist(), strict=True)
    ]
