"""An eval-mode program derived from a train-mode capture, without exporting again.

torch.export freezes one mode: a model captured in train mode whose graph has dropout needs
another program for ``eval()``. Exporting it again costs as much as the first capture (most of
a first ``parallelize``). When the model's Python code takes the same path in both modes, the
eval graph *is* the train graph with each mode-dependent op in its eval form (a dropout with
``train=False`` is the identity; attention with ``dropout_p=0``): ``derive_eval`` makes that
edit instead, and refuses (returns None, so the caller exports) unless it can show the path is
the same.

The evidence: one forward of the model on fake tensors per mode, recording every torch call at
the Python level (``cut_check._Recorder``: each call's function and its arguments, tensors named
by where they came from). The two recordings must be equal call for call, except calls of the
functions in ``MODE_ARGS`` that differ only in their mode argument, and must return the same
outputs. The calls whose mode argument was *on* in train mode (dropout with p > 0 in training,
attention with dropout_p > 0) must be, in order, the graph's mode-dependent nodes
(``Captured.mode_sensitive``), each of the ATen op its function becomes; each such node's
registry entry says how to make it compute what eval mode does (``OpInfo.to_eval``). Code that
branches on ``self.training`` in any other way (extra ops, another output structure, a
buffer update, an always-on dropout) fails one of these checks, and the mode is exported.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from autotp._compat import FakeTensorMode, copy_codegen
from autotp.capture import Captured, _mode_sensitive
from autotp.capture.cut_check import _Recorder, fake_call, fake_params, fake_state
from autotp.rules import op_info

aten = torch.ops.aten


@dataclass(frozen=True)
class ModeArg:
    """A torch function whose argument ``name`` (positional index ``index``) carries the
    mode; ``on(bound)`` tells whether the call, as recorded, draws (its train form), and the
    ATen op it becomes in the graph."""
    name: str
    index: int
    on: Callable[[Callable[[str, int, Any], Any]], bool]
    aten: Any


def _value(canon: Any) -> Any:
    """A recorded scalar back as a value (``_Recorder.canon`` of a bool/int/float)."""
    kind, v = canon
    return float(v) if kind == "float" else v


MODE_ARGS: dict[Any, ModeArg] = {
    F.dropout: ModeArg("training", 2, lambda arg: bool(arg("p", 1, 0.5)) and bool(arg("training", 2, True)),
                       aten.dropout.default),
    torch.dropout: ModeArg("train", 2, lambda arg: bool(arg("p", 1, None)) and bool(arg("train", 2, None)),
                           aten.dropout.default),
    F.scaled_dot_product_attention: ModeArg("dropout_p", 4, lambda arg: bool(arg("dropout_p", 4, 0.0)),
                                            aten.scaled_dot_product_attention.default),
}


def _arg(event: tuple) -> Callable[[str, int, Any], Any]:
    _func, args, kwargs = event
    pos, kw = args[1], dict(kwargs[1])

    def get(name: str, index: int, default: Any) -> Any:
        if name in kw:
            return _value(kw[name])
        if index < len(pos):
            return _value(pos[index])
        return default
    return get


def _without(event: tuple, spec: ModeArg) -> tuple:
    """The event with its mode argument left out (wherever the call passed it)."""
    func, args, kwargs = event
    pos = tuple(v for i, v in enumerate(args[1]) if i != spec.index)
    kw = tuple((k, v) for k, v in kwargs[1] if k != spec.name)
    return (func, pos, kw)


def record(model: nn.Module, args: tuple, kwargs: dict) -> tuple[list[tuple], Any]:
    """Every torch call of one forward of ``model`` (in its current mode) on fake tensors,
    and its outputs, canonical (``_Recorder``)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_of, names = fake_params(model, mode)
    fargs, fkwargs, inputs = fake_call(mode, args, kwargs)
    rec = _Recorder(names, inputs, lambda _name: None)
    with torch.random.fork_rng(devices=[]), mode, rec, torch.no_grad():
        out = torch.func.functional_call(model, fake_state(model, fake_of), fargs, fkwargs, strict=False)
    return rec.regions[0], rec.canon(out)


