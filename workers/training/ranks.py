"""Data parallelism for the recipe: which rank this process is, and what ranks must agree on.

A job with `num_gpus > 1` runs the same recipe on every rank of a `torch.distributed` process
group (gloo on CPUs, nccl on GPUs; Ray Train's `TorchTrainer` sets it up). Each rank trains on
its share of every step's examples; the LoRA gradients are summed across ranks, so the update
is the one a single process makes; rank 0 alone decides when to stop and writes the results.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from control_plane.hyperparameters import Hyperparameters
from workers.training.interface import TrainingError


def process_group_rank(hp: Hyperparameters) -> tuple[int, int]:
    """(rank, world size) for the job: (0, 1) in one process, else from the process group
    `hp.num_gpus` asks for, which must be initialised and of that size."""
    if hp.num_gpus <= 1:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise TrainingError(
            f"the job asks for {hp.num_gpus} ranks (num_gpus): run it on every rank of an "
            "initialised torch.distributed group (as Ray Train does)"
        )
    if dist.get_world_size() != hp.num_gpus:
        raise TrainingError(
            f"the job asks for {hp.num_gpus} ranks (num_gpus) but the torch.distributed group "
            f"has {dist.get_world_size()}"
        )
    return dist.get_rank(), dist.get_world_size()


def rank_zero_decides(answer: bool, device: torch.device) -> bool:
    """Rank 0's `answer`, on every rank (the others' is ignored)."""
    import torch.distributed as dist

    flag = torch.tensor([answer], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def all_reduce_gradients(
    params: Sequence[torch.nn.Parameter], loss_sum: torch.Tensor
) -> torch.Tensor:
    """Sum the gradients of `params` (and the loss) over ranks, in one flat buffer; returns the
    summed loss."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss_sum.reshape(1)])
    dist.all_reduce(flat)
    offset = 0
    for param in params:
        param.grad = flat[offset : offset + param.numel()].view_as(param).clone()
        offset += param.numel()
    return flat[-1]
