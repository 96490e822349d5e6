"""Padding-free training compute: packed rows, attention within each example, loss where trained.

The training recipe's kernels, kept apart from its loop:

- `pack` concatenates the examples of a micro-batch into one row (position ids restart per
  example), so no FLOP is spent on padding;
- `packed_sdpa_attention`, registered with transformers as `PACKED_ATTENTION`, runs causal
  attention example by example from the row's boundaries, so examples never see each other and no
  `tokens x tokens` mask is built. Each example goes through sdpa's fused kernel, or, for a short
  example in bf16 on a CPU, through `ExplicitCausalAttention` (batched matmuls and a softmax,
  nine operations forward and backward): there the fused kernel's backward costs eight times its
  forward (measured on 2 cores of a bf16 Xeon: a layer's 8 examples of ~105 tokens take 11.4 ms
  forward and backward, against sdpa's 26.4);
- `LinearCrossEntropy` applies the output head and the cross-entropy only at positions that carry
  a label, chunk by chunk, with the gradient computed in the same pass: the `tokens x vocabulary`
  logits of a whole batch (49k columns for SmolLM2) never exist, and the chunk's buffers
  (`LogitsWorkspace`) are reused rather than faulted in afresh.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence, Sized
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from workers.kernels.example import IGNORE_INDEX, TokenizedExample

Sizes = TypeVar("Sizes", bound=Sized)  # an example, or a pair of them: a length in tokens

PACKED_ATTENTION = "loraforge_packed_sdpa"
# Largest logits chunk, in elements (64 MiB of fp32): bounds memory whatever the vocabulary.
LOGITS_CHUNK_ELEMENTS = 1 << 24
# Longest example that `ExplicitCausalAttention` takes: it keeps the heads x tokens x tokens
# probabilities for the backward (4.5 MiB a layer for 9 heads at 512 tokens in bf16).
EXPLICIT_ATTENTION_MAX_TOKENS = 512

# sdpa's backends for per-example attention on a GPU. Not cuDNN's: it builds an execution plan
# for every new sequence length, and packed examples rarely repeat one (measured on an H200 with
# torch 2.11: 4-5 ms of host time per call, the whole of a step's time on a 1B model).
CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

AttentionKernel = Literal["auto", "sdpa", "explicit"]
_ATTENTION_KERNEL: ContextVar[AttentionKernel] = ContextVar(
    "loraforge_attention_kernel", default="auto"
)


@contextmanager
def attention_kernel(kind: AttentionKernel) -> Iterator[None]:
    """Pin the per-example attention kernel (`auto`: explicit for short bf16 examples on a CPU,
    sdpa otherwise); for measurements and tests."""
    token = _ATTENTION_KERNEL.set(kind)
    try:
        yield
    finally:
        _ATTENTION_KERNEL.reset(token)


def rows_of_tokens(examples: Sequence[Sizes], max_tokens: int) -> Iterator[list[Sizes]]:
    """Consecutive groups of examples (or anything with a length in tokens, such as a preference
    pair) holding at most `max_tokens` tokens (or one example)."""
    row: list[Sizes] = []
    tokens = 0
    for example in examples:
        if row and tokens + len(example) > max_tokens:
            yield row
            row, tokens = [], 0
        row.append(example)
        tokens += len(example)
    if row:
        yield row


@dataclass(frozen=True)
class PackedRow:
    """Examples concatenated into one row, with what attention and the loss need to keep them apart.

    `cu_seq_lens` are the cumulative example boundaries; `target_positions` the positions whose
    next token is trained on, and `targets` those next tokens.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seq_lens: torch.Tensor
    target_positions: torch.Tensor
    targets: torch.Tensor


def pack(examples: Sequence[TokenizedExample], device: torch.device) -> PackedRow:
    """Pack examples into one row: no padding anywhere."""
    input_ids: list[int] = []
    positions: list[int] = []
    boundaries = [0]
    target_positions: list[int] = []
    targets: list[int] = []
    for example in examples:
        offset = len(input_ids)
        input_ids += example.input_ids
        positions += range(len(example))
        boundaries.append(len(input_ids))
        for index, label in enumerate(example.labels[1:]):
            if label != IGNORE_INDEX:
                target_positions.append(offset + index)
                targets.append(label)

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return PackedRow(
        input_ids=tensor(input_ids)[None],
        position_ids=tensor(positions)[None],
        # on the CPU whatever the device: attention reads the boundaries in every layer, and
        # reading them from a GPU would wait for it each time
        cu_seq_lens=torch.tensor(boundaries, dtype=torch.int32),
        target_positions=tensor(target_positions),
        targets=tensor(targets),
    )


