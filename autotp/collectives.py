"""Collectives as autograd Functions whose backward is the conjugate collective.

One Function, ``Redistribute``, covers every transition. Forward converts the value from the
producer's placement P to the consumer's Q; backward converts the consumer's gradient from
its placement G to dual(P) (Shard stays Shard, everything else Replicate), so that every
gradient reaching a producer has the same placement and autograd's summation is right:

    P -> Q      G -> dual(P)    forward          backward          (Megatron name)
    R -> R      P -> R          identity         all_reduce        f  (copy to TP region)
    P -> R      R -> R          all_reduce       identity          g  (reduce from TP region)
    R -> S(d)   S(d) -> R       slice            all_gather        scatter
    S(d) -> R   R -> S(d)       all_gather       slice             gather
    S(d) -> R   P -> S(d)       all_gather       reduce_scatter
    P -> S(d)   S(d) -> R       reduce_scatter   all_gather        (sequence parallel)

The loss is replicated on every rank, so a replicated value's gradient is identical on every
rank; torch.distributed.nn's differentiable all_reduce would sum those copies and give
world_size x gradients, which is why these are written here.

``Comm`` is the transport: ``DistComm`` runs on a torch.distributed process group (gloo,
NCCL); tests and the SPMD simulator may provide another. Every call is counted by
(kind, phase) so tests and the CLI can compare what ran with what the plan says.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from .cost import convert_ops, dual
from .placements import Placement, Shard, rank_major, shard_tensor, unshard


class Comm:
    """Transport for the collectives of one tensor-parallel group."""

    rank: int
    world_size: int

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def reduce_scatter(self, chunks: Sequence[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class DistComm(Comm):
    def __init__(self, group: dist.ProcessGroup | None = None):
        super().__init__()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        out = t.contiguous().clone()
        dist.all_reduce(out, group=self.group)
        return out

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        t = t.contiguous()
        outs = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(outs, t, group=self.group)
        return outs

    def reduce_scatter(self, chunks: Sequence[torch.Tensor]) -> torch.Tensor:
        chunks = [c.contiguous() for c in chunks]
        out = torch.empty_like(chunks[self.rank])
        dist.reduce_scatter(out, chunks, group=self.group)
        return out


def convert(x: torch.Tensor, src: Placement, dst: Placement, comm: Comm, phase: str) -> torch.Tensor:
    """Turn a local value placed ``src`` into one placed ``dst`` (see the table above)."""
    ops = convert_ops(src, dst)
    if ops is None:
        raise AssertionError(f"no conversion {src} -> {dst}")
    n, r = comm.world_size, comm.rank
    for op in ops:
        if op == "slice":
            x = shard_tensor(x, dst, r, n).contiguous().clone()
        elif op == "all_reduce":
            x = comm.all_reduce(x)
        elif op == "all_gather":
            assert isinstance(src, Shard)
            x = unshard(comm.all_gather(x), src)
        elif op == "reduce_scatter":
            assert isinstance(dst, Shard)
            d = dst.dim % x.dim()
            x = comm.reduce_scatter(rank_major(x, dst, n).chunk(n, dim=d))
        if op != "slice":
            comm.counts[(op, phase)] += 1
    return x if ops else x.view_as(x)


class _Redistribute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, mod: "Redistribute") -> torch.Tensor:  # type: ignore[override]
        ctx.mod = mod
        return convert(x, mod.src, mod.dst, mod.comm, "forward")

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        mod = ctx.mod
        return convert(g, mod.grad_src, mod.grad_dst, mod.comm, "backward"), None


class Redistribute(nn.Module):
    """A transition in the rewritten graph: forward ``src -> dst``, backward
    ``grad_src -> grad_dst`` (= dual(src))."""

    def __init__(self, comm: Comm, src: Placement, dst: Placement, grad_src: Placement):
        super().__init__()
        self.comm = comm
        self.src, self.dst, self.grad_src, self.grad_dst = src, dst, grad_src, dual(src)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return convert(x, self.src, self.dst, self.comm, "forward")
        return _Redistribute.apply(x, self)

    def extra_repr(self) -> str:
        fwd = "+".join(convert_ops(self.src, self.dst) or ()) or "identity"
        bwd = "+".join(convert_ops(self.grad_src, self.grad_dst) or ()) or "identity"
        return f"{self.src} -> {self.dst} [{fwd}] | grad {self.grad_src} -> {self.grad_dst} [{bwd}]"
