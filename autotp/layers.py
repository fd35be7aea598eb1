"""Repeated layers: capture a stack of identical layers once for a few layers, then replicate.

A *stack* is a module whose children are named 0, 1, ..., L-1 (``nn.ModuleList``,
``nn.Sequential``) and are structurally identical: same class, same submodules, same
parameter and buffer names, shapes, dtypes and ``requires_grad``, none shared with another
module. Names mean nothing here; the test is the module tree.

torch.export costs about 0.15 s per Llama-70B layer on a 2-core machine (fake tensors,
symbolic shapes, fx bookkeeping), so capture exports the model with every stack of more than
KEEP + 1 = 4 layers cut to layers 0, 1, 2 and L-1 (the container's children are swapped for
the export and put back in a ``finally``), then rebuilds the full-depth graph:

1. ``_verify`` (before the export): the model's Python code must do at full depth what it
   does cut. One forward of the cut model on fake tensors records every torch call outside
   the layers and each layer call as one event (where each argument came from: the previous
   layer's output, the n-th call before the layers, a parameter; other values by value), and
   which attributes each kept layer's modules read (``_watch``). One forward of the full model
   with every layer stubbed (it returns fresh tensors shaped like its representative's
   output) must record the same, layer for layer (layers 3..L-2 against layer 2): the code
   around the layers and what each layer is given. A layer runs its representative's code
   (same class) on the same arguments; if no attribute in which it differs from its
   representative (HF's ``layer_idx``) was read by the representative, it runs the same
   calls; else it runs alone on meta tensors and its calls are compared (``_layer_events``).
   Assumed: a layer's forward depends on its class, its own attributes and parameters and its
   arguments, not on mutable global state or ``vars(self)``.
2. ``_segments``: the cut graph is  pre | layer 0 | layer 1 | layer 2 | layer L-1 | post  in
   node order (a layer's segment also holds the nodes between it and the next layer, as the
   parent's loop emits them). Layer 2's segment must be a copy of layer 1's (``_shape_of``):
   the same ops, arguments, shapes and module paths, with references to its own parameters by
   relative name, to the previous layer at the same offsets and to anything else identical.
3. ``_expand``: layer 2's segment is copied for layers 3..L-2 (its references to the
   previous layer moved to the previous copy), the last layer's nodes are renamed L-1 and
   the parameters of layers 3..L-1 are attached under their own names.

Anything unexpected raises ``Unsupported`` and capture falls back to the full export, so the
fast path changes time, never the graph. ``canonical_names`` renames every node in fx's own
scheme (op, op_1, op_2 ... in graph order) after either path: a full export and a cut one
give the same graph, node names included (tests/test_layers.py compares them).
"""
from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree  # see capture.py: no public pytree in torch 2.13

log = logging.getLogger(__name__)
KEEP = 3  # layers 0..KEEP-1 and the last are exported; layer KEEP-1 is the template


class Unsupported(Exception):
    """The cut capture can't be used for this model; capture exports the whole model."""


@dataclass(frozen=True)
class Stack:
    path: str  # module path of the container, e.g. "model.layers"
    size: int  # number of layers

    def layer(self, i: int) -> str:
        return f"{self.path}.{i}" if self.path else str(i)


# ---------------------------------------------------------------------------------------------
# finding stacks

def _signature(m: nn.Module) -> tuple:
    sig: list[tuple] = [(name, type(sub), sub.training) for name, sub in m.named_modules()]
    sig += [("p", n, tuple(p.shape), p.dtype, p.requires_grad)
            for n, p in m.named_parameters(remove_duplicate=False)]
    sig += [("b", n, tuple(b.shape), b.dtype) for n, b in m.named_buffers(remove_duplicate=False)]
    return tuple(sig)


def find_stacks(model: nn.Module, min_size: int = 2) -> tuple[Stack, ...]:
    """The outermost containers of ``min_size`` or more structurally identical layers."""
    mods = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    tensors = Counter(id(t) for _, t in model.named_parameters(remove_duplicate=False))
    tensors.update(id(t) for _, t in model.named_buffers(remove_duplicate=False))
    stacks: list[Stack] = []
    for path, mod in model.named_modules():
        if any(path.startswith(s.path + ".") for s in stacks):
            continue
        keys = list(mod._modules)
        if len(keys) < min_size or keys != [str(i) for i in range(len(keys))]:
            continue
        kids = list(mod._modules.values())
        if any(k is None for k in kids):
            continue
        if any(mods[id(sub)] != 1 for k in kids for sub in k.modules()) or \
                any(tensors[id(t)] != 1 for k in kids for t in (*k.parameters(), *k.buffers())):
            continue  # a layer shares a module or tensor with another: not replicable
        sig = _signature(kids[0])
        if all(_signature(k) == sig for k in kids[1:]):
            stacks.append(Stack(path, len(kids)))
    return tuple(stacks)


