"""Candidates: for every node of the captured graph, the strategies it may run with.

Decision nodes are placeholders (always Replicate: the user passes full inputs), parameters
(Replicate, or Shard on any static dim: evenly, or unevenly in torch.chunk sizes of whole
units such as heads, see ``_grain_hints``), buffers (Replicate), ops with tensor outputs
(from their rule, or Replicate-only with a warning when no rule exists or the rule raised, see
``_warn_broken``) and the output node
(needs every returned tensor Replicate). ``getitem`` of a multi-output op follows its
producer. Nodes without tensor outputs (``sym_size``, input guards) are left as they are.
"""
from __future__ import annotations

import logging
import operator
import re
import warnings
from collections import defaultdict
from collections.abc import Callable
from enum import Enum
from dataclasses import dataclass, field, replace
from typing import Any

import torch.fx as fx
from autotp._compat import pytree

from autotp.capture import Captured, describe, module_path
from autotp.core.meta import TensorMeta
from autotp.core.options import ADAM_FP32_BYTES
from autotp.errors import AutoTPInternalError
from autotp.core.placements import Placement, Replicate, Shard, make_shard
from autotp.rules import (DimMap, OpCall, Strategy, label_units, op_info, replicate_only, rule_for, strategies_from_dims)

log = logging.getLogger(__name__)

Value = tuple[str, int]  # (producer node name, output index; 0 for single-tensor nodes)


class NodeKind(str, Enum):
    """The role of a decision node. A str Enum: the JSON boundary and old callers still see
    "param" etc.; code compares with the members, so a typo fails to import, not silently."""
    INPUT = "input"
    PARAM = "param"
    BUFFER = "buffer"
    STATE = "state"  # a buffer the program writes in place (a static KV cache): see _Build.mutated
    OP = "op"
    OUTPUT = "output"


@dataclass
class NodeCands:
    name: str
    kind: NodeKind
    slots: tuple[Value, ...]  # producer value of each tensor input slot
    slot_nodes: tuple[str, ...]  # the graph node each slot reads (a getitem for tuple values)
    strategies: list[Strategy]
    metas: tuple[TensorMeta, ...]  # output metas
    module: str
    op: str
    target: object = None  # the ATen op (call_function) or attribute path (get_attr)
    fallback: bool = False  # no sharding rule, or its rule raised: replicated
    flops: float | None = None  # global forward FLOPs from the call (registry ``call_flops``)


@dataclass(frozen=True)
class Candidates:
    captured: Captured
    world_size: int
    nodes: dict[str, NodeCands]  # decision nodes in graph order
    followers: dict[str, Value]  # getitem node -> the tuple value it reads
    consumers: dict[Value, list[tuple[str, int]]] = field(default_factory=dict)
    unruled: dict[str, list[str]] = field(default_factory=dict)  # op -> module paths
    needs_grad: frozenset[str] = frozenset()  # nodes whose value has a gradient in training
    # per stack of identical layers (capture's Captured.stacks), per layer, its decision
    # nodes in graph order: the solver solves runs of identical layers once (solve/runs.py)
    layers: tuple[tuple[tuple[str, ...], ...], ...] = ()
    cache: dict = field(default_factory=dict, repr=False, compare=False)  # solver tables
    # the plan options the cost model reads, set by build() (PlanOptions has them all)
    dp_size: int = 1  # data-parallel replicas of this tensor-parallel group (a 2-D mesh)
    optimizer_bytes: float = ADAM_FP32_BYTES  # training: optimizer state per trained parameter element
    dp_mode: str = "ddp"  # how the replicas hold the shards: "ddp" or "fsdp" (never "auto" here)

    def bytes_of(self, v: Value) -> int:
        return self.nodes[v[0]].metas[v[1]].nbytes

    def with_dp_mode(self, dp_mode: str) -> "Candidates":
        """These candidates priced for another data-parallel kind ("ddp" or "fsdp"): the same
        strategies, and a fresh solver cache (its tables were priced the other way)."""
        return self if dp_mode == self.dp_mode else replace(self, dp_mode=dp_mode, cache={})

    def need(self, name: str, st: Strategy, slot: int) -> tuple[Placement, Placement | None]:
        """What strategy ``st`` of node ``name`` needs of the value at input ``slot``: its
        placement Q and the placement G of the gradient it sends back, None when that value has
        no gradient (a mask, token ids): then there is no backward to pay, and strategies
        that differ only in G read the value alike (one collective, charged once)."""
        return st.inputs[slot], (st.grad_placement(slot) if self.nodes[name].slots[slot][0] in self.needs_grad
                                 else None)


