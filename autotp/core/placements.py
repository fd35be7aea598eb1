"""Placements: how one logical (global) tensor lives on the ranks of a tensor-parallel group.

The vocabulary is torch.distributed.tensor's: ``Shard(dim)``, ``Replicate()``, ``Partial()``.
``Shard`` adds one optional field, ``blocks``: the sharded dimension is a concatenation of
blocks (e.g. the fused ``[q | k | v]`` output of a QKV projection) and *each block* is split
into ``world_size`` contiguous chunks; rank r holds the r-th chunk of every block, concatenated.
With ``blocks=None`` it is DTensor's contiguous ``Shard``. (DTensor's private ``_StridedShard``
plays the same role there.)

Uneven splits (a world size that does not divide the dim) follow ``torch.chunk``, as DTensor's
``Shard`` does: the dim (each block) is cut into ``units = size // grain`` units, every rank
gets ``c = ceil(units / n)`` consecutive units until they run out, so rank r holds units
``[min(r c, units), min((r + 1) c, units))``; the last ranks may hold fewer, or none
(4 heads on 3 ranks: 2, 2, 0; vocab 257: 86, 86, 85). Rank 0 always holds the most.
``grain`` (default 1, written None) is the number of elements per unit: a hidden dim of
``H * d`` split on head boundaries has ``grain=d``. When n divides ``units`` the split is the
even one whatever the grain, and placements are normalized to ``grain=None`` (see
``make_shard``). ``shard_ranges`` is the one definition every slicer uses (``shard_tensor``,
``runtime/weights.py``'s reader, checkpoints).

``rep`` (default None, i.e. 1) shares each piece among ``rep`` consecutive ranks: the dim is
split as above into ``n / rep`` pieces and rank r holds piece ``r // rep``. It is the least
replication of a dim with fewer units than ranks: 2 key/value heads on 4 ranks are
``S(1,rep=2)``, ranks 0 and 1 holding head 0 and ranks 2 and 3 head 1, which is all the query
heads of each rank read (a query split ``S(1)`` is then a local slice of the repeated heads,
``local_slices``). Ranks that share a piece hold identical copies, so a replicated-piece value
has no Partial counterpart: sums over ranks would count it ``rep`` times. Strategies with it
are offered only to programs planned for inference (candidates.build), and the rewrite refuses
a backward through one (rewrite/collectives.py).

Helpers here convert full tensors to local shards and back; they are pure tensor functions
used by the collectives, the parameter slicer and the state-dict gatherer.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from autotp.errors import AutoTPInternalError


@dataclass(frozen=True)
class Replicate:
    """Every rank holds the whole tensor."""

    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Partial:
    """Every rank holds a full-shaped summand; the logical tensor is their sum."""

    def __str__(self) -> str:
        return "P"


@dataclass(frozen=True)
class Shard:
    """Rank r holds the r-th of ``world_size`` contiguous chunks along ``dim`` (of each
    block, when ``blocks`` gives the block sizes along ``dim``), torch.chunk-sized in units
    of ``grain`` elements (see the module docstring)."""

    dim: int
    blocks: tuple[int, ...] | None = None
    grain: int | None = None
    rep: int | None = None  # ranks sharing one piece (None: 1)

    def __str__(self) -> str:
        extra = ""
        if self.blocks is not None:
            extra += f",blocks={'+'.join(map(str, self.blocks))}"
        if self.grain is not None:
            extra += f",grain={self.grain}"
        if self.rep is not None:
            extra += f",rep={self.rep}"
        return f"S({self.dim}{extra})"


Placement = Union[Replicate, Partial, Shard]
OutPlacement = Union[Placement, tuple[Placement, ...]]

_SHARD_RE = re.compile(r"^S\((-?\d+)(?:,blocks=([\d+]+))?(?:,grain=(\d+))?(?:,rep=(\d+))?\)$")


def parse(text: str) -> Placement:
    """Inverse of ``str(placement)``."""
    if text == "R":
        return Replicate()
    if text == "P":
        return Partial()
    m = _SHARD_RE.match(text)
    if not m:
        raise ValueError(f"not a placement: {text!r} (expected R, P, S(d), S(d,blocks=a+b), "
                         f"S(d,grain=g) or S(d,rep=k))")
    blocks = tuple(int(b) for b in m.group(2).split("+")) if m.group(2) else None
    return Shard(int(m.group(1)), blocks, int(m.group(3)) if m.group(3) else None,
                 int(m.group(4)) if m.group(4) else None)


def format_out(p: OutPlacement) -> str:
    if isinstance(p, tuple):
        return "(" + ", ".join(str(x) for x in p) + ")"
    return str(p)


def parse_out(text: str) -> OutPlacement:
    if text.startswith("("):
        inner = text[1:-1].strip()
        return tuple(parse(t.strip()) for t in inner.split(", ")) if inner else ()
    return parse(text)


def _blocks(p: Shard, size: int) -> Sequence[int]:
    return p.blocks if p.blocks is not None else (size,)


def make_shard(dim: int, size: int, grain: int, world_size: int,
               blocks: tuple[int, ...] | None = None, rep: int | None = None) -> Shard:
    """``Shard(dim, blocks, grain, rep)`` in canonical form: the smallest grain that cuts the
    same pieces (``None`` for 1), so that placements laying out a tensor identically compare
    equal (heads in pairs or one by one, 4 on 3 ranks: both 2, 2, 0; an even split is grain
    1); ``rep`` 1 is None."""
    rep = None if rep in (None, 1) else rep
    return Shard(dim, blocks, _canonical_grain(size, grain, world_size // (rep or 1), blocks), rep)


@functools.lru_cache(maxsize=4096)
def _canonical_grain(size: int, grain: int, n: int, blocks: tuple[int, ...] | None) -> int | None:
    want = [shard_ranges(Shard(0, blocks, grain), size, r, n) for r in range(n)]
    divs = {d for i in range(1, math.isqrt(size) + 1) if size % i == 0 for d in (i, size // i)}
    for g in sorted(d for d in divs if d < grain):
        if all(b % g == 0 for b in (blocks or (size,))) and \
                all(shard_ranges(Shard(0, blocks, g), size, r, n) == want[r] for r in range(n)):
            return None if g == 1 else g
    return None if grain == 1 else grain


def shard_ranges(p: Placement, size: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """This rank's [start, end) index ranges along the sharded dim, one per block: the one
    definition of the split (torch.chunk sizes in units of ``grain``; possibly empty)."""
    if not isinstance(p, Shard):
        return [(0, size)]
    if p.rep is not None:
        rank, world_size = rank // p.rep, world_size // p.rep
    g = p.grain or 1
    out, off = [], 0
    for b in _blocks(p, size):
        units = b // g
        c = -(-units // world_size)
        out.append((off + min(rank * c, units) * g, off + min((rank + 1) * c, units) * g))
        off += b
    return out


def local_size(p: Placement, size: int, world_size: int, rank: int = 0) -> int:
    """Size along the sharded dim on ``rank`` (rank 0 holds the most)."""
    return sum(b - a for a, b in shard_ranges(p, size, rank, world_size))


def local_sizes(p: Placement, size: int, world_size: int) -> list[int]:
    return [local_size(p, size, world_size, r) for r in range(world_size)]


def shard_tensor(full: torch.Tensor, p: Placement, rank: int, world_size: int) -> torch.Tensor:
    """This rank's local piece of ``full`` (a view where possible). Partial: not defined."""
    if isinstance(p, Replicate):
        return full
    if not isinstance(p, Shard):
        raise AutoTPInternalError(f"shard_tensor({p}): a Partial value has no local piece to cut")
    dim = p.dim % full.dim()
    pieces = [full.narrow(dim, a, b - a) for a, b in shard_ranges(p, full.shape[dim], rank, world_size)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def local_slices(src: Placement, dst: Shard, size: int, rank: int,
                 world_size: int) -> list[tuple[int, int]] | None:
    """Where ``dst``'s piece of this rank lies inside its ``src`` piece, as (offset, length)
    pairs along the dim in the local tensor, or None when it does not lie inside (then only a
    gather gets it). A Replicate source holds everything; a ``rep`` source holds the pieces of
    every rank that shares it."""
    if isinstance(src, Shard) and src.dim != dst.dim:
        return None
    have = shard_ranges(src, size, rank, world_size)
    out = []
    for a, b in shard_ranges(dst, size, rank, world_size):
        if a == b:
            continue
        off = 0
        for c, e in have:
            if c <= a and b <= e:
                out.append((off + a - c, b - a))
                break
            off += e - c
        else:
            return None
    return out


def unshard(locals_: Sequence[torch.Tensor], p: Shard) -> torch.Tensor:
    """Reassemble the full tensor from every rank's local piece (rank order)."""
    dim = p.dim % locals_[0].dim()
    if p.rep is not None:  # one piece of each group of ranks that share it
        locals_ = list(locals_)[::p.rep]
        p = Shard(p.dim, p.blocks, p.grain)
    n = len(locals_)
    if p.blocks is None:
        return torch.cat(list(locals_), dim=dim)
    size = sum(p.blocks)
    per_rank = []
    for r, t in enumerate(locals_):
        sizes = [b - a for a, b in shard_ranges(p, size, r, n)]
        per_rank.append(t.split(sizes, dim=dim))
    return torch.cat([per_rank[r][j] for j in range(len(p.blocks)) for r in range(n)], dim=dim)


def rank_major(full: torch.Tensor, p: Shard, world_size: int) -> torch.Tensor:
    """``full`` reordered along ``p.dim`` so that rank r's piece is the r-th contiguous piece
    (the layout reduce_scatter expects; piece sizes are ``local_sizes``)."""
    if p.blocks is None and p.rep is None:
        return full
    dim = p.dim % full.dim()
    return torch.cat([shard_tensor(full, p, r, world_size) for r in range(world_size)], dim=dim)
