"""embedding(W[V, H], ids[...]) -> out[..., H]: the hidden dim of W splits the output's last
dim; the ids' dims pass through. (A vocab split needs masked lookups and a Partial output; it
is not offered yet: a vocab-split LM head still works through the matmul rule.)"""
from __future__ import annotations

import torch

from . import DimMap, OpCall, register

aten = torch.ops.aten


@register(aten.embedding.default)
def _embedding(call: OpCall) -> DimMap:
    ids = call.inputs[1]
    idx = tuple(("i", j) for j in range(len(ids.shape)))
    return DimMap(inputs=((None, "h"), idx), outputs=(idx + ("h",),))
