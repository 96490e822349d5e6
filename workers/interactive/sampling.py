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
  k most likely tokens, each a (token, logprob) pair, most likely first, from the same
  distribution as its `logprobs`: the model's own, before temperature, top-k and top-p narrow
  it. At temperature 0 a token is the first of its row (or tied with it).
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
from transformers import Cache, DynamicCache, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from workers.interactive.prompt_scores import TopkRow, prompt_scores, seeded_generator, topk_rows
from workers.interactive.routing import BASE, routed
from workers.interactive.sample_batching import Room, reaches_past, rope_couples_past
from workers.interactive.sample_requests import SamplingRequest


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


# Each request's rows so far (`rows[r]`: request r's, in order, each a SampledSequence: its
# tokens, their logprobs and top-k rows) in; the requests to stop now out.
OnStep = Callable[["Rows"], set[int]]
# A request's place in the batch and its SampleResponse, once every row of it is done.
OnDone = Callable[[int, dict[str, Any]], None]
# Between passes, the batch's room in; the requests that join it now out, each with its adapter
# (None where the batch has none), their places after the batch's.
Join = Callable[[Room], list[tuple[SamplingRequest, str | None]]]


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
    join: Join | None = None,
) -> list[dict[str, Any]]:
    """Decode every request's `num_samples` continuations in one batch (a SampleResponse
    each): the prompts left-padded to the longest, masked, and each row placed by its own
    positions, so a request's rows read what they would alone. Each request draws from its own
    generator and keeps its own parameters and stops; a row that has stopped leaves the batch
    (its cache with it, where the cache can be narrowed: `_narrowable`; and, where it can take
    rows, the leading positions no row left reads: `_trimmed`), so the passes after it cost the
    rows still decoding, not the batch's first size. `adapters` (a peft model's
    adapter names, one a request) has each request's rows read through its own adapter.
    `on_step` is given each request's rows so far after every token sampled but the last, and
    answers the requests (by place) to stop sampling now (their rows end as at `max_tokens`).
    `on_done` is given each request's SampleResponse (by place) as soon as its rows are done,
    before the rows still decoding go on: its answer need not wait for the batch's longest
    row. `join` is asked before each pass but the first, where the cache can
    take rows (`_joinable`), for requests that join the batch then: their prompts are read in a
    pass of their own and their rows decode with the batch's from then on, each answering what
    it answers alone (places after the batch's, in the answers returned too). A request that
    reaches past where the base's rope couples rows must come alone (`sample_batching`); none
    joins a batch that holds one."""
    if adapters is None:
        return _Decode(model, tokenizer, device, None, on_step, on_done).run(requests, [], join)
    with routed(cast(PeftModel, model), list(adapters)) as route:
        decode = _Decode(model, tokenizer, device, route, on_step, on_done)
        return decode.run(requests, list(adapters), join)


