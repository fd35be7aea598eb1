"""embedding(W[V, H], ids[...]) -> out[..., H].

- Hidden split: W's dim 1 splits the output's last dim; the ids' dims pass through.
- Vocab split (Megatron's vocab-parallel embedding): rank r holds its torch.chunk range of rows
  (``shard_ranges``: [r V/n, (r+1) V/n) when n divides V, else ceil(V/n) rows per rank, the
  last ranks fewer: GPT-2's 50257 on 3 ranks is 16753, 16753, 16751) and looks up only the ids
  that fall there, writing zeros for the others; the output is Partial
  (the sum over ranks is the full lookup). With a tied LM head split by vocab columns, this is
  the split that keeps both uses of the weight local.

Facts: one FLOP per output element (a gather, costed by its bytes on the roofline); plan
tables word the weight split hidden (dim 1) or vocab (dim 0).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from autotp.core.placements import Partial, Replicate, Shard, shard_ranges
from autotp.rules.registry import DimMap, Display, OpCall, Strategy, elementwise_flops, register

aten = torch.ops.aten


def _embedding(call: OpCall) -> DimMap:
    ids = call.inputs[1]
    idx = tuple(("i", j) for j in range(len(ids.shape)))
    return DimMap(inputs=((None, "h"), idx), outputs=(idx + ("h",),))


def _vocab_split(call: OpCall) -> list[Strategy]:
    w = call.inputs[0]
    if w.dynamic[0] or w.shape[0] < 2:
        return []
    return [Strategy((Shard(0), Replicate()), Partial())]


def vocab_parallel_embedding(weight: torch.Tensor, ids: torch.Tensor, offset: int,
                             padding_idx: int = -1) -> torch.Tensor:
    """This rank's summand of embedding(W, ids) when it holds rows [offset, offset + len(W))."""
    local = ids - offset
    inside = (local >= 0) & (local < weight.shape[0])
    out = aten.embedding.default(weight, torch.where(inside, local, torch.zeros_like(local)),
                                 padding_idx)
    return out * inside.unsqueeze(-1).to(out.dtype)


def _localize(node: fx.Node, strategy: Strategy, n: int, rank: int) -> None:
    if strategy.inputs[0] != Shard(0):
        return
    weight, ids = node.args[0], node.args[1]
    # meta keeps the global shape
    ((offset, end),) = shard_ranges(Shard(0), int(weight.meta["val"].shape[0]), rank, n)
    rows = end - offset
    pad = node.args[2] if len(node.args) > 2 else -1
    local_pad = pad - offset if isinstance(pad, int) and 0 <= pad - offset < rows else -1
    node.target = vocab_parallel_embedding
    node.args = (weight, ids, offset, local_pad)
    node.kwargs = {}


def _hidden_vocab(p: Shard) -> str:
    """W[V, H]: a split of dim 1 is the hidden split, of dim 0 the vocab split."""
    return "hidden" if p.dim == 1 else "vocab"


register(aten.embedding.default, extra=_vocab_split, localize=_localize, flops=elementwise_flops,
         display=Display(_hidden_vocab))(_embedding)
