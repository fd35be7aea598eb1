"""The op registry: per ATen op one ``OpInfo`` with its sharding ``Rule`` and every other fact
(FLOPs, what autograd keeps, view, mode sensitivity, display, bias split), written by
``register`` / ``declare`` in the family files and read by ``op_info`` / ``rule_for``; and the
vocabulary rules are written in (Strategy, OpCall, DimMap)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Hashable, Literal, Sequence

import torch
import torch.fx as fx

from autotp.core.placements import (OutPlacement, Partial, Placement, Replicate, Shard, shard_tensor)


from autotp.core.meta import TensorMeta


Label = Hashable | None


@dataclass(frozen=True)
class Strategy:
    """One way to run a node: a placement per tensor input slot and the output placement
    (a tuple for ops that return several tensors)."""

    inputs: tuple[Placement, ...]
    output: OutPlacement

    def outputs(self) -> tuple[Placement, ...]:
        return self.output if isinstance(self.output, tuple) else (self.output,)

    def grad_placement(self, slot: int) -> Placement:
        """Placement of the gradient this op sends back to input ``slot``.

        Shard -> Shard; Partial -> Replicate (each summand's grad is the whole grad);
        Replicate -> Partial when the op's output is split (each rank's grad covers only its
        part of the output), else Replicate.
        """
        q = self.inputs[slot]
        if isinstance(q, Shard):
            return q
        if isinstance(q, Partial):
            return Replicate()
        if any(not isinstance(o, Replicate) for o in self.outputs()):
            return Partial()
        return Replicate()

    def __str__(self) -> str:
        from autotp.core.placements import format_out
        return f"[{', '.join(map(str, self.inputs))}] -> {format_out(self.output)}"


@dataclass(frozen=True)
class OpCall:
    """What a rule sees: the node, its tensor input slots' metas and its output metas."""

    node: fx.Node
    inputs: tuple[TensorMeta, ...]  # one per tensor input slot
    outputs: tuple[TensorMeta, ...]  # one per output tensor
    world_size: int

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        if len(self.node.args) > i:
            return self.node.args[i]
        return self.node.kwargs.get(name, default)


@dataclass(frozen=True)
class DimMap:
    inputs: tuple[tuple[Label, ...], ...]
    outputs: tuple[tuple[Label, ...], ...]
    contract: frozenset = frozenset()
    partial_any: tuple[int, ...] = ()
    partial_all: bool = False
    multi: bool = False  # the op returns a tuple of tensors
    dynamic_ok: bool = False  # labels on dynamic (batch/sequence) dims may be split evenly


@dataclass(frozen=True)
class Rule:
    dims: Callable[[OpCall], DimMap | None]
    # strategies a DimMap can't express (split of a blocked dim)
    extra: Callable[[OpCall], list[Strategy]] | None = None
    # rewrite global sizes in args to this rank's (or swap in a per-rank op):
    # (node, strategy, world_size, rank) -> None
    localize: Callable[[fx.Node, Strategy, int, int], None] | None = None
    # block hints this op puts on its input slots: [(slot, dim, blocks)]
    hints: Callable[[OpCall], list[tuple[int, int, tuple[int, ...]]]] | None = None


Metas = tuple["TensorMeta | None", ...]


# global forward FLOPs from the op's tensor input metas and output metas
Flops = Callable[[Metas, Metas], float]


# whether the backward keeps the op's inputs, given how many tensor inputs the node has
Keeps = Callable[[int], bool]


# whether this node computes something different in train and eval mode
ModeCheck = Callable[[fx.Node], bool]


# a random op run on a split output: its local args/kwargs -> its local result, drawn so that
# it is this rank's slice of what one device draws (see ``SplitDraw``)
Draw = Callable[["SplitDraw", tuple, dict], Any]


# the bias-free op a node splits into: (target, args, bias node), or None to leave it
Unbias = Callable[[fx.Node], "tuple[Any, tuple[Any, ...], Any] | None"]


# the word for a Shard of the tensor a plan table names an op's split by
Words = Callable[[Shard], str]


def keeps_inputs(tensor_inputs: int) -> bool:
    """The default: the backward needs the op's inputs (a nonlinear op, a matmul)."""
    return True