class _Decode:
    """One batch's decoding: its requests and rows (those it began with and those that joined),
    each row's tokens so far, and the rows still in the batch (`live`, by place)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        route: Callable[[list[str]], None] | None,
        on_step: OnStep | None,
        on_done: OnDone | None,
    ) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.route, self.on_step, self.on_done = route, on_step, on_done
        self.couples_past = rope_couples_past(getattr(model, "config", None))
        self.requests: list[SamplingRequest] = []
        self.rows_of: list[list[int]] = []  # each request's rows
        self.scores: list[dict[str, Any]] = []  # each request's prompt scores
        self.generators: list[torch.Generator] = []
        self.answers: list[dict[str, Any] | None] = []
        self.owner: list[int] = []  # each row's request
        self.adapters: list[str] = []  # each row's adapter (none without `route`)
        self.tokens: list[list[int]] = []
        self.logprobs: list[list[float]] = []
        self.topk: list[list[TopkRow]] = []
        self.stopped: list[bool] = []
        self.done: list[bool] = []
        self.live: list[int] = []  # the rows in the batch, by place: those still decoding
        self.places_of: list[list[int]] = []  # each request's rows' places in the batch

    def run(
        self, requests: list[SamplingRequest], adapters: list[str], join: Join | None
    ) -> list[dict[str, Any]]:
        self.live, (logits, cache, mask, positions) = self._read(requests, adapters)
        self._moved()
        passes = 0
        while True:
            if join is not None and passes and _joinable(cache):
                logits, mask, positions = self._join(join, cache, logits, mask, positions)
            chosen = self._choose(logits)
            if all(self.done):
                break
            kept = [place for place, row in enumerate(self.live) if not self.done[row]]
            if len(kept) < len(self.live) and _narrowable(cache):  # finished rows leave
                index = torch.tensor(kept, device=self.device)
                cache.reorder_cache(index)
                mask, positions, chosen = mask[index], positions[index], chosen[index]
                self.live = [self.live[place] for place in kept]
                self._moved()
                if _joinable(cache):
                    mask = _trimmed(cache, mask)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            positions = positions + 1
            output = self.model(
                input_ids=chosen[:, None],
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
            )
            logits, cache, passes = output.logits[:, -1].float(), output.cache, passes + 1
        finished = [answer for answer in self.answers if answer is not None]
        assert len(finished) == len(self.requests)  # the loop ends once every row is done
        return finished

    def _read(
        self, requests: list[SamplingRequest], adapters: list[str]
    ) -> tuple[list[int], tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]]:
        """The requests' rows added to the batch's books (each request through its adapter,
        where the batch routes them) and their prompts read in one pass, left-padded to the
        longest: the new rows, and the pass's last logits, its cache, the mask and each row's
        last position."""
        first = len(self.owner)
        for k, request in enumerate(requests):
            r, rows = (
                len(self.requests),
                range(len(self.owner), len(self.owner) + request.num_samples),
            )
            self.requests.append(request)
            self.rows_of.append(list(rows))
            self.generators.append(seeded_generator(request.seed, self.device))
            self.answers.append(None)
            self.owner += [r] * len(rows)
            self.adapters += [adapters[k]] * len(rows) if self.route is not None else []
            for _ in rows:
                self.tokens.append([])
                self.logprobs.append([])
                self.topk.append([])
            self.stopped += [False] * len(rows)
            self.done += [False] * len(rows)
        new = list(range(first, len(self.owner)))
        width = max(len(request.prompt) for request in requests)
        ids = torch.zeros((len(new), width), dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for place, row in enumerate(new):
            prompt = self.requests[self.owner[row]].prompt
            ids[place, width - len(prompt) :] = torch.tensor(prompt)
            mask[place, width - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        if self.route is not None:
            self.route([self.adapters[row] for row in new])
        output = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True
        )
        for request in requests:  # each request's prompt scored off its first row
            place = self.rows_of[len(self.scores)][0] - first
            read = output.logits[place, width - len(request.prompt) :]
            self.scores.append(prompt_scores(read, request))
        return new, (output.logits[:, -1].float(), output.cache, mask, positions[:, -1:])

    def _join(
        self,
        join: Join,
        cache: Any,
        logits: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The requests `join` gives, read and merged into the batch: their caches and the
        batch's left-padded to the wider, their rows after the batch's."""
        left = max(
            self.requests[self.owner[row]].max_tokens - len(self.tokens[row]) for row in self.live
        )
        live = [self.requests[self.owner[row]] for row in self.live]
        apart = any(reaches_past(request, self.couples_past) for request in live)
        joining = join(Room(len(self.live), mask.shape[1], left, self.couples_past, apart))
        if not joining:
            return logits, mask, positions
        new, (theirs, their_cache, their_mask, their_positions) = self._read(
            [request for request, _ in joining],
            [BASE if adapter is None else adapter for _, adapter in joining],
        )
        self.live += new
        self._moved()
        width = max(mask.shape[1], their_mask.shape[1])
        _merge_caches(cache, their_cache, width - mask.shape[1], width - their_mask.shape[1])
        mask = torch.cat(
            [
                nn.functional.pad(mask, (width - mask.shape[1], 0)),
                nn.functional.pad(their_mask, (width - their_mask.shape[1], 0)),
            ]
        )
        return torch.cat([logits, theirs]), mask, torch.cat([positions, their_positions])

    def _moved(self) -> None:
        """The batch's rows changed (it began, rows left, rows joined): each request's places in
        it, and the passes after this routed by its rows (in mixed batches)."""
        self.places_of = [[] for _ in self.requests]
        for place, row in enumerate(self.live):
            self.places_of[self.owner[row]].append(place)
        if self.route is not None:
            self.route([self.adapters[row] for row in self.live])

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's next token drawn from its logits (a request for its rows still decoding,
        with its own generator), recorded with its logprobs; the requests whose rows are all
        done are answered, and `on_step` may stop others. The tokens chosen, by place."""
        live, requests, places_of = self.live, self.requests, self.places_of
        chosen = torch.empty(len(live), dtype=torch.int64, device=self.device)
        for r, request in enumerate(requests):
            if places_of[r]:  # a request draws for its rows still decoding, alone or not
                chosen[places_of[r]] = _choose(logits[places_of[r]], request, self.generators[r])
        every = torch.log_softmax(logits, dim=-1)
        own = every.gather(-1, chosen[:, None]).squeeze(-1)
        widths = [requests[self.owner[row]].topk_sample_logprobs for row in live]
        tops = _sample_topk(every, widths)
        pairs = zip(live, chosen.tolist(), own.tolist(), strict=True)
        for place, (row, token, logprob) in enumerate(pairs):
            if self.done[row]:
                continue  # a row running along with a cache it cannot leave: tokens dropped
            request = requests[self.owner[row]]
            self.tokens[row].append(token)
            self.logprobs[row].append(logprob)
            if widths[place]:
                self.topk[row].append(tops[place])
            self.stopped[row] = token in request.stop_tokens or _ends_in_stop_string(
                self.tokens[row], request.stop_strings, self.tokenizer
            )
            self.done[row] = self.stopped[row] or len(self.tokens[row]) == request.max_tokens
        self._answer_the_finished()
        if self.on_step is not None and not all(self.done):
            for r in self.on_step(Rows(self)):
                for row in self.rows_of[r]:
                    self.done[row] = True
            self._answer_the_finished()
        return chosen

    def _sequence(self, row: int, request: SamplingRequest) -> dict[str, Any]:
        return _sequence(
            self.tokens[row],
            self.logprobs[row],
            self.stopped[row],
            self.topk[row],
            request.topk_sample_logprobs,
        )

    def _answer_the_finished(self) -> None:
        """Each request answered once, as soon as its rows are done."""
        for r, rows in enumerate(self.rows_of):
            if self.answers[r] is None and all(self.done[row] for row in rows):
                request = self.requests[r]
                sequences = [self._sequence(row, request) for row in rows]
                answer = {"type": "sample", "sequences": sequences, **self.scores[r]}
                self.answers[r] = answer
                if self.on_done is not None:
                    self.on_done(r, answer)


class Rows:
    """A batch's requests' rows as sampled so far, read only where asked (`rows[r]`: request r's
    SampledSequences; a step that writes nothing reads none)."""

    def __init__(self, decode: _Decode) -> None:
        self.decode = decode

    def __getitem__(self, r: int) -> list[dict[str, Any]]:
        decode = self.decode
        return [decode._sequence(row, decode.requests[r]) for row in decode.rows_of[r]]

    def scores(self, r: int) -> dict[str, Any]:
        """Request r's prompt scores (`prompt_scores`), read as its prompt was."""
        return self.decode.scores[r]


