"""Preference fine-tuning: Direct Preference Optimization (Rafailov et al., 2023) on the adapter.

A preference record (OpenAI's DPO format) is a conversation (`input.messages`) and two replies
to it, `preferred_output` and `non_preferred_output`. Each reply is tokenized as the chat record
it makes with the conversation, its own assistant turns trained and the conversation's not
(`formatting.tokenize_record`, the same markup as supervised training), so a pair is two
examples that share a prompt.

The loss of a pair is `-log sigmoid(beta * ((log pi(yw) - log ref(yw)) - (log pi(yl) - log
ref(yl))))`, each log-probability summed over the reply's trained tokens: it raises the
preferred reply's likelihood relative to the reference more than the other's, and `beta` says
how far from the reference the model may go. The reference is the model as the job starts:
the base itself for a fresh adapter (whose B matrices are zero), or the adapter a job continues
from (the usual recipe: supervised fine-tuning, then DPO against it). Its log-probabilities are
computed once, before the first step, in one pass without gradients: no second copy of the
model is kept, which is what a shared resident base needs. A checkpoint carries them, so a
resumed job compares against the same reference.

A step's loss is the mean over its pairs; each row of pairs runs as one packed forward of both
replies, and the vocabulary projection runs in chunks recomputed in the backward, so the logits
of a row are never all held.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedTokenizerBase

from control_plane.hyperparameters import Hyperparameters
from workers.kernels.example import TokenizedExample
from workers.kernels.packing import pack, packed_hidden_states, rows_of_tokens
from workers.training.data import job_datasets
from workers.training.formatting import DatasetFormatError, TokenizedDataset, tokenize_record
from workers.training.interface import TrainingError
from workers.training.supervised import EVAL_ROW_TOKENS, RowObjective

LOGP_CHUNK = 256  # target positions a chunk of the vocabulary projection covers


@dataclass(frozen=True)
class PreferencePair:
    """A conversation's preferred and non-preferred replies, tokenized; `index` is its place in
    its dataset (where its reference log-probabilities are)."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    index: int = 0

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)

    @property
    def trainable_tokens(self) -> int:
        return self.chosen.trainable_tokens + self.rejected.trainable_tokens


PreferenceDataset = TokenizedDataset[PreferencePair]


