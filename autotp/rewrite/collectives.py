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

Uneven shards (torch.chunk sizes, see core/placements.py): gloo's and NCCL's all_gather and
reduce_scatter need equal sizes, so each piece is zero-padded along the shard dim to the
largest rank's size (rank 0's) and trimmed after; the Comm always sees equal shapes. The
all-gather needs the global size along the dim to know every rank's size: ``Redistribute``
keeps the value's global shape. A dynamic (batch/sequence) dim has no fixed size; it is only
ever split evenly (sequence-parallel regions), so its shape entry is None, the all-gather
takes every piece to be this rank's size, and ``Redistribute`` checks when it splits such a
dim that the world size divides it (else the pieces would be uneven and the gather wrong).
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from autotp.cost.model import convert_ops, dual
from autotp.errors import AutoTPError, AutoTPInternalError
from autotp.core.placements import (Placement, Shard, local_sizes, local_slices, rank_major,
                                    shard_tensor, unshard)


# torch.distributed's single-tensor gather and scatter along dim 0 (both public; Dynamo rewrites
# both): the ``_single`` names are the current ones, ``*_into_tensor`` / ``*_tensor`` the
# names of the torch releases before them (deprecated since)
_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# the counted (kind, phase) pairs: one cell each of ``Comm.tally`` (see Comm)
KINDS = ("all_reduce", "all_gather", "reduce_scatter")
PHASES = ("forward", "backward")
_CELL = {(k, p): i for i, (k, p) in enumerate((k, p) for k in KINDS for p in PHASES)}


@torch.library.custom_op("autotp::tally", mutates_args=("tally",))
def _tally(tally: torch.Tensor, cell: int) -> None:
    """``tally[cell] += 1``, as one opaque call: compiled, inductor calls it where the graph
    does, instead of generating (and building) a kernel for each count, which took a 2-layer
    Llama's first forward compile from 22 s to 54 s."""
    tally[cell] += 1


@_tally.register_fake
def _tally_fake(tally: torch.Tensor, cell: int) -> None:
    return None


