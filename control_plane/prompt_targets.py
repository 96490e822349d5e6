"""A sample's `target_prompt_logprobs` (Tinker's SampleRequest): the token ids whose logprobs to
return at each prompt position, an int64 TensorData of shape [len(prompt) - 1, K], dense or
sparse CSR. Cell [i, j] is scored at prompt position i + 1 (position 0 has no context); -1, or
in a sparse tensor a cell it does not list, asks for nothing. K is at most MAX_TOPK_LOGPROBS,
the bound of the other per-position lists.

The layout is checked here, on the JSON, so that the API refuses a bad one when it is sent
(a 400 naming the field) and the engine, which alone knows the base's vocabulary, reads the
same rules with the token ids' upper bound added.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import pairwise
from typing import Any, TypeGuard

from control_plane.interactive import MAX_TOPK_LOGPROBS

NOTHING = -1  # a cell that asks for no logprob, and is answered 0.0


def layout_problem(
    tensor: Mapping[str, Any], rows: int, vocab_size: int | None = None
) -> str | None:
    """What keeps `tensor` (TensorData JSON) from being the targets of a prompt of `rows` + 1
    tokens, said after the field's name ("must ..."), or None when nothing does. With
    `vocab_size`, a token id must also be below it."""
    if tensor.get("dtype") != "int64":
        return f"must be an int64 tensor of token ids, got dtype {tensor.get('dtype')!r}"
    shape = tensor.get("shape")
    if not (
        _integers(shape)
        and len(shape) == 2
        and shape[0] == rows
        and 1 <= shape[1] <= MAX_TOPK_LOGPROBS
    ):
        return (
            f"must have the shape [len(prompt) - 1, K] = [{rows}, K] with K from 1 to "
            f"{MAX_TOPK_LOGPROBS}, got {shape!r}"
        )
    data = tensor.get("data")
    if not _integers(data):
        return "must hold integer token ids"
    end = math.inf if vocab_size is None else vocab_size
    bad = next((v for v in data if not NOTHING <= v < end), None)
    if bad is not None:
        ids = "token ids" if vocab_size is None else f"token ids below {vocab_size}"
        return f"holds {bad}: each cell is one of the base's {ids}, or -1 for none"
    crow, col = tensor.get("sparse_crow_indices"), tensor.get("sparse_col_indices")
    if crow is None and col is None:
        if len(data) != rows * shape[1]:
            return f"holds {len(data)} values; dense, a {shape} tensor holds {rows * shape[1]}"
        return None
    return _csr_problem(crow, col, len(data), rows, shape[1])


def _csr_problem(crow: Any, col: Any, listed: int, rows: int, width: int) -> str | None:
    """What is wrong with the CSR indices of `listed` values in a (rows, width) tensor: the
    row pointers rise from 0 to `listed`, and each row's columns rise within 0 to width - 1."""
    if not (_integers(crow) and _integers(col)):
        return "is sparse only with both sparse_crow_indices and sparse_col_indices, integers"
    if (
        len(crow) != rows + 1
        or crow[0] != 0
        or crow[-1] != listed
        or len(col) != listed
        or any(start > end for start, end in pairwise(crow))
    ):
        return (
            f"has sparse_crow_indices that are not {rows + 1} row pointers rising from 0 to the "
            f"{listed} values listed (one column index each)"
        )
    for start, end in pairwise(crow):
        columns = col[start:end]
        if any(not 0 <= c < width for c in columns) or any(a >= b for a, b in pairwise(columns)):
            return f"has sparse_col_indices that are not columns 0 to {width - 1} rising in a row"
    return None


def _integers(values: Any) -> TypeGuard[list[int]]:
    return isinstance(values, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    )