def _joinable(cache: Any) -> bool:
    """Whether rows can join a cache: a plain `DynamicCache` of full-attention layers, whose
    keys and values are each one tensor a layer that padding on the left widens (a sliding
    window's, a hybrid base's recurrent state or a model's own cache class keep more)."""
    return type(cache) is DynamicCache and all(
        type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers
    )


def _trimmed(cache: Any, mask: torch.Tensor) -> torch.Tensor:
    """The leading positions no row still in the batch reads (the left padding of prompts
    longer than theirs, which have left) dropped from a joinable cache, and its mask without
    them: the passes after read only as wide a cache as the rows need."""
    first = int(mask.any(dim=0).int().argmax())
    if first == 0:
        return mask
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
    return mask[:, first:]


def _merge_caches(cache: Any, theirs: Any, pad_mine: int, pad_theirs: int) -> None:
    """`theirs`' rows after `cache`'s, each left-padded to the wider (positions the masks hide)."""
    for mine, their in zip(cache.layers, theirs.layers, strict=True):
        for name in ("keys", "values"):
            ours = nn.functional.pad(getattr(mine, name), (0, 0, pad_mine, 0))
            joined = nn.functional.pad(getattr(their, name), (0, 0, pad_theirs, 0))
            setattr(mine, name, torch.cat([ours, joined]))


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