def keeps_nothing(tensor_inputs: int) -> bool:
    """The backward needs only shapes: sums, casts and copies, concatenation, means."""
    return False


def keeps_tensor_operands(tensor_inputs: int) -> bool:
    """A product: d(xy)/dx = y needs the other operand only when it is a tensor, so
    ``x * y`` keeps both and ``x * 0.5`` nothing."""
    return tensor_inputs >= 2


def never_mode_sensitive(node: fx.Node) -> bool:
    """The default: the op computes the same in train and eval mode."""
    return False


def always_mode_sensitive(node: fx.Node) -> bool:
    """The op differs between train and eval mode (batch_norm's batch statistics)."""
    return True


def set_arg(node: fx.Node, index: int, name: str, value: Any) -> None:
    """Set the argument of ``node`` passed at position ``index`` or as keyword ``name``
    (added as a keyword when the call left it out)."""
    if index < len(node.args):
        node.update_arg(index, value)
    else:
        node.update_kwarg(name, value)


def random_op(target: Any) -> bool:
    """Whether an ATen op draws from the random generator: ATen tags every such op
    ``nondeterministic_seeded`` (dropout, rand_like, bernoulli, scaled_dot_product_attention)."""
    return torch.Tag.nondeterministic_seeded in getattr(target, "tags", ())