def kept(stack: Stack) -> list[int]:
    """Original layer index of each layer in the cut model."""
    return list(range(KEEP)) + [stack.size - 1]


@contextmanager
def _cut(model: nn.Module, stacks: tuple[Stack, ...]) -> Iterator[None]:
    saved = []
    try:
        for s in stacks:
            mod = model.get_submodule(s.path)
            kids = list(mod._modules.values())
            saved.append((mod, mod._modules))
            object.__setattr__(mod, "_modules", {str(j): kids[i] for j, i in enumerate(kept(s))})
        yield
    finally:
        for mod, modules in saved:
            object.__setattr__(mod, "_modules", modules)


# ---------------------------------------------------------------------------------------------
# verification: the torch calls of every layer, on fake tensors

class _Recorder(TorchFunctionMode):
    """Records each torch call as (function, canonical args, canonical kwargs) in the region
    (before the first layer, or a layer up to the next layer's start) where it happened.
    Canonical: a tensor is named by where it came from (this region's n-th call, the one
    ``back`` regions ago, a parameter, an input), everything else by value or type."""

    def __init__(self, names: dict[int, str], inputs: dict[int, int],
                 owner: Callable[[str], tuple[Any, str] | None]):
        super().__init__()
        self.names, self.inputs, self.owner = names, inputs, owner
        self.keys: list[Any] = ["pre"]
        self.regions: list[list[tuple]] = [[]]
        self.where: dict[int, tuple[int, int, int]] = {}
        self.alive: list[Any] = []  # keeps tensors alive so their ids stay unique
        self.paused = 0
        self.reads: dict[Any, set[tuple[str, str]]] = {}  # layer -> (submodule, attribute) read

    def start(self, key: Any) -> None:
        self.keys.append(key)
        self.regions.append([])

    def canon(self, x: Any, r: int | None = None) -> Any:
        r = len(self.regions) - 1 if r is None else r
        if isinstance(x, torch.Tensor):
            name = self.names.get(id(x))
            if name is not None:
                own = self.owner(name)
                if own is not None and own[0] == self.keys[r]:
                    return ("own", own[1])
                return ("param", name)
            w = self.where.get(id(x))
            if w is not None:
                return ("pre", w[1], w[2]) if w[0] == 0 else ("back", r - w[0], w[1], w[2])
            if id(x) in self.inputs:
                return ("input", self.inputs[id(x)])
            return ("tensor", tuple(x.shape), x.dtype)
        if isinstance(x, (list, tuple)):
            return (type(x).__name__, tuple(self.canon(v, r) for v in x))
        if isinstance(x, dict):
            return ("dict", tuple((k, self.canon(v, r)) for k, v in x.items()))
        if isinstance(x, slice):
            return ("slice", self.canon(x.start, r), self.canon(x.stop, r), self.canon(x.step, r))
        if x is None or isinstance(x, (bool, int, str)):
            return (type(x).__name__, x)
        if isinstance(x, float):
            return ("float", repr(x))
        if isinstance(x, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            return (type(x).__name__, str(x))
        if isinstance(x, nn.Module):
            return ("module", type(x))
        if callable(x):
            return ("callable", getattr(x, "__qualname__", type(x).__name__))
        return ("object", type(x).__qualname__)

    def record(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        r = len(self.regions) - 1
        region = self.regions[r]
        region.append((func, self.canon(args, r), self.canon(kwargs, r)))
        for j, t in enumerate(pytree.tree_leaves(out)):
            if isinstance(t, torch.Tensor):
                self.where[id(t)] = (r, len(region) - 1, j)
                self.alive.append(t)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.paused:
            self.record(func, args, kwargs, out)
        return out


def _like(out: Any) -> Any:
    """Fresh tensors shaped like ``out``'s (under the active fake mode: fake ones)."""
    return pytree.tree_map(lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
                           if isinstance(t, torch.Tensor) else t, out)


@dataclass
class _Call:
    args: tuple
    kwargs: dict
    out: Any


def _trace(model: nn.Module, args: tuple, kwargs: dict, stacks: tuple[Stack, ...],
           fake_of: dict[int, torch.Tensor], fake_mode: Any, names: dict[int, str],
           index_of: Callable[[Stack, int], int], stub: Callable[[tuple[str, int]], Any] | None
           ) -> tuple[_Recorder, dict[tuple[str, int], _Call]]:
    """One forward of ``model`` on fake tensors, recording the torch calls outside the stacks'
    layers and each layer call as one event (its arguments, canonical). A layer runs for
    real, unrecorded, or (``stub``) returns fresh tensors shaped like ``stub(key)``."""
    pats = [(s, _layer_re(s)) for s in stacks]

    def owner(name: str) -> tuple[tuple[str, int], str] | None:
        for s, pat in pats:
            m = pat.match(name)
            if m:
                return (s.path, int(m.group(1))), name[m.end():]
        return None

    state = {}
    for n, t in (*model.named_parameters(remove_duplicate=False),
                 *model.named_buffers(remove_duplicate=False)):
        state[n] = fake_of[id(t)]
    with fake_mode:
        flat, spec = pytree.tree_flatten((args, kwargs))
        fflat = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in flat]
        fargs, fkwargs = pytree.tree_unflatten(fflat, spec)
    inputs = {id(x): i for i, x in enumerate(fflat) if isinstance(x, torch.Tensor)}
    rec = _Recorder(names, inputs, owner)
    calls: dict[tuple[str, int], _Call] = {}
    swapped = []
    watched: dict[int, tuple[tuple[str, int], str]] = {}
    for s in stacks:
        for j, layer in enumerate(model.get_submodule(s.path)._modules.values()):
            key = (s.path, index_of(s, j))
            if stub is None:
                watched.update({id(m): (key, path) for path, m in layer.named_modules()})

            def forward(*a: Any, _key: tuple = key, _real: Callable = layer.forward, **kw: Any) -> Any:
                rec.start(_key)
                rec.paused += 1
                try:
                    out = _real(*a, **kw) if stub is None else _like(stub(_key))
                finally:
                    rec.paused -= 1
                rec.record(("layer",), a, kw, out)
                calls[_key] = _Call(a, kw, out)
                return out
            swapped.append((layer, layer.__dict__.get("forward")))
            layer.forward = forward
    reads: dict[tuple[str, int], set[tuple[str, str]]] = defaultdict(set)

    def read(m: object, name: str) -> None:
        where = watched.get(id(m))
        if where is not None:
            reads[where[0]].add((where[1], name))
    try:
        with fake_mode, rec, torch.no_grad(), _watch(model, watched, read):
            torch.func.functional_call(model, state, fargs, fkwargs, strict=False)
    finally:
        for layer, had in swapped:
            if had is None:
                del layer.forward
            else:
                layer.forward = had
    rec.reads = dict(reads)
    return rec, calls


@contextmanager
def _watch(model: nn.Module, ids: dict[int, Any], read: Callable[[object, str], None]) -> Iterator[None]:
    """Log every attribute read of the modules in ``ids`` (their class is swapped for a
    subclass whose ``__getattribute__`` logs, and put back)."""
    subclasses: dict[type, type] = {}
    swapped = []

    def watching(cls: type) -> type:
        if cls not in subclasses:
            def __getattribute__(self: Any, name: str, _cls: type = cls) -> Any:
                if not name.startswith("__"):
                    read(self, name)
                return _cls.__getattribute__(self, name)
            subclasses[cls] = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__,
                                                          "__module__": cls.__module__,
                                                          "__qualname__": cls.__qualname__})
        return subclasses[cls]
    try:
        for m in model.modules():
            if id(m) in ids:
                cls = type(m)
                m.__class__ = watching(cls)
                swapped.append((m, cls))
        yield
    finally:
        for m, cls in swapped:
            m.__class__ = cls