class Comm:
    """Transport for the collectives of one tensor-parallel group.

    Counts: each collective adds one to its (kind, phase) cell of ``tally``, an int64 tensor,
    in place. A tensor, not a Python counter, so that a compiled program counts too: under
    torch.compile the increment is an op of the graph and runs each time the graph runs,
    where a Python-side count would run once, at trace time (and an autograd Function that
    mutates Python state is an "unsafe side effect" that breaks ``fullgraph=True``).
    Phases other than forward/backward (``calibrate``) are counted in ``other``."""

    rank: int
    world_size: int

    def __init__(self) -> None:
        with torch.inference_mode(False):  # a normal tensor even when made under inference_mode
            self.tally = torch.zeros(len(_CELL), dtype=torch.int64)
        self.other: Counter[tuple[str, str]] = Counter()

    @property
    def counts(self) -> Counter[tuple[str, str]]:
        """Collectives run so far, by (kind, phase): a snapshot."""
        out = Counter({key: int(v) for key, v in zip(_CELL, self.tally.tolist()) if v})
        out.update(self.other)
        return out

    def count(self, kind: str, phase: str) -> None:
        cell = _CELL.get((kind, phase))
        if cell is None:
            self.other[(kind, phase)] += 1
        elif torch.compiler.is_compiling():
            _tally(self.tally, cell)
        else:  # eager: the same add, without a custom op's dispatch
            with torch.no_grad():
                self.tally[cell] += 1

    def clear_counts(self) -> None:
        with torch.no_grad():
            self.tally.zero_()
        self.other.clear()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def reduce_scatter(self, chunks: Sequence[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` (equal shapes) concatenated along dim 0."""
        return torch.cat(self.all_gather(t))

    def scatter_rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's n-th of the sum over ranks of ``t``, along dim 0 (which n divides)."""
        return self.reduce_scatter(list(t.chunk(self.world_size)))


class DistComm(Comm):
    """torch.distributed's collectives, called as Dynamo traces them: under torch.compile each
    becomes a functional collective in the graph (issued, then waited for where its result is
    first read), in eager a blocking call. The gather and scatter run on dim 0 of one
    contiguous tensor (``all_gather_single`` / ``reduce_scatter_single``), the forms both
    gloo and NCCL take and Dynamo rewrites."""

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
        return list(self.gather_rows(t).chunk(self.world_size))

    def reduce_scatter(self, chunks: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.scatter_rows(torch.stack(list(chunks)))[0]

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        out = t.new_empty((self.world_size * t.shape[0], *t.shape[1:]))
        _gather_single(out, t, group=self.group)
        return out

    def scatter_rows(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        out = t.new_empty((t.shape[0] // self.world_size, *t.shape[1:]))
        _scatter_single(out, t, group=self.group)
        return out


def _pad_to(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if t.shape[dim] == size:
        return t
    pad = list(t.shape)
    pad[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(pad)], dim=dim)


def gather_shards(comm: Comm, x: torch.Tensor, p: Shard, size: int | None = None) -> torch.Tensor:
    """The full tensor from every rank's piece ``x`` placed ``p``; ``size`` is the global size
    along ``p.dim`` (needed when the split may be uneven; None means even)."""
    n = comm.world_size
    d = p.dim % x.dim()
    if size is None:
        size = x.shape[d] * n // (p.rep or 1) if p.blocks is None else sum(p.blocks)
    sizes = local_sizes(p, size, n)
    m = max(sizes)
    if d == 0 and p.blocks is None and p.rep is None and min(sizes) == m:
        return comm.gather_rows(x)  # rank order along dim 0 is the full tensor: no cat
    parts = comm.all_gather(_pad_to(x, d, m))
    return unshard([t.narrow(d, 0, k) for t, k in zip(parts, sizes)], p)


def scatter_reduce(comm: Comm, x: torch.Tensor, p: Shard) -> torch.Tensor:
    """This rank's piece (placed ``p``) of the sum over ranks of the full-shaped ``x``."""
    n = comm.world_size
    d = p.dim % x.dim()
    sizes = local_sizes(p, x.shape[d], n)
    m = max(sizes)
    if d == 0 and p.blocks is None and p.rep is None and min(sizes) == m:
        return comm.scatter_rows(x)  # x's rows are already rank-major: no copy
    chunks = [_pad_to(c, d, m) for c in rank_major(x, p, n).split(sizes, dim=d)]
    return comm.reduce_scatter(chunks).narrow(d, 0, sizes[comm.rank])


def _reslice(x: torch.Tensor, src: Shard, dst: Placement, size: int | None, rank: int,
             n: int) -> torch.Tensor:
    """This rank's ``dst`` piece cut from its ``src`` piece ``x`` (``local_slices``)."""
    d = src.dim % x.dim()
    spans = local_slices(src, dst, size, rank, n) if isinstance(dst, Shard) and size else None
    if spans is None:
        raise AutoTPInternalError(f"{src} -> {dst} is not a local slice at size {size}")
    pieces = [x.narrow(d, a, k) for a, k in spans] or [x.narrow(d, 0, 0)]
    return torch.cat(pieces, dim=d) if len(pieces) > 1 else pieces[0].contiguous().clone()


def convert(x: torch.Tensor, src: Placement, dst: Placement, comm: Comm, phase: str,
            size: int | None = None) -> torch.Tensor:
    """Turn a local value placed ``src`` into one placed ``dst`` (see the table above).
    ``size``: the global size along ``src``'s shard dim (for an all-gather of uneven pieces)."""
    ops = convert_ops(src, dst)
    if ops is None:
        raise AutoTPInternalError(f"the plan asks for a conversion {src} -> {dst}, which no "
                                  f"collective performs")
    n, r = comm.world_size, comm.rank
    if ops == ("all_gather", "slice"):
        ops = convert_ops(src, dst, size, n)  # a nested one is a local slice
    for op in ops:
        if op == "slice" and ops == ("slice",) and isinstance(src, Shard):
            x = _reslice(x, src, dst, size, r, n)  # dst's piece lies inside src's (nested)
        elif op == "slice":
            x = shard_tensor(x, dst, r, n).contiguous().clone()
        elif op == "all_reduce":
            x = comm.all_reduce(x)
        elif op == "all_gather":
            if not isinstance(src, Shard):
                raise AutoTPInternalError(f"all_gather from {src}: only a Shard can be gathered")
            x = gather_shards(comm, x, src, size)
        elif op == "reduce_scatter":
            if not isinstance(dst, Shard):
                raise AutoTPInternalError(f"reduce_scatter to {dst}: only to a Shard")
            x = scatter_reduce(comm, x, dst)
        if op != "slice":
            comm.count(op, phase)
    return x if ops else x.view_as(x)


# ---- the transition as an autograd Function ----------------------------------------------------
# ``_Transition`` runs one Redistribute's forward conversion, and its backward the gradient's.
# Everything in it traces: torch.compile (Dynamo, then AOTAutograd for the backward) follows the
# placement logic at trace time on static shard sizes, records the collectives as functional
# collectives (DistComm), and the counts as in-place adds to ``Comm.tally``; so
# ``torch.compile(tp, fullgraph=True)`` takes the whole per-rank program, and inductor may run
# compute while a collective is in flight (it waits where the result is first read). An
# identity forward (Megatron's f) returns a view of its input: no copy, only the backward's
# collective.
class _Transition(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, mod: "Redistribute") -> torch.Tensor:
        ctx.mod = mod
        mod.check_even(x)
        out = convert(x, mod.src, mod.dst, mod.comm, "forward", mod.size_of(mod.src))
        # a consumer that writes its input in place (relu_) may not write a view made here
        return out.clone() if mod.fresh and mod.src == mod.dst else out

    @staticmethod
    @once_differentiable  # its collectives run in place: a double backward would be wrong, so it is an error
    def backward(ctx, g: torch.Tensor):
        mod = ctx.mod
        if mod.grad_src == mod.grad_dst:
            return g, None  # an identity conversion: no op, no copy
        return convert(g, mod.grad_src, mod.grad_dst, mod.comm, "backward", mod.size_of(mod.grad_src)), None


class Redistribute(nn.Module):
    """A transition in the rewritten graph: forward ``src -> dst``, backward
    ``grad_src -> grad_dst`` (= dual(src)). ``shape``: the value's global shape (its shard
    dims are static), so uneven pieces can be gathered."""

    def __init__(self, comm: Comm, src: Placement, dst: Placement, grad_src: Placement,
                 shape: tuple | None = None, where: str = ""):
        super().__init__()
        self.comm = comm
        self.src, self.dst, self.grad_src, self.grad_dst = src, dst, grad_src, dual(src)
        self.shape = tuple(shape) if shape is not None else None
        self.where = where  # the value and module, for error messages
        # a fresh output even when the forward is the identity: a consumer writes it in place
        # (relu_, index_copy_), which a view made inside _Transition may not be (rewrite.py sets it)
        self.fresh = False

    def check_even(self, x: torch.Tensor) -> None:
        """A dynamic dim split here must divide evenly (see the module docstring)."""
        p = self.dst
        if not isinstance(p, Shard) or self.src == p or self.shape is None:
            return  # (split on another dim or not at all, x is whole along p.dim)
        d = p.dim % x.dim()
        n = self.comm.world_size
        if self.shape[d] is None and x.shape[d] % n:
            raise AutoTPError(
                f"{self.where}: this plan splits dim {d} (a batch or sequence dim, size "
                f"{x.shape[d]} now) {n} ways (sequence parallelism), which needs it divisible by "
                f"{n}. Pad the batch/sequence to a multiple of {n}, or plan with a larger "
                f"memory_budget so that the solver keeps this region whole.")

    def size_of(self, p: Placement) -> int | None:
        if not isinstance(p, Shard) or self.shape is None:
            return None
        s = self.shape[p.dim % len(self.shape)]
        return s if isinstance(s, int) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad and \
                any(isinstance(p, Shard) and p.rep is not None for p in (self.src, self.dst)):
            raise AutoTPError(
                f"{self.where}: this program was planned for inference and keeps a value split "
                f"with pieces shared by several ranks ({self.src} -> {self.dst}: key/value heads "
                f"fewer than ranks), which has no exact gradient. Run it under torch.no_grad(), "
                f"or parallelize with mode='training' to train.")
        if self.src == self.dst and not self.fresh and \
                (self.grad_src == self.grad_dst or not (torch.is_grad_enabled() and x.requires_grad)):
            return x
        return _Transition.apply(x, self)

    def extra_repr(self) -> str:
        n = self.comm.world_size
        fwd = "+".join(convert_ops(self.src, self.dst, self.size_of(self.src), n) or ()) or "identity"
        bwd = "+".join(convert_ops(self.grad_src, self.grad_dst, self.size_of(self.grad_src), n)
                       or ()) or "identity"
        return f"{self.src} -> {self.dst} [{fwd}] | grad {self.grad_src} -> {self.grad_dst} [{bwd}]"
