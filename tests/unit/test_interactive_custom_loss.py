"""`workers.interactive.custom_loss.CustomLoss`, the executor's interpreter of an uploaded loss:
on realistic losses the real `tinker` SDK traces, its loss, metrics and gradient with respect to
the logprobs equal those of the Python function itself on the same random tensors; and a graph
that fails, or that would take more memory or time than a loss needs, is stopped before it does,
with a message naming the node."""

from __future__ import annotations

import json
import operator
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tinker.lib.public_interfaces.custom_loss import encode_graph, trace_loss
from torch.testing import assert_close

from control_plane.loss_graphs import FUNCTIONS, METHODS, LossGraphError
from workers.interactive.custom_loss import _NO_LARGER, _SAME_SHAPE, MAX_ELEMENTS, CustomLoss
from workers.interactive.losses import InteractiveError

Result = tuple[torch.Tensor, dict[str, Any]]
T, K = 9, 4


def traced(fn: Callable[..., Any], ranks: dict[str, Any]) -> tuple[str, list[Any], Any]:
    handle = trace_loss(fn, ranks, "session")
    inputs = [loss_input.model_dump(mode="json") for loss_input in handle.inputs]
    # Through JSON, as the API stores it.
    return handle.name, inputs, json.loads(json.dumps(encode_graph(handle).model_dump(mode="json")))


def build(fn: Callable[..., Any], ranks: dict[str, Any]) -> CustomLoss:
    return CustomLoss.build(*traced(fn, ranks))


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def weighted_nll(logprobs: torch.Tensor, weights: torch.Tensor) -> Result:
    return -(logprobs * weights).sum(), {"custom/weight:sum": weights.sum()}


def ppo(logprobs: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor) -> Result:
    ratio = torch.exp(logprobs - old)
    clipped = torch.clamp(ratio, 0.8, 1.2)
    objective = torch.minimum(ratio * advantages, clipped * advantages)
    clip_fraction = ((ratio.detach() - 1).abs() > 0.2).float().mean()
    return -objective.sum(dim=-1) / logprobs.shape[0], {
        "custom/clip_fraction:mean": clip_fraction,
        "custom/ratio:mean": ratio.detach().mean(),
    }


def topk_distillation(logprobs: torch.Tensor, probs: torch.Tensor) -> Result:
    renormalised = F.log_softmax(logprobs, dim=-1)
    kept = torch.where(probs > 0, renormalised, torch.zeros_like(renormalised))
    return -(probs * kept).sum() / logprobs.shape[0], {"custom/tokens:sum": logprobs.shape[0]}


def masked_mean(logprobs: torch.Tensor, mask: torch.Tensor) -> Result:
    kept = torch.where(mask > 0, -logprobs, torch.zeros_like(logprobs))
    count = torch.clamp(mask.sum(), min=1.0)
    picked = logprobs[mask > 0]  # sized by the data: measured after it runs
    return kept.sum() / count - 0.5 * picked.sum(), {"custom/kept:sum": (mask > 0).sum()}


def smoothness(logprobs: torch.Tensor) -> Result:
    steps = logprobs[1:] - logprobs[:-1]
    return -logprobs.sum() + 0.1 * steps.pow(2).sum(), {"custom/step:mean": steps.abs().max()}


def gathered(logprobs: torch.Tensor, index: torch.Tensor) -> Result:
    picked = torch.gather(logprobs, 1, index.unsqueeze(1)).squeeze(1)
    return -picked.sum() / logprobs.size(0), {}


def dpo(logprobs: torch.Tensor, reference: torch.Tensor, beta: torch.Tensor) -> Result:
    margin = beta * (logprobs.sum() - reference.sum())
    one = torch.tensor(1.0, device=logprobs.device)
    loss = -F.logsigmoid(margin) * one + logprobs.new_tensor(0.0)
    return loss, {"custom/margin:mean": margin.detach().to(torch.float64)}


PROBS = randn(T, K, seed=3).softmax(-1)
PROBS[0, 1] = 0.0  # where() has both branches to take
LOSSES: list[tuple[Callable[..., Result], dict[str, Any], dict[str, torch.Tensor]]] = [
    (weighted_nll, {"logprobs": 1, "weights": 1}, {"weights": randn(T, seed=1).abs()}),
    (
        ppo,
        {"logprobs": 1, "old": 1, "advantages": 1},
        {"old": -randn(T, seed=2).abs(), "advantages": randn(T, seed=5)},
    ),
    (topk_distillation, {"logprobs": 2, "probs": 2}, {"probs": PROBS}),
    (masked_mean, {"logprobs": 1, "mask": 1}, {"mask": (randn(T, seed=4) > 0).float()}),
    (smoothness, {"logprobs": 1}, {}),
    (gathered, {"logprobs": 2, "index": 1}, {"index": torch.arange(T) % K}),
    (
        dpo,
        {"logprobs": 1, "reference": 1, "beta": 0},
        {"reference": randn(T, seed=6), "beta": torch.tensor(0.1)},
    ),
]