def tensor_slots(node: fx.Node, metas: dict) -> list[fx.Node]:
    """The tensor inputs of ``node`` in argument order (one per occurrence)."""
    leaves = pytree.tree_leaves((node.args, node.kwargs))
    return [a for a in leaves if isinstance(a, fx.Node) and isinstance(metas.get(a.name), TensorMeta)]


def writes_first_arg(target: object) -> bool:
    """Whether an ATen op writes its first argument in place (``index_copy_``, ``copy_``,
    ``add_``): its schema marks that argument's alias as written."""
    schema = getattr(target, "_schema", None)
    if schema is None or not schema.arguments:
        return False
    alias = schema.arguments[0].alias_info
    return alias is not None and alias.is_write


def _op_name(node: fx.Node) -> str:
    if node.op == "call_function":
        return str(node.target)
    return node.op


Grains = dict[Value, dict[int, set[int]]]


def _grain_hints(order: list[fx.Node], calls: dict[str, OpCall], dims: dict[str, DimMap | None],
                 metas: dict, value_of, n: int) -> Grains:
    """Grain hints for uneven splits: where the dims of one label differ in size (a view
    hidden H*d -> heads H, a repeat of kv heads, GQA attention), a split the world size does
    not divide must fall on whole units (heads), i.e. dim i in grains of size_i / units. The
    grain found on one dim spreads to every dim sharing a label with it, forwards and
    backwards (the q projection and its weight learn that a view splits their output into
    heads of d), until nothing changes. Unit counts n divides need no grain (even split)."""
    grains: Grains = defaultdict(lambda: defaultdict(set))
    if n <= 1:
        return grains
    groups = grain_groups(order, calls, dims, metas, value_of)
    by_dim: dict[tuple[Value, int], list[int]] = defaultdict(list)  # (value, dim) -> groups
    for k, (where, _) in enumerate(groups):
        for vd in where:
            by_dim[vd].append(k)
    # a worklist to the fixpoint: a group is looked at again when one of its dims gains a grain
    todo, queued = list(range(len(groups))), set(range(len(groups)))
    while todo:
        k = todo.pop()
        queued.discard(k)
        for vd in grain_step(*groups[k], grains, n):
            for other in by_dim[vd]:
                if other not in queued:
                    queued.add(other)
                    todo.append(other)
    return grains


GrainGroup = tuple[list[tuple[Value, int]], list[int]]  # the (value, dim)s of one label, their sizes


def grain_groups(order: list[fx.Node], calls: dict[str, OpCall], dims: dict[str, DimMap | None],
                 metas: dict, value_of) -> list[GrainGroup]:
    """Each (node, label) of the graph once: the dims (value, dim) that carry the label and
    their sizes; a label with a dynamic dim takes no grain and is left out."""
    groups: list[GrainGroup] = []
    for node in order:
        dm, call = dims.get(node.name), calls.get(node.name)
        if dm is None or call is None:
            continue
        slots = tensor_slots(node, metas)
        labels = dict.fromkeys(lab for labs in (*dm.inputs, *dm.outputs) for lab in labs
                               if lab is not None)
        for lab in labels:
            where = [(value_of(slots[j]), labs.index(lab), call.inputs[j])
                     for j, labs in enumerate(dm.inputs) if lab in labs and j < len(slots)]
            where += [((node.name, i), labs.index(lab), call.outputs[i])
                      for i, labs in enumerate(dm.outputs) if lab in labs]
            if not any(m.dynamic[d] for _, d, m in where):
                groups.append(([(v, d) for v, d, _ in where], [m.shape[d] for _, d, m in where]))
    return groups


def grain_step(where: list[tuple[Value, int]], sizes: list[int], grains: Grains, n: int
               ) -> list[tuple[Value, int]]:
    """One group's propagation: every unit count of its label that ``n`` does not divide
    (``label_units``, given the grains its dims have) adds the grain size // units to each dim.
    Returns the dims that gained one."""
    gained = []
    hinted = [(j, g) for j, (v, d) in enumerate(where) for g in grains[v][d]]
    for units in label_units(sizes, hinted):
        if units % n == 0:
            continue
        for (v, d), size in zip(where, sizes):
            g = size // units
            if g > 1 and g not in grains[v][d]:
                grains[v][d].add(g)
                gained.append((v, d))
    return gained


def _static_shard(nc: NodeCands, oi: int) -> bool:
    meta = nc.metas[oi]
    return meta is not None and any(isinstance(st.outputs()[oi], Shard) and not meta.splits_dynamic(st.outputs()[oi])
                                    for st in nc.strategies)