def tokenize_pair(record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> PreferencePair:
    """The two examples a preference record makes (not truncated)."""
    try:
        conversation = record["input"]["messages"]
        preferred, other = record["preferred_output"], record["non_preferred_output"]
    except (KeyError, TypeError):
        raise DatasetFormatError(
            "a preference record needs 'input.messages', 'preferred_output' and "
            f"'non_preferred_output'; keys {sorted(record)}"
        ) from None
    context = [{**m, "weight": 0} if m.get("role") == "assistant" else m for m in conversation]
    return PreferencePair(
        tokenize_record({"messages": [*context, *preferred]}, tokenizer),
        tokenize_record({"messages": [*context, *other]}, tokenizer),
    )


def tokenize_pairs(
    records: Iterable[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase, max_seq_length: int
) -> PreferenceDataset:
    """Tokenize every record, each reply truncated to `max_seq_length`; a pair whose reply is
    left with no trained token is dropped (it would compare nothing)."""
    pairs: list[PreferencePair] = []
    dropped = truncated = 0
    for record in records:
        pair = tokenize_pair(record, tokenizer)
        if len(pair.chosen) > max_seq_length or len(pair.rejected) > max_seq_length:
            truncated += 1
            pair = PreferencePair(
                pair.chosen.truncated(max_seq_length), pair.rejected.truncated(max_seq_length)
            )
        if pair.chosen.trainable_tokens and pair.rejected.trainable_tokens:
            pairs.append(PreferencePair(pair.chosen, pair.rejected, index=len(pairs)))
        else:
            dropped += 1
    return PreferenceDataset(tuple(pairs), dropped=dropped, truncated=truncated)


def job_pairs(
    train_records: list[dict[str, Any]],
    eval_records: list[dict[str, Any]] | None,
    tokenizer: PreTrainedTokenizerBase,
    hp: Hyperparameters,
) -> tuple[PreferenceDataset, PreferenceDataset | None]:
    """A DPO job's training pairs and its evaluation pairs (`data.job_datasets`, by pair)."""
    return job_datasets(
        train_records,
        eval_records,
        tokenizer,
        hp,
        tokenize=tokenize_pairs,
        nothing_left="no preference pair is left with a reply to compare: all {records} records "
        "lose a reply's every token within max_seq_length={max_seq_length}",
    )


def examples_of(items: Sequence[TokenizedExample | PreferencePair]) -> list[TokenizedExample]:
    """The examples a training set holds, both replies of each pair (what identifies the data
    of a checkpoint)."""
    flat: list[TokenizedExample] = []
    for item in items:
        flat += [item.chosen, item.rejected] if isinstance(item, PreferencePair) else [item]
    return flat


def sequence_logps(
    backbone: nn.Module, lm_head: nn.Module, examples: Sequence[TokenizedExample], device: Any
) -> torch.Tensor:
    """Each example's log-probability of its trained tokens, summed: `[len(examples)]`, fp32.

    One packed forward; the projection to the vocabulary runs `LOGP_CHUNK` positions at a time,
    each chunk recomputed in the backward rather than its logits kept."""
    row = pack(examples, device)
    hidden = packed_hidden_states(backbone, row)[row.target_positions]
    owners = torch.repeat_interleave(
        torch.arange(len(examples), device=hidden.device),
        torch.tensor([e.trainable_tokens for e in examples], device=hidden.device),
    )
    sums = torch.zeros(len(examples), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], LOGP_CHUNK):
        part = slice(start, start + LOGP_CHUNK)
        logp = checkpoint(
            _token_logps, hidden[part], row.targets[part], lm_head.weight, use_reentrant=False
        )
        sums = sums.index_add(0, owners[part], logp)
    return sums


def _token_logps(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return -F.cross_entropy(logits, targets, reduction="none")


def dpo_losses(
    policy: torch.Tensor, reference: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's DPO loss and its implicit rewards `beta * (log pi - log ref)`, `[n, 2]`
    (column 0 the preferred reply, 1 the other), from `[n, 2]` summed log-probabilities."""
    rewards = beta * (policy - reference.to(policy.dtype))
    losses = -F.logsigmoid(rewards[:, 0] - rewards[:, 1])
    return losses, rewards.detach()


class PreferenceObjective(RowObjective):
    """The DPO side of a recipe's run: its reference, each row's loss, and what it reports."""

    def __init__(
        self,
        hp: Hyperparameters,
        backbone: nn.Module,
        lm_head: nn.Module,
        device: Any,
        autocast: Callable[[], Any],
    ) -> None:
        super().__init__(backbone, lm_head, device, autocast)
        self.beta = hp.dpo_beta
        self.reference: dict[str, torch.Tensor] = {}
        self._rewards: list[torch.Tensor] = []

    def pair_logps(self, pairs: Sequence[PreferencePair]) -> torch.Tensor:
        """`[len(pairs), 2]` summed log-probabilities of each pair's replies under the model."""
        with self.autocast():
            sums = sequence_logps(self.backbone, self.lm_head, examples_of(pairs), self.device)
        return sums.view(len(pairs), 2)

    @torch.no_grad()
    def compute_reference(self, model: nn.Module, sets: Mapping[str, PreferenceDataset]) -> None:
        """The model's log-probabilities of every pair of `sets`, as the job starts."""
        was_training = model.training
        model.eval()
        for name, dataset in sets.items():
            # Indexed by each pair's place among its file's pairs (`PreferencePair.index`):
            # a held-out split keeps its pairs' indexes.
            reference = torch.zeros(1 + max(p.index for p in dataset.examples), 2)
            for row in rows_of_tokens(dataset.examples, EVAL_ROW_TOKENS):
                reference[[p.index for p in row]] = self.pair_logps(row).cpu()
            self.reference[name] = reference
        model.train(was_training)

    def denominator(self, batch: Sequence[PreferencePair]) -> int:
        return len(batch)  # a step's loss is the mean over its pairs

    def loss_sum(self, row: Sequence[PreferencePair]) -> torch.Tensor:
        """The summed DPO loss of a row of training pairs (the step divides by its pairs)."""
        policy = self.pair_logps(row)
        reference = self._reference_of("train", row)
        losses, rewards = dpo_losses(policy, reference, self.beta)
        self._rewards.append(rewards.cpu())
        return losses.sum()

    def step_metrics(self) -> dict[str, float]:
        """The step's rewards: their means, the margin, and how often the preferred reply won;
        over every rank's pairs of a data-parallel step."""
        rewards = torch.cat(self._rewards) if self._rewards else torch.zeros(0, 2)
        self._rewards = []
        margin = rewards[:, 0] - rewards[:, 1]
        sums = torch.stack(
            [
                rewards[:, 0].sum(),
                rewards[:, 1].sum(),
                margin.sum(),
                (margin > 0).float().sum(),
                torch.tensor(float(len(rewards))),
            ]
        ).double()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            sums = sums.to(self.device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        chosen, rejected, margins, wins, count = sums.tolist()
        if not count:
            return {}
        return {
            "rewards_chosen": chosen / count,
            "rewards_rejected": rejected / count,
            "rewards_margin": margins / count,
            "rewards_accuracy": wins / count,
        }

    @torch.no_grad()
    def evaluate(self, dataset: PreferenceDataset) -> tuple[float, dict[str, float]]:
        """The mean DPO loss over the evaluation pairs, and their rewards."""
        losses, rewards = [], []
        for row in rows_of_tokens(dataset.examples, EVAL_ROW_TOKENS):
            loss, reward = dpo_losses(
                self.pair_logps(row), self._reference_of("eval", row), self.beta
            )
            losses.append(loss.cpu())
            rewards.append(reward.cpu())
        return torch.cat(losses).mean().item(), _reward_metrics(torch.cat(rewards), "eval_")

    def state(self) -> dict[str, Any]:
        return {"dpo_reference": dict(self.reference)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        saved = state.get("dpo_reference")
        if saved is None:
            raise TrainingError("the checkpoint holds no DPO reference: it is not a DPO job's")
        self.reference = dict(saved)

    def _reference_of(self, name: str, pairs: Sequence[PreferencePair]) -> torch.Tensor:
        indexes = torch.tensor([p.index for p in pairs])
        return self.reference[name][indexes].to(self.device)


def _reward_metrics(rewards: torch.Tensor, prefix: str) -> dict[str, float]:
    if not rewards.numel():
        return {}
    margin = rewards[:, 0] - rewards[:, 1]
    return {
        f"{prefix}rewards_chosen": rewards[:, 0].mean().item(),
        f"{prefix}rewards_rejected": rewards[:, 1].mean().item(),
        f"{prefix}rewards_margin": margin.mean().item(),
        f"{prefix}rewards_accuracy": (margin > 0).float().mean().item(),
    }
