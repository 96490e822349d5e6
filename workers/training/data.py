"""A job's data: its records tokenized, a share held out for evaluation, and the order they are
seen in, fixed by the job's seed so that a run is resumable and the same on every rank.

An epoch's order is a permutation seeded by (seed, epoch), and the step's randomness (LoRA
dropout) by (seed, step), so a run resumed from a checkpoint replays exactly the steps an
uninterrupted run takes, and every rank of a data-parallel job agrees on the batch it shares.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence, Sized
from functools import lru_cache
from typing import Any, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from control_plane.hyperparameters import Hyperparameters
from workers.training.formatting import DatasetFormatError, TokenizedDataset, tokenize_records
from workers.training.interface import TrainingError

Item = TypeVar("Item", bound=Sized)  # an example, or a preference pair


def job_datasets(
    train_records: list[dict[str, Any]],
    eval_records: list[dict[str, Any]] | None,
    tokenizer: PreTrainedTokenizerBase,
    hp: Hyperparameters,
    tokenize: Callable[..., TokenizedDataset[Any]] = tokenize_records,
    nothing_left: str = "no training example is left with a token to learn from: all {records} "
    "records lack an assistant/completion token within max_seq_length={max_seq_length}",
) -> tuple[TokenizedDataset[Any], TokenizedDataset[Any] | None]:
    """The job's training set and its evaluation set (its own file, else `eval_fraction` of the
    training examples held out, else none), tokenized by `tokenize` (records into examples,
    or into preference pairs); refused, saying `nothing_left`, when nothing is left to learn."""
    try:
        train_set = tokenize(train_records, tokenizer, hp.max_seq_length)
        eval_set = tokenize(eval_records, tokenizer, hp.max_seq_length) if eval_records else None
    except DatasetFormatError as exc:
        raise TrainingError(f"dataset record cannot be formatted: {exc}") from exc
    if not train_set.examples:
        raise TrainingError(
            nothing_left.format(records=len(train_records), max_seq_length=hp.max_seq_length)
        )
    if eval_set is None and hp.eval_fraction > 0:
        train_set, eval_set = split_eval(train_set, hp.eval_fraction, hp.seed)
    if eval_set is not None and not eval_set.examples:
        eval_set = None
    return train_set, eval_set


def dataset_summary(
    train_set: TokenizedDataset[Any], eval_set: TokenizedDataset[Any] | None
) -> tuple[str, dict[str, Any]]:
    """What the job trains and evaluates on, as a log line and its figures."""
    held_out = len(eval_set.examples) if eval_set else 0
    message = (
        f"dataset: {len(train_set.examples)} training examples ({train_set.total_tokens} "
        f"tokens), {train_set.dropped} dropped, {train_set.truncated} truncated; "
        f"{held_out} held out for evaluation"
    )
    return message, {
        "train_examples": len(train_set.examples),
        "train_tokens": train_set.total_tokens,
        "dropped_examples": train_set.dropped,
        "truncated_examples": train_set.truncated,
        "eval_examples": held_out,
    }


def hash_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed derived from the job seed and loop coordinates."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@lru_cache(maxsize=2)
def epoch_order(count: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The order examples are seen in during `epoch`: a permutation fixed by (seed, epoch)."""
    generator = torch.Generator().manual_seed(hash_seed(seed, epoch))
    return tuple(torch.randperm(count, generator=generator).tolist())


def held_out(count: int, fraction: float, seed: int) -> set[int]:
    """The indexes of `fraction` of `count` items (at least one, never all) held out for
    evaluation, seeded."""
    held = min(max(1, round(count * fraction)), count - 1)
    if held <= 0:
        return set()
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return set(order[:held])


def split_eval(
    dataset: TokenizedDataset[Item], fraction: float, seed: int
) -> tuple[TokenizedDataset[Item], TokenizedDataset[Item]]:
    """Hold out `fraction` of the examples (`held_out`) for evaluation."""
    held = held_out(len(dataset.examples), fraction, seed)
    train = [e for i, e in enumerate(dataset.examples) if i not in held]
    evaluation = [e for i, e in enumerate(dataset.examples) if i in held]
    return (
        TokenizedDataset(tuple(train), dataset.dropped, dataset.truncated),
        TokenizedDataset(tuple(evaluation)),
    )


def split_evenly(items: Sequence[Item], parts: int) -> Iterator[list[Item]]:
    """Exactly `parts` contiguous groups of near-equal size, the last ones empty when items run
    short (gradient-accumulation micro-batches: every rank sees as many, in lock-step)."""
    size, extra = divmod(len(items), parts)
    start = 0
    for index in range(parts):
        end = start + size + (index < extra)
        yield list(items[start:end])
        start = end
