"""Layer units: this rank's graph with each layer of a stack run as one call of its own module,
so that FSDP2 can gather a layer's parameters just before the layer runs and free them after
(and again in backward), one layer at a time.

The rewritten graph reads every parameter as an attribute (``get_attr``) and never calls the
model's submodules, so FSDP's hooks, which fire around a module's forward, would see one call:
the whole program. ``outline_layers`` moves the nodes of layer ``i`` (a contiguous region in
graph order: the decision nodes ``Candidates.layers`` assigns to it, everything between its
first and last, and the ``get_attr`` nodes of its own parameters) into a GraphModule of their
own, installs that module's call as the layer module's method ``autotp_forward`` (so the
layer module, which owns the parameters in the model's tree, is the unit), and replaces the
region by ``_run_layer(layer, *inputs)``. Values the region reads from outside become its
inputs; values used after it, its outputs. Nothing is computed differently: the same nodes
run in the same order.

A region that holds another layer's node, or reads a parameter it does not own through a
module path it can't reach, is left in place (``outline_layers`` returns the layer paths it
did outline)."""
from __future__ import annotations

import operator
from typing import Any, Iterable

import torch.fx as fx
from torch import nn

from autotp.core.attrs import attach
from autotp.errors import AutoTPInternalError

METHOD = "autotp_forward"


def _run_layer(layer: nn.Module, *args: Any) -> Any:
    """The graph's call of one layer unit (FSDP wraps ``autotp_forward`` with its hooks)."""
    return getattr(layer, METHOD)(*args)


def _region(nodes: list[fx.Node], mine: set[str], others: set[str], path: str
            ) -> list[fx.Node] | None:
    """Layer ``path``'s nodes in graph order: its own get_attr nodes, and every call node from
    its first assigned node to its last. None when another layer's node lies between."""
    at = [i for i, n in enumerate(nodes) if n.name in mine and n.op != "get_attr"]
    if not at:
        return None
    lo, hi = at[0], at[-1]
    index = {n: i for i, n in enumerate(nodes)}
    region = []
    for i, n in enumerate(nodes):
        if n.op == "get_attr" and isinstance(n.target, str) and n.target.startswith(path + "."):
            if not all(lo <= index[u] <= hi for u in n.users):
                return None  # a parameter of this layer read outside it: leave the layer alone
            region.append(n)
        elif lo <= i <= hi:
            if n.op in ("placeholder", "output") or n.name in others:
                return None
            if n.op == "get_attr":
                continue  # another object's attribute: an input of the region
            region.append(n)
    return region


def outline_layers(gm: fx.GraphModule, layers: Iterable[tuple[str, Iterable[str]]]) -> list[str]:
    """Outline each ``(layer module path, its node names)`` of ``gm`` into a unit (see the
    module docstring). Returns the paths outlined, in order."""
    layers = [(p, set(names)) for p, names in layers]
    assigned = set().union(*(names for _, names in layers)) if layers else set()
    done = []
    for path, mine in layers:
        nodes = list(gm.graph.nodes)
        region = _region(nodes, mine, assigned - mine, path)
        if region is None:
            continue
        layer = gm.get_submodule(path)
        _outline(gm, layer, path, region)
        done.append(path)
    gm.graph.lint()
    gm.recompile()
    return done


def _outline(gm: fx.GraphModule, layer: nn.Module, path: str, region: list[fx.Node]) -> None:
    inside = set(region)
    inputs: list[fx.Node] = []
    for n in region:
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs:
                inputs.append(a)
    outputs = [n for n in region if any(u not in inside for u in n.users)]
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in inputs:
        env[a] = g.placeholder(a.name)
        env[a].meta = dict(a.meta)
    modules: dict[str, nn.Module] = {}
    for n in region:
        if n.op == "get_attr":
            env[n] = g.get_attr("layer" + n.target[len(path):])
            env[n].meta = dict(n.meta)
        else:
            if n.op == "call_module":
                modules[n.target] = gm.get_submodule(n.target)
            env[n] = g.node_copy(n, lambda x: env[x])
    g.output(tuple(env[o] for o in outputs))
    unit = fx.GraphModule(nn.Module(), fx.Graph())
    unit.add_module("layer", layer)
    for target, mod in modules.items():  # collectives and random draws: the program's own
        attach(unit, target, mod)
    unit.graph = g  # recompiles
    # the unit is held by a closure, outside every module tree: the layer stays the one owner
    # of its parameters (FSDP and the model's state_dict see them there only)
    object.__setattr__(layer, METHOD, lambda *args: unit(*args))
    with gm.graph.inserting_after(region[-1]):
        holder = gm.graph.get_attr(path)
    with gm.graph.inserting_after(holder):
        call = gm.graph.call_function(_run_layer, (holder, *inputs))
    last = call
    for k, o in enumerate(outputs):
        with gm.graph.inserting_after(last):
            got = gm.graph.call_function(operator.getitem, (call, k))
        got.meta = dict(o.meta)
        o.replace_all_uses_with(got, delete_user_cb=lambda u: u not in inside)
        last = got
    for n in reversed(region):
        if n.users and not all(u in inside for u in n.users):
            raise AutoTPInternalError(f"outlining {path}: {n.format_node()} is still used outside")
        gm.graph.erase_node(n)