@pytest.mark.parametrize(
    ("fn", "ranks", "inputs"), LOSSES, ids=[fn.__name__ for fn, _, _ in LOSSES]
)
def test_the_interpreted_loss_equals_the_function_in_loss_metrics_and_gradient(
    fn: Callable[..., Result], ranks: dict[str, Any], inputs: dict[str, torch.Tensor]
) -> None:
    loss_fn = build(fn, ranks)
    assert loss_fn.input_names == tuple(ranks)[1:]
    shape = (T, K) if ranks["logprobs"] == 2 else (T,)
    start = -randn(*shape, seed=7).abs()
    ours, theirs = start.clone().requires_grad_(), start.clone().requires_grad_()

    loss, metrics = loss_fn(ours, inputs)
    want_loss, want_metrics = fn(theirs, *(inputs[name] for name in loss_fn.input_names))

    assert loss.shape == ()
    assert_close(loss, want_loss.reshape(()))
    assert set(metrics) == set(want_metrics)
    for key, value in metrics.items():
        assert value.shape == () and value.is_floating_point() and not value.requires_grad
        assert_close(value, torch.as_tensor(want_metrics[key]).to(value.dtype).reshape(()))
    loss.backward()
    want_loss.backward()
    assert ours.grad is not None and theirs.grad is not None
    assert ours.grad.abs().sum() > 0
    assert_close(ours.grad, theirs.grad)


def graph_of(*nodes: tuple[str, str, str, list[Any]], loss: str = "total") -> Any:
    """A hand-made graph over logprobs of rank 1: its (op, name, target, args) nodes, then
    `total`, the sum of the logprobs; it returns `loss`."""
    calls = [*nodes, ("call_method", "total", "sum", [{"ref": "logprobs"}])]
    returns = {"tuple": [{"ref": loss}, {"dict": {}}]}
    return {
        "format": 1,
        "nodes": [
            {"op": "placeholder", "name": "logprobs", "target": "logprobs"},
            *(
                {"op": op, "name": name, "target": target, "args": args}
                for op, name, target, args in calls
            ),
            {"op": "output", "name": "output", "target": "output", "args": [returns]},
        ],
    }


def test_every_listed_name_is_one_this_torch_has() -> None:
    for target in sorted(FUNCTIONS | METHODS):
        op = "call_method" if target in METHODS else "call_function"
        args: list[Any] = [{"ref": "logprobs"}] + (["shape"] if target == "getattr" else [])
        graph = graph_of((op, "node", target, args))
        assert CustomLoss.build("probe", [{"name": "logprobs", "rank": 1}], graph).steps


def run(
    graph: Any, logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor] | None = None
) -> Any:
    ranks = [{"name": "logprobs", "rank": logprobs.dim()}]
    ranks += [{"name": name, "rank": value.dim()} for name, value in (inputs or {}).items()]
    return CustomLoss.build("probe", ranks, graph)(logprobs, inputs or {})


def refused(fn: Callable[..., Any], ranks: dict[str, Any], *tensors: torch.Tensor) -> str:
    loss_fn = build(fn, ranks)
    with pytest.raises(InteractiveError) as error:
        loss_fn(tensors[0], dict(zip(loss_fn.input_names, tensors[1:], strict=True)))
    return str(error.value)


def mismatched(logprobs: torch.Tensor, weights: torch.Tensor) -> Result:
    return (logprobs * weights).sum(), {}


def test_an_op_that_fails_names_its_node_and_the_reason() -> None:
    message = refused(mismatched, {"logprobs": 1, "weights": 1}, torch.zeros(5), torch.zeros(4))
    assert message.startswith("custom loss 'mismatched' failed at node 'mul' (operator.mul): ")
    assert "size of tensor a (5) must match the size of tensor b (4)" in message


def outer(logprobs: torch.Tensor) -> Result:
    return (logprobs.unsqueeze(0) * logprobs.unsqueeze(1)).sum(), {}


def outer_matmul(logprobs: torch.Tensor) -> Result:
    return torch.matmul(logprobs.unsqueeze(1), logprobs.unsqueeze(0)).sum(), {}


def test_a_small_outer_product_runs_as_the_function_does() -> None:
    logprobs = randn(100, seed=8)
    assert_close(build(outer, {"logprobs": 1})(logprobs, {})[0], outer(logprobs)[0])