def packed_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed example (`cu_seq_lens_q`), never across them.

    Without packing information (generation, a caller's own forward) it is plain sdpa.
    """
    boundaries = kwargs.get("cu_seq_lens_q")
    if boundaries is None or query.shape[0] != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    # split (not slicing): its backward is one concatenation, where each slice's backward would
    # write a zero-filled row-sized gradient per example.
    lengths = [end - start for start, end in pairwise(boundaries.tolist())]
    dropout = dropout if module.training else 0.0
    outputs = [
        causal_attention(q, k, v, scaling, dropout)
        for q, k, v in zip(
            query.split(lengths, dim=2),
            key.split(lengths, dim=2),
            value.split(lengths, dim=2),
            strict=True,
        )
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
    dropout: float,
) -> torch.Tensor:
    """Causal attention of one example, `[1, heads, tokens, head_dim]`; grouped-query attention
    (fewer key/value heads) without repeating keys and values in memory."""
    kind = _ATTENTION_KERNEL.get()
    if kind == "auto":
        short = query.shape[2] <= EXPLICIT_ATTENTION_MAX_TOKENS
        cpu_bf16 = query.device.type == "cpu" and query.dtype == torch.bfloat16
        kind = "explicit" if short and cpu_bf16 else "sdpa"
    if kind == "explicit" and dropout == 0.0:
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        output: torch.Tensor = ExplicitCausalAttention.apply(query, key, value, scale)
        return output
    cuda = query.device.type == "cuda"
    with sdpa_kernel(CUDA_SDPA_BACKENDS) if cuda else nullcontext():
        return F.scaled_dot_product_attention(
            query,
            key,
            value,
            dropout_p=dropout,
            is_causal=True,
            scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
        )


@lru_cache(maxsize=32)
def _causal_bias(tokens: int, group: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`[group * tokens, tokens]`: 0 where a query (of any of `group` stacked heads) may attend,
    -inf above the diagonal. Cached: every layer of a step asks for the same lengths (a step has
    a few distinct ones; at most 32 kept, 1.5 MiB each at 512 tokens and 3 heads a group)."""
    bias = torch.full((tokens, tokens), -math.inf, dtype=dtype, device=device).triu_(1)
    return bias.repeat(group, 1)


class ExplicitCausalAttention(torch.autograd.Function):
    """Causal (grouped-query) attention of one example as batched matmuls, softmax in float32.

    Query heads that share a key/value head are stacked along the token axis, so each matmul is
    one `bmm` over the key/value heads and keys and values are never repeated. The scale and the
    causal mask go into the scores' matmul (`baddbmm`), the softmax reads them into float32 and
    the probabilities are kept in the input dtype for the backward, which is the textbook one:
    dV = Pᵀ dO, dS = P ⊙ (dP - rowsum(dP ⊙ P)) with dP = dO Vᵀ (softmax's own backward kernel,
    float32 inside), dQ = s·dS K, dK = s·dSᵀ Q. Nine operations a call, forward and backward:
    short examples are many calls, so their count matters as much as their arithmetic.
    """

    @staticmethod
    def forward(
        ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
    ) -> torch.Tensor:
        _, heads, tokens, dim = query.shape
        kv_heads = key.shape[1]
        group = heads // kv_heads
        q = query.reshape(kv_heads, group * tokens, dim)
        k = key.reshape(kv_heads, tokens, dim)
        v = value.reshape(kv_heads, tokens, dim)
        with torch.autocast(query.device.type, enabled=False):
            bias = _causal_bias(tokens, group, query.dtype, query.device)
            scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)
            accumulate = torch.promote_types(query.dtype, torch.float32)
            probabilities = torch.softmax(scores, dim=-1, dtype=accumulate).to(query.dtype)
            output = torch.bmm(probabilities, v)
        ctx.save_for_backward(q, k, v, probabilities)
        ctx.scale = scale
        return output.view(1, heads, tokens, dim)

    @staticmethod
    def backward(
        ctx: Any, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        q, k, v, probabilities = ctx.saved_tensors
        kv_heads, rows, dim = q.shape
        tokens = k.shape[1]
        grad_o = grad_output.reshape(kv_heads, rows, dim).to(q.dtype)
        with torch.autocast(q.device.type, enabled=False):
            grad_v = torch.bmm(probabilities.transpose(1, 2), grad_o)
            grad_p = torch.bmm(grad_o, v.transpose(1, 2))
            grad_s = torch.ops.aten._softmax_backward_data(grad_p, probabilities, -1, q.dtype)
            grad_q = torch.bmm(grad_s, k).mul_(ctx.scale)
            grad_k = torch.bmm(grad_s.transpose(1, 2), q).mul_(ctx.scale)
        return (
            grad_q.view(1, kv_heads * rows // tokens, tokens, dim),
            grad_k.view(1, kv_heads, tokens, dim),
            grad_v.view(1, kv_heads, tokens, dim),
            None,
        )


_PACKED_FORWARD: ContextVar[bool] = ContextVar("loraforge_packed_forward", default=False)


def _packed_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """No mask for packed rows (attention is split per example: a mask would cost T x T); sdpa's
    mask for any other forward."""
    return None if _PACKED_FORWARD.get() else sdpa_mask(*args, **kwargs)


AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, _packed_mask)


def packed_hidden_states(backbone: nn.Module, row: PackedRow) -> torch.Tensor:
    """The backbone's last hidden states for a packed row, `[tokens, hidden]`.

    The model must use `PACKED_ATTENTION` (`set_attn_implementation`), else examples would
    attend to each other.
    """
    token = _PACKED_FORWARD.set(True)
    try:
        output = backbone(
            input_ids=row.input_ids,
            position_ids=row.position_ids,
            use_cache=False,
            cu_seq_lens_q=row.cu_seq_lens,
        )
    finally:
        _PACKED_FORWARD.reset(token)
    return output.last_hidden_state[0]


class LogitsWorkspace:
    """The buffers `LinearCrossEntropy` computes each chunk's logits and softmax in, kept from one
    call to the next.

    A chunk's float32 softmax is 64 MiB: allocated afresh for every chunk, its pages are faulted
    in (and zeroed by the kernel) each time, which on a CPU costs as much as the arithmetic on it
    (measured on a 2-core bf16 CPU: a fresh 341 x 49152 float32 copy 27 ms, into a kept buffer
    3 ms). A training run holds one and drops it at the end.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def buffer(
        self, rows: int, columns: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """A `rows x columns` tensor of `dtype` on `device`, uninitialised, reused when it fits."""
        key = (dtype, device)
        kept = self._buffers.get(key)
        if kept is None or kept.numel() < rows * columns:
            kept = self._buffers[key] = torch.empty(rows * columns, dtype=dtype, device=device)
        return kept[: rows * columns].view(rows, columns)


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, chunk by chunk.

    The gradient with respect to `hidden` is computed in the forward pass (the loss is a terminal
    scalar), so logits never outlive their chunk and the head runs once per token. `weight` is
    the frozen output head: it gets no gradient. The chunks' logits live in `workspace` (a fresh
    one when none is given).
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        workspace: LogitsWorkspace | None = None,
    ) -> torch.Tensor:
        if weight.requires_grad:
            raise ValueError("LinearCrossEntropy gives the output head no gradient: freeze it")
        workspace = workspace or LogitsWorkspace()
        vocabulary = weight.shape[0]
        chunk = max(1, LOGITS_CHUNK_ELEMENTS // vocabulary)
        # softmax in at least float32 (bf16 logits would lose the loss)
        accumulate = torch.promote_types(hidden.dtype, torch.float32)
        total = torch.zeros((), dtype=accumulate, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        weight = weight.to(hidden.dtype)
        rows = min(chunk, hidden.shape[0])
        logits_buffer = workspace.buffer(rows, vocabulary, hidden.dtype, hidden.device)
        in_place = accumulate == hidden.dtype  # float32 logits: the softmax overwrites them
        softmax_buffer = (
            logits_buffer
            if in_place
            else workspace.buffer(rows, vocabulary, accumulate, hidden.device)
        )
        for start in range(0, hidden.shape[0], chunk):
            part = hidden[start : start + chunk]
            wanted = targets[start : start + chunk, None]
            logits = torch.mm(part, weight.T, out=logits_buffer[: part.shape[0]])
            peak = logits.amax(dim=-1, keepdim=True).to(accumulate)
            target_logit = logits.gather(1, wanted).to(accumulate)
            # log-softmax in place, one pass each: cast, shift, exp, sum (no logsumexp temporaries)
            probabilities = logits if in_place else softmax_buffer[: part.shape[0]].copy_(logits)
            probabilities.sub_(peak).exp_()
            norm = probabilities.sum(dim=-1, keepdim=True)
            total += (norm.log() + peak - target_logit).sum()
            if grad is not None:
                probabilities.div_(norm).scatter_add_(
                    1, wanted, probabilities.new_full(wanted.shape, -1.0)
                )
                if not in_place:
                    logits.copy_(probabilities)
                torch.mm(logits, weight, out=grad[start : start + chunk])
        ctx.save_for_backward(grad if grad is not None else hidden.new_empty(0))
        return total

    @staticmethod
    def backward(
        ctx: Any, grad_total: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None
