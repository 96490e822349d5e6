"""A session's custom loss run on one datum: the graph the `tinker` SDK traced with torch.fx,
checked by `control_plane.loss_graphs` (again here: the stored graph is the tenant's data) and
run by a small interpreter, node by node, over the datum's logprobs and loss_fn_inputs.

Nothing in the graph is executed as code: no exec or eval, and no torch.fx GraphModule (whose
code is Python generated from the graph's strings). Each node's target is looked up once, by its
name, among the functions and tensor methods `loss_graphs` lists, and called with the node's
decoded arguments. Gradients flow as in the traced function: the caller runs backward on the loss.

A graph may still ask for much memory or time from allowed operations (`x.unsqueeze(0) *
x.unsqueeze(1)` of a long x, `2 ** 10**9`), so before a node that takes a tensor runs, the sizes
of its outputs are worked out from its arguments' shapes (broadcast, for an elementwise op) or by
running it on meta tensors (shapes without data), and it is refused where:
- one of its outputs would have more than MAX_ELEMENTS elements, or more than GROWTH times the
  largest of the datum's tensors (logprobs or an input) plus SLACK: a loss works on its inputs'
  elements, not on products of them;
- all the nodes' outputs together would pass TOTAL_GROWTH times the datum's largest tensor plus
  TOTAL_SLACK, or MAX_TOTAL_ELEMENTS (what autograd may keep), or the
  elements they read and write (matrix products: each output element times the inner size)
  MAX_WORK.
An op that makes no more than it is given (a reduction, a view, a sort, gather) or that torch
cannot size without the data (a boolean mask's indexing) runs first and is measured after: none
of the listed ones makes more elements than its largest argument has. Python numbers
stay small: `operator.pow` of integers with an exponent over 64 is refused before it is computed,
an integer result past 2**53 after, and arithmetic on strings, tuples, lists or torch.Size
(repetition, concatenation, `%` formatting) is refused. `to` and `type` convert to a dtype only,
`torch.tensor` and `new_tensor` take at most MAX_CONSTANTS numbers, and every tensor stays on the
logprobs' device (`torch.tensor` without a device is made there).

A failing op (mismatched shapes, say) and every refusal raise InteractiveError naming the node
and its target, which the call reports to the person. The loss must be a floating-point tensor of
one element; each metric a tensor of one element or a Python number, returned detached as a
0-dim tensor (float32 for integers and booleans, so that metrics sum as numbers).
"""

from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional

from control_plane.loss_graphs import DTYPES, FUNCTIONS, METHODS, LossGraphError, check_loss
from workers.interactive.losses import InteractiveError

MAX_ELEMENTS = 1 << 24  # one node's output: 64 MiB of float32
GROWTH = 64
SLACK = 1 << 16  # so that short sequences may compare every pair of positions
MAX_TOTAL_ELEMENTS = 1 << 28  # all nodes' outputs: 1 GiB of float32
# ... and at most this many times the largest tensor the datum gives, plus TOTAL_SLACK: a pass
# keeps every datum's graph of a micro-batch until its backward, so what one datum may keep
# scales with its own tensors rather than with the 1 GiB that a hundred datums would multiply.
TOTAL_GROWTH = 1024
TOTAL_SLACK = 1 << 20
MAX_WORK = 1 << 32  # elements read and written, a few seconds of CPU at most
MAX_CONSTANTS = 64  # numbers a torch.tensor takes
MAX_INT = 2**53

_ROOTS: dict[str, Any] = {"torch": torch, "operator": operator, "math": math}
_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPES}
_MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format}
_MEMORY_FORMATS["preserve_format"] = torch.preserve_format
_PRODUCTS = frozenset(
    {"torch.matmul", "torch.mm", "torch.bmm", "torch.dot", "operator.matmul", "matmul", "mm", "dot"}
)
# operator functions that compute: on sequences they repeat, join or format them.
_OPERATORS = "abs add and_ floordiv invert matmul mod mul neg or_ pos pow sub truediv xor"
_ARITHMETIC = frozenset(f"operator.{name}" for name in _OPERATORS.split(" "))
_FACTORIES = frozenset({"torch.tensor", "torch.as_tensor", "torch.scalar_tensor", "new_tensor"})
_PLAIN = frozenset({"getattr", "size", "dim", "numel", "is_floating_point"})  # make no tensor
# Ops whose one output has the broadcast shape of their tensor arguments (or less), by the last
# part of their name: measured without running them, as their meta kernels are slow Python.
_SHAPE_KEEPING = """abs add and_ bfloat16 binary_cross_entropy binary_cross_entropy_with_logits
bool ceil clamp clamp_max clamp_min clip clone contiguous cos cumprod cumsum detach div double elu
eq erf erfc exp exp2 expand_as expm1 flip float floor floor_divide floordiv fmod full_like ge gelu
gt half huber_loss int invert isfinite isinf isnan kl_div l1_loss le leaky_relu lerp log log10
log1p log2 log_sigmoid log_softmax logaddexp logcumsumexp logical_and logical_not logical_or
logical_xor logit long lt masked_fill maximum minimum mod mse_loss mul nan_to_num ne neg normalize
ones_like or_ pos pow reciprocal relu remainder round rsqrt sgn sigmoid sign silu sin
smooth_l1_loss softmax softmin softplus special_entr special_expit special_logit special_xlogy sqrt
square sub tanh to true_divide truediv trunc type where xlogy xor zeros_like"""
_SAME_SHAPE = frozenset(_SHAPE_KEEPING.split())
# Ops of one tensor whose outputs are each no larger than it (reductions, views, sorts), and ops
# whose outputs are no larger than one of theirs (gather's index, a loss's input): they cannot
# make much, so they are measured after they run.
_REDUCING = """all amax amin any argmax argmin argsort count_nonzero flatten logsumexp max mean min
nanmean nansum narrow norm permute prod reshape select sort squeeze std std_mean sum t topk
transpose unsqueeze var var_mean view"""
_NO_LARGER = frozenset(_REDUCING.split())
_INDEXED = frozenset({"gather", "cross_entropy", "nll_loss"})


