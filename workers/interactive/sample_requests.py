"""A Tinker SampleRequest read from its JSON wire shape into the `SamplingRequest` that
`sampling.generate` decodes: each field checked against the base (its vocabulary, its context)
with a message that says what to send instead, and the features this engine does not compute
refused by name. What each field means is in `sampling`'s docstring.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from control_plane.interactive import MAX_TOPK_LOGPROBS
from control_plane.prompt_targets import NOTHING, layout_problem
from workers.interactive.losses import InteractiveError, read_tensor, read_tokens

# Request fields of features this engine does not compute, with the value that means "off".
_UNSUPPORTED = {"record_stability_info": None}


@dataclass(frozen=True, eq=False)
class PromptTargets:
    """A request's `target_prompt_logprobs`: the token ids as a dense (len(prompt) - 1, K)
    tensor, NOTHING (-1) where a cell asks for nothing, and the CSR indices it came with (None
    when it came dense), which its answer keeps."""

    ids: torch.Tensor
    crow: list[int] | None
    col: list[int] | None


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
    prompt_targets: PromptTargets | None
    prompt_alt_tokens_k: int


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
        seed=None if seed is None else _seed(seed),
        stop_tokens=stop_tokens,
        stop_strings=stop_strings,
        prompt_logprobs=bool(request.get("prompt_logprobs")),
        prompt_logprobs_last_n=last_n,
        topk_prompt_logprobs=_top_k(request, "topk_prompt_logprobs"),
        topk_sample_logprobs=_top_k(request, "topk_sample_logprobs"),
        prompt_targets=_prompt_targets(request.get("target_prompt_logprobs"), prompt, vocab_size),
        prompt_alt_tokens_k=_top_k(request, "prompt_alt_tokens_k"),
    )


def _prompt_targets(value: Any, prompt: list[int], vocab_size: int) -> PromptTargets | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InteractiveError("target_prompt_logprobs must be a TensorData of token ids")
    problem = layout_problem(value, len(prompt) - 1, vocab_size)
    if problem is not None:
        raise InteractiveError(f"target_prompt_logprobs {problem}")
    return PromptTargets(
        ids=read_tensor(value, "target_prompt_logprobs", pad=NOTHING),
        crow=value.get("sparse_crow_indices"),
        col=value.get("sparse_col_indices"),
    )


def _top_k(request: Mapping[str, Any], name: str) -> int:
    k = _integer(_or(request.get(name), 0), name, minimum=0)
    if k > MAX_TOPK_LOGPROBS:
        raise InteractiveError(f"{name} must be at most {MAX_TOPK_LOGPROBS}, got {k}")
    return k


def _seed(value: Any) -> int:
    seed = _integer(value, "seed", minimum=0)
    if seed >= 2**64:
        raise InteractiveError(f"seed must be below 2**64 (a torch generator's), got {seed}")
    return seed


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
