"""scaled_dot_product_attention: heads (and batch, and query positions) are independent, so
q, k, v, the mask and the output may all be split on them together. With grouped-query
attention, q has h heads and k/v have h_kv: splitting both into n contiguous chunks keeps
every query head with its key/value head (q head i uses kv head i // (h / h_kv)). The head
dim and key positions are mixed nonlinearly (softmax), so they are never split.

FLOPs: QK^T and PV are 2 L E S each per batch and head, 4 S per element of q. Plan tables show
it by its output: "heads" when dim 1 (the heads of (batch, heads, L, E)) is split.

Attention dropout (``dropout_p`` > 0, train mode) makes the op random: split, it draws the
full-size mask one device draws and keeps its slice (``_draw_sdpa``)."""
from __future__ import annotations

import math

import torch

from autotp.core.placements import Shard
from autotp.rules.registry import DimMap, Display, Label, Metas, OpCall, SplitDraw, elementwise_flops, register, set_arg

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


def _dropout_p(node) -> bool:
    """Attention dropout is on (the program was captured in train mode with dropout_p > 0)."""
    return bool(_bind(*node.args, **node.kwargs)["dropout_p"])


def _bind(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
          enable_gqa=False) -> dict:
    return dict(query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=dropout_p,
                is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


def _draw_sdpa(d: SplitDraw, args: tuple, kwargs: dict) -> torch.Tensor:
    """Attention dropout with split heads (or batch, or query positions): one device's math
    kernel drops out the (..., L, S) attention weights with a mask drawn for their full shape,
    so this rank draws that full mask (dropout of ones, which is exactly the mask scaled by
    1/(1-p)), keeps its slice and computes softmax(q k^T * scale + mask) * slice @ v with
    public ops. Without dropout it is the op itself."""
    a = _bind(*args, **kwargs)
    p = a["dropout_p"]
    if not p:
        return aten.scaled_dot_product_attention.default(*args, **kwargs)
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    L, S = q.shape[-2], k.shape[-2]
    # the weights one device drops out are a fresh (contiguous) matmul output
    ones = torch.ones(d.full_shape((*q.shape[:-1], S)), dtype=q.dtype, device=q.device)
    noise = d.keep(aten.dropout.default(ones, p, True))
    if a["enable_gqa"] and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
    w = (q @ k.transpose(-2, -1)) * scale
    if a["is_causal"]:
        w = w.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if mask is not None:
        w = w.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else w + mask
    probs = torch.softmax(w, dim=-1)
    probs = torch.where(torch.isneginf(w).all(-1, keepdim=True), 0.0, probs)  # a fully masked row: 0
    return (probs * noise) @ v


def _sdpa_to_eval(node) -> None:
    set_arg(node, 4, "dropout_p", 0.0)  # attention without dropout, as eval mode calls it


@register(aten.scaled_dot_product_attention.default, flops=sdpa_flops,
          display=Display(_heads, by="output"), mode_sensitive=_dropout_p, draws=_draw_sdpa,
          to_eval=_sdpa_to_eval)
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
