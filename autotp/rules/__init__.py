"""Sharding rules: for each ATen op, which placements of its inputs give which output.

Most rules are written as a ``DimMap``: a label per dimension of every tensor input and
output, in the style of einsum. One generic enumerator (``strategies_from_dims``) turns a
DimMap into candidate strategies:

- all inputs and outputs Replicate;
- for every label L: each tensor dim labelled L is Shard on it, tensors without L stay
  Replicate; an output without L is Partial when L is a contracted label (matmul's inner
  dim, a sum), else the label is not offered;
- the same with ``Shard(dim, blocks)`` when a consumer splits that dim into blocks
  (fused QKV): the blocks come from ``block hints`` found by candidates.py;
- Partial inputs only where the op is linear in them (``partial_any``: one input Partial,
  the others Replicate, e.g. ``x * w`` or a view; ``partial_all``: every input Partial,
  e.g. ``a + b``). A Partial plus a Replicate (a bias, a residual) is never offered.

A dim labelled None can't be split (a normalized dim, a softmax dim, a broadcast size-1
dim). A label on dynamic dims (batch, sequence: symbolic in the captured graph) is offered only
by rules that set ``dynamic_ok`` (elementwise ops, norms, reductions: Megatron's sequence-
parallel regions), only evenly (``Shard(d)``, when the world size divides the example size),
and only the largest such dim of the op (the sequence rather than the batch, at the example
sizes; the last on a tie), so that one region splits one dim. The rewritten module checks at
run time that the world size still divides it (rewrite/collectives.py). Views,
matmuls and attention never split a dynamic dim: their shape arguments and causal masks
would have to follow it.

Uneven splits: the dims carrying one label may differ in size (a view's hidden H*d and heads
H, a repeat's kv heads and q heads); they are split together in ``units`` (by default the gcd
of their sizes: H heads), each dim in ``grain = size / units`` elements. When the world size
divides ``units`` this is the even split (``Shard(d)``); otherwise each rank gets torch.chunk's
share of the units (``Shard(d, grain=g)``, see core/placements.py). Other unit counts come from
*grain hints* (``unit_hints``, found by candidates.py): a matmul whose output a view splits into
heads is offered the split on head boundaries as well as the element-wise one.

Everything autotp knows about an op lives in one registry entry (``OpInfo``), written in the
op's family file next to its sharding rule: the rule, its FLOPs, which of its inputs autograd
keeps, whether it is a view, whether it depends on train/eval mode, how plan tables show it,
and whether capture splits a bias off it. ``register(op, ..., **facts)`` writes a rule and its
facts, ``declare(op, **facts)`` facts alone (an op with no sharding rule). cost/model.py, capture/__init__.py
and tools/cli.py ask ``op_info(target)``. See docs/adding_an_op_rule.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable, Literal, Sequence

import torch.fx as fx

from autotp.core.placements import (OutPlacement, Partial, Placement, Replicate, Shard, local_size, make_shard)

if TYPE_CHECKING:  # capture imports the registry (mode facts, bias splits): no import cycle
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


# ---------------------------------------------------------------------------------------------
# the registry: every fact about an op, keyed by its ATen overload

Metas = tuple["TensorMeta | None", ...]
# global forward FLOPs from the op's tensor input metas and output metas
Flops = Callable[[Metas, Metas], float]
# whether the backward keeps the op's inputs, given how many tensor inputs the node has
Keeps = Callable[[int], bool]
# whether this node computes something different in train and eval mode
ModeCheck = Callable[[fx.Node], bool]
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
    - ``view``: its output aliases its input, so it keeps no activation memory.
    - ``keeps``: whether its backward keeps its inputs (cost.saves_inputs).
    - ``mode_sensitive``: the node differs in train and eval mode (dropout, batch_norm).
    - ``display``: how plan tables show it; None: not a row of the matmul table.
    - ``unbias``: capture replaces the node by a bias-free op plus an add (linear, addmm),
      so a row-split output is never given the bias on every rank.
    """

    rule: Rule | None = None
    flops: Flops | None = None
    view: bool = False
    keeps: Keeps = keeps_inputs
    mode_sensitive: ModeCheck = never_mode_sensitive
    display: Display | None = None
    unbias: Unbias | None = None

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
    are their other ``OpInfo`` fields (flops, view, keeps, mode_sensitive, display, unbias)."""
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


# ---------------------------------------------------------------------------------------------
# generic enumeration

def _dim_ok(meta: TensorMeta, dim: int, blocks: tuple[int, ...], n: int) -> bool:
    """A blocked split (fused QKV) is offered only when n divides every block."""
    if meta.dynamic[dim]:
        return False
    return sum(blocks) == meta.shape[dim] and all(b % n == 0 and b >= n for b in blocks)


def _dynamic_label(call: OpCall, dm: DimMap, labels: list) -> Label:
    """The one label on dynamic dims an op may split: the largest at the example sizes, the
    last of the output's dims on a tie (see the module docstring)."""
    best, key = None, None
    for labs, metas in ((dm.outputs, call.outputs), (dm.inputs, call.inputs)):
        for labs_i, m in zip(labs, metas):
            for d, lab in enumerate(labs_i):
                if lab is not None and m is not None and m.dynamic[d]:
                    k = (m.shape[d], d)
                    if key is None or k > key:
                        best, key = lab, k
        if best is not None:
            return best
    return best


