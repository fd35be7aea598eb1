"""Ops that write their first argument in place: a static KV cache's ``index_copy_`` and the
``copy_`` / ``add_`` of its position counter. Such a buffer is program state (candidates'
``NodeKind.STATE``): it is placed like a parameter and read only where it lives
(cost/model.py ``transition``), so an in-place op's first input, its output and the buffer
share one placement, and each rank writes its own piece.

``index_copy_(cache, dim, index, src)``: ``cache[..., index[j], ...] = src[..., j, ...]``
along ``dim``. Every other dim is one label on cache, src and the output (batch, kv heads,
head dim split together); the indexed dim and the index stay whole (a position must land on
the rank that holds it). Facts: no FLOPs; the output is the cache itself (``view``)."""
from __future__ import annotations

import torch

from autotp.rules.registry import DimMap, OpCall, keeps_nothing, register
from autotp.rules.enumerate import broadcast_labels

aten = torch.ops.aten


@register(aten.index_copy_.default, keeps=keeps_nothing, view=True)
def _index_copy(call: OpCall) -> DimMap:
    dst, index, src = call.inputs
    rank = len(dst.shape)
    dim = int(call.arg(1, "dim")) % rank
    labels = tuple(None if d == dim else ("d", d) for d in range(rank))
    return DimMap((labels, (None,) * len(index.shape), labels), (labels,))


register(aten.index_copy.default, keeps=keeps_nothing)(_index_copy)  # the out-of-place form


@register(aten.copy_.default, aten.add_.Tensor, keeps=keeps_nothing, view=True)
def _write_elementwise(call: OpCall) -> DimMap:
    """``dst.copy_(src)`` / ``dst.add_(src)``: elementwise with broadcasting onto ``dst``."""
    ins, out = broadcast_labels(call.inputs, call.outputs[0])
    return DimMap(ins, (out,))
