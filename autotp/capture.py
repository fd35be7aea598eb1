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
import os

import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.fx as fx
# ep.module() builds its in/out handling on torch.utils._pytree TreeSpecs; torch 2.13 has no
# public pytree module, so tree_leaves comes from there (the same call torch.export makes).
from torch.utils import _pytree as pytree

from .errors import CaptureError
from .layers import Stack, Unsupported, canonical_names, capture_cut, find_stacks
from .rules import op_info

log = logging.getLogger(__name__)
aten = torch.ops.aten


@dataclass(frozen=True)
class TensorMeta:
    """Shape of one global tensor at the example inputs; ``dynamic[d]`` when dim d is symbolic
    (batch, sequence): such dims are split only evenly, by sequence-parallel regions
    (rules/__init__.py), so the module stays valid at other sizes."""

    shape: tuple[int, ...]
    dynamic: tuple[bool, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def splits_dynamic(self, p: object) -> bool:
        """Whether placement ``p`` of this tensor splits a dynamic (batch/sequence) dim."""
        from .placements import Shard
        return isinstance(p, Shard) and bool(self.shape) and self.dynamic[p.dim % len(self.shape)]

    @property
    def nbytes(self) -> int:
        return self.numel * (torch.finfo(self.dtype).bits // 8 if self.dtype.is_floating_point
                             else torch.iinfo(self.dtype).bits // 8 if self.dtype != torch.bool else 1)


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
    stacks: tuple[Stack, ...] = ()  # containers of identical layers (layers.py)
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


# ---------------------------------------------------------------------------------------------
# export with a readable error

@contextmanager
def _module_tracker(model: torch.nn.Module) -> Iterator[list[str]]:
    """Tracks which submodule is executing, so a capture failure can name it."""
    stack: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    handles = []

    def enter(mod: torch.nn.Module, _args: Any) -> None:
        stack.append(names[mod] or "<root>")

    def leave(_mod: torch.nn.Module, _args: Any, _out: Any) -> None:  # must return None
        if stack:
            stack.pop()

    for m in names:
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave))
    failed_at: list[str] = []
    try:
        yield failed_at
    except BaseException:
        failed_at.extend(stack)
        raise
    finally:
        for h in handles:
            h.remove()


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch and autotp: the user's line."""
    skip = (os.path.dirname(torch.__file__), os.path.dirname(__file__))
    best = ""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for fs in traceback.extract_tb(e.__traceback__):
            if not fs.filename.startswith(skip) and "site-packages/torch" not in fs.filename:
                best = f"{fs.filename}:{fs.lineno} ({fs.name}): {fs.line}"
        e = e.__cause__ or e.__context__
    return best


def _advice(msg: str) -> str:
    low = msg.lower()
    tips = []
    if "cache" in low:
        tips.append("pass example_kwargs={'use_cache': False} (a KV-cache object cannot be exported)")
    if "data-dependent" in low or "guardonda" in low or ".item()" in low or "unbacked" in low:
        tips.append("avoid Python control flow on tensor values (.item(), if tensor:) in forward, "
                    "or guard it with torch._check")
    if "argument" in low or "missing" in low or "unexpected keyword" in low:
        tips.append("check example_inputs / example_kwargs match forward's signature")
    tips.append("make sure the model runs eagerly on the example inputs; "
                "see docs/troubleshooting.md")
    return "; ".join(tips)


def _dynamic_shapes(args: tuple, kwargs: dict) -> tuple:
    """Dim.AUTO on every dim of every tensor input: export keeps symbolic what the model
    allows (batch, sequence) and specializes the rest. One spec per positional arg, then one
    per keyword arg, as torch.export matches them."""
    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return {d: torch.export.Dim.AUTO for d in range(x.dim())}
        return None
    return tuple(pytree.tree_map(spec, a) for a in (*args, *kwargs.values()))


def _export(model: torch.nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    errors: list[tuple[BaseException, list[str]]] = []
    for dynamic in (True, False):
        ds = _dynamic_shapes(args, kwargs) if dynamic else None
        try:
            with _module_tracker(model) as failed_at:
                ep = torch.export.export(model, args, kwargs, dynamic_shapes=ds, strict=False)
            if not dynamic:
                first = str(errors[0][0]).strip().splitlines()[0] if errors else ""
                warnings.warn(f"autotp: {type(model).__name__} was captured with static shapes "
                              f"(dynamic batch/sequence dims failed: {first}); the parallel "
                              f"module accepts only the example inputs' shapes", stacklevel=4)
            return ep
        except Exception as e:  # noqa: BLE001 - re-raised below as CaptureError with context
            errors.append((e, list(failed_at)))
    exc, stack = errors[-1]
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    where = stack[-1] if stack else "<outside any submodule: inputs or outputs>"
    raise CaptureError(
        f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: {first}\n"
        f"  module: {where}\n  source: {_user_frame(exc) or 'unknown'}\n  try: {_advice(str(exc))}"
    ) from exc


# ---------------------------------------------------------------------------------------------
# normalization passes

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


def fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------------------------
# shapes

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
    for a few layers and replicate them (layers.py); the result is the same graph, faster."""
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
    missing = [k for k in state_keys if not _has_attr(gm, k)]
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


def _has_attr(gm: torch.nn.Module, target: str) -> bool:
    try:
        fetch_attr(gm, target)
        return True
    except AttributeError:
        return False


def _mode_sensitive(node: fx.Node) -> bool:
    """Whether the node computes differently in train and eval mode (its registry entry's
    ``mode_sensitive`` fact: dropout, batch_norm)."""
    return node.op == "call_function" and op_info(node.target).mode_sensitive(node)


def set_attr(gm: torch.nn.Module, target: str, value: Any) -> None:
    *path, name = target.split(".")
    obj: Any = gm
    for p in path:
        obj = getattr(obj, p)
    setattr(obj, name, value)


__all__ = ["Captured", "TensorMeta", "capture", "describe", "module_path", "source_line",
           "fetch_attr", "set_attr"]