class _Refused(Exception):
    """A guard's refusal at a node, before the node's name is added."""


@dataclass(frozen=True)
class _Step:
    """A call node: its target looked up, its arguments as the graph encodes them."""

    name: str
    target: str
    method: bool
    fn: Callable[..., Any]
    args: list[Any]
    kwargs: dict[str, Any]


@dataclass
class _Budget:
    """One run's limits and what its nodes have used of them."""

    device: torch.device
    largest: int
    elements: int = 0
    work: int = 0


@dataclass(frozen=True)
class CustomLoss:
    """A checked custom loss with its targets looked up; call it on a datum's tensors."""

    name: str
    inputs: tuple[tuple[str, int], ...]  # (name, rank), logprobs first
    placeholders: tuple[str, ...]  # the node name each input is bound to
    steps: tuple[_Step, ...]
    loss_ref: str
    metric_refs: tuple[tuple[str, str], ...]  # (metric key, node name)

    @property
    def input_names(self) -> tuple[str, ...]:
        """The loss_fn_inputs keys the loss reads, in the order it takes them."""
        return tuple(name for name, _ in self.inputs[1:])

    @classmethod
    def build(cls, name: Any, inputs: Any, graph: Any) -> CustomLoss:
        """The loss, checked (LossGraphError as `check_loss` says, or for a target this torch
        does not have)."""
        checked = check_loss(name, inputs, graph)
        nodes = checked.graph["nodes"]
        count = len(checked.inputs)
        steps = tuple(
            _Step(
                node["name"],
                node["target"],
                node["op"] == "call_method",
                _resolve(node["target"], node["op"] == "call_method"),
                node.get("args", []),
                node.get("kwargs", {}),
            )
            for node in nodes[count:-1]
        )
        returned = nodes[-1]["args"][0]
        loss, metrics = returned["tuple"] if isinstance(returned, dict) else returned
        return cls(
            checked.name,
            checked.inputs,
            tuple(node["name"] for node in nodes[:count]),
            steps,
            loss["ref"],
            tuple((key, ref["ref"]) for key, ref in metrics["dict"].items()),
        )

    def __call__(
        self, logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The datum's loss (0-dim, its graph back to `logprobs`) and metrics (0-dim, detached)."""
        env = self._bind(logprobs, inputs)
        budget = _Budget(logprobs.device, max(t.numel() for t in env.values()))
        for step in self.steps:
            try:
                env[step.name] = self._run(step, env, budget)
            except _Refused as refused:
                raise InteractiveError(
                    f"custom loss {self.name!r} refused node {step.name!r} ({step.target}): "
                    f"{refused}"
                ) from None
        return self._loss(env[self.loss_ref]), {
            key: self._metric(key, env[ref], budget.device) for key, ref in self.metric_refs
        }

    def _bind(self, logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        env: dict[str, Any] = {}
        for (name, rank), node in zip(self.inputs, self.placeholders, strict=True):
            value = logprobs if name == "logprobs" else inputs.get(name)
            if not isinstance(value, torch.Tensor):
                raise InteractiveError(f"custom loss {self.name!r} reads {name!r}, not given")
            if value.dim() != rank:
                raise InteractiveError(
                    f"custom loss {self.name!r} declared {name} with rank {rank}; it has shape "
                    f"{list(value.shape)}"
                )
            env[node] = value.to(logprobs.device)
        return env

    def _run(self, step: _Step, env: Mapping[str, Any], budget: _Budget) -> Any:
        args = [_decode(arg, env) for arg in step.args]
        kwargs = {key: _decode(value, env) for key, value in step.kwargs.items()}
        _check_arguments(step, args, kwargs, budget.device)
        given = list(_tensors((args, kwargs)))
        made = _made(step, args, kwargs, given) if given else []
        if made is not None:
            _charge(step, given, made, budget)
        try:
            result = step.fn(*args, **kwargs)
        except (MemoryError, torch.OutOfMemoryError):
            raise  # the executor's to handle, as any pass out of memory
        except Exception as error:  # whatever an op raises on the tenant's values is theirs
            raise InteractiveError(
                f"custom loss {self.name!r} failed at node {step.name!r} ({step.target}): "
                f"{str(error)[:500]}"
            ) from None
        if made is None:
            _charge(step, given, [tensor.numel() for tensor in _tensors(result)], budget)
        for tensor in _tensors(result):
            if tensor.device != budget.device:
                raise _Refused(f"it made a tensor on {tensor.device}, not {budget.device}")
        if isinstance(result, int) and abs(result) > MAX_INT:
            raise _Refused(f"it computed an integer past 2**53 ({result.bit_length()} bits)")
        return result

    def _loss(self, loss: Any) -> torch.Tensor:
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise InteractiveError(
                f"custom loss {self.name!r} returned a loss of shape {shape}; it must be a scalar "
                "tensor (one element): sum or average it"
            )
        if not loss.is_floating_point():
            raise InteractiveError(
                f"custom loss {self.name!r} returned a {loss.dtype} loss; it must be floating "
                "point, to have a gradient"
            )
        return loss.reshape(())

    def _metric(self, key: str, value: Any, device: torch.device) -> torch.Tensor:
        if isinstance(value, (bool, int, float)):
            return torch.tensor(float(value), device=device)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise InteractiveError(
                f"custom loss {self.name!r} returned metric {key!r} of shape {shape}; a metric "
                "must be a scalar tensor (one element)"
            )
        value = value.detach().reshape(())
        return value if value.is_floating_point() else value.float()


def _resolve(target: str, method: bool) -> Callable[..., Any]:
    """The callable an allowlisted target names, in this torch."""
    found: Any
    if method:
        found = getattr(torch.Tensor, target, None) if target in METHODS else None
    elif target == "getattr":
        found = builtins.getattr
    elif target in FUNCTIONS:
        root, *path = target.split(".")
        found = _ROOTS[root]
        for part in path:
            found = getattr(found, part, None)
    else:
        found = None
    if not callable(found):
        raise LossGraphError(
            f"{target} is allowed but this server's torch {torch.__version__} has no such "
            f"{'method' if method else 'function'}"
        )
    return found


def _decode(value: Any, env: Mapping[str, Any]) -> Any:
    """An argument as the SDK encodes it, with node references replaced by their values."""
    if isinstance(value, list):
        return [_decode(item, env) for item in value]
    if not isinstance(value, dict):
        return value
    ((kind, inner),) = value.items()
    if kind == "ref":
        return env[inner]
    if kind == "tuple":
        return tuple(_decode(item, env) for item in inner)
    if kind == "slice":
        return slice(*(_decode(item, env) for item in inner))
    if kind == "ellipsis":
        return Ellipsis
    if kind == "float":
        return float(inner)
    if kind == "dtype":
        return _DTYPES[inner]
    if kind == "layout":
        return torch.strided
    if kind == "memory_format":
        return _MEMORY_FORMATS[inner]
    raise LossGraphError(f"argument {value!r:.80} is not one the server decodes")


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    else:
        yield value


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    return (leaf for leaf in _leaves(value) if isinstance(leaf, torch.Tensor))


def _meta(value: Any) -> Any:
    """The arguments with each tensor as a meta tensor of its shape and dtype, no data."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("meta")
    if isinstance(value, torch.device):
        return torch.device("meta")
    if isinstance(value, list):
        return [_meta(item) for item in value]
    if isinstance(value, dict):
        return {key: _meta(item) for key, item in value.items()}
    if isinstance(value, tuple) and not isinstance(value, torch.Size):
        return tuple(_meta(item) for item in value)
    return value


def _check_arguments(
    step: _Step, args: list[Any], kwargs: dict[str, Any], device: torch.device
) -> None:
    """Refuse what the allowlist's names could still be asked to do beyond a loss's needs."""
    leaves = list(_leaves((args, kwargs)))
    if any(isinstance(leaf, torch.device) and leaf != device for leaf in leaves):
        raise _Refused(f"it names a device other than the logprobs' ({device})")
    if step.method and not isinstance(args[0], torch.Tensor):
        raise _Refused(f"it calls {step.target} on a {type(args[0]).__name__}, not a tensor")
    if step.target == "getattr" and not isinstance(
        args[0], tuple if args[1] in ("values", "indices") else torch.Tensor
    ):
        raise _Refused(f"it reads {args[1]} of a {type(args[0]).__name__}")
    if step.target in ("to", "type") and not (
        all(isinstance(arg, torch.dtype) for arg in args[1:])
        and set(kwargs) <= {"dtype", "copy", "non_blocking", "memory_format"}
        and isinstance(kwargs.get("dtype", torch.float32), torch.dtype)
    ):
        raise _Refused(f"{step.target} may only convert to a dtype, e.g. .to(torch.float32)")
    if step.target in ("norm", "torch.functional.norm") and any(
        isinstance(leaf, str) and leaf != "fro" for leaf in leaves
    ):
        raise _Refused("a norm's p is a number or 'fro'")
    if step.target in _FACTORIES:
        data = args[1:2] if step.method else args[:1]
        data = data or [kwargs.get("data", kwargs.get("s"))]
        numbers = list(_leaves(data))
        if len(numbers) > MAX_CONSTANTS or not all(
            isinstance(x, (bool, int, float)) for x in numbers
        ):
            raise _Refused(
                f"{step.target} takes a number or a list of at most {MAX_CONSTANTS} numbers"
            )
        if any(isinstance(leaf, str) for leaf in leaves):
            raise _Refused(f"{step.target} takes a dtype, not a string")
        if not step.method and kwargs.get("device") is None:
            kwargs["device"] = device
    if step.target in _ARITHMETIC:
        if any(isinstance(arg, (str, bytes, list, tuple, dict)) for arg in args):
            kinds = sorted({type(arg).__name__ for arg in args})
            raise _Refused(
                f"it computes on {' and '.join(kinds)}: a loss's arithmetic is on tensors and "
                "numbers (sequences would repeat or join)"
            )
        base, exponent = [*args, None, None][:2]
        if (
            step.target == "operator.pow"
            and isinstance(base, int)
            and isinstance(exponent, int)
            and abs(base) > 1
            and exponent > 64
        ):
            raise _Refused(f"{base} ** {exponent} is past 2**53: an exponent may be up to 64")


def _made(step: _Step, args: list[Any], kwargs: dict[str, Any], given: list[torch.Tensor]) -> Any:
    """The element counts of the node's tensor outputs, known before it runs, from its
    arguments' shapes (elementwise ops: their broadcast shape) or a run on meta tensors; None
    where they are measured after it runs: an op that makes no more than it is given, or one
    torch cannot size without the data."""
    short = step.target.rpartition(".")[2]
    if (
        short in _SAME_SHAPE
        and not step.target.startswith("math.")
        and not (short == "where" and len(args) + len(kwargs) < 3)  # where(c) is nonzero(c)
    ):
        try:
            return [math.prod(torch.broadcast_shapes(*(t.shape for t in given)))]
        except RuntimeError:
            pass  # the shapes do not broadcast: meta tensors say what happens
    if step.target in _PLAIN:
        return []
    if not step.target.startswith("math.") and (
        short in _INDEXED or (short in _NO_LARGER and len(given) == 1)
    ):
        return None
    try:
        with torch.no_grad():
            shapes = step.fn(*_meta(args), **_meta(kwargs))
    except Exception:  # no meta kernel (data-dependent: a boolean mask's indexing)
        return None
    return [tensor.numel() for tensor in _tensors(shapes)]


def _charge(step: _Step, given: list[torch.Tensor], made: list[int], budget: _Budget) -> None:
    """Count the node's outputs against the run's limits (see the module's docstring)."""
    limit = GROWTH * budget.largest + SLACK
    for elements in made:
        if elements > MAX_ELEMENTS:
            raise _Refused(
                f"its output would have {elements:,} elements; a node may make at most "
                f"{MAX_ELEMENTS:,}"
            )
        if elements > limit:
            raise _Refused(
                f"its output would have {elements:,} elements, more than {GROWTH} times the "
                f"largest tensor the loss is given ({budget.largest:,} elements) plus {SLACK:,}"
            )
    work = sum(tensor.numel() for tensor in given) + sum(made)
    if step.target in _PRODUCTS:
        inner = given[0].shape[-1] if given[0].dim() else 1
        work += sum(made) * inner
    budget.elements += sum(made)
    budget.work += work
    total = min(MAX_TOTAL_ELEMENTS, TOTAL_GROWTH * budget.largest + TOTAL_SLACK)
    if budget.elements > total:
        raise _Refused(
            f"the loss's nodes would make more than {total:,} elements together (at most "
            f"{TOTAL_GROWTH} times the largest tensor the loss is given plus {TOTAL_SLACK:,}, "
            f"and {MAX_TOTAL_ELEMENTS:,} in all)"
        )
    if budget.work > MAX_WORK:
        raise _Refused(f"the loss's nodes would touch more than {MAX_WORK:,} elements together")
