"""OpenAI's legacy completion `logprobs` (`POST /v1/completions`), read as one entry a token:
`{"token": its text decoded alone, "logprob": its logprob (None for a prompt's first token),
"top_logprobs": its position's likeliest tokens by text (None where it has no logprob)}`.

An executor builds a completion's entries (`workers.interactive.completion`) and answers them as
the four parallel lists OpenAI's answer holds (`arrays`); a streamed completion's executor writes
them as they are sure, and its stream sends each chunk's new entries as those lists, their
`text_offset` carrying on from the entries sent before (`arrays(new, offset)`), so the lists of
every chunk joined are the completion's answered whole.
"""

from __future__ import annotations

from typing import Any


def arrays(entries: list[dict[str, Any]], offset: int = 0) -> dict[str, Any]:
    """The entries as OpenAI's legacy lists: `tokens`, `token_logprobs`, `top_logprobs`, and
    `text_offset`, each token's start in the tokens' texts joined, counted from `offset` (the
    texts of the entries before them)."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry["token"])
    return {
        "tokens": [entry["token"] for entry in entries],
        "token_logprobs": [entry["logprob"] for entry in entries],
        "top_logprobs": [entry["top_logprobs"] for entry in entries],
        "text_offset": offsets,
    }


def entries(lists: dict[str, Any]) -> list[dict[str, Any]]:
    """OpenAI's legacy lists (`arrays`) as entries, one a token."""
    return [
        {"token": token, "logprob": logprob, "top_logprobs": top}
        for token, logprob, top in zip(
            lists["tokens"], lists["token_logprobs"], lists["top_logprobs"], strict=True
        )
    ]