def build(captured: Captured, world_size: int, *, dp_size: int = 1,
          optimizer_bytes: float = ADAM_FP32_BYTES, shared_pieces: bool = False,
          dp_mode: str = "ddp") -> Candidates:
    """The candidates of every node of ``captured`` at ``world_size``; ``dp_size``,
    ``dp_mode`` ("ddp" or "fsdp") and ``optimizer_bytes`` are the options the cost model reads
    (see ``options.PlanOptions``).
    ``shared_pieces`` (inference only): also offer splits whose pieces several ranks share
    (key/value heads fewer than ranks, ``Shard(rep=k)`` in core/placements.py).

    Phases, in order (each a method of ``_Build``): the ops and their DimMaps
    (``ops``); block hints, backwards from splits (``block_hints``); grain hints
    (``_grain_hints``); the strategies of every node (``strategies``); which nodes carry
    gradients and who consumes each value (``finish``)."""
    bd = _Build(captured, world_size)
    bd.shared_pieces = shared_pieces
    bd.ops()
    bd.block_hints()
    bd.grains = _grain_hints(bd.order, bd.calls, bd.dims, captured.metas, bd.value_of, world_size)
    for node in bd.order:
        bd.nodes[node.name] = bd.strategies(node)
    return bd.finish(dp_size, optimizer_bytes, dp_mode)


