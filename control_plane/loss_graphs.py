"""The custom losses a session uploads, checked as data: the graph the `tinker` SDK traced with
torch.fx (`create_custom_loss`), which the executor runs per datum
(`workers.interactive.custom_loss`). The API checks it here when it is uploaded, without torch
and without data, and the executor checks it again before it runs it.

The graph comes from a tenant, so nothing in it runs but what the server lists here: its nodes
may call the tensor functions of `FUNCTIONS` (pure ones: no I/O, no random numbers, no global
state, no in-place writes, no device moves, and no factory whose size is a number in the graph,
such as `torch.zeros(n)`: `torch.zeros_like(x)` takes its size from a tensor), the tensor methods
of `METHODS` on a tensor, and read the `ATTRIBUTES` of a tensor with `getattr`. Nodes that read
captured state (`get_attr`) or call modules (`call_module`) are refused, as the SDK refuses them.
Its arguments are the SDK's encoding, bounded (`MAX_DEPTH`, `MAX_ITEMS`, `MAX_STRING`, `MAX_INT`)
so that a constant cannot be a large value: every value that takes memory or time is made by an
allowed operation, which the executor measures before it runs it. A refusal says which node and
what is allowed; the API shows it to the person as a 400.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

MAX_NODES = 1000
MAX_INPUTS = 16
MAX_METRICS = 64
MAX_GRAPH_BYTES = 256 * 1024
MAX_NAME = 200
MAX_DEPTH = 8  # levels of lists, tuples, slices in one argument
MAX_ITEMS = 64  # items of a list or tuple, a node's arguments included
MAX_STRING = 64
MAX_INT = 2**53  # integers beyond lose precision as JSON numbers, and bound Python arithmetic

_TORCH = """abs add all amax amin any argmax argmin argsort as_tensor bmm cat ceil clamp clamp_max
clamp_min clip cos cosine_similarity count_nonzero cumprod cumsum diff div dot eq erf erfc exp exp2
expm1 flatten flip floor floor_divide fmod full_like gather ge gt index_select isfinite isinf isnan
le lerp log log10 log1p log2 log_softmax logaddexp logcumsumexp logical_and logical_not logical_or
logical_xor logit logsumexp lt masked_fill matmul max maximum mean min minimum mm mul nan_to_num
nanmean nansum narrow ne neg ones_like outer permute pow prod reciprocal relu reshape round rsqrt
scalar_tensor select sgn sigmoid sign sin softmax sort sqrt square squeeze stack std std_mean sub
sum take_along_dim tanh tensor topk transpose true_divide trunc unsqueeze var var_mean where xlogy
zeros_like"""
_FUNCTIONAL = """binary_cross_entropy binary_cross_entropy_with_logits cross_entropy elu
huber_loss kl_div l1_loss leaky_relu log_softmax mse_loss nll_loss normalize relu sigmoid silu
smooth_l1_loss softmax softmin tanh"""
_OPERATOR = """abs add and_ eq floordiv ge getitem gt invert le lt matmul mod mul ne neg or_ pos pow
sub truediv xor"""
_MATH = (
    "ceil erf exp expm1 fabs floor isfinite isinf isnan log log10 log1p log2 pow sqrt tanh trunc"
)

FUNCTIONS: frozenset[str] = frozenset(
    [f"torch.{name}" for name in _TORCH.split()]
    + [f"torch.nn.functional.{name}" for name in _FUNCTIONAL.split()]
    + [f"operator.{name}" for name in _OPERATOR.split()]
    + [f"math.{name}" for name in _MATH.split()]
    # What the SDK names F.logsigmoid, F.softplus, F.gelu, torch.norm and torch.special's
    # functions: where they live in torch, not where a loss calls them from.
    + ["torch._C._nn.log_sigmoid", "torch._C._nn.softplus", "torch._C._nn.gelu"]
    + ["torch.functional.norm"]
    + [f"torch._C._special.special_{name}" for name in ("entr", "expit", "logit", "xlogy")]
    + ["getattr"]  # builtins.getattr, how fx records `x.shape`: ATTRIBUTES only
)
"""call_function targets, as the SDK names them."""

_METHODS = """abs add all amax amin any argmax argmin argsort bfloat16 bool ceil clamp clamp_max
    clamp_min clip clone contiguous count_nonzero cumprod cumsum detach diff dim div dot double eq
    erf exp exp2 expand_as expm1 flatten flip float floor floor_divide fmod gather ge gt half
    index_select int is_floating_point isfinite isinf isnan le lerp log log10 log1p log2
    log_softmax logcumsumexp logical_and logical_not logical_or logical_xor logit logsumexp long lt
    masked_fill matmul max maximum mean min minimum mm mul nan_to_num nanmean nansum narrow ne neg
    new_tensor norm numel outer permute pow prod reciprocal relu remainder reshape reshape_as round
    rsqrt select sgn sigmoid sign size softmax sort sqrt square squeeze std sub sum t
    take_along_dim tanh to topk transpose true_divide trunc type type_as unsqueeze var view
    view_as where xlogy"""
METHODS: frozenset[str] = frozenset(_METHODS.split())
"""call_method targets: tensor methods, called on a tensor. None writes in place (a name ending
in `_`), leaves torch (`item`, `tolist`, `numpy`), moves devices (`cuda`, `cpu`; `to` and
`type` take a dtype only), runs backward or hooks, or takes its size from numbers in the graph
(`expand`, `repeat`, `new_zeros`); `new_tensor` takes a few numbers, as `torch.tensor` does."""

ATTRIBUTES: frozenset[str] = frozenset(
    {"shape", "dtype", "ndim", "T", "mT", "device", "values", "indices"}
)
"""What `getattr` may read of a tensor, and `values` and `indices` of what max, min, sort and
topk return. `device` is the tensor's own (a loss writes `torch.tensor(0.0,
device=logprobs.device)`); a device written in the graph is refused."""

DTYPES: frozenset[str] = frozenset(
    {"float32", "float64", "float16", "bfloat16", "int64", "int32", "bool"}
)
LAYOUTS: frozenset[str] = frozenset({"strided"})
MEMORY_FORMATS: frozenset[str] = frozenset({"contiguous_format", "preserve_format"})

# The SDK's rules: a metric says how it combines across datums; inputs are loss_fn_inputs keys.
METRIC_KEY = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")
INPUT_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
NODE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")

# Keyword arguments with a value that would write in place, pin host memory or pick a device.
_KWARG_VALUES: dict[str, tuple[Any, ...]] = {"out": (None,), "inplace": (None, False)}
_KWARG_VALUES["pin_memory"] = (None, False)
_HINTS = {
    "backward": "return the loss: forward_backward runs the backward pass",
    "item": "keep every value, metrics included, as a tensor",
    "tolist": "keep every value as a tensor",
    "numpy": "keep every value as a tensor",
    "expand": "use expand_as, or let broadcasting do it",
}
_SIZED = ("zeros", "ones", "full", "empty", "rand", "randn", "randint", "arange", "linspace", "eye")
_INPLACE_OPERATORS = ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul")


class LossGraphError(ValueError):
    """A custom loss the server does not run; the message says which part and what is allowed."""


@dataclass(frozen=True)
class CheckedLoss:
    """A loss that passed `check_loss`, as the API stores it and the executor builds it."""

    name: str
    inputs: tuple[tuple[str, int], ...]  # (name, rank), logprobs first
    graph: dict[str, Any]  # the graph as given, through JSON


def check_loss(name: Any, inputs: Any, graph: Any) -> CheckedLoss:
    """The loss, checked: its name, its inputs (logprobs first, each with its rank 0, 1 or 2)
    and its graph ({"format": 1, "nodes": [...]}, the SDK's `CustomLossGraph`). LossGraphError
    for anything the executor would not run, naming the node."""
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
        raise LossGraphError(f"a custom loss's name must be a string of 1 to {MAX_NAME} characters")
    checked_inputs = _inputs(inputs)
    try:
        text = json.dumps(graph)
    except (TypeError, ValueError, RecursionError):
        raise LossGraphError("the graph must be JSON: the SDK's encode_graph") from None
    if len(text.encode()) > MAX_GRAPH_BYTES:
        raise LossGraphError(
            f"the graph is {len(text.encode())} bytes of JSON; a custom loss's graph may have at "
            f"most {MAX_GRAPH_BYTES}"
        )
    graph = json.loads(text)
    if (
        not isinstance(graph, dict)
        or set(graph) != {"format", "nodes"}
        or type(graph["format"]) is not int
        or graph["format"] != 1
    ):
        raise LossGraphError('the graph must be {"format": 1, "nodes": [...]}, as the SDK sends it')
    nodes = graph["nodes"]
    if not isinstance(nodes, list) or not 2 <= len(nodes) <= MAX_NODES:
        raise LossGraphError(
            f"the graph must have 2 to {MAX_NODES} nodes, got "
            f"{len(nodes) if isinstance(nodes, list) else type(nodes).__name__}"
        )
    seen: set[str] = set()
    for index, node in enumerate(nodes):
        node_name = _node_shape(node, index, seen)
        _check_node(node, node_name, index, checked_inputs, len(nodes), seen)
        seen.add(node_name)
    return CheckedLoss(name, checked_inputs, graph)


def _inputs(inputs: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(inputs, (list, tuple)) or not 1 <= len(inputs) <= MAX_INPUTS:
        raise LossGraphError(
            f'inputs must be a list of 1 to {MAX_INPUTS} {{"name", "rank"}}, logprobs first'
        )
    checked: list[tuple[str, int]] = []
    for i, item in enumerate(inputs):
        if not isinstance(item, dict) or set(item) != {"name", "rank"}:
            raise LossGraphError(f'inputs[{i}] must be {{"name": ..., "rank": 0, 1 or 2}}')
        name, rank = item["name"], item["rank"]
        if not isinstance(name, str) or not INPUT_NAME.fullmatch(name):
            raise LossGraphError(
                f"inputs[{i}] name {name!r} must be a lowercase name of letters, digits and "
                "underscores, at most 64 characters"
            )
        if not isinstance(rank, int) or isinstance(rank, bool) or rank not in (0, 1, 2):
            raise LossGraphError(f"inputs[{i}] ({name}) rank must be 0, 1 or 2, got {rank!r}")
        if (i == 0) != (name == "logprobs"):
            raise LossGraphError(
                "logprobs must be the first input and only the first: the loss takes the "
                "datum's logprobs, then the loss_fn_inputs it reads"
            )
        if i == 0 and rank == 0:
            raise LossGraphError("logprobs has rank 1 ([T]) or 2 ([T, K]), not 0")
        if any(name == other for other, _ in checked):
            raise LossGraphError(f"inputs name {name!r} twice")
        checked.append((name, rank))
    return tuple(checked)


def _node_shape(node: Any, index: int, seen: set[str]) -> str:
    """The node's name, once its keys and their types are as the SDK sends them."""
    if not isinstance(node, dict) or not {"op", "name", "target"} <= set(node):
        raise LossGraphError(f'nodes[{index}] must be {{"op", "name", "target", "args", "kwargs"}}')
    extra = set(node) - {"op", "name", "target", "args", "kwargs"}
    if extra:
        raise LossGraphError(f"nodes[{index}] has unknown keys {sorted(extra)}")
    name = node["name"]
    if not isinstance(name, str) or not NODE_NAME.fullmatch(name):
        raise LossGraphError(
            f"nodes[{index}] name {name!r} must be an identifier of at most 128 characters"
        )
    if name in seen:
        raise LossGraphError(f"nodes[{index}] is named {name!r}, as an earlier node is")
    if not isinstance(node["target"], str) or len(node["target"]) > 128:
        raise LossGraphError(f"node {name!r} target must be a string of at most 128 characters")
    args, kwargs = node.get("args", []), node.get("kwargs", {})
    if not isinstance(args, list) or len(args) > MAX_ITEMS:
        raise LossGraphError(f"node {name!r} args must be a list of at most {MAX_ITEMS}")
    if not isinstance(kwargs, dict) or len(kwargs) > MAX_ITEMS:
        raise LossGraphError(f"node {name!r} kwargs must be an object of at most {MAX_ITEMS}")
    return name


def _check_node(
    node: dict[str, Any],
    name: str,
    index: int,
    inputs: tuple[tuple[str, int], ...],
    count: int,
    seen: set[str],
) -> None:
    op, target = node["op"], node["target"]
    args, kwargs = node.get("args", []), node.get("kwargs", {})
    if op in ("get_attr", "call_module"):
        raise LossGraphError(
            f"node {name!r} is a {op} node ({target!r}): a custom loss may read only logprobs and "
            "its inputs, and call functions and tensor methods, not modules or captured values"
        )
    if (op == "placeholder") != (index < len(inputs)):
        raise LossGraphError(
            f"node {name!r} is a {op} node at position {index}: the graph must begin with one "
            f"placeholder per input ({', '.join(n for n, _ in inputs)}), in order, and only those"
        )
    if op == "placeholder":
        if target != inputs[index][0] or args or kwargs:
            raise LossGraphError(
                f"placeholder {name!r} must take input {inputs[index][0]!r} (inputs[{index}]), "
                f"with no arguments; it takes {target!r}"
            )
        return
    if (op == "output") != (index == count - 1):
        raise LossGraphError(f"node {name!r}: the graph must end with its one output node")
    where = f"node {name!r} ({target})"
    for key, value in kwargs.items():
        if not isinstance(key, str) or not NODE_NAME.fullmatch(key):
            raise LossGraphError(f"{where} has a keyword argument named {key!r}")
        if key in _KWARG_VALUES and value not in _KWARG_VALUES[key]:
            raise LossGraphError(
                f"{where} passes {key}={value!r}; a custom loss makes new tensors only "
                f"({key} may be {' or '.join(map(json.dumps, _KWARG_VALUES[key]))})"
            )
        if key == "device" and value is not None and not _is_ref(value):
            raise LossGraphError(
                f"{where} passes device={value!r}; a custom loss runs where its logprobs are "
                "(pass device=logprobs.device, or no device)"
            )
        _check_arg(value, where, seen, 1)
    if op == "output":
        _check_output(target, args, kwargs, where, seen)
        return
    for value in args:
        _check_arg(value, where, seen, 1)
    if op == "call_function":
        _check_function(target, args, kwargs, where)
    elif op == "call_method":
        _check_method(target, args, where)
    else:
        raise LossGraphError(
            f"node {name!r} has op {op!r}; a graph has placeholder, call_function, call_method "
            "and output nodes"
        )


def _check_function(target: str, args: list[Any], kwargs: dict[str, Any], where: str) -> None:
    if target not in FUNCTIONS:
        module, _, short = target.rpartition(".")
        hint = ""
        if module == "torch" and short.startswith(_SIZED):
            hint = " (its size is a number: use zeros_like, ones_like or full_like of a tensor)"
        elif module == "operator" and short in _INPLACE_OPERATORS:
            hint = " (it writes in place: write x = x + y rather than x += y)"
        same = sorted(f.rpartition(".")[2] for f in FUNCTIONS if f.rpartition(".")[0] == module)
        allowed = (
            f"the functions of {module} it may call are: {', '.join(same)}"
            if same
            else "it may call pure tensor functions of torch, torch.nn.functional, operator "
            "and math"
        )
        raise LossGraphError(
            f"{where} calls {target}, which a custom loss may not call{hint}; {allowed}"
        )
    attribute = args[1] if len(args) > 1 else None
    if target == "getattr" and not (
        len(args) == 2
        and not kwargs
        and _is_ref(args[0])
        and isinstance(attribute, str)
        and attribute in ATTRIBUTES
    ):
        raise LossGraphError(
            f"{where} reads attribute {attribute!r:.80} of a value; a custom loss may read only "
            f"{', '.join(sorted(ATTRIBUTES))}"
        )


def _check_method(target: str, args: list[Any], where: str) -> None:
    if target not in METHODS:
        why = _HINTS.get(target, "")
        if target.endswith("_"):
            why = "it writes in place: use the method without the trailing _"
        elif target.startswith("new_"):
            why = "its size is a number: use torch.zeros_like, ones_like or full_like"
        raise LossGraphError(
            f"{where} calls the tensor method {target}, which a custom loss may not call"
            f"{f' ({why})' if why else ''}; the methods it may call are: "
            f"{', '.join(sorted(METHODS))}"
        )
    if not args or not _is_ref(args[0]):
        raise LossGraphError(f"{where} calls {target} on no tensor: its first argument must be one")


def _check_output(
    target: str, args: list[Any], kwargs: dict[str, Any], where: str, seen: set[str]
) -> None:
    returned = args[0] if len(args) == 1 and not kwargs and target == "output" else None
    pair = returned.get("tuple") if isinstance(returned, dict) else returned
    if not (isinstance(pair, list) and len(pair) == 2 and _is_ref(pair[0])):
        raise LossGraphError(f"{where}: the loss must return (loss, metrics), loss a tensor")
    _check_arg(pair[0], where, seen, 1)
    metrics = pair[1].get("dict") if isinstance(pair[1], dict) else None
    if not isinstance(metrics, dict) or len(metrics) > MAX_METRICS:
        raise LossGraphError(f"{where}: the metrics must be a dict of at most {MAX_METRICS}")
    for key, value in metrics.items():
        if not METRIC_KEY.fullmatch(key):
            raise LossGraphError(
                f"{where}: metric {key!r} must be named custom/<name>:sum or custom/<name>:mean, "
                "the name of lowercase letters, digits and _ . / -, at most 64 characters"
            )
        if not _is_ref(value):
            raise LossGraphError(f"{where}: metric {key!r} must be a tensor the loss computes")
        _check_arg(value, where, seen, 1)


def _is_ref(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"ref"}


def _check_arg(value: Any, where: str, seen: set[str], depth: int) -> None:
    """An encoded argument: JSON scalars, strings and lists as themselves, else a one-key
    object (the SDK's `_encode_arg`). Dicts are the output's metrics only (`_check_output`)."""
    if depth > MAX_DEPTH:
        raise LossGraphError(f"{where} nests an argument deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if abs(value) > MAX_INT:
            raise LossGraphError(f"{where} has the integer {value}; constants may be up to 2**53")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise LossGraphError(f'{where} has the number {value}; write it {{"float": "{value}"}}')
        return
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise LossGraphError(f"{where} has a string of {len(value)} characters (max 64)")
        return
    if isinstance(value, list):
        if len(value) > MAX_ITEMS:
            raise LossGraphError(f"{where} has a list of {len(value)} items (max {MAX_ITEMS})")
        for item in value:
            _check_arg(item, where, seen, depth + 1)
        return
    if not isinstance(value, dict) or len(value) != 1:
        raise LossGraphError(f"{where} has an argument the SDK does not encode: {value!r:.80}")
    ((kind, inner),) = value.items()
    if kind == "ref":
        if not isinstance(inner, str) or inner not in seen:
            raise LossGraphError(
                f"{where} refers to {inner!r:.80}, which is not an earlier node: a node may use "
                "only the values of the nodes before it"
            )
    elif kind in ("tuple", "slice"):
        if not isinstance(inner, list) or len(inner) > MAX_ITEMS:
            raise LossGraphError(f"{where} has a {kind} that is not a list of at most 64 items")
        if kind == "slice" and (
            len(inner) != 3 or not all(x is None or _is_ref(x) or type(x) is int for x in inner)
        ):
            raise LossGraphError(f"{where} has a slice that is not [start, stop, step]")
        for item in inner:
            _check_arg(item, where, seen, depth + 1)
    elif kind == "ellipsis" and inner is True:
        return
    else:
        allowed = {
            "float": ("inf", "-inf", "nan"),
            "dtype": tuple(sorted(DTYPES)),
            "layout": tuple(LAYOUTS),
            "memory_format": tuple(sorted(MEMORY_FORMATS)),
        }.get(kind)
        if kind == "dict":
            raise LossGraphError(f"{where} has a dict argument; only the output's metrics are one")
        if allowed is None and kind != "device":
            raise LossGraphError(
                f"{where} has an argument the SDK does not encode: {value!r:.80}; arguments are "
                'JSON values, or {"ref"}, {"tuple"}, {"slice"}, {"ellipsis"}, {"float"}, '
                '{"dtype"}, {"layout"} or {"memory_format"}'
            )
        if allowed is None or inner not in allowed:
            raise LossGraphError(
                f"{where} has the argument {value!r:.80}: "
                + (
                    "a device, which a custom loss does not choose (it runs where its logprobs are)"
                    if allowed is None
                    else f"{kind} may be {', '.join(map(str, allowed))}"
                )
            )
