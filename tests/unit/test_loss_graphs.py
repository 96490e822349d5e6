"""`control_plane.loss_graphs.check_loss`, the API's check of an uploaded custom loss: graphs the
real `tinker` SDK traces from realistic losses pass as they are, and a graph breaking any rule
(an operation off the lists, a reference forward, a constant too large, a device, a malformed
output) is refused with a message naming the node and what is wrong."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tinker.lib.public_interfaces.custom_loss import encode_graph, trace_loss

from control_plane.loss_graphs import (
    ATTRIBUTES,
    FUNCTIONS,
    MAX_NODES,
    METHODS,
    CheckedLoss,
    LossGraphError,
    check_loss,
)

Graph = dict[str, Any]


def traced(fn: Callable[..., Any], ranks: dict[str, Any]) -> tuple[str, list[Any], Graph]:
    """What the SDK uploads for `fn`: its name, its inputs and its graph, as JSON."""
    handle = trace_loss(fn, ranks, "session")
    inputs = [loss_input.model_dump(mode="json") for loss_input in handle.inputs]
    return handle.name, inputs, json.loads(json.dumps(encode_graph(handle).model_dump(mode="json")))


def ppo(
    logprobs: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ratio = torch.exp(logprobs - old)
    clipped = torch.clamp(ratio, 0.8, 1.2)
    objective = torch.minimum(ratio * advantages, clipped * advantages)
    loss = -objective.sum(dim=-1) / logprobs.shape[0]
    return loss, {"custom/ratio:mean": ratio.detach().mean()}


def distill(
    logprobs: torch.Tensor, probs: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    renormalised = F.log_softmax(logprobs[:, ...], dim=-1)
    kept = torch.where(probs > 0, renormalised, torch.zeros_like(renormalised))
    return -(probs * kept).sum() + float("inf") * 0, {"custom/mass:sum": probs.sum()}


def dpo(
    logprobs: torch.Tensor, reference: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    margin = beta * (logprobs.sum() - reference.sum())
    one = torch.tensor(1.0, device=logprobs.device)
    return -F.logsigmoid(margin) * one, {"custom/margin:mean": margin.detach().to(torch.float64)}


def gathered(
    logprobs: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    picked = logprobs.gather(1, index.unsqueeze(1)).squeeze(1)
    return -picked[1:].sum() / logprobs.size(0), {}


SDK_LOSSES = [
    (ppo, {"logprobs": 1, "old": 1, "advantages": 1}),
    (distill, {"logprobs": 2, "probs": 2}),
    (dpo, {"logprobs": 1, "reference": 1, "beta": 0}),
    (gathered, {"logprobs": 2, "index": 1}),
]


@pytest.mark.parametrize(("fn", "ranks"), SDK_LOSSES, ids=[fn.__name__ for fn, _ in SDK_LOSSES])
def test_a_graph_the_sdk_traces_passes_as_it_is(
    fn: Callable[..., Any], ranks: dict[str, Any]
) -> None:
    name, inputs, graph = traced(fn, ranks)
    checked = check_loss(name, inputs, graph)
    assert checked == CheckedLoss(fn.__name__, tuple(ranks.items()), graph)
    assert json.loads(json.dumps(checked.graph)) == graph


def test_the_traced_graphs_use_the_encodings_the_checker_reads() -> None:
    # The refusals below are only worth something if real graphs exercise what they break.
    _, _, graph = traced(distill, {"logprobs": 2, "probs": 2})
    text = json.dumps(graph)
    for form in ('"slice"', '"ellipsis"', '"float": "nan"', '"dict"', '"_stacklevel"'):
        assert form in text
    _, _, graph = traced(dpo, {"logprobs": 1, "reference": 1, "beta": 0})
    targets = {node["target"] for node in graph["nodes"]}
    assert {"torch._C._nn.log_sigmoid", "getattr", "torch.tensor", "to"} <= targets


def base() -> tuple[str, list[Any], Graph]:
    return traced(ppo, {"logprobs": 1, "old": 1, "advantages": 1})


def with_node(node: dict[str, Any], at: int = -1) -> Graph:
    """The PPO graph with `node` added at `at`, before its output unless said."""
    _, _, graph = base()
    graph["nodes"].insert(at, {"args": [], "kwargs": {}, **node})
    return graph


def call(target: str, *args: Any, op: str = "call_function", **kwargs: Any) -> Graph:
    return with_node(
        {"op": op, "name": "bad", "target": target, "args": list(args), "kwargs": kwargs}
    )


def first_call(target: str, *args: Any) -> Graph:
    """A call_function node right after the placeholders."""
    return with_node({"op": "call_function", "name": "bad", "target": target, "args": args}, 3)


def output(*args: Any) -> Graph:
    """The PPO graph returning `args` instead."""
    _, _, graph = base()
    graph["nodes"][-1]["args"] = list(args)
    return graph


def output_metrics(metrics: dict[str, Any]) -> Graph:
    return output({"tuple": [{"ref": "truediv"}, {"dict": metrics}]})


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


LP = {"ref": "logprobs"}

REFUSED_GRAPHS: list[tuple[str, Graph, str]] = [
    (
        "forward reference",
        first_call("torch.exp", {"ref": "mean"}),
        "'mean', which is not an earlier",
    ),
    ("reference to itself", call("torch.exp", {"ref": "bad"}), "'bad', which is not an earlier"),
    ("reference to the output", call("torch.exp", {"ref": "output"}), "not an earlier node"),
    ("eval", call("builtins.eval", "1"), "calls builtins.eval, which a custom loss may not"),
    ("os.system", call("os.system", "ls"), "calls os.system, which a custom loss may not call"),
    ("torch.load", call("torch.load", "x.pt"), "calls torch.load, which a custom loss may not"),
    ("torch.save", call("torch.save", LP, "x.pt"), "calls torch.save, which"),
    ("torch.zeros", call("torch.zeros", 10**6), "its size is a number: use zeros_like"),
    ("torch.manual_seed", call("torch.manual_seed", 0), "calls torch.manual_seed"),
    ("private torch", call("torch._C._nn.linear", LP, LP), "calls torch._C._nn.linear"),
    ("operator.setitem", call("operator.setitem", LP, 0, 1.0), "calls operator.setitem"),
    ("in-place operator", call("operator.iadd", LP, 1), "write x = x + y"),
    ("method backward", call("backward", LP, op="call_method"), "forward_backward runs the"),
    ("method item", call("item", LP, op="call_method"), "tensor method item, which"),
    ("method add_", call("add_", LP, 1, op="call_method"), "writes in place"),
    ("method new_zeros", call("new_zeros", LP, 9, op="call_method"), "its size is a number"),
    ("method cuda", call("cuda", LP, op="call_method"), "tensor method cuda, which"),
    ("method on a constant", call("exp", 1.0, op="call_method"), "its first argument must be"),
    ("get_attr", with_node({"op": "get_attr", "name": "bad", "target": "w"}), "get_attr node"),
    ("call_module", call("linear", LP, op="call_module"), "call_module node"),
    ("getattr __class__", call("getattr", LP, "__class__"), "attribute '__class__' of a value"),
    ("getattr __dict__", call("getattr", LP, "__dict__"), "may read only T, device, dtype"),
    ("getattr of a constant", call("getattr", 1, "shape"), "attribute 'shape' of a value"),
    ("huge int", call("torch.exp", LP, 2**60), f"the integer {2**60}; constants may be"),
    ("raw nan", call("torch.exp", LP, float("nan")), 'write it {"float": "nan"}'),
    ("device literal", call("torch.exp", LP, {"device": "cuda:1"}), "a device, which a custom"),
    ("device string kwarg", call("torch.ones_like", LP, device="cuda:1"), "device='cuda:1'"),
    ("out kwarg", call("torch.exp", LP, out={"ref": "old"}), "passes out="),
    ("inplace kwarg", call("torch.nn.functional.relu", LP, inplace=True), "inplace=True"),
    ("pin_memory", call("torch.tensor", 1.0, pin_memory=True), "pin_memory=True"),
    ("dtype off the list", call("to", LP, {"dtype": "complex64"}, op="call_method"), "complex64"),
    ("memory format", call("clone", LP, {"memory_format": "channels_last"}, op="call_method"), ""),
    ("unknown encoding", call("torch.exp", {"code": "import os"}), "the SDK does not encode"),
    ("deep nesting", call("torch.stack", nested(9)), "deeper than 8 levels"),
    ("long list", call("torch.stack", [LP] * 65), "a list of 65 items"),
    ("long string", call("torch.exp", LP, "x" * 65), "a string of 65 characters"),
    ("bad slice", call("operator.getitem", LP, {"slice": [1, 2]}), "[start, stop, step]"),
    ("dict argument", call("torch.exp", {"dict": {"a": 1}}), "only the output's metrics are one"),
    (
        "kwarg name",
        with_node(
            {"op": "call_function", "name": "bad", "target": "torch.exp", "kwargs": {"a b": 1}}
        ),
        "keyword argument named 'a b'",
    ),
]


@pytest.mark.parametrize(
    ("graph", "message"),
    [(graph, message) for _, graph, message in REFUSED_GRAPHS],
    ids=[case for case, _, _ in REFUSED_GRAPHS],
)
def test_a_node_breaking_a_rule_is_refused_naming_it(graph: Graph, message: str) -> None:
    name, inputs, _ = base()
    with pytest.raises(LossGraphError) as refused:
        check_loss(name, inputs, graph)
    assert message in str(refused.value)
    assert "'bad'" in str(refused.value) or "node 'output'" in str(refused.value)


def _edited(edit: Callable[[Graph], Any]) -> Graph:
    _, _, graph = base()
    edit(graph)
    return graph


def padded(count: int, target: str, *args: Any) -> Graph:
    """The PPO graph with `count` more nodes before its output, each calling `target`."""
    _, _, graph = base()
    for i in range(count):
        node = {"op": "call_function", "name": f"n{i}", "target": target, "args": list(args)}
        graph["nodes"].insert(-1, {**node, "kwargs": {}})
    return graph


REFUSED_STRUCTURES: list[tuple[str, Graph, str]] = [
    (
        "placeholder of another input",
        _edited(lambda g: g["nodes"][1].update(target="advantages")),
        "placeholder 'old' must take input 'old'",
    ),
    (
        "placeholder missing",
        _edited(lambda g: g["nodes"].pop(2)),
        "one placeholder per input (logprobs, old, advantages)",
    ),
    (
        "placeholder late",
        _edited(lambda g: g["nodes"].insert(5, {**g["nodes"][0], "name": "late"})),
        "node 'late' is a placeholder node at position 5",
    ),
    ("no output", _edited(lambda g: g["nodes"].pop()), "must end with its one output node"),
    (
        "two outputs",
        _edited(lambda g: g["nodes"].insert(-1, {**g["nodes"][-1], "name": "out2"})),
        "must end with its one output node",
    ),
    (
        "duplicate name",
        _edited(lambda g: g["nodes"][4].update(name="sub")),
        "is named 'sub', as an earlier node is",
    ),
    ("bad node name", _edited(lambda g: g["nodes"][4].update(name="a-b")), "an identifier"),
    ("unknown op", _edited(lambda g: g["nodes"][4].update(op="run")), "has op 'run'"),
    ("extra key", _edited(lambda g: g["nodes"][4].update(code="x")), "unknown keys ['code']"),
    ("format", _edited(lambda g: g.update(format=2)), '{"format": 1, "nodes": [...]}'),
    (
        "too many nodes",
        padded(MAX_NODES, "torch.exp", LP),
        f"2 to {MAX_NODES} nodes, got {MAX_NODES + 17}",
    ),
    (
        "too large",
        padded(200, "torch.stack", [LP] * 60),
        "bytes of JSON; a custom loss's graph may have at most 262144",
    ),
    ("loss a constant", output({"tuple": [1.0, {"dict": {}}]}), "must return (loss, metrics)"),
    ("loss alone", output({"ref": "truediv"}), "must return (loss, metrics)"),
    ("two returns", output({"ref": "truediv"}, {"dict": {}}), "must return (loss, metrics)"),
    ("metrics a list", output([{"ref": "truediv"}, []]), "metrics must be a dict"),
    ("list form", output([{"ref": "truediv"}, {"dict": {"custom/x:sum": 1}}]), "computes"),
    ("metric not custom/", output_metrics({"loss:sum": {"ref": "mean"}}), "metric 'loss:sum'"),
    ("metric suffix", output_metrics({"custom/x:avg": {"ref": "mean"}}), "custom/<name>:sum"),
    ("metric upper case", output_metrics({"custom/X:sum": {"ref": "mean"}}), "lowercase"),
    ("metric constant", output_metrics({"custom/x:sum": 1.0}), "a tensor the loss computes"),
    ("metric forward", output_metrics({"custom/x:sum": {"ref": "output"}}), "not an earlier"),
    (
        "too many metrics",
        output_metrics({f"custom/m{i}:sum": {"ref": "mean"} for i in range(65)}),
        "a dict of at most 64",
    ),
]


@pytest.mark.parametrize(
    ("graph", "message"),
    [(graph, message) for _, graph, message in REFUSED_STRUCTURES],
    ids=[case for case, _, _ in REFUSED_STRUCTURES],
)
def test_a_graph_of_the_wrong_shape_is_refused_saying_how(graph: Graph, message: str) -> None:
    name, inputs, _ = base()
    with pytest.raises(LossGraphError) as refused:
        check_loss(name, inputs, graph)
    assert message in str(refused.value)


PPO_INPUTS = [{"name": "logprobs", "rank": 1}, {"name": "old", "rank": 1}]
REFUSED_INPUTS: list[tuple[str, Any, Any, str]] = [
    ("empty name", "", PPO_INPUTS, "name must be a string of 1 to 200"),
    ("long name", "x" * 201, PPO_INPUTS, "name must be a string of 1 to 200"),
    ("no inputs", "ppo", [], "a list of 1 to 16"),
    ("17 inputs", "ppo", PPO_INPUTS + [{"name": f"x{i}", "rank": 1} for i in range(15)], "1 to 16"),
    ("logprobs second", "ppo", PPO_INPUTS[::-1], "logprobs must be the first input"),
    ("logprobs rank 0", "ppo", [{"name": "logprobs", "rank": 0}], "rank 1 ([T]) or 2"),
    ("rank 3", "ppo", [PPO_INPUTS[0], {"name": "old", "rank": 3}], "rank must be 0, 1 or 2"),
    ("rank true", "ppo", [PPO_INPUTS[0], {"name": "old", "rank": True}], "rank must be 0, 1"),
    ("upper case", "ppo", [PPO_INPUTS[0], {"name": "Old", "rank": 1}], "must be a lowercase"),
    ("twice", "ppo", [PPO_INPUTS[0], PPO_INPUTS[1], PPO_INPUTS[1]], "inputs name 'old' twice"),
    ("extra key", "ppo", [{"name": "logprobs", "rank": 1, "x": 1}], 'inputs[0] must be {"name"'),
]


@pytest.mark.parametrize(
    ("name", "inputs", "message"),
    [(name, inputs, message) for _, name, inputs, message in REFUSED_INPUTS],
    ids=[case for case, _, _, _ in REFUSED_INPUTS],
)
def test_a_bad_name_or_inputs_are_refused(name: Any, inputs: Any, message: str) -> None:
    _, _, graph = base()
    with pytest.raises(LossGraphError) as refused:
        check_loss(name, inputs, graph)
    assert message in str(refused.value)


def test_a_graph_that_is_not_json_is_refused() -> None:
    name, inputs, graph = base()
    graph["nodes"][4]["args"].append(object())
    with pytest.raises(LossGraphError, match="the graph must be JSON"):
        check_loss(name, inputs, graph)


def test_the_checked_graph_is_a_copy_the_caller_cannot_change_behind_it() -> None:
    name, inputs, graph = base()
    given = copy.deepcopy(graph)
    checked = check_loss(name, inputs, graph)
    graph["nodes"][4]["target"] = "torch.load"
    assert checked.graph == given


def test_the_lists_hold_nothing_that_writes_leaves_torch_or_sizes_a_tensor() -> None:
    never = {"backward", "item", "tolist", "numpy", "cuda", "cpu", "storage", "data_ptr"}
    never |= {"register_hook", "retain_grad", "pin_memory", "expand", "repeat", "tile"}
    never |= {"new_zeros", "new_ones", "new_full", "new_empty", "to_sparse", "apply_"}
    assert not METHODS & never
    # operator.and_ and or_ are & and |; the in-place operators (iand, iadd) are not listed.
    assert sorted(name for name in METHODS | FUNCTIONS if name.endswith("_")) == [
        "operator.and_",
        "operator.or_",
    ]
    in_place = {"iadd", "isub", "imul", "itruediv", "ipow", "iand", "ior", "setitem", "delitem"}
    assert not {f"operator.{name}" for name in in_place} & FUNCTIONS
    sized = ("zeros", "ones", "full", "empty", "rand", "randn", "arange", "linspace", "eye")
    assert not {f"torch.{name}" for name in sized} & FUNCTIONS
    modules = {name.rpartition(".")[0] for name in FUNCTIONS}
    assert modules == {
        "",  # getattr
        "torch",
        "torch.nn.functional",
        "torch.functional",
        "torch._C._nn",
        "torch._C._special",
        "operator",
        "math",
    }
    assert not {"__class__", "__dict__", "grad", "data"} & ATTRIBUTES


def test_the_checker_imports_no_torch() -> None:
    probe = "import sys, control_plane.loss_graphs; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "False"
