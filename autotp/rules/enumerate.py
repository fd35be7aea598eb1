"""The standard rule: ``strategies_from_dims`` turns a DimMap (an einsum-style label per tensor
dim) into candidate strategies, as the package docstring (rules/__init__.py) states; plus the
small helpers family files share (broadcast labels, dim normalization, shape arguments made
local)."""
from __future__ import annotations

import math
from typing import Callable, Hashable, Iterable, Sequence

import torch.fx as fx

from autotp.core.placements import (OutPlacement, Partial, Replicate, Shard, local_size, make_shard)
from autotp.core.meta import TensorMeta
from autotp.rules.registry import DimMap, Label, OpCall, Strategy


def _dim_ok(meta: TensorMeta, dim: int, blocks: tuple[int, ...], n: int) -> bool:
    """A blocked split (fused QKV) is offered only when n divides every block."""
    if meta.dynamic[dim]:
        return False
    return sum(blocks) == meta.shape[dim] and all(b % n == 0 and b >= n for b in blocks)


def _dynamic_label(call: OpCall, dm: DimMap, labels: list) -> Label:
    """The one label on dynamic dims an op may split: the largest at the example sizes, the
    last of the output's dims on a tie (see the module docstring)."""
    best, key = None, None
    for labs, metas in ((dm.outputs, call.outputs), (dm.inputs, call.inputs)):
        for labs_i, m in zip(labs, metas):
            for d, lab in enumerate(labs_i):
                if lab is not None and m is not None and m.dynamic[d]:
                    k = (m.shape[d], d)
                    if key is None or k > key:
                        best, key = lab, k
        if best is not None:
            return best
    return best


