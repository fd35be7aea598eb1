"""Placements: how one logical (global) tensor lives on the ranks of a tensor-parallel group.

The vocabulary is torch.distributed.tensor's: ``Shard(dim)``, ``Replicate()``, ``Partial()``.
``Shard`` adds one optional field, ``blocks``: the sharded dimension is a concatenation of
blocks (e.g. the fused ``[q | k | v]`` output of a QKV projection) and *each block* is split
into ``world_size`` contiguous chunks; rank r holds the r-th chunk of every block, concatenated.
With ``blocks=None`` it is DTensor's contiguous ``Shard``. (DTensor's private ``_StridedShard``
plays the same role there.)

Helpers here convert full tensors to local shards and back; they are pure tensor functions
used by the collectives, the parameter slicer and the state-dict gatherer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence, Union

import torch


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
    """Rank r holds the r-th of ``world_size`` equal contiguous chunks along ``dim``
    (of each block, when ``blocks`` gives the block sizes along ``dim``)."""

    dim: int
    blocks: tuple[int, ...] | None = None

    def __str__(self) -> str:
        if self.blocks is None:
            return f"S({self.dim})"
        return f"S({self.dim},blocks={'+'.join(map(str, self.blocks))})"


Placement = Union[Replicate, Partial, Shard]
OutPlacement = Union[Placement, tuple[Placement, ...]]

_SHARD_RE = re.compile(r"^S\((-?\d+)(?:,blocks=([\d+]+))?\)$")


def parse(text: str) -> Placement:
    """Inverse of ``str(placement)``."""
    if text == "R":
        return Replicate()
    if text == "P":
        return Partial()
    m = _SHARD_RE.match(text)
    if not m:
        raise ValueError(f"not a placement: {text!r} (expected R, P, S(d) or S(d,blocks=a+b))")
    blocks = tuple(int(b) for b in m.group(2).split("+")) if m.group(2) else None
    return Shard(int(m.group(1)), blocks)


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


def local_size(p: Placement, size: int, world_size: int) -> int:
    """Size along the sharded dim on one rank."""
    assert isinstance(p, Shard)
    return sum(b // world_size for b in _blocks(p, size))


def shard_tensor(full: torch.Tensor, p: Placement, rank: int, world_size: int) -> torch.Tensor:
    """This rank's local piece of ``full`` (a view where possible). Partial: not defined."""
    if isinstance(p, Replicate):
        return full
    assert isinstance(p, Shard), p
    dim = p.dim % full.dim()
    pieces = []
    for block in full.split(list(_blocks(p, full.shape[dim])), dim=dim):
        pieces.append(block.chunk(world_size, dim=dim)[rank])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def unshard(locals_: Sequence[torch.Tensor], p: Shard) -> torch.Tensor:
    """Reassemble the full tensor from every rank's local piece (rank order)."""
    dim = p.dim % locals_[0].dim()
    n = len(locals_)
    if p.blocks is None:
        return torch.cat(list(locals_), dim=dim)
    sizes = [b // n for b in p.blocks]
    per_rank = [t.split(sizes, dim=dim) for t in locals_]
    return torch.cat([per_rank[r][j] for j in range(len(sizes)) for r in range(n)], dim=dim)


def rank_major(full: torch.Tensor, p: Shard, world_size: int) -> torch.Tensor:
    """``full`` reordered along ``p.dim`` so that rank r's piece is the r-th contiguous chunk
    (the layout reduce_scatter expects)."""
    if p.blocks is None:
        return full
    dim = p.dim % full.dim()
    return torch.cat([shard_tensor(full, p, r, world_size) for r in range(world_size)], dim=dim)