_MODULE_KEYS = frozenset(vars(nn.Module()))  # nn.Module's own bookkeeping (hooks, ...)


def _differing(a: nn.Module, b: nn.Module) -> set[tuple[str, str]]:
    """(submodule path, attribute) whose values differ between two identical-shaped layers."""
    out = set()
    subs_b = dict(b.named_modules())
    for path, ma in a.named_modules():
        mb = subs_b[path]
        da, db = vars(ma), vars(mb)
        for k in (da.keys() | db.keys()) - _MODULE_KEYS:
            x, y = da.get(k, _MISSING), db.get(k, _MISSING)
            if x is y:
                continue
            try:
                same = type(x) is type(y) and not isinstance(x, torch.Tensor) and bool(x == y)
            except Exception:  # noqa: BLE001 - not comparable: count it as different
                same = False
            if not same:
                out.add((path, k))
    return out


_MISSING = object()


def _layer_events(layer: nn.Module, call: _Call, fake: Any | None) -> tuple:
    """The torch calls of one layer's forward on ``call``'s arguments, run alone on meta
    tensors (no fake-tensor bookkeeping: ~20x cheaper), or on fake ones (``fake``: a mode)
    when the layer needs values (data-dependent code)."""
    flat, spec = pytree.tree_flatten((call.args, call.kwargs))
    inputs: dict[int, int] = {}

    def fresh(t: torch.Tensor) -> torch.Tensor:
        m = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        return fake.from_tensor(m) if fake is not None else m
    for i, x in enumerate(flat):
        if isinstance(x, torch.Tensor):
            flat[i] = fresh(x)
            inputs[id(flat[i])] = i
    a, kw = pytree.tree_unflatten(flat, spec)
    state = {n: fresh(t) for n, t in (*layer.named_parameters(remove_duplicate=False),
                                      *layer.named_buffers(remove_duplicate=False))}
    rec = _Recorder({id(t): n for n, t in state.items()}, inputs, lambda n: ("pre", n))
    with (fake if fake is not None else contextlib.nullcontext()), rec, torch.no_grad():
        out = torch.func.functional_call(layer, state, a, kw, strict=False)
    return tuple(rec.regions[0]), rec.canon(out)


