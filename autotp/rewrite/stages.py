"""Pipeline stages: this rank's rewritten program cut into the part its stage runs.

Every node gets a segment by the rule cost/pipeline.py prices (``segment_of``: pre, a layer,
post) and from it a stage (the plan's ``Pipeline``: the first layer of each stage). Stage
``s``'s GraphModule holds its own nodes, in graph order, and reads:

- stage 0: the model's call itself (the original program's input handling: the same
  positional and keyword arguments, flattened the same way);
- a later stage: every tensor an earlier stage made (or was given) that this stage or a
  later one reads, in graph order: the values the previous stage sends. A value read two
  stages on is passed along by the stage between (``torch.distributed.pipelining`` sends
  between neighbours only).

It returns the values the next stage reads (the last stage: the program's outputs,
flattened). A non-tensor value (a symbolic size, ``sym_size``) read by a later stage is not
sent: its node is computed again in the stage that reads it (from tensors it receives). A
``getitem`` of a multi-output op stays with the op. Parameters and buffers are attributes of
the stages that read them, under their names in the model; one read by two stages (tied
embeddings on the first and the last) is held by both, and its gradients are summed across
them after each step (runtime/stages.py)."""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from autotp._compat import call_codegen
from autotp.cost.pipeline import segment_of, stage_of_segment
from autotp.errors import AutoTPError, AutoTPInternalError


@dataclass(frozen=True)
class StageCut:
    """Each node's stage, and the values crossing into each stage (``into[s]``: what stage
    s-1 sends to stage s, by node name, in graph order)."""
    stage: dict[str, int]
    into: tuple[tuple[str, ...], ...]
    copies: tuple[frozenset[str], ...]  # per stage: non-tensor nodes of earlier stages computed again
    attrs: dict[str, tuple[int, ...]]  # get_attr node -> the stages that read it


def _is_scalar(n: fx.Node) -> bool:
    val = n.meta.get("val")
    return isinstance(val, (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool))


def cut(gm: fx.GraphModule, layers: list[tuple[str, frozenset[str] | set[str]]],
        first_layers: tuple[str, ...]) -> StageCut:
    """Assign every node of ``gm`` a stage. ``layers``: per layer, in graph order, its module
    path and its node names; ``first_layers``: the first layer of each stage after the first."""
    nodes = list(gm.graph.nodes)
    names = {n.name for n in nodes}
    paths = [p for p, _ in layers]
    missing = [p for p in first_layers if p not in paths]
    if missing:
        raise AutoTPInternalError(f"the plan cuts at layers {missing}, which this program lacks")
    sets = [set(ns) & names for _, ns in layers]
    by_name = {n.name: n for n in nodes}
    seg = segment_of([n.name for n in nodes], sets, lambda v: [u.name for u in by_name[v].users],
                     lambda v: by_name[v].op == "get_attr")
    for n in nodes:  # a getitem stays with its multi-output op
        if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node):
            seg[n.name] = seg[n.args[0].name]
    bounds = [0] + [paths.index(p) for p in first_layers]
    of = stage_of_segment(bounds, len(paths))
    stage = {n.name: of(seg[n.name]) for n in nodes}
    pp = len(bounds)
    copies: list[set[str]] = [set() for _ in range(pp)]
    for s in range(pp):  # scalars read by stage s from earlier stages: recomputed in s
        todo = [a for n in nodes if stage[n.name] == s for a in n.all_input_nodes]
        while todo:
            a = todo.pop()
            if stage[a.name] < s and _is_scalar(a) and a.op not in ("placeholder", "get_attr") \
                    and a.name not in copies[s]:
                copies[s].add(a.name)
                todo.extend(a.all_input_nodes)
    readers: dict[str, set[int]] = {n.name: set() for n in nodes}  # the stages reading each value
    for n in nodes:
        for s in {stage[n.name]} | {t for t in range(pp) if n.name in copies[t]}:
            for a in n.all_input_nodes:
                readers[a.name].add(s)
    attrs = {n.name: tuple(sorted(readers[n.name])) for n in nodes if n.op == "get_attr"}
    into: list[tuple[str, ...]] = [()]
    for s in range(1, pp):
        crossing = []
        for n in nodes:
            if n.op in ("get_attr", "output") or stage[n.name] >= s or n.name in copies[s]:
                continue
            if any(r >= s for r in readers[n.name]) and not (_is_scalar(n) and n.op != "placeholder"):
                crossing.append(n.name)
        into.append(tuple(crossing))
    for n in nodes:  # the cut follows graph order: no value flows to an earlier stage
        for u in n.users:
            if n.op != "get_attr" and u.op != "output" and stage[u.name] < stage[n.name]:
                raise AutoTPInternalError(f"pipeline cut: {n.format_node()} (stage {stage[n.name]}) "
                                          f"feeds {u.format_node()} (stage {stage[u.name]})")
    bad = [v for s in range(1, pp) for v in into[s] if _is_scalar(by_name[v])]
    if bad:
        raise AutoTPError(f"pipeline stages would send the non-tensor model inputs {bad[:3]} to a "
                          "later stage, which only tensors can cross: pass them as tensors, or "
                          "drop the argument, to a pipelined model")
    return StageCut(stage, tuple(into), tuple(frozenset(c) for c in copies), attrs)


def stage_module(gm: fx.GraphModule, sc: StageCut, s: int) -> fx.GraphModule:
    """Stage ``s``'s GraphModule (module docstring). Its parameters and buffers are ``gm``'s
    tensors under the same attribute paths (fx.GraphModule copies what its graph reads)."""
    pp = len(sc.into)
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    by_name = {n.name: n for n in gm.graph.nodes}
    if s == 0:
        call_codegen(g, gm.graph)  # the model's call, flattened as the original program does
    else:
        for v in sc.into[s]:
            env[by_name[v]] = g.placeholder(v)
            env[by_name[v]].meta = dict(by_name[v].meta)
    out = None
    for n in gm.graph.nodes:
        if n.op == "output":
            out = n
            continue
        mine = sc.stage[n.name] == s or n.name in sc.copies[s] or \
            (n.op == "get_attr" and s in sc.attrs[n.name])
        if n.op == "placeholder":
            if s == 0:
                env[n] = g.node_copy(n)
            continue
        if mine and n not in env:
            env[n] = g.node_copy(n, lambda x: env[x])
    if s == pp - 1:
        g.output(torch.fx.node.map_arg(out.args[0], lambda x: env[x]))
    else:
        g.output(tuple(env[by_name[v]] for v in sc.into[s + 1]))
    g.lint()
    return fx.GraphModule(gm, g)