def _why_not(train: tuple[list[tuple], Any], evl: tuple[list[tuple], Any],
             sensitive: list[fx.Node]) -> str | None:
    """Why the eval graph is not the train graph with ``sensitive`` in eval form (None: it is)."""
    (t_events, t_out), (e_events, e_out) = train, evl
    if len(t_events) != len(e_events):
        return f"eval mode runs {len(e_events)} torch calls, train mode {len(t_events)}"
    if t_out != e_out:
        return "the outputs differ between the modes"
    drawn = []
    for i, (a, b) in enumerate(zip(t_events, e_events)):
        if a == b:
            spec = MODE_ARGS.get(a[0])
            if spec is not None and spec.on(_arg(a)):
                return f"torch call {i} ({getattr(a[0], '__name__', a[0])}) draws in both modes"
            continue
        spec = MODE_ARGS.get(a[0])
        if spec is None or a[0] is not b[0] or _without(a, spec) != _without(b, spec):
            return f"torch call {i} ({getattr(a[0], '__name__', a[0])}) differs between the modes"
        if spec.on(_arg(b)):
            return f"torch call {i} ({getattr(a[0], '__name__', a[0])}) still draws in eval mode"
        if spec.on(_arg(a)):
            drawn.append(spec.aten)
    if [n.target for n in sensitive] != drawn:
        return (f"the graph's {len(sensitive)} mode-dependent nodes are not the {len(drawn)} "
                "calls that draw in train mode only")
    return None


def derive_eval(source: Captured, model: nn.Module, args: tuple, kwargs: dict) -> tuple[Captured | None, str]:
    """The eval-mode capture of ``model`` on ``args``/``kwargs`` made from ``source`` (its
    train-mode capture with the same call structure; not modified), or None and the reason
    it cannot be (then export the eval mode). ``model`` is left in the mode it was in."""
    if not source.training or not source.mode_sensitive:
        return None, "the source program is not a train-mode program with dropout"
    g = source.gm.graph
    names = set(source.mode_sensitive)
    sensitive = [n for n in g.nodes if n.name in names]
    bad = next((n for n in sensitive if op_info(n.target).to_eval is None), None)
    if bad is not None:
        return None, f"{bad.target} has no eval form"
    was = model.training
    try:
        model.train(True)
        train = record(model, args, kwargs)
        model.train(False)
        evl = record(model, args, kwargs)
    except Exception as e:  # noqa: BLE001 - a model that does not run on fake tensors: export it
        return None, f"the model does not run on fake tensors: {type(e).__name__}: {e}"
    finally:
        model.train(was)
    why = _why_not(train, evl, sensitive)
    if why is not None:
        return None, why
    graph = _copy(g)
    copied = {n.name: n for n in graph.nodes}
    for name in source.mode_sensitive:
        node = copied[name]
        op_info(node.target).to_eval(node)
    left = [n.name for n in graph.nodes if _mode_sensitive(n)]
    if left:  # an OpInfo.to_eval that did not do its job
        return None, f"nodes {left[:3]} are still mode-dependent after their eval edit"
    gm = fx.GraphModule(source.gm, graph)
    return dataclasses.replace(source, gm=gm, training=False, mode_sensitive=()), ""


def keep_source(captured: Captured) -> Captured:
    """A copy of ``captured`` that later rewrites of it leave alone: a copy of the graph over
    the same attribute tensors (no weight is copied)."""
    return dataclasses.replace(captured, gm=fx.GraphModule(captured.gm, _copy(captured.gm.graph)))


def _copy(g: fx.Graph) -> fx.Graph:
    """A copy of ``g``: the same node names and metadata, the same in/out handling."""
    new = copy_codegen(fx.Graph(), g)
    out = new.graph_copy(g, {})
    new.output(out)
    return new


__all__ = ["MODE_ARGS", "ModeArg", "derive_eval", "keep_source", "record"]