@dataclass(frozen=True)
class SplitDraw:
    """What a random op whose output is split needs to draw exactly what one device draws: it
    draws the full-size value from the generator every rank shares (every rank then advances
    the generator as one device does) and keeps this rank's slice. ``place``: the output's
    Shard; ``size``: the global size along ``place.dim`` (None for a dynamic dim, which is only
    ever split evenly: the local size times the world size)."""

    place: Shard
    size: int | None
    rank: int
    world_size: int

    def full_shape(self, local: Sequence[int]) -> list[int]:
        """The global shape of a tensor split like the output whose local shape is ``local``."""
        shape = list(local)
        d = self.place.dim % len(shape)
        shape[d] = self.size if self.size is not None else shape[d] * self.world_size
        return shape

    def full_like(self, x: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
        """An uninitialized full-size tensor laid out as one device would lay out ``x``'s full
        value (a random fill follows memory order, so a transposed input draws transposed)."""
        shape = self.full_shape(x.shape) if shape is None else list(shape)
        dense = x.dim() > 0 and x.is_contiguous() is False and _dense(x)
        if not dense:
            return torch.empty(shape, dtype=x.dtype, device=x.device)
        order = sorted(range(x.dim()), key=lambda i: -x.stride(i))
        return torch.empty_permuted(shape, order, dtype=x.dtype, device=x.device)

    def keep(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a full-size draw."""
        return shard_tensor(full, self.place, self.rank, self.world_size)


def _dense(x: torch.Tensor) -> bool:
    """Non-overlapping and dense: its strides are a permutation of a contiguous layout's."""
    dims = sorted((d for d in range(x.dim()) if x.shape[d] != 1), key=lambda i: x.stride(i))
    expect = 1
    for d in dims:
        if x.stride(d) != expect:
            return False
        expect *= x.shape[d]
    return True


def elementwise_flops(ins: Metas, outs: Metas) -> float:
    """One FLOP per output element: sum of numel over the outputs."""
    return float(sum(o.numel for o in outs if o is not None))


def matmul_flops(ins: Metas, outs: Metas) -> float:
    """2 K FLOPs per output element, K the first input's last (contracted) dim:
    Y[.., m, n] = sum_k X[.., m, k] W[k, n] is one multiply and one add per (.., m, n, k)."""
    x = ins[0] if ins else None
    k = x.shape[-1] if x is not None and x.shape else 1
    return 2.0 * outs[0].numel * k


def column_row(out_dim: int) -> Words:
    """Words for a matmul's weight split: "column" when the weight's output-features dim
    ``out_dim`` is split (Y = X [W_1 .. W_n]), "row" when its contracted dim is
    (Y = sum_r X_r W_r). linear's W[out, in] has out_dim 0; mm's W[in, out] has 1."""
    def words(p: Shard) -> str:
        return "column" if p.dim == out_dim else "row"
    return words


@dataclass(frozen=True)
class Display:
    """How plan tables (``autotp plan``, ``explain``, ``diff``) show an op: as a row of the
    "matmuls and attention" table. Its split is named ``words(p)`` for the Shard ``p`` of
    its weight (``by="weight"``: the first parameter input slot, with a
    "(fused, k blocks)" suffix for a blocked split and its local shape; a node without a
    parameter input is not shown) or of its output (``by="output"``: no weight shape); an
    unsplit one is "replicated"."""

    words: Words
    by: Literal["weight", "output"] = "weight"


@dataclass(frozen=True)
class OpInfo:
    """Every fact autotp has about one ATen overload.

    - ``rule``: its sharding rule; None runs it replicated (candidates.py warns).
    - ``flops``: global forward FLOPs from its metas; None means the op is taken as fused
      into its producer and costs 0 s (elementwise, views, norms: cost.compute_time).
    - ``call_flops``: the same from the whole call, for an op whose metas do not say it
      (einsum: the equation does); computed once per node (``NodeCands.flops``).
    - ``view``: its output aliases its input, so it keeps no activation memory.
    - ``keeps``: whether its backward keeps its inputs (cost.saves_inputs).
    - ``mode_sensitive``: the node differs in train and eval mode (dropout, batch_norm).
    - ``display``: how plan tables show it; None: not a row of the matmul table.
    - ``unbias``: capture replaces the node by a bias-free op plus an add (linear, addmm),
      so a row-split output is never given the bias on every rank.
    - ``draws``: a random op with a rule: how it runs when its output is split, so that it
      keeps its slice of the single device's draw (rewrite.py's edit 4). A random op
      (``random_op``) with a rule must have it; one without a rule runs replicated, which
      draws what one device draws on every rank.
    - ``to_eval``: a mode-dependent op's eval form: edits the node in place so that it
      computes what the op does in eval mode (dropout: ``train=False``), for an eval program
      derived from a train capture (capture/modes.py); None: eval mode is exported.
    """

    rule: Rule | None = None
    flops: Flops | None = None
    call_flops: Callable[[OpCall], float] | None = None
    view: bool = False
    keeps: Keeps = keeps_inputs
    mode_sensitive: ModeCheck = never_mode_sensitive
    display: Display | None = None
    unbias: Unbias | None = None
    draws: Draw | None = None
    to_eval: Callable[[fx.Node], None] | None = None

    def saves_inputs(self, tensor_inputs: int) -> bool:
        """Whether the op, on the gradient path, keeps its inputs for the backward: not a
        view, and its ``keeps`` fact says so."""
        return not self.view and self.keeps(tensor_inputs)


UNKNOWN = OpInfo()  # an op nobody registered: no rule, no compute, keeps its inputs


OPS: dict[Any, OpInfo] = {}


def declare(*ops: Any, **facts: Any) -> None:
    """Record facts (``OpInfo`` fields other than ``rule``) about ``ops``, keeping what is
    already registered for them."""
    for op in ops:
        OPS[op] = replace(OPS.get(op, UNKNOWN), **facts)


def register(*ops: Any, extra=None, localize=None, hints=None, **facts: Any) -> Callable:
    """Decorator: ``fn(call) -> DimMap | None`` is the sharding rule of ``ops``; ``facts``
    are their other ``OpInfo`` fields (flops, view, keeps, mode_sensitive, display, unbias, draws)."""
    def deco(fn: Callable[[OpCall], DimMap | None]) -> Callable:
        declare(*ops, rule=Rule(fn, extra, localize, hints), **facts)
        return fn
    return deco


def op_info(target: Any) -> OpInfo:
    """The registry entry of an fx node's target (``UNKNOWN`` when there is none)."""
    return OPS.get(target, UNKNOWN)


def op_info_named(name: str) -> OpInfo:
    """The registry entry of the op named ``name`` (``str(target)``, as in a saved plan)."""
    return next((info for op, info in OPS.items() if str(op) == name), UNKNOWN)


def rule_for(node: fx.Node) -> Rule | None:
    """The sharding rule of a call_function node, or None."""
    return op_info(node.target).rule if node.op == "call_function" else None

