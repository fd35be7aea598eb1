"""Normalizations, softmax and reductions: the normalized / reduced dims can't be split (a
sum may: its contracted dim gives a Partial output); every other dim passes through.

Facts: no FLOPs (fused); sums and means keep nothing for the backward (only the input's
shape); batch_norm (no rule) depends on train/eval mode."""
from __future__ import annotations

import torch

from autotp.rules.registry import DimMap, OpCall, always_mode_sensitive, declare, keeps_nothing, register
from autotp.rules.enumerate import norm_dims

aten = torch.ops.aten


# batch statistics in training, running statistics in eval; no rule: it runs replicated
declare(aten.batch_norm.default, mode_sensitive=always_mode_sensitive)


@register(aten.layer_norm.default)
def _layer_norm(call: OpCall) -> DimMap:
    x = call.inputs[0]
    k = len(call.arg(1, "normalized_shape"))
    lead = tuple(("b", j) for j in range(len(x.shape) - k))
    xl = lead + (None,) * k
    params = tuple(tuple(None for _ in m.shape) for m in call.inputs[1:])
    return DimMap((xl, *params), (xl,), dynamic_ok=True)


@register(aten.rms_norm.default)
def _rms_norm(call: OpCall) -> DimMap:
    return _layer_norm(call)


@register(aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int)
def _softmax(call: OpCall) -> DimMap:
    r = len(call.inputs[0].shape)
    d = call.arg(1, "dim") % r
    labels = tuple(("b", j) if j != d else None for j in range(r))
    return DimMap((labels,), (labels,), dynamic_ok=True)


def _reduce(call: OpCall, contract: bool) -> DimMap:
    r = len(call.inputs[0].shape)
    dims = call.arg(1, "dim", None)
    reduced = set(norm_dims(dims, r)) if dims not in (None, []) else set(range(r))
    keep = bool(call.arg(2, "keepdim", False))
    ins = tuple(("r", j) for j in range(r))
    outs = tuple((None if j in reduced else ins[j]) for j in range(r) if keep or j not in reduced)
    con = frozenset(ins[j] for j in reduced) if contract else frozenset()
    return DimMap(((ins if contract else tuple(None if j in reduced else ins[j] for j in range(r))),),
                  (outs,), contract=con, partial_any=(0,), dynamic_ok=True)


@register(aten.sum.dim_IntList, aten.sum.default, keeps=keeps_nothing)
def _sum(call: OpCall) -> DimMap:
    return _reduce(call, contract=True)


@register(aten.mean.dim, aten.mean.default, keeps=keeps_nothing)
def _mean(call: OpCall) -> DimMap:
    return _reduce(call, contract=False)


@register(aten.amax.default, aten.amin.default)
def _max(call: OpCall) -> DimMap:
    d = _reduce(call, contract=False)
    return DimMap(d.inputs, d.outputs, dynamic_ok=True)