@pytest.mark.parametrize("fn", [outer, outer_matmul])
def test_an_outer_product_past_the_limits_is_refused_before_it_is_made(
    fn: Callable[..., Result],
) -> None:
    message = refused(fn, {"logprobs": 1}, torch.zeros(5_000))
    assert "its output would have 25,000,000 elements" in message
    assert f"a node may make at most {MAX_ELEMENTS:,}" in message
    # Under MAX_ELEMENTS, but 1,000,000 elements from 1,000: past 64 times the input.
    message = refused(fn, {"logprobs": 1}, torch.zeros(1_000))
    assert "would have 1,000,000 elements, more than 64 times the largest tensor" in message


PEAK = """
import json, resource, sys, torch
from workers.interactive.custom_loss import CustomLoss
from workers.interactive.losses import InteractiveError
loss = CustomLoss.build(*json.load(sys.stdin))
loss(torch.zeros(3), {})
logprobs = torch.zeros(1 << 14)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    loss(logprobs, {})
except InteractiveError as error:
    print(error)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_the_refused_outer_product_was_never_allocated() -> None:
    # Made, its 2**28 float32 elements would raise the process's peak memory by 1 GiB.
    result = subprocess.run(
        [sys.executable, "-c", PEAK],
        input=json.dumps(traced(outer, {"logprobs": 1})),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    message, grown_kib = result.stdout.strip().rsplit("\n", 1)
    assert "its output would have 268,435,456 elements" in message
    assert int(grown_kib) < 128 * 1024, result.stdout


def gram(logprobs: torch.Tensor) -> Result:
    return (logprobs @ logprobs.T).sum(), {}


def test_a_matrix_product_of_too_much_work_is_refused() -> None:
    # A (2048, 2048) product: 4M outputs, within the size limits, each a sum of 2,048 products.
    message = refused(gram, {"logprobs": 2}, torch.zeros(2048, 2048))
    assert "refused node 'matmul' (operator.matmul)" in message
    assert "would touch more than 4,294,967,296 elements together" in message


def many_copies(logprobs: torch.Tensor) -> Result:
    total = logprobs.sum()
    for _ in range(40):  # each node 64 times the logprobs, within the limit of one node
        total = total + torch.cat([logprobs] * 64).sum()
    return total, {}


def test_what_a_datums_nodes_make_together_scales_with_its_tensors() -> None:
    # 40 nodes of 262,144 elements each: 10.5M together, far below the 2**28 of any loss, but
    # past 1,024 times this datum's 4,096 logprobs plus 2**20 (what a micro-batch of many
    # datums would otherwise keep, each as much, until its backward).
    message = refused(many_copies, {"logprobs": 1}, torch.zeros(4096))
    assert "would make more than 5,242,880 elements together" in message
    assert "refused node 'cat_19'" in message
    # The same loss on a datum whose tensors are larger in proportion runs.
    loss, _ = build(many_copies, {"logprobs": 1})(torch.ones(64), {})
    assert float(loss) == 64 + 40 * 64 * 64


def huge_power(logprobs: torch.Tensor) -> Result:
    return logprobs.sum() * (logprobs.shape[0] ** 1_000_000_000), {}


def power_past_2_53(logprobs: torch.Tensor) -> Result:
    return logprobs.sum() * (logprobs.shape[0] ** 60), {}


def test_integer_powers_stay_small() -> None:
    start = time.perf_counter()
    message = refused(huge_power, {"logprobs": 1}, torch.zeros(3))
    assert time.perf_counter() - start < 10  # computing 3 ** 1e9 would take far longer
    assert "refused node 'pow_1' (operator.pow): 3 ** 1000000000" in message
    message = refused(power_past_2_53, {"logprobs": 1}, torch.zeros(3))
    assert "computed an integer past 2**53" in message
    assert_close(build(power_past_2_53, {"logprobs": 1})(torch.ones(1), {})[0], torch.tensor(1.0))


def repeated_shape(logprobs: torch.Tensor) -> Result:
    return logprobs.view(logprobs.shape * 1_000_000).sum(), {}


def test_a_sequence_is_not_repeated_or_joined() -> None:
    message = refused(repeated_shape, {"logprobs": 1}, torch.zeros(3))
    assert "refused node 'mul' (operator.mul): it computes on Size and int" in message
    text = graph_of(("call_function", "text", "operator.mul", ["x" * 64, 10**15]))
    with pytest.raises(InteractiveError, match="it computes on int and str"):
        run(text, torch.zeros(3))
    formatted = graph_of(("call_function", "text", "operator.mod", ["%0999999999d", 1]))
    with pytest.raises(InteractiveError, match=r"refused node 'text' \(operator.mod\)"):
        run(formatted, torch.zeros(3))


def elementwise(logprobs: torch.Tensor) -> Result:
    return logprobs * 2, {}


def shaped_metric(logprobs: torch.Tensor) -> Result:
    return logprobs.sum(), {"custom/all:sum": logprobs.detach()}


def test_a_loss_or_metric_of_more_than_one_element_is_refused_naming_its_shape() -> None:
    message = refused(elementwise, {"logprobs": 1}, torch.zeros(5))
    assert "custom loss 'elementwise' returned a loss of shape [5]; it must be a scalar" in message
    message = refused(shaped_metric, {"logprobs": 1}, torch.zeros(5))
    assert "returned metric 'custom/all:sum' of shape [5]" in message


def test_a_name_off_the_lists_is_refused_when_built() -> None:
    graph = graph_of(("call_function", "evil", "builtins.eval", ["1"]))
    with pytest.raises(LossGraphError, match=r"node 'evil' \(builtins.eval\) calls builtins.eval"):
        CustomLoss.build("probe", [{"name": "logprobs", "rank": 1}], graph)


def test_to_and_factories_stay_on_the_logprobs_device_and_small() -> None:
    to_device = graph_of(("call_method", "moved", "to", [{"ref": "logprobs"}, "cpu"]))
    with pytest.raises(InteractiveError, match="to may only convert to a dtype"):
        run(to_device, torch.zeros(3))
    made = graph_of(("call_function", "made", "torch.tensor", [[0.5] * 64]), loss="made")
    with pytest.raises(InteractiveError, match="returned a loss of shape \\[64\\]"):
        run(made, torch.zeros(3))  # made, on the logprobs' device, and returned
    nested = graph_of(("call_function", "made", "torch.tensor", [[[0.0] * 64] * 2]))
    with pytest.raises(InteractiveError, match="at most 64 numbers"):
        run(nested, torch.zeros(3))


def test_an_input_of_another_rank_than_declared_is_refused() -> None:
    loss_fn = build(weighted_nll, {"logprobs": 1, "weights": 1})
    with pytest.raises(
        InteractiveError, match=r"declared weights with rank 1; it has shape \[3, 1\]"
    ):
        loss_fn(torch.zeros(3), {"weights": torch.zeros(3, 1)})
    with pytest.raises(InteractiveError, match="reads 'weights', not given"):
        loss_fn(torch.zeros(3), {})


def _callables(name: str) -> list[Callable[..., Any]]:
    """Every function or tensor method the interpreter may reach by `name`'s last part."""
    found: list[Callable[..., Any]] = []
    for root in (torch, torch.nn.functional, torch.special, operator, torch.Tensor):
        fn = getattr(root, name, None) or getattr(root, name.removeprefix("special_"), None)
        if callable(fn):
            found.append(fn)
    return found


