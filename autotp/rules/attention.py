"""scaled_dot_product_attention: heads (and batch, and query positions) are independent, so
q, k, v, the mask and the output may all be split on them together. With grouped-query
attention, q has h heads and k/v have h_kv: splitting both into n contiguous chunks keeps
every query head with its key/value head (q head i uses kv head i // (h / h_kv)). The head
dim and key positions are mixed nonlinearly (softmax), so they are never split."""
from __future__ import annotations

import torch

from . import DimMap, Label, OpCall, register

aten = torch.ops.aten


@register(aten.scaled_dot_product_attention.default)
def _sdpa(call: OpCall) -> DimMap | None:
    q, k, v = call.inputs[:3]
    r = len(q.shape)
    if r < 3 or len(k.shape) != r or len(v.shape) != r:
        return None
    lead = tuple(("b", j) for j in range(r - 2))  # (batch, heads) for 4-D inputs
    ql = lead + ("L", None)
    kl = lead + (None, None)
    ins: list[tuple[Label, ...]] = [ql, kl, kl]
    if len(call.inputs) > 3:  # attn_mask broadcasts to (..., L, S)
        m = call.inputs[3]
        full = lead + ("L", None)
        off = r - len(m.shape)
        ins.append(tuple(None if m.shape[j] == 1 and q.shape[off + j] != 1 and j + off < r - 2
                         else full[off + j] for j in range(len(m.shape))))
    return DimMap(tuple(ins), (lead + ("L", None),))
