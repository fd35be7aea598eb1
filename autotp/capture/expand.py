"""Steps 2 and 3 of a cut capture (see stacks.py): ``_segments`` splits the cut graph into
pre | layer 0 | layer 1 | layer 2 | layer L-1 | post and checks that layer 2's segment is a copy
of layer 1's (``_shape_of``); ``_expand`` copies layer 2's segment for layers 3..L-2, renames
the last layer's nodes L-1 and attaches the parameters of layers 3..L-1 under their own names.
``capture_cut`` runs the three steps. Anything unexpected raises ``Unsupported``."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn
from autotp._compat import copy_codegen, pytree, set_children
from autotp.capture.stacks import Stack, Unsupported, _cut, _layer_re, _prefix
from autotp.capture.cut_check import _verify


def _unit(node: fx.Node, pat: re.Pattern) -> int | None:
    if node.op == "get_attr":
        m = pat.match(str(node.target))
        return int(m.group(1)) if m else None
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        m = pat.match(path)
        if m:
            return int(m.group(1))
    return None


@dataclass
class _Segments:
    pre: list[fx.Node]
    segs: list[list[fx.Node]]  # per kept layer: its nodes and the nodes up to the next layer
    post: list[fx.Node]
    attrs: list[dict[str, fx.Node]]  # per kept layer: relative target -> its get_attr node
    attr_order: list[fx.Node]


def _segments(g: fx.Graph, stack: Stack) -> _Segments:
    pat = _layer_re(stack)
    n_keep = stack.keep + 1
    pre: list[fx.Node] = []
    segs: list[list[fx.Node]] = [[] for _ in range(n_keep)]
    post: list[fx.Node] = []
    attrs: list[dict[str, fx.Node]] = [{} for _ in range(n_keep)]
    attr_order = []
    cur = -1
    between = False  # the current layer's own nodes are over (nodes of no layer followed)
    for node in g.nodes:
        u = _unit(node, pat)
        if node.op == "get_attr":
            attr_order.append(node)
            if u is not None:
                attrs[u][str(node.target)[len(_prefix(stack)) + len(str(u)) + 1:]] = node
            continue
        if node.op == "call_module":  # export's input guards: they borrow a layer's metadata
            u = None
        if u is None:
            if cur < 0:
                pre.append(node)
            elif cur < n_keep - 1:
                segs[cur].append(node)  # between this layer and the next: the parent's loop
                between = True
            else:
                post.append(node)
            continue
        if u == cur and not between and not (cur == n_keep - 1 and post):
            segs[cur].append(node)
        elif u == cur + 1:
            cur, between = u, False
            segs[cur].append(node)
        else:
            raise Unsupported(f"the nodes of layer {u} are not one contiguous run in layer order")
    if cur != n_keep - 1:
        raise Unsupported("not every kept layer has nodes")
    return _Segments(pre, segs, post, attrs, attr_order)


def _rename_stack(meta: dict, old: str, new: str) -> dict:
    stack = meta.get("nn_module_stack")
    if not stack:
        return meta

    def sub(path: str) -> str:
        return new + path[len(old):] if path == old or path.startswith(old + ".") else path
    head = "L__self__"
    meta = dict(meta)
    meta["nn_module_stack"] = {(head + sub(k[len(head):]) if k.startswith(head) else k): (sub(p), t)
                               for k, (p, t) in stack.items()}
    return meta


def _shape_of(seg: list[fx.Node], prev: list[fx.Node], attrs: dict[str, fx.Node], prefix: str) -> list:
    """A layer segment with references made relative: comparable between layers."""
    here = {n: i for i, n in enumerate(seg)}
    back = {n: i for i, n in enumerate(prev)}
    own = {n: rel for rel, n in attrs.items()}

    def ref(a: Any) -> Any:
        if isinstance(a, fx.Node):
            if a in here:
                return ("self", here[a])
            if _size(a):  # a size computed in some earlier layer: the same value in every layer
                return ("size", str(a.meta["val"]))
            if a in back:  # from the end: the first layer may hold sizes the others read
                return ("prev", back[a] - len(prev))
            if a in own:
                return ("own", own[a])
            return ("node", a)
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(ref(x) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple((k, ref(v)) for k, v in a.items()))
        if isinstance(a, slice):
            return ("slice", ref(a.start), ref(a.stop), ref(a.step))
        if isinstance(a, float):
            return ("float", repr(a))
        return (type(a).__name__, a)

    def paths(n: fx.Node) -> tuple:
        return tuple(p[len(prefix):] if p == prefix or p.startswith(prefix + ".") else "/" + p
                     for p, _ in (n.meta.get("nn_module_stack") or {}).values())

    def val(n: fx.Node) -> Any:
        v = n.meta.get("val")
        leaves = pytree.tree_leaves(v)
        return tuple((tuple(str(s) for s in x.shape), x.dtype) if isinstance(x, torch.Tensor) else str(x)
                     for x in leaves)
    return [(n.op, n.target, ref(n.args), ref(n.kwargs), paths(n), val(n)) for n in seg]


def _size(n: fx.Node) -> bool:
    """A node whose value is an integer size (a SymInt expression of the inputs' dims, e.g.
    tokens x top_k). Export computes such a size once, in the first layer that needs it, and
    every later layer reads that node: it is the same value in every layer, so a layer may
    read it from any earlier one (the copies read it where it was computed, before them)."""
    return n.op == "call_function" and isinstance(n.meta.get("val"), (torch.SymInt, int)) \
        and not isinstance(n.meta.get("val"), bool)


def _check_refs(nodes: list[fx.Node], allowed: set[fx.Node], forbidden: set[fx.Node], what: str) -> None:
    for n in nodes:
        for a in n.all_input_nodes:
            if a in forbidden and a not in allowed and not _size(a):
                raise Unsupported(f"{what} reads {a.name} of an earlier layer")


def _expand(gm: fx.GraphModule, g: fx.Graph, model: nn.Module, stack: Stack) -> fx.Graph:
    """The graph ``g`` of the cut model with ``stack`` at full depth (a new Graph; the layers'
    parameters are attached to ``gm``).

    Longer than the rest on purpose: it is one pass of ``node_copy`` over the graph in which
    the environment that maps old nodes to new ones changes per emitted layer copy, and its
    helpers (``attr``, ``emit_copies``, ``arg``) close over that environment; split apart they
    would pass it around by hand. Every structural assumption was checked by ``_segments``
    and ``_shape_of`` before this runs."""
    sg = _segments(g, stack)
    t = stack.keep - 1  # template layer
    keep = stack.keep
    last = stack.size - 1
    if list(sg.attrs[t]) != list(sg.attrs[t - 1]):
        raise Unsupported("layers read different parameters")
    if _shape_of(sg.segs[t], sg.segs[t - 1], sg.attrs[t], stack.layer(t)) != \
            _shape_of(sg.segs[t - 1], sg.segs[t - 2], sg.attrs[t - 1], stack.layer(t - 1)):
        raise Unsupported(f"layer {t} is not a copy of layer {t - 1} in the captured graph")
    early = {n for seg in sg.segs[:t] for n in seg}
    _check_refs(sg.segs[t], set(sg.segs[t - 1]), early, f"layer {t}")
    _check_refs(sg.segs[keep], set(), early, "the last layer")
    _check_refs(sg.post, set(sg.segs[0]), early | set(sg.segs[t]), "the code after the layers")
    for rel in sg.attrs[keep]:
        if rel not in sg.attrs[t]:
            raise Unsupported("the last layer reads other parameters")
    n_attrs_t = sg.attrs[t]
    if not n_attrs_t:
        raise Unsupported("the layers have no parameters")
    # the template's get_attr nodes in contiguous groups (export lists parameters, then
    # buffers): each layer's copies go after the group they copy, as a full export has them
    tpl_attrs = set(n_attrs_t.values())
    groups: dict[fx.Node, list[fx.Node]] = {}  # last node of a group -> the group
    run: list[fx.Node] = []
    for n in sg.attr_order + [None]:
        if n in tpl_attrs:
            run.append(n)
        elif run:
            groups[run[-1]] = run
            run = []
    tpl = sg.segs[t]
    tpl_pos = {n: i for i, n in enumerate(tpl)}
    prev_pos = {n: i for i, n in enumerate(sg.segs[t - 1])}
    last_seg = set(sg.segs[keep])
    attr_rel = {n: rel for rel, n in sg.attrs[keep].items()}
    tpl_attr_rel = {n: rel for rel, n in n_attrs_t.items()}

    new = fx.Graph()
    copy_codegen(new, g)
    env: dict[fx.Node, fx.Node] = {}
    layer_attrs: dict[int, dict[str, fx.Node]] = {}
    copies_prev: list[fx.Node] = []

    def attr(target: str, like: fx.Node) -> fx.Node:
        n = new.create_node("get_attr", target, (), {}, name=target.replace(".", "_"))
        n.meta = dict(like.meta)
        return n

    def emit_copies() -> None:
        nonlocal copies_prev
        prev = [env[n] for n in tpl]
        for i in range(keep, last):
            here: dict[fx.Node, fx.Node] = {}

            def arg(a: fx.Node, i: int = i, here: dict = here, prev: list = prev) -> fx.Node:
                if a in here:
                    return here[a]
                if a in prev_pos:
                    return prev[prev_pos[a]]
                if a in tpl_attr_rel:
                    return layer_attrs[i][tpl_attr_rel[a]]
                return env[a]
            for n in tpl:
                c = new.create_node(n.op, n.target, fx.map_arg(n.args, arg), fx.map_arg(n.kwargs, arg),
                                    name=re.sub(r"_\d+$", "", n.name), type_expr=n.type)
                c.meta = _rename_stack(n.meta, stack.layer(t), stack.layer(i))
                here[n] = c
            prev = [here[n] for n in tpl]
        copies_prev = prev

    for node in g.nodes:
        if node.op == "get_attr" and node in attr_rel:
            env[node] = attr(f"{stack.layer(last)}.{attr_rel[node]}", node)
            continue
        if node in last_seg or node in sg.post:
            in_last = node in last_seg

            def arg(a: fx.Node, in_last: bool = in_last) -> fx.Node:
                # the last layer reads the previous layer: now the last copy
                return copies_prev[tpl_pos[a]] if in_last and a in tpl_pos else env[a]
            c = new.create_node(node.op, node.target, fx.map_arg(node.args, arg),
                                fx.map_arg(node.kwargs, arg), name=node.name, type_expr=node.type)
            c.meta = _rename_stack(node.meta, stack.layer(keep), stack.layer(last)) \
                if in_last else node.meta
            env[node] = c
            continue
        env[node] = new.node_copy(node, lambda a: env[a])
        if node in groups:
            for i in range(keep, last):
                layer_attrs.setdefault(i, {}).update(
                    {tpl_attr_rel[n]: attr(f"{stack.layer(i)}.{tpl_attr_rel[n]}", n) for n in groups[node]})
        if tpl and node is tpl[-1]:
            emit_copies()
    # parameters, buffers (and tensor attributes the graph reads) of layers keep..L-1 under
    # their own names, where the cut model's last layer was
    container = gm.get_submodule(stack.path)
    src = list(model.get_submodule(stack.path)._modules.values())
    mods: dict[str, nn.Module] = {}
    for k, v in container._modules.items():
        if k != str(keep):
            mods[k] = v
            continue
        for i in range(keep, stack.size):
            holder = nn.Module()
            for rel, p in src[i].named_parameters():
                _attach(holder, rel, p, "param")
            for rel, b in src[i].named_buffers():
                _attach(holder, rel, b, "buffer")
            for rel in n_attrs_t:
                if not _has(holder, rel):
                    _attach(holder, rel, src[i].get_submodule(rel.rpartition(".")[0]) if "." in rel
                            else src[i], "attribute")
            mods[str(i)] = holder
    set_children(container, mods)
    return new


def _has(root: nn.Module, dotted: str) -> bool:
    obj: Any = root
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _attach(root: nn.Module, dotted: str, t: Any, kind: str) -> None:
    """Put ``t`` at ``dotted`` under ``root`` as a parameter, a buffer, or (kind "attribute",
    ``t`` the module holding it) a plain attribute copied from that module."""
    *path, name = dotted.split(".")
    mod = root
    for part in path:
        if part not in mod._modules:
            mod.add_module(part, nn.Module())
        mod = mod._modules[part]
    if kind == "param":
        mod.register_parameter(name, t)
    elif kind == "buffer":
        mod.register_buffer(name, t)
    else:
        setattr(mod, name, getattr(t, name))


def capture_cut(model: nn.Module, args: tuple, kwargs: dict, stacks: tuple[Stack, ...],
                export: Callable[[nn.Module, tuple, dict], Any]) -> tuple[fx.GraphModule, fx.Graph]:
    """The model's graph, exported with each stack cut to keep + 1 layers and replicated:
    the exported module (the layers' parameters attached) and the full graph, which the
    caller installs (``gm.graph = ...`` recompiles the module's code: once is enough)."""
    stacks = tuple(s for s in stacks if s.size > s.keep + 1)
    if not stacks:
        raise Unsupported("no stack deeper than the layers a cut capture keeps")
    try:
        _verify(model, args, kwargs, stacks)
    except Unsupported:
        raise
    except Exception as e:  # any failure of the cut model means: export it all
        raise Unsupported(f"the cut model does not run on fake tensors: {type(e).__name__}: {e}") from e
    with _cut(model, stacks):
        gm = export(model, args, kwargs).module()
    g = gm.graph
    for s in stacks:
        try:
            g = _expand(gm, g, model, s)
        except Unsupported:
            raise
        except Exception as e:  # a graph this pass doesn't know: export it all
            raise Unsupported(f"replicating {s.path or 'the layers'} failed: {type(e).__name__}: {e}") from e
    return gm, g