def _numels(result: Any) -> list[int]:
    if isinstance(result, torch.Tensor):
        return [result.numel()]
    if isinstance(result, (tuple, list)):
        return [n for item in result for n in _numels(item)]
    return []


@pytest.mark.parametrize(
    ("names", "tries", "bound"),
    [
        # Sized from the broadcast of their arguments, without running: none may make more.
        (
            sorted(_SAME_SHAPE),
            [
                lambda a, b: (a,),
                lambda a, b: (a, b),
                lambda a, b: (a > 0.5, a, b),
                lambda a, b: (a, -1),
                lambda a, b: (a, torch.float32),
                lambda a, b: (a, 0.5),
            ],
            12,  # (3, 1) broadcast with (1, 4)
        ),
        # Run first and measured after: none may make more than its one tensor has.
        (
            sorted(_NO_LARGER),
            [
                lambda a, b: (a * b,),
                lambda a, b: (a * b, 0),
                lambda a, b: (a * b, 1),
                lambda a, b: (a * b, 1, 0),
                lambda a, b: (a * b, 1, 1, 2),
                lambda a, b: (a * b, [12]),
            ],
            12,  # the (3, 4) tensor
        ),
    ],
    ids=["same_shape", "no_larger"],
)
def test_the_ops_measured_by_rule_make_no_more_than_the_rule_says(
    names: list[str], tries: list[Callable[..., tuple[Any, ...]]], bound: int
) -> None:
    # The size guard trusts two hand-written lists: an op listed wrongly (one that makes more
    # than its arguments' broadcast, or than its one tensor) would pass unchecked. Each listed
    # name is called every way that works on small tensors, and what it makes is measured.
    a, b = torch.rand(3, 1) + 0.1, torch.rand(1, 4) + 0.1
    exercised = set()
    for name in names:
        for fn in _callables(name):
            for args in tries:
                try:
                    result = fn(*args(a, b))
                except Exception:  # not this way: its other ways are tried
                    continue
                exercised.add(name)
                assert max(_numels(result), default=0) <= bound, (name, fn, args(a, b))
    # Most of each list is exercised (the rest take arguments of other kinds).
    assert len(exercised) >= 0.8 * len(names), sorted(set(names) - exercised)