class _Build:
    """The state ``build``'s phases share."""

    def __init__(self, captured: Captured, n: int):
        self.captured, self.n = captured, n
        self.metas = captured.metas
        self.followers: dict[str, Value] = {}
        self.calls: dict[str, OpCall] = {}
        self.dims: dict[str, DimMap | None] = {}
        self.order: list[fx.Node] = []
        self.broken: dict[str, tuple[fx.Node, str, Exception]] = {}  # node -> (node, part, error)
        # hints[node name][(output index, dim)] = block tuples a consumer splits that dim into
        self.hints: dict[str, dict[tuple[int, int], set[tuple[int, ...]]]] = \
            defaultdict(lambda: defaultdict(set))
        self.grains: Grains = {}
        self.nodes: dict[str, NodeCands] = {}
        self.unruled: dict[str, list[str]] = defaultdict(list)
        # buffers an op writes in place (index_copy_ of a static KV cache, a position counter):
        # program state, placed like parameters (split or whole) but read only where they live
        self.mutated: set[str] = set()
        self.shared_pieces = False  # offer Shard(rep=k) (see build)

    def value_of(self, a: fx.Node) -> Value:
        return self.followers.get(a.name, (a.name, 0))

    def guarded(self, node: fx.Node, part: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, a call into ``node``'s rule; if it raises, the node falls back to
        Replicate-only (its DimMap is dropped) and ``_warn_broken`` reports it: a bug in a
        rule costs speed, never the plan."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - any rule bug gets the documented fallback
            self.broken.setdefault(node.name, (node, part, e))
            self.dims[node.name] = None
            return None

    def ops(self) -> None:
        """The decision nodes in graph order (getitems of multi-output ops follow their
        producer), and each op's OpCall and DimMap from its rule."""
        metas, n = self.metas, self.n
        for node in self.captured.gm.graph.nodes:
            meta = metas.get(node.name)
            if node.op == "call_function" and node.target is operator.getitem and \
                    isinstance(metas.get(node.args[0].name), tuple):
                self.followers[node.name] = (node.args[0].name, node.args[1])
                continue
            if node.op == "output" or (node.op in ("placeholder", "get_attr", "call_function")
                                       and meta is not None):
                self.order.append(node)
            if node.op == "call_function" and writes_first_arg(node.target) and node.args and \
                    isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr":
                self.mutated.add(node.args[0].name)
            if node.op == "call_function" and meta is not None:
                outs = meta if isinstance(meta, tuple) else (meta,)
                if any(o is None for o in outs):
                    continue
                call = OpCall(node, tuple(metas[a.name] for a in tensor_slots(node, metas)), outs, n)
                self.calls[node.name] = call
                rule = rule_for(node)
                self.dims[node.name] = self.guarded(node, "dims", rule.dims, call) if rule else None

    def block_hints(self) -> None:
        """Block hints flow backwards from splits (a rule's ``hints``) through ops that carry
        the same label, to the fused projection's output and its weight."""
        metas, hints = self.metas, self.hints
        for node in reversed(self.order):
            call = self.calls.get(node.name)
            if call is None:
                continue
            slots = tensor_slots(node, metas)
            rule = rule_for(node)
            if rule and rule.hints and node.name not in self.broken:
                for slot, d, blocks in self.guarded(node, "hints", rule.hints, call) or []:
                    p, oi = self.value_of(slots[slot])
                    hints[p][(oi, d)].add(blocks)
            dm = self.dims.get(node.name)
            if dm is None:
                continue
            for (oi, d), bset in list(hints.get(node.name, {}).items()):
                if oi >= len(dm.outputs) or d >= len(dm.outputs[oi]):
                    continue
                lab = dm.outputs[oi][d]
                if lab is None:
                    continue
                for j, labs in enumerate(dm.inputs):
                    if lab in labs:
                        dj = labs.index(lab)
                        p, poi = self.value_of(slots[j])
                        for b in bset:
                            if call.inputs[j].shape[dj] == sum(b):
                                hints[p][(poi, dj)].add(b)

    def strategies(self, node: fx.Node) -> NodeCands:
        """One node's candidates: placeholders and buffers Replicate; parameters Replicate or
        Shard on any static dim (even, uneven in whole units, on hinted grains and blocks); ops
        from their rule, or Replicate-only (with a warning when an input could be split)."""
        metas, n = self.metas, self.n
        meta = metas.get(node.name)
        slots_n = tensor_slots(node, metas) if node.op in ("call_function", "output") else []
        slots = tuple(self.value_of(a) for a in slots_n)
        slot_names = tuple(a.name for a in slots_n)
        outs = tuple(meta) if isinstance(meta, tuple) else ((meta,) if meta is not None else ())
        fallback = False
        if node.op == "placeholder":
            kind, strategies = NodeKind.INPUT, [Strategy((), Replicate())]
        elif node.op == "get_attr":
            is_param = node.target in self.captured.param_names
            kind = NodeKind.PARAM if is_param else NodeKind.STATE if node.name in self.mutated else NodeKind.BUFFER
            strategies = self._param_strategies(node, outs[0]) if kind is not NodeKind.BUFFER and n > 1 else \
                [Strategy((), Replicate())]
        elif node.op == "output":
            kind, strategies = NodeKind.OUTPUT, [Strategy(tuple(Replicate() for _ in slots), ())]
        else:
            kind = NodeKind.OP
            found = self._op_strategies(node)
            if found is not None:
                strategies = found
            else:
                fallback = True
                strategies = replicate_only(len(slots), len(outs) if isinstance(meta, tuple) else None)
                # worth a warning when an input may be split on a static dim (a split of a
                # batch/sequence dim is only chosen when memory binds)
                if node.name not in self.broken and n > 1 and \
                        any(_static_shard(self.nodes[v[0]], v[1]) for v in slots if v[0] in self.nodes):
                    self.unruled[_op_name(node)].append(module_path(node) or "<root>")
        flops = None
        info = op_info(node.target) if node.op == "call_function" else None
        if info is not None and info.call_flops is not None and node.name in self.calls:
            try:
                flops = float(info.call_flops(self.calls[node.name]))
            except Exception:  # noqa: BLE001 - a cost estimate: the op then costs no compute
                flops = None
        return NodeCands(node.name, kind, slots, slot_names, strategies, outs, module_path(node),
                         _op_name(node),
                         node.target if node.op in ("call_function", "get_attr") else None, fallback,
                         flops)

    def _param_strategies(self, node: fx.Node, m: TensorMeta) -> list[Strategy]:
        n = self.n
        strategies = [Strategy((), Replicate())]
        for d, size in enumerate(m.shape):
            hinted = [(0, g) for g in sorted(self.grains.get((node.name, 0), {}).get(d, ()))]
            for units in label_units([size], hinted):
                strategies.append(Strategy((), make_shard(d, size, size // units, n)))
                if self.shared_pieces and units < n and n % units == 0:
                    strategies.append(Strategy((), make_shard(d, size, size // units, n, rep=n // units)))
            for b in sorted(self.hints.get(node.name, {}).get((0, d), ())):
                if sum(b) == size and all(x % n == 0 and x >= n for x in b):
                    strategies.append(Strategy((), Shard(d, b)))
        return list(dict.fromkeys(strategies))

    def _op_strategies(self, node: fx.Node) -> list[Strategy] | None:
        """The rule's strategies (plus its ``extra`` ones), or None: no rule, or it raised."""
        dm = self.dims.get(node.name)
        if dm is None:
            return None
        call, rule, grains = self.calls[node.name], rule_for(node), self.grains
        ins_v = [self.value_of(a) for a in tensor_slots(node, self.metas)]

        def grains_of(side: str, i: int, d: int) -> set[int]:
            v = ins_v[i] if side == "in" else (node.name, i)
            return grains.get(v, {}).get(d, set())
        found = self.guarded(node, "strategies", strategies_from_dims, call, dm,
                             self.hints.get(node.name, {}), grains_of, self.shared_pieces)
        if found is not None and rule and rule.extra and self.n > 1:
            extra = self.guarded(node, "extra", rule.extra, call)
            found = None if extra is None else found + [s for s in extra if s not in found]
        return found

    def finish(self, dp_size: int, optimizer_bytes: float, dp_mode: str = "ddp") -> Candidates:
        """Gradient flags, consumers, the warnings, the stage invariant; the Candidates."""
        gm, nodes = self.captured.gm, self.nodes
        needs_grad: set[str] = set(self.captured.inputs_requiring_grad)
        for nc in nodes.values():
            if nc.kind is NodeKind.PARAM:
                if gm.get_parameter(str(nc.target)).requires_grad:
                    needs_grad.add(nc.name)
            elif any(v[0] in needs_grad for v in nc.slots) and \
                    any(m is not None and m.dtype.is_floating_point for m in nc.metas):
                needs_grad.add(nc.name)
        consumers: dict[Value, list[tuple[str, int]]] = defaultdict(list)
        for nc in nodes.values():
            for i, v in enumerate(nc.slots):
                consumers[v].append((nc.name, i))
        for op, mods in self.unruled.items():
            uniq = list(dict.fromkeys(mods))
            shown = ", ".join(uniq[:3]) + (f" and {len(uniq) - 3} more" if len(uniq) > 3 else "")
            msg = (f"autotp: {op} has no sharding rule; it runs replicated with its inputs gathered "
                   f"first (in {shown}). Correct but may be slow: see docs/adding_an_op_rule.md")
            warnings.warn(msg, stacklevel=4)
            log.info(msg)
        _warn_broken(list(self.broken.values()), stacklevel=5)
        _check_replicate_first(nodes)
        return Candidates(self.captured, self.n, nodes, self.followers, dict(consumers),
                          dict(self.unruled), frozenset(needs_grad),
                          _layer_units(nodes, self.captured.stacks), dp_size=dp_size,
                          optimizer_bytes=optimizer_bytes, dp_mode=dp_mode)


def _check_replicate_first(nodes: dict) -> None:
    """Stage invariant (docs/architecture.md): strategy 0 of every node is all-Replicate, the
    fallback every node can take and the baseline the plan tables compare with."""
    for name, nc in nodes.items():
        st = nc.strategies[0] if nc.strategies else None
        if st is None or not all(isinstance(p, Replicate) for p in st.inputs + st.outputs()):
            raise AutoTPInternalError(f"strategy 0 of node {name} is not all-Replicate: {st}")


def _warn_broken(broken: list[tuple[fx.Node, str, Exception]], stacklevel: int = 4) -> None:
    """One warning per op and error whose rule raised during enumeration: the op, the first
    node's module path and user source line (capture.describe), the other modules, and the
    error. Those nodes run replicated (correct, maybe slow); the rule has a bug."""
    groups: dict[tuple[str, str], list[tuple[fx.Node, str, Exception]]] = defaultdict(list)
    for node, part, e in broken:
        groups[(_op_name(node), f"{type(e).__name__}: {e}")].append((node, part, e))
    for (op, err), items in groups.items():
        node, part, _ = items[0]
        others = list(dict.fromkeys(module_path(x) or "<root>" for x, _, _ in items[1:]))
        more = (f"; also at {len(items) - 1} more node(s) in " + ", ".join(others[:3]) +
                (f" and {len(others) - 3} more modules" if len(others) > 3 else "")) if others else ""
        msg = (f"autotp: the sharding rule of {op} raised {err} (in its {part}) at "
               f"{describe(node)}{more}. Those nodes run replicated with their inputs gathered "
               f"first: correct but may be slow. This is a bug in autotp, please report it.")
        warnings.warn(msg, stacklevel=stacklevel)
        log.warning(msg)


def _layer_units(nodes: dict[str, NodeCands], stacks: tuple) -> tuple[tuple[tuple[str, ...], ...], ...]:
    """Per stack, per layer, the decision nodes whose module lies in that layer, in order."""
    out = []
    for st in stacks:
        pat = re.compile(re.escape(st.path + "." if st.path else "") + r"(\d+)(?:\.|$)")
        units: list[list[str]] = [[] for _ in range(st.size)]
        for name, nc in nodes.items():
            m = pat.match(nc.module)
            if m and int(m.group(1)) < st.size:
                units[int(m.group(1))].append(name)
        out.append(tuple(tuple(u) for u in units))
    return tuple(out)
