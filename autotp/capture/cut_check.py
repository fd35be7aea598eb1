"""Step 1 of a cut capture (see stacks.py): the model's Python code must do at full depth what it
does cut. ``_verify`` records one forward of the cut model on fake tensors (every torch call
outside the layers, each layer call as one event, the attributes each kept layer reads) and one
forward of the full model with its layers stubbed, and compares them layer for layer;
``_layer_events`` runs a layer that differs from its representative in an attribute it reads
alone on meta tensors. Anything unexpected raises ``Unsupported``."""
from __future__ import annotations

import contextlib
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from autotp._compat import FakeTensorMode, pytree, swap_class
from autotp.capture.stacks import Stack, Unsupported, _cut, _layer_re, kept


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


def fake_params(model: nn.Module, mode: Any) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
    """A fake tensor under ``mode`` for each parameter and buffer of ``model`` (tied ones
    once), by the real tensor's id, and each fake tensor's first name, by its id."""
    fake_of: dict[int, torch.Tensor] = {}
    names: dict[int, str] = {}
    for n, t in (*model.named_parameters(remove_duplicate=False),
                 *model.named_buffers(remove_duplicate=False)):
        if id(t) not in fake_of:
            fake_of[id(t)] = mode.from_tensor(t)
            names[id(fake_of[id(t)])] = n
    return fake_of, names


def fake_state(model: nn.Module, fake_of: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``model``'s state by every name (tied ones under each), as fake tensors."""
    return {n: fake_of[id(t)] for n, t in (*model.named_parameters(remove_duplicate=False),
                                           *model.named_buffers(remove_duplicate=False))}


def fake_call(mode: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict, dict[int, int]]:
    """The call's arguments with every tensor made fake under ``mode``, and each fake
    input's position among the call's leaves, by its id (``_Recorder``'s ``inputs``)."""
    with mode:
        flat, spec = pytree.tree_flatten((args, kwargs))
        fflat = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in flat]
        fargs, fkwargs = pytree.tree_unflatten(fflat, spec)
    return fargs, fkwargs, {id(x): i for i, x in enumerate(fflat) if isinstance(x, torch.Tensor)}


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

    state = fake_state(model, fake_of)
    fargs, fkwargs, inputs = fake_call(fake_mode, args, kwargs)
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
                swap_class(m, watching(cls))
                swapped.append((m, cls))
        yield
    finally:
        for m, cls in swapped:
            swap_class(m, cls)


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
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_of, names = fake_params(model, mode)
    by_path = {s.path: s for s in stacks}

    def rep(key: Any) -> Any:
        if key == "pre":
            return key
        s = by_path[key[0]]
        return key if key[1] < s.keep or key[1] == s.size - 1 else (key[0], s.keep - 1)

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