def label_units(sizes: Sequence[int], grains: Iterable[tuple[int, int]] = ()) -> list[int]:
    """Unit counts a label whose dims have ``sizes`` may be split in: the gcd of the sizes,
    plus ``size_i // g`` for each grain hint (i, g); every size must be a multiple."""
    found = [math.gcd(*sizes)] + [sizes[i] // g for i, g in grains if g and sizes[i] % g == 0]
    return [u for u in dict.fromkeys(found) if u >= 2 and all(s % u == 0 for s in sizes)]


def strategies_from_dims(call: OpCall, dm: DimMap,
                         out_hints: dict[tuple[int, int], set[tuple[int, ...]]],
                         grains: Callable[[str, int, int], set[int]] | None = None,
                         shared_pieces: bool = False) -> list[Strategy]:
    """``grains(kind, i, d)``: grain hints on dim d of input slot / output i (kind "in"/"out").
    ``shared_pieces`` (programs planned for inference): a label with fewer units than ranks,
    where the ranks are a multiple of the units, may also be split one unit per group of
    ranks (``Shard(rep=k)``, core/placements.py) when every output carries it (no sum over
    ranks could then count a shared piece twice).
    Strategy 0 is all-Replicate, as it is for every node strategies.build makes (fallbacks
    and parameters included); cli's replicated-plan time relies on that."""
    n = call.world_size
    n_in = len(dm.inputs)
    rep_out: OutPlacement = tuple(Replicate() for _ in dm.outputs) if dm.multi else Replicate()
    found: list[Strategy] = [Strategy(tuple(Replicate() for _ in range(n_in)), rep_out)]

    labels: list[Hashable] = []
    for labs in (*dm.inputs, *dm.outputs):
        for lab in labs:
            if lab is not None and lab not in labels:
                labels.append(lab)

    dyn_pick = _dynamic_label(call, dm, labels) if dm.dynamic_ok else None
    for lab in labels if n > 1 else []:
        in_dims = [labs.index(lab) if lab in labs else None for labs in dm.inputs]
        out_dims = [labs.index(lab) if lab in labs else None for labs in dm.outputs]
        if all(d is None for d in out_dims) and lab not in dm.contract:
            continue
        if any(d is None for d in out_dims) and any(d is not None for d in out_dims):
            continue
        dims = [("in", i, call.inputs[i], d) for i, d in enumerate(in_dims) if d is not None] + \
               [("out", i, call.outputs[i], d) for i, d in enumerate(out_dims) if d is not None]
        sizes = [m.shape[d] for _, _, m, d in dims]
        if any(m.dynamic[d] for _, _, m, d in dims):
            if lab == dyn_pick and len(set(sizes)) == 1 and sizes[0] % n == 0 and sizes[0] >= n:
                pl = {(kind, i): Shard(d) for kind, i, _, d in dims}
                ins = tuple(pl.get(("in", i), Replicate()) for i in range(n_in))
                outs = tuple(pl.get(("out", i), Partial()) for i in range(len(out_dims)))
                found.append(Strategy(ins, outs if dm.multi else outs[0]))
            continue
        hinted = [(k, g) for k, (kind, i, _, d) in enumerate(dims)
                  for g in (grains(kind, i, d) if grains else ())]
        for units in label_units(sizes, hinted):
            pl = {(kind, i): make_shard(d, s, s // units, n) for (kind, i, _, d), s in zip(dims, sizes)}
            ins = tuple(pl.get(("in", i), Replicate()) for i in range(n_in))
            outs = tuple(pl.get(("out", i), Partial()) for i in range(len(out_dims)))
            found.append(Strategy(ins, outs if dm.multi else outs[0]))
            if shared_pieces and units < n and n % units == 0 and all(d is not None for d in out_dims):
                pl = {(kind, i): make_shard(d, s, s // units, n, rep=n // units)
                      for (kind, i, _, d), s in zip(dims, sizes)}
                found.append(Strategy(tuple(pl.get(("in", i), Replicate()) for i in range(n_in)),
                                      tuple(pl[("out", i)] for i in range(len(out_dims)))
                                      if dm.multi else pl[("out", 0)]))
        options: list[tuple[int, ...]] = []
        for oi, d in enumerate(out_dims):
            if d is not None:
                options.extend(sorted(out_hints.get((oi, d), ())))
        for blocks in dict.fromkeys(options):
            if not all(_dim_ok(m, d, blocks, n) for _, _, m, d in dims):
                continue
            ins = tuple(Shard(d, blocks) if d is not None else Replicate() for d in in_dims)
            outs = tuple(Shard(d, blocks) if d is not None else Partial() for d in out_dims)
            found.append(Strategy(ins, outs if dm.multi else outs[0]))

    part_out: OutPlacement = tuple(Partial() for _ in dm.outputs) if dm.multi else Partial()
    if n == 1:
        return found
    if dm.partial_all and n_in:
        found.append(Strategy(tuple(Partial() for _ in range(n_in)), part_out))
    for slot in dm.partial_any:
        if slot < n_in:
            found.append(Strategy(tuple(Partial() if i == slot else Replicate()
                                        for i in range(n_in)), part_out))
    return list(dict.fromkeys(found))


def replicate_only(n_in: int, n_out: int | None) -> list[Strategy]:
    out: OutPlacement = Replicate() if n_out is None else tuple(Replicate() for _ in range(n_out))
    return [Strategy(tuple(Replicate() for _ in range(n_in)), out)]


def broadcast_labels(inputs: Sequence[TensorMeta], out: TensorMeta, prefix: str = "d"
                     ) -> tuple[tuple[tuple[Label, ...], ...], tuple[Label, ...]]:
    """Labels for a broadcasting elementwise op: dims align from the right; an input dim of
    size 1 against a larger output dim gets None (it is broadcast, so it stays replicated)."""
    r = len(out.shape)
    out_labels = tuple((prefix, i) for i in range(r))
    ins = []
    for m in inputs:
        off = r - len(m.shape)
        ins.append(tuple(None if (m.shape[j] == 1 and out.shape[off + j] != 1) else out_labels[off + j]
                         for j in range(len(m.shape))))
    return tuple(ins), out_labels


def norm_dims(dims: Iterable[int] | int, rank: int) -> list[int]:
    if isinstance(dims, int):
        dims = [dims]
    return sorted({d % rank for d in dims}) if rank else []


def scale_shape_arg(node: fx.Node, strategy: Strategy, n: int, rank: int = 0, index: int = 1) -> None:
    """Replace the global size at each output Shard dim of a shape-list argument (view,
    reshape, expand) with this rank's local size (uneven splits differ per rank). -1 and
    symbolic sizes are left alone (symbolic dims are never split)."""
    out = strategy.output
    if not isinstance(out, Shard):
        return
    shape = list(node.args[index])
    d = out.dim % len(shape)
    if isinstance(shape[d], int) and shape[d] != -1:
        shape[d] = local_size(out, shape[d], n, rank)
        args = list(node.args)
        args[index] = shape
        node.args = tuple(args)
