"""scaled_dot_product_attention: heads (and batch, and query positions) are independent, so
q, k, v, the mask and the output may all be split on them together. With grouped-query
attention, q has h heads and k/v have h_kv: splitting both into n contiguous chunks keeps
every query head with its key/value head (q head i uses kv head i // (h / h_kv)). The head
dim and key positions are mixed nonlinearly (softmax), so they are never split.

FLOPs: QK^T and PV are 2 L E S each per batch and head, 4 S per element of q. Plan tables show
it by its output: "heads" when dim 1 (the heads of (batch, heads, L, E)) is split."""
from __future__ import annotations

import torch

from autotp.core.placements import Shard
from autotp.rules.registry import DimMap, Display, Label, Metas, OpCall, elementwise_flops, register

aten = torch.ops.aten


def sdpa_flops(ins: Metas, outs: Metas) -> float:
    """4 q.numel S: softmax(Q K^T) V does 2 L E S FLOPs for each of its two matmuls per
    (batch, head), S the key length (dim -2 of k)."""
    if len(ins) < 3:
        return elementwise_flops(ins, outs)
    q, k = ins[0], ins[1]
    return 4.0 * q.numel * k.shape[-2]


def _heads(p: Shard) -> str:
    """An output split on dim 1 is a split of the heads; batch or query splits are not
    shown as a split."""
    return "heads" if p.dim == 1 else "replicated"


@register(aten.scaled_dot_product_attention.default, flops=sdpa_flops,
          display=Display(_heads, by="output"))
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
