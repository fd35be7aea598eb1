"""Capture: nn.Module + example inputs -> an ATen-level torch.fx graph with shapes.

``torch.export.export(strict=False)`` traces the model (Hugging Face 5.x models included)
with every tensor dimension marked ``Dim.AUTO``: export keeps batch and sequence dims
symbolic where the model allows, so the parallel module runs on other shapes. A small set of
graph normalizations follows (each a plain graph edit), then one pass over the graph on the
example shape of every tensor is read from the export's fake values (for the cost model).

Normalizations:
- ``_assert_tensor_metadata`` checks are dropped (they check dtype/device, which TP keeps).
- get_attr nodes that read the same tensor (tied weights) are merged into one, so a tied
  weight gets one placement.
- ``linear(x, W, b)`` becomes ``linear(x, W) + b`` and ``addmm(b, x, W)`` becomes
  ``mm(x, W) + b``: the bias add is its own op, so a row-split matmul (Partial output) can
  reduce first and add the bias once, instead of adding it on every rank.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from autotp._compat import pytree

from autotp.errors import CaptureError
from autotp.capture.stacks import Stack, Unsupported, find_stacks
from autotp.capture.normalize import canonical_names
from autotp.capture.expand import capture_cut
from autotp.rules import OPS, op_info, random_op
from autotp.core.meta import TensorMeta
from autotp.capture.export import _export
from autotp.core.attrs import fetch_attr, has_attr, set_attr
from autotp.capture.normalize import _drop_asserts, _merge_tied_get_attrs, _split_bias


log = logging.getLogger(__name__)


aten = torch.ops.aten


@dataclass
class Captured:
    gm: fx.GraphModule  # ep.module() after normalization; parameters are the model's tensors
    metas: dict[str, Any]  # node name -> TensorMeta | tuple[TensorMeta | None, ...] | None
    state_keys: tuple[str, ...]  # the original model.state_dict() keys, in order
    param_names: frozenset[str]  # gm attribute paths that are parameters
    training: bool
    mode_sensitive: tuple[str, ...]  # nodes whose result depends on train/eval (dropout p>0 ...)
    inputs_requiring_grad: frozenset[str] = frozenset()  # placeholders whose example requires grad
    state_meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)  # key -> global (shape, dtype)
    stacks: tuple[Stack, ...] = ()  # containers of identical layers (capture/stacks.py)
    cut: bool = False  # exported with the stacks cut to a few layers, then replicated


def module_path(node: fx.Node) -> str:
    """The module path of the user's module that produced ``node`` ("" for the root)."""
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0]
    return ""


def source_line(node: fx.Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    return " ".join(lines[-2:]) if lines else ""


def describe(node: fx.Node) -> str:
    """One line naming the node for error messages: op, module path and user source line."""
    where = module_path(node) or "<root>"
    src = source_line(node)
    return f"{node.format_node()} in module '{where}'" + (f" at {src}" if src else "")


def _tensor_meta(val: Any, placeholder: bool) -> TensorMeta:
    # int() of a SymInt gives its value at the example inputs (export traced with them); the
    # shape environment is discarded after capture, so the guard int() records is harmless.
    shape = tuple(int(s) for s in val.shape)
    dynamic = tuple(placeholder or not isinstance(s, int) for s in val.shape)
    return TensorMeta(shape, dynamic, val.dtype)


def _node_meta(node: fx.Node) -> Any:
    """TensorMeta for a tensor-valued node, a tuple of them for multi-output ops, else None."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return _tensor_meta(val, node.op == "placeholder")
    if node.op not in ("get_attr", "output") and isinstance(val, (tuple, list)) and \
            any(isinstance(v, torch.Tensor) for v in val):
        return tuple(_tensor_meta(v, False) if isinstance(v, torch.Tensor) else None for v in val)
    return None


def capture(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, *,
            cut: bool = True) -> Captured:
    """Export ``model`` and normalize the graph. ``cut``: export stacks of identical layers
    for a few layers and replicate them (capture/stacks.py); the result is the same graph, faster."""
    kwargs = dict(kwargs or {})
    if not isinstance(args, tuple):
        args = (args,)
    stacks = find_stacks(model)
    got = None
    if cut:
        try:
            got = capture_cut(model, args, kwargs, stacks, _export)
        except (Unsupported, CaptureError) as e:
            log.info("autotp: exporting every layer of %s: %s", type(model).__name__, e)
    if got is None:
        gm = _export(model, args, kwargs).module()
        g = gm.graph
    else:
        gm, g = got
    _drop_asserts(g)
    _merge_tied_get_attrs(gm, g)
    _split_bias(g)
    gm.graph = canonical_names(g)  # recompiles
    gm.graph.lint()

    metas = {n.name: _node_meta(n) for n in gm.graph.nodes}
    for n in gm.graph.nodes:  # get_attr nodes carry no "val" in ep.module(): read the tensor
        if n.op == "get_attr":
            obj = fetch_attr(gm, n.target)
            if isinstance(obj, torch.Tensor):
                metas[n.name] = TensorMeta(tuple(obj.shape), (False,) * obj.dim(), obj.dtype)

    state = model.state_dict()
    state_keys = tuple(state.keys())
    missing = [k for k in state_keys if not has_attr(gm, k)]
    if missing:
        raise CaptureError(f"the exported module lacks state entries {missing[:5]}; "
                           f"autotp cannot map them back to the original keys")
    sensitive = tuple(n.name for n in gm.graph.nodes if _mode_sensitive(n))
    leaves = pytree.tree_leaves((args, kwargs))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    grad_inputs = frozenset(n.name for n, v in zip(placeholders, leaves)
                            if isinstance(v, torch.Tensor) and v.requires_grad)
    return Captured(gm=gm, metas=metas, state_keys=state_keys, inputs_requiring_grad=grad_inputs,
                    param_names=frozenset(n for n, _ in gm.named_parameters(remove_duplicate=False)),
                    training=model.training, mode_sensitive=sensitive, stacks=stacks, cut=got is not None,
                    state_meta={k: (tuple(v.shape), v.dtype) for k, v in state.items()})


def _mode_sensitive(node: fx.Node) -> bool:
    """Whether the node computes differently in train and eval mode: its registry entry's
    ``mode_sensitive`` fact (dropout, batch_norm, attention dropout); an op nobody registered
    counts when it is random (noise a model adds in training, e.g. a router's jitter)."""
    if node.op != "call_function":
        return False
    if node.target in OPS:
        return op_info(node.target).mode_sensitive(node)
    return random_op(node.target)


__all__ = ["Captured", "TensorMeta", "capture", "describe", "module_path", "source_line",
           "fetch_attr", "set_attr"]
