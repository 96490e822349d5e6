"""Which sample requests decode together: the batches a `sample_many` call's requests split into
(`sample_batches`), and whether a request asked while a batch decodes may join it (`Room`).

Two bounds hold a batch. Its padded tokens (its rows times its longest row: prompt and
`max_tokens`) stay within SAMPLE_TOKENS, which bounds its KV caches and logits. And a request
whose positions reach past where the base's rope scaling couples rows (`rope_couples_past`)
decodes alone: dynamic NTK and longrope scale every row's rotary frequencies by the batch's
largest position, so such a request beside shorter ones would change what they read, and they
what it reads. A request's own rows share its positions, so they still decode together.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from workers.interactive.sample_requests import SamplingRequest

# Most (padded) tokens decoded together: a batch's rows times its longest row (prompt and
# max_tokens), which bounds its KV caches and logits; a request past it runs alone.
SAMPLE_TOKENS = 32768


def rope_couples_past(config: Any) -> int | None:
    """The positions past which a model (its `config`) reads the batch's largest position in
    its rotary embedding (transformers' dynamic NTK: the context it was trained on; longrope:
    its original one), so a row reaching past them reads differently beside other rows than
    alone; None where rows never couple (default, linear, YaRN, llama3 scaling: fixed
    frequencies)."""
    if config is None:
        return None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    parameters = getattr(config, "rope_parameters", None) or {}
    # One set for the model, or one a layer type (sliding and full attention layers), or both.
    kinds = [parameters, *(v for v in parameters.values() if isinstance(v, dict))]
    bounds = []
    for kind in kinds:
        rope_type = str(kind.get("rope_type", "default"))
        if "dynamic" in rope_type:
            bounds.append(int(config.max_position_embeddings))
        elif rope_type == "longrope":
            original = kind.get("original_max_position_embeddings", config.max_position_embeddings)
            bounds.append(int(original))
    return min(bounds, default=None)


def reaches_past(request: SamplingRequest, bound: int | None) -> bool:
    """Whether `request`'s positions reach past `bound`, where rows couple: it decodes alone."""
    return past(len(request.prompt) + request.max_tokens, bound)


def past(length: int, bound: int | None) -> bool:
    """Whether a row of a prompt and its tokens to sample, `length` in all, reads past `bound`:
    the last token it samples is never read, so the positions it reads are one fewer (the
    rotary embedding's sequence length is the largest position read, plus one)."""
    return bound is not None and length - 1 > bound


def sample_batches(
    sizes: dict[int, tuple[int, int]], couples_past: int | None = None
) -> Iterator[list[int]]:
    """The requests' keys in order, each with its (rows, tokens a row), grouped while a group's
    rows times its longest row stay within SAMPLE_TOKENS; a request whose rows reach past
    `couples_past` (`rope_couples_past`) in a group of its own."""
    group: list[int] = []
    rows = longest = 0
    apart = False  # the group is one request that reaches past `couples_past`
    for key, (request_rows, length) in sizes.items():
        alone = past(length, couples_past)
        if group and (
            apart or alone or (rows + request_rows) * max(longest, length) > SAMPLE_TOKENS
        ):
            yield group
            group, rows, longest = [], 0, 0
        group.append(key)
        rows, longest, apart = rows + request_rows, max(longest, length), alone
    if group:
        yield group


@dataclass(frozen=True)
class Room:
    """How full a running batch is: its rows still decoding, its cache's width (its longest
    prompt's padded positions and the tokens since), and the most tokens a row of it may still
    sample, which its remaining passes need not outlast; and where rows couple on its base
    (`rope_couples_past`) and whether it holds a request that reaches past that (it takes
    none)."""

    rows: int
    width: int
    tokens_left: int
    couples_past: int | None = None
    apart: bool = False

    def taking(self, request: SamplingRequest) -> Room | None:
        """The batch once `request`'s rows join, or None where they do not fit: they would
        sample more tokens than any row of the batch may still sample (the batch would run
        longer than it could have without them, and whatever waits for its end would wait
        longer), the rows times the longest row (the cache's width and the tokens left) would
        pass SAMPLE_TOKENS, or it or the batch reaches past where rows couple."""
        if request.max_tokens > self.tokens_left:
            return None
        if self.apart or reaches_past(request, self.couples_past):
            return None
        rows, width = self.rows + request.num_samples, max(self.width, len(request.prompt))
        if rows * (width + self.tokens_left) > SAMPLE_TOKENS:
            return None
        return Room(rows, width, self.tokens_left, self.couples_past)