def _verify(model: nn.Module, args: tuple, kwargs: dict, stacks: tuple[Stack, ...]) -> None:
    """The full model runs as the cut one, layer for layer (see the module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_of: dict[int, torch.Tensor] = {}
    names: dict[int, str] = {}
    for n, t in (*model.named_parameters(remove_duplicate=False),
                 *model.named_buffers(remove_duplicate=False)):
        if id(t) not in fake_of:
            fake_of[id(t)] = mode.from_tensor(t)
            names[id(fake_of[id(t)])] = n
    by_path = {s.path: s for s in stacks}

    def rep(key: Any) -> Any:
        if key == "pre":
            return key
        s = by_path[key[0]]
        return key if key[1] < KEEP or key[1] == s.size - 1 else (key[0], KEEP - 1)

    with _cut(model, stacks):
        cut, cut_calls = _trace(model, args, kwargs, stacks, fake_of, mode, names,
                                lambda s, j: kept(s)[j], None)
    # the full model with every layer stubbed by its representative's output: checks the
    # code around the layers and what each layer is given
    full, calls = _trace(model, args, kwargs, stacks, fake_of, mode, names, lambda s, j: j,
                         lambda key: cut_calls[rep(key)].out)
    want = [k for k in full.keys if k == "pre" or rep(k) == k]
    if cut.keys != want or len(full.keys) != 1 + sum(s.size for s in stacks):
        raise Unsupported("the layers do not run once each, in order")
    regions = dict(zip(cut.keys, cut.regions))
    for key, events in zip(full.keys, full.regions):
        if events != regions[rep(key)]:
            raise Unsupported(f"the code around layer {key} differs from that around layer "
                              f"{rep(key)} of the cut model (it depends on the index or depth)")
    # each layer: it is given what its representative was (above); its forward is the same
    # code (same class); it reads the same attribute values (below), so it runs the same. A
    # layer whose differing attributes its representative read is run alone and compared.
    for s in stacks:
        layers = list(model.get_submodule(s.path)._modules.values())
        ref: dict[int, tuple] = {}
        fake = None
        for i, layer in enumerate(layers):
            r = rep((s.path, i))[1]
            if not (_differing(layer, layers[r]) & cut.reads.get((s.path, r), set())):
                continue
            if r not in ref:
                try:
                    ref[r] = _layer_events(layers[r], cut_calls[(s.path, r)], fake)
                except Exception:  # noqa: BLE001 - data-dependent code: use fake tensors
                    fake = FakeTensorMode(allow_non_fake_inputs=True)
                    ref = {r: _layer_events(layers[r], cut_calls[(s.path, r)], fake)}
            if _layer_events(layer, calls[(s.path, i)], fake) != ref[r]:
                raise Unsupported(f"layer {i} of {s.path or 'the model'} does not run the same "
                                  f"torch calls as layer {r}")


# ---------------------------------------------------------------------------------------------
# the cut graph: segments, the template check, expansion

def _prefix(stack: Stack) -> str:
    return stack.path + "." if stack.path else ""


def _layer_re(stack: Stack) -> re.Pattern:
    return re.compile(re.escape(_prefix(stack)) + r"(\d+)(?:\.|$)")


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
    n_keep = KEEP + 1
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
            if a in back:
                return ("prev", back[a])
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


def _check_refs(nodes: list[fx.Node], allowed: set[fx.Node], forbidden: set[fx.Node], what: str) -> None:
    for n in nodes:
        for a in n.all_input_nodes:
            if a in forbidden and a not in allowed:
                raise Unsupported(f"{what} reads {a.name} of an earlier layer")


def _expand(gm: fx.GraphModule, g: fx.Graph, model: nn.Module, stack: Stack) -> fx.Graph:
    """The graph ``g`` of the cut model with ``stack`` at full depth (a new Graph; the layers'
    parameters are attached to ``gm``)."""
    sg = _segments(g, stack)
    t = KEEP - 1  # template layer
    last = stack.size - 1
    if list(sg.attrs[t]) != list(sg.attrs[t - 1]):
        raise Unsupported("layers read different parameters")
    if _shape_of(sg.segs[t], sg.segs[t - 1], sg.attrs[t], stack.layer(t)) != \
            _shape_of(sg.segs[t - 1], sg.segs[t - 2], sg.attrs[t - 1], stack.layer(t - 1)):
        raise Unsupported(f"layer {t} is not a copy of layer {t - 1} in the captured graph")
    early = {n for seg in sg.segs[:t] for n in seg}
    _check_refs(sg.segs[t], set(sg.segs[t - 1]), early, f"layer {t}")
    _check_refs(sg.segs[KEEP], set(), early, "the last layer")
    _check_refs(sg.post, set(sg.segs[0]), early | set(sg.segs[t]), "the code after the layers")
    for rel in sg.attrs[KEEP]:
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
    last_seg = set(sg.segs[KEEP])
    attr_rel = {n: rel for rel, n in sg.attrs[KEEP].items()}
    tpl_attr_rel = {n: rel for rel, n in n_attrs_t.items()}

    new = fx.Graph()
    new._codegen = g._codegen
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
        for i in range(KEEP, last):
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
            c.meta = _rename_stack(node.meta, stack.layer(KEEP), stack.layer(last)) \
                if in_last else node.meta
            env[node] = c
            continue
        env[node] = new.node_copy(node, lambda a: env[a])
        if node in groups:
            for i in range(KEEP, last):
                layer_attrs.setdefault(i, {}).update(
                    {tpl_attr_rel[n]: attr(f"{stack.layer(i)}.{tpl_attr_rel[n]}", n) for n in groups[node]})
        if tpl and node is tpl[-1]:
            emit_copies()
    # parameters, buffers (and tensor attributes the graph reads) of layers KEEP..L-1 under
    # their own names, where the cut model's last layer was
    container = gm.get_submodule(stack.path)
    src = list(model.get_submodule(stack.path)._modules.values())
    mods: dict[str, nn.Module] = {}
    for k, v in container._modules.items():
        if k != str(KEEP):
            mods[k] = v
            continue
        for i in range(KEEP, stack.size):
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
    object.__setattr__(container, "_modules", mods)
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
    """The model's graph, exported with each stack cut to KEEP + 1 layers and replicated:
    the exported module (the layers' parameters attached) and the full graph, which the
    caller installs (``gm.graph = ...`` recompiles the module's code: once is enough)."""
    stacks = tuple(s for s in stacks if s.size > KEEP + 1)
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


def canonical_names(g: fx.Graph) -> fx.Graph:
    """``g`` with call nodes renamed in fx's scheme in graph order (op, op_1, ...): export's
    names have gaps where it deleted nodes, which differ between a full and a cut capture."""
    new = fx.Graph()
    new._codegen = g._codegen
    env: dict[fx.Node, fx.Node] = {}
    for node in g.nodes:
        name = node.name if node.op in ("placeholder", "output", "get_attr", "call_module") \
            else re.sub(r"_\d+$", "", node.name)
        c = new.create_node(node.op, node.target, fx.map_arg(node.args, lambda a: env[a]),
                            fx.map_arg(node.kwargs, lambda a: env[a]), name=name, type_expr=node.type)
        c.meta = node.meta
        env[node] = c
    return new


__all__ = ["Stack", "Unsupported", "canonical_names", "capture_cut", "find_stacks", "kept"]
