"""The device a trainer runs on: which one, whether it multiplies in bf16, how much memory a job
took.

bf16 is probed, not assumed: a CPU has it only with oneDNN's bf16 kernels (AVX512-BF16 or AMX),
and `auto` precision must not pick a format the hardware emulates at a fraction of fp32's speed.
"""

from __future__ import annotations

import resource
from typing import Any, Literal

import torch

from workers.training.interface import TrainingError

Precision = Literal["bf16", "fp32"]
RequestedPrecision = Literal["auto", "bf16", "fp32"]


def default_device() -> torch.device:
    """The device a worker trains on: its GPU when it has one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def describe_device(device: torch.device | None = None) -> str:
    """The device in a few words for the trainer registry: `cuda (NVIDIA H200)`, `cpu (bf16)`."""
    device = device or default_device()
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"[:64]
    return f"{device.type} ({'bf16' if bf16_supported(device) else 'fp32'})"


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (CUDA with bf16, or a CPU with oneDNN bf16 support)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    checker = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if checker is not None and not checker():
        return False
    try:
        probe = torch.ones(8, 8, dtype=torch.bfloat16)
        return bool(torch.isfinite(probe @ probe).all())
    except RuntimeError:
        return False


def resolve_precision(
    requested: RequestedPrecision, device: torch.device | None = None
) -> Precision:
    """`auto` becomes bf16 where the hardware has it, else fp32; explicit choices are checked."""
    device = device or default_device()
    if requested == "fp32":
        return "fp32"
    supported = bf16_supported(device)
    if requested == "bf16" and not supported:
        raise TrainingError(f"precision bf16 was requested but {device.type} has no bf16 support")
    return "bf16" if supported else "fp32"


def precision_reason(
    requested: RequestedPrecision, resident: Precision, device: torch.device
) -> str:
    """Why a job trains in the precision its base is resident in, in words for the job's log;
    a job that asks for the other precision is refused (the base would have to be reloaded)."""
    if requested != "auto" and requested != resident:
        raise TrainingError(
            f"the job asks for {requested} but the base is resident in {resident}; "
            f"load it with precision={requested!r}"
        )
    if requested != "auto":
        return "requested"
    return (
        f"auto: {device.type} bf16 support"
        if resident == "bf16"
        else f"auto: no bf16 on {device.type}"
    )


def precision_event(
    requested: RequestedPrecision, resident: Precision, device: torch.device
) -> tuple[str, dict[str, Any]]:
    """The job's log event on the precision it trains in (`precision_reason`)."""
    reason = precision_reason(requested, resident, device)
    return (
        f"precision {resident} ({reason}); frozen base in {resident}, "
        "LoRA weights and optimizer in fp32",
        {"precision": resident, "device": device.type},
    )


def torch_dtype(precision: Precision) -> torch.dtype:
    """The tensor dtype of a precision."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, resident set size on a CPU."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
