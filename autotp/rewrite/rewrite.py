"""Rewrite: the captured graph + a chosen strategy per node -> this rank's fx.GraphModule.

Three edits, then ``graph.lint()``:
1. every parameter placed Shard is replaced by this rank's slice (tied names keep sharing it),
   and every buffer the program writes in place (a KV cache) by this rank's piece;
2. a ``Redistribute`` module is inserted on every edge whose producer placement P differs from
   what the consumer needs (Q), or whose gradient needs a conjugate collective (G != dual(P));
   consumers of one value that need the same (Q, G) share one;
3. shape arguments holding global sizes (view/expand head counts, split sizes) become local;
4. a random op whose output is split (dropout of a column-split activation, attention dropout
   with split heads) becomes a ``SplitRandom`` module: it draws the full-size value from the
   generator every rank shares and keeps this rank's slice (the op's ``draws`` fact), so with
   the same ``torch.manual_seed`` on every rank the parallel model draws exactly the numbers
   one device draws, and every rank's generator advances as one device's does. A replicated
   random op already draws the full value on every rank.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
from torch import nn
from autotp._compat import pytree

from autotp.core.meta import TensorMeta
from autotp.capture import fetch_attr, set_attr
from autotp.rewrite.collectives import Comm, Redistribute
from autotp.errors import AutoTPInternalError
from autotp.core.placements import Placement, Replicate, Shard, local_size, shard_tensor
from autotp.rules import SplitDraw, op_info, random_op, rule_for
from autotp.cost.evaluate import Choice
from autotp.candidates import Candidates, NodeKind, writes_first_arg


def value_placement(c: Candidates, choice: Choice, name: str) -> Placement:
    producer, oi = c.followers.get(name, (name, 0))
    return c.nodes[producer].strategies[choice[producer]].outputs()[oi]


Load = Callable[[list[str], torch.Tensor, Placement], torch.Tensor]


def rewrite(c: Candidates, choice: Choice, comm: Comm,
            load: Load | None = None) -> tuple[fx.GraphModule, dict[str, Placement]]:
    """Edits ``c.captured.gm`` in place into this rank's module. Returns it and the placement
    of every parameter name (aliases of tied weights included). ``load(names, full, place)``
    gives this rank's piece of the parameter known by ``names`` (``full`` is the model's
    tensor, possibly on meta); by default the piece is sliced from ``full``."""
    placements = _parameters(c, choice, comm.rank, load)
    placements.update(_state(c, choice, comm.rank))
    _transitions(c, choice, comm)
    _random_draws(c, choice, comm)
    c.captured.gm.graph.lint()
    c.captured.gm.recompile()
    return c.captured.gm, placements


def _parameters(c: Candidates, choice: Choice, rank: int, load: Load | None) -> dict[str, Placement]:
    """Edit 1: every parameter becomes a fresh tensor (this rank's slice where Shard), so the
    user's model is never aliased; tied names share one. Returns each name's placement."""
    gm = c.captured.gm
    graph = gm.graph
    n = c.world_size
    aliases: dict[int, list[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    placements: dict[str, Placement] = {name: Replicate() for ids in aliases.values() for name in ids}
    for node in graph.nodes:
        if node.op != "get_attr" or c.nodes.get(node.name) is None or c.nodes[node.name].kind is not NodeKind.PARAM:
            continue
        full = fetch_attr(gm, node.target)
        place = value_placement(c, choice, node.name)
        names = aliases.get(id(full), [node.target])
        local = (load(names, full, place) if load is not None
                 else shard_tensor(full.detach(), place, rank, n).clone())
        new = nn.Parameter(local, requires_grad=full.requires_grad)
        for alias in aliases.get(id(full), [node.target]):
            set_attr(gm, alias, new)
            placements[alias] = place
    for ids in aliases.values():  # unused parameters: copy them too
        obj = fetch_attr(gm, ids[0])
        if all(not isinstance(placements.get(a), Shard) for a in ids):
            if not any(node.op == "get_attr" and node.target in ids for node in graph.nodes):
                if load is not None:
                    local = load(ids, obj, Replicate())
                elif obj.device.type == "meta":
                    continue
                else:
                    local = obj.detach().clone()
                new = nn.Parameter(local, requires_grad=obj.requires_grad)
                for a in ids:
                    set_attr(gm, a, new)
    return placements


def _state(c: Candidates, choice: Choice, rank: int) -> dict[str, Placement]:
    """Edit 1b: every buffer the program writes in place (a static KV cache) becomes this
    rank's piece of it, a fresh tensor (zeros where the full one is on meta), so writes stay
    on this rank's shard. Returns each such buffer's placement."""
    gm = c.captured.gm
    out: dict[str, Placement] = {}
    for name, nc in c.nodes.items():
        if nc.kind is not NodeKind.STATE:
            continue
        full = fetch_attr(gm, str(nc.target))
        place = value_placement(c, choice, name)
        if full.device.type == "meta":
            shape = list(full.shape)
            if isinstance(place, Shard):
                d = place.dim % len(shape)
                shape[d] = local_size(place, shape[d], c.world_size, rank)
            local = torch.zeros(shape, dtype=full.dtype)
        else:
            local = shard_tensor(full, place, rank, c.world_size).clone()
        set_attr(gm, str(nc.target), local)
        out[str(nc.target)] = place
    return out


def _transitions(c: Candidates, choice: Choice, comm: Comm) -> None:
    """Edits 2 and 3: a Redistribute before every consumer whose strategy needs another
    placement (or gradient placement) than its producer's, one per (value, need) for all
    its consumers; then the rule's ``localize`` makes shape arguments local (head counts)."""
    gm = c.captured.gm
    graph = gm.graph
    n, rank = c.world_size, comm.rank
    metas = c.captured.metas
    made: dict[tuple[str, Placement, Placement], fx.Node] = {}
    count = 0
    for node in list(graph.nodes):
        nc = c.nodes.get(node.name)
        if nc is None or nc.kind not in (NodeKind.OP, NodeKind.OUTPUT):
            continue
        st = nc.strategies[choice[node.name]]
        slot = 0

        def swap(a: object) -> object:
            nonlocal slot, count
            if not (isinstance(a, fx.Node) and isinstance(metas.get(a.name), TensorMeta)):
                return a
            i = slot
            slot += 1
            p = value_placement(c, choice, a.name)
            q, gk = c.need(node.name, st, i)  # gk None: the value has no gradient
            g = st.grad_placement(i) if gk is None else gk
            if p == q and (gk is None or g == (p if isinstance(p, Shard) else Replicate())):
                return a
            key = (a.name, q, gk)
            if key not in made:
                target = f"autotp_redistribute_{count}"
                count += 1
                meta = metas[a.name]
                shape = tuple(None if dyn else size for size, dyn in zip(meta.shape, meta.dynamic))
                where = f"{a.name} ({c.nodes[c.followers.get(a.name, (a.name, 0))[0]].module or '<root>'})"
                gm.add_submodule(target, Redistribute(comm, p, q, g, shape, where))
                with graph.inserting_before(node):
                    made[key] = graph.call_module(target, (a,))
                made[key].meta = dict(a.meta)
            return made[key]

        node.args = pytree.tree_map(swap, node.args)
        node.kwargs = pytree.tree_map(swap, node.kwargs)
        if slot != len(st.inputs):
            raise AutoTPInternalError(f"{node.format_node()} has {slot} tensor inputs but its "
                                      f"strategy {st} places {len(st.inputs)}")
        rule = rule_for(node)  # a fallback node runs replicated: its global sizes are local
        if rule is not None and rule.localize is not None and not nc.fallback:
            rule.localize(node, st, n, rank)
    for rn in made.values():  # an in-place consumer gets a fresh tensor, never a view
        if any(u.op == "call_function" and writes_first_arg(u.target) and u.args and u.args[0] is rn
               for u in rn.users):
            gm.get_submodule(rn.target).fresh = True


class SplitRandom(nn.Module):
    """A random op run on this rank's split of its output: ``draws(split, args, kwargs)``
    draws the full-size value and keeps this rank's slice (see ``SplitDraw``)."""

    def __init__(self, op: object, split: SplitDraw):
        super().__init__()
        self.op, self.split = op, split
        self.draws = op_info(op).draws

    def forward(self, *args: object, **kwargs: object) -> object:
        return self.draws(self.split, args, kwargs)

    def extra_repr(self) -> str:
        return f"{self.op}, output {self.split.place}"


def _random_draws(c: Candidates, choice: Choice, comm: Comm) -> None:
    """Edit 4: every random op whose output is split draws like one device (``SplitRandom``)."""
    gm = c.captured.gm
    metas = c.captured.metas
    count = 0
    for node in list(gm.graph.nodes):
        nc = c.nodes.get(node.name)
        if nc is None or nc.kind is not NodeKind.OP or node.op != "call_function" or not random_op(node.target):
            continue
        place = nc.strategies[choice[node.name]].outputs()[0]
        if not isinstance(place, Shard):
            continue
        if op_info(node.target).draws is None:  # rules/: a random op with a rule has ``draws``
            raise AutoTPInternalError(f"{node.format_node()} is random and split but its op has no "
                                      "``draws`` fact: it would draw other numbers than one device")
        meta = metas[node.name]
        d = place.dim % len(meta.shape)
        size = None if meta.dynamic[d] else int(meta.shape[d])
        target = f"autotp_random_{count}"
        count += 1
        gm.add_submodule(target, SplitRandom(node.target, SplitDraw(place, size, comm.rank, c.world_size)))
        node.op, node.target = "call_module", target  # same node and name: plans still read it
