"""Normalization passes over a captured graph, fx-pass style (each edits the Graph in place and
returns nothing), run in this order by ``capture``: drop export's runtime asserts, merge tied
get_attrs, split fused bias ops (as the op registry's ``unbias`` fact says), then
``canonical_names`` renames every node in fx's own scheme (op, op_1, ... in graph order), last:
the metas of every later stage are keyed by those names."""
from __future__ import annotations

import re



import torch
import torch.fx as fx

from autotp.rules import op_info
from autotp._compat import copy_codegen
from autotp.core.attrs import fetch_attr

aten = torch.ops.aten


def _drop_asserts(g: fx.Graph) -> None:
    for node in list(g.nodes):
        if node.op == "call_function" and node.target is aten._assert_tensor_metadata.default:
            g.erase_node(node)


def _merge_tied_get_attrs(gm: fx.GraphModule, g: fx.Graph) -> None:
    first: dict[int, fx.Node] = {}
    for node in list(g.nodes):
        if node.op != "get_attr":
            continue
        obj = fetch_attr(gm, node.target)
        if not isinstance(obj, torch.Tensor):
            continue
        keep = first.setdefault(id(obj), node)
        if keep is not node:
            node.replace_all_uses_with(keep)
            g.erase_node(node)
        elif not node.users:
            g.erase_node(node)
            del first[id(obj)]


def _split_bias(g: fx.Graph) -> None:
    """op(x, W, b) -> op'(x, W) + b for every node whose registry entry has an ``unbias``
    fact (linear, addmm: rules/matmul.py)."""
    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        unbias = op_info(node.target).unbias
        split = unbias(node) if unbias is not None else None
        if split is None:
            continue
        target, args, b = split
        with g.inserting_before(node):
            mm = g.call_function(target, args)
        mm.meta = dict(node.meta)
        with g.inserting_after(mm):
            add = g.call_function(aten.add.Tensor, (mm, b))
        add.meta = dict(node.meta)
        node.replace_all_uses_with(add)
        g.erase_node(node)


def canonical_names(g: fx.Graph) -> fx.Graph:
    """``g`` with call nodes renamed in fx's scheme in graph order (op, op_1, ...): export's
    names have gaps where it deleted nodes, which differ between a full and a cut capture."""
    new = fx.Graph()
    copy_codegen(new, g)
    env: dict[fx.Node, fx.Node] = {}
    for node in g.nodes:
        name = node.name if node.op in ("placeholder", "output", "get_attr", "call_module") \
            else re.sub(r"_\d+$", "", node.name)
        c = new.create_node(node.op, node.target, fx.map_arg(node.args, lambda a: env[a]),
                            fx.map_arg(node.kwargs, lambda a: env[a]), name=name, type_expr=node.type)
        c.meta = node.meta
        env[node] = c
    return new
