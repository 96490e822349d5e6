"""Per-example causal attention, forward + backward: sdpa's fused kernel against the explicit one.

Run: `python -m benchmarks.attention [--repeats N]`. One layer of SmolLM2-135M (9 query heads,
3 key/value heads, head size 64) over a batch of 8 examples with `benchmarks.train`'s log-normal
lengths (mean ~100 tokens), through `workers.kernels.packing.causal_attention` with each kernel pinned;
in bf16 where the CPU has it, and in fp32. One JSON line per precision: milliseconds per layer
for each kernel (sdpa is the baseline), and the forward's share.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from typing import Any

from benchmarks.train import machine

HEADS, KV_HEADS, HEAD_DIM, EXAMPLES = 9, 3, 64, 8


def time_kernel(kernel: str, dtype: Any, lengths: list[int], repeats: int) -> tuple[float, float]:
    """(forward ms, forward + backward ms) per layer, after two warm-up passes."""
    import torch

    from workers.kernels.packing import attention_kernel, causal_attention

    torch.manual_seed(0)
    total = sum(lengths)

    def projected(heads: int) -> Any:
        """`[1, heads, tokens, dim]` laid out as a projection's `[1, tokens, heads, dim]`, as the
        model's attention receives it (the layout changes the kernels' speed)."""
        return torch.randn(1, total, heads, HEAD_DIM, dtype=dtype).transpose(1, 2)

    query, key, value = (projected(h).requires_grad_() for h in (HEADS, KV_HEADS, KV_HEADS))
    grad = projected(HEADS)

    def forward() -> Any:
        parts = zip(
            query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True
        )
        return torch.cat([causal_attention(q, k, v, None, 0.0) for q, k, v in parts], 2)

    with attention_kernel(kernel):  # type: ignore[arg-type]
        for _ in range(2):
            forward().backward(grad)
        started = time.perf_counter()
        for _ in range(repeats):
            forward()
        forward_s = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(repeats):
            forward().backward(grad)
        both_s = time.perf_counter() - started
    return forward_s / repeats * 1e3, both_s / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    import torch

    from workers.training.device import bf16_supported

    rng = random.Random(42)
    sigma = 0.5
    lengths = [
        min(450, max(24, int(rng.lognormvariate(math.log(100) - sigma**2 / 2, sigma))))
        for _ in range(EXAMPLES)
    ]
    precisions = ["fp32"] + (["bf16"] if bf16_supported(torch.device("cpu")) else [])
    for precision in precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        explicit = time_kernel("explicit", dtype, lengths, args.repeats)
        sdpa = time_kernel("sdpa", dtype, lengths, args.repeats)
        print(
            json.dumps(
                {
                    "name": f"attention_layer_smollm2_{EXAMPLES}x{sum(lengths) // EXAMPLES}_{precision}",
                    "explicit_ms": round(explicit[1], 2),
                    "explicit_forward_ms": round(explicit[0], 2),
                    "baseline_sdpa_ms": round(sdpa[1], 2),
                    "baseline_sdpa_forward_ms": round(sdpa[0], 2),
                    "speedup": round(sdpa[1] / explicit[1], 2),
                    "lengths": lengths,
                    "machine": machine(),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