def label_units(sizes: Sequence[int], grains: Iterable[tuple[int, int]] = ()) -> list[int]:
    """Unit counts a label whose dims have ``sizes`` may be split in: the gcd of the sizes,
    plus ``size_i // g`` for each grain hint (i, g); every size must be a multiple."""
    found = [math.gcd(*sizes)] + [sizes[i] // g for i, g in grains if g and sizes[i] % g == 0]
    return [u for u in dict.fromkeys(found) if u >= 2 and all(s % u == 0 for s in sizes)]


def strategies_from_dims(call: OpCall, dm: DimMap,
                         out_hints: dict[tuple[int, int], set[tuple[int, ...]]],
                         grains: Callable[[str, int, int], set[int]] | None = None) -> list[Strategy]:
    """``grains(kind, i, d)``: grain hints on dim d of input slot / output i (kind "in"/"out").
    Strategy 0 is all-Replicate, as it is for every node strategies.build makes (fallbacks
    and parameters included); cli's replicated-plan time relies on that."""
    n = call.world_size
    n_in = len(dm.inputs)
    rep_out: OutPlacement = tuple(Replicate() for _ in dm.outputs) if dm.multi else Replicate()
    found: list[Strategy] = [Strategy(tuple(Replicate() for _ in range(n_in)), rep_out)]

    labels: list[Hashable] = []
    for labs in (*dm.inputs, *dm.outputs):
        for lab in labs:
            if lab is not None and lab not in labels:
                labels.append(lab)

    dyn_pick = _dynamic_label(call, dm, labels) if dm.dynamic_ok else None
    for lab in labels if n > 1 else []:
        in_dims = [labs.index(lab) if lab in labs else None for labs in dm.inputs]
        out_dims = [labs.index(lab) if lab in labs else None for labs in dm.outputs]
        if all(d is None for d in out_dims) and lab not in dm.contract:
            continue
        if any(d is None for d in out_dims) and any(d is not None for d in out_dims):
            continue
        dims = [("in", i, call.inputs[i], d) for i, d in enumerate(in_dims) if d is not None] + \
               [("out", i, call.outputs[i], d) for i, d in enumerate(out_dims) if d is not None]
        sizes = [m.shape[d] for _, _, m, d in dims]
        if any(m.dynamic[d] for _, _, m, d in dims):
            if lab == dyn_pick and len(set(sizes)) == 1 and sizes[0] % n == 0 and sizes[0] >= n:
                pl = {(kind, i): Shard(d) for kind, i, _, d in dims}
                ins = tuple(pl.get(("in", i), Replicate()) for i in range(n_in))
                outs = tuple(pl.get(("out", i), Partial()) for i in range(len(out_dims)))
                found.append(Strategy(ins, outs if dm.multi else outs[0]))
            continue
        hinted = [(k, g) for k, (kind, i, _, d) in enumerate(dims)
                  for g in (grains(kind, i, d) if grains else ())]
        for units in label_units(sizes, hinted):
            pl = {(kind, i): make_shard(d, s, s // units, n) for (kind, i, _, d), s in zip(dims, sizes)}
            ins = tuple(pl.get(("in", i), Replicate()) for i in range(n_in))
            outs = tuple(pl.get(("out", i), Partial()) for i in range(len(out_dims)))
            found.append(Strategy(ins, outs if dm.multi else outs[0]))
        options: list[tuple[int, ...]] = []
        for oi, d in enumerate(out_dims):
            if d is not None:
                options.extend(sorted(out_hints.get((oi, d), ())))
        for blocks in dict.fromkeys(options):
            if not all(_dim_ok(m, d, blocks, n) for _, _, m, d in dims):
                continue
            ins = tuple(Shard(d, blocks) if d is not None else Replicate() for d in in_dims)
            outs = tuple(Shard(d, blocks) if d is not None else Partial() for d in out_dims)
            found.append(Strategy(ins, outs if dm.multi else outs[0]))

    part_out: OutPlacement = tuple(Partial() for _ in dm.outputs) if dm.multi else Partial()
    if n == 1:
        return found
    if dm.partial_all and n_in:
        found.append(Strategy(tuple(Partial() for _ in range(n_in)), part_out))
    for slot in dm.partial_any:
        if slot < n_in:
            found.append(Strategy(tuple(Partial() if i == slot else Replicate()
                                        for i in range(n_in)), part_out))
    return list(dict.fromkeys(found))


def replicate_only(n_in: int, n_out: int | None) -> list[Strategy]:
    out: OutPlacement = Replicate() if n_out is None else tuple(Replicate() for _ in range(n_out))
    return [Strategy(tuple(Replicate() for _ in range(n_in)), out)]


# ---------------------------------------------------------------------------------------------
# helpers shared by rule files

def broadcast_labels(inputs: Sequence[TensorMeta], out: TensorMeta, prefix: str = "d"
                     ) -> tuple[tuple[tuple[Label, ...], ...], tuple[Label, ...]]:
    """Labels for a broadcasting elementwise op: dims align from the right; an input dim of
    size 1 against a larger output dim gets None (it is broadcast, so it stays replicated)."""
    r = len(out.shape)
    out_labels = tuple((prefix, i) for i in range(r))
    ins = []
    for m in inputs:
        off = r - len(m.shape)
        ins.append(tuple(None if (m.shape[j] == 1 and out.shape[off + j] != 1) else out_labels[off + j]
                         for j in range(len(m.shape))))
    return tuple(ins), out_labels


def norm_dims(dims: Iterable[int] | int, rank: int) -> list[int]:
    if isinstance(dims, int):
        dims = [dims]
    return sorted({d % rank for d in dims}) if rank else []


def scale_shape_arg(node: fx.Node, strategy: Strategy, n: int, rank: int = 0, index: int = 1) -> None:
    """Replace the global size at each output Shard dim of a shape-list argument (view,
    reshape, expand) with this rank's local size (uneven splits differ per rank). -1 and
    symbolic sizes are left alone (symbolic dims are never split)."""
    out = strategy.output
    if not isinstance(out, Shard):
        return
    shape = list(node.args[index])
    d = out.dim % len(shape)
    if isinstance(shape[d], int) and shape[d] != -1:
        shape[d] = local_size(out, shape[d], n, rank)
        args = list(node.args)
        args[index] = shape
        node.args = tuple(args)


# importing the families registers their rules
from autotp.rules import attention, embedding, matmul, norms, pointwise, views  # noqa: E402,F401
