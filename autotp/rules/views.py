"""Views, reshapes, transposes, slices, concatenation, splits and chunks, advanced indexing.
A shard passes through when the split dim maps to a whole block of output dims:
hidden -> (heads, head_dim) splits heads.
Global sizes in shape arguments (the head count) are rewritten to per-rank sizes.

Facts: no FLOPs; views, reshapes, transposes, slices and splits alias their input (``view``:
no activation memory); cat and repeat_interleave copy but their backward needs no input."""
from __future__ import annotations

import torch
import torch.fx as fx

from autotp.core.placements import Shard, local_size, shard_ranges
from autotp.rules.registry import DimMap, Label, OpCall, Strategy, keeps_nothing, register
from autotp.rules.enumerate import norm_dims, scale_shape_arg

aten = torch.ops.aten


def view_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair up runs of dims whose sizes multiply to the same number (a reshape's structure)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        if i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
            groups.append(([], [j]))
            j += 1
            continue
        if i >= len(src) or j >= len(dst):
            raise ValueError(f"cannot match reshape {src} -> {dst}")
        gi, gj, pi, pj = [i], [j], src[i], dst[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                gi.append(i)
                pi *= src[i]
                i += 1
            else:
                gj.append(j)
                pj *= dst[j]
                j += 1
        groups.append((gi, gj))
    return groups


def _view_dims(call: OpCall) -> DimMap:
    src, dst = call.inputs[0].shape, call.outputs[0].shape
    ins: list[Label] = [None] * len(src)
    outs: list[Label] = [None] * len(dst)
    for k, (gi, gj) in enumerate(view_groups(src, dst)):
        if gi and gj:
            # only the outermost dim of each side carries a split: chunk r of (a, b) flattened
            # is chunk r of a, and nothing else maps to contiguous chunks
            ins[gi[0]] = outs[gj[0]] = ("g", k)
    return DimMap((tuple(ins),), (tuple(outs),), partial_any=(0,))


register(aten.view.default, aten.reshape.default, aten._unsafe_view.default,
         localize=scale_shape_arg, view=True)(_view_dims)
register(aten.flatten.using_ints, aten.unflatten.int, view=True)(_view_dims)


@register(aten.expand.default, localize=scale_shape_arg, view=True)
def _expand(call: OpCall) -> DimMap:
    src, dst = call.inputs[0].shape, call.outputs[0].shape
    off = len(dst) - len(src)
    outs: list[Label] = [None] * len(dst)
    ins: list[Label] = []
    for j, s in enumerate(src):
        lab = ("e", j) if s == dst[off + j] else None
        ins.append(lab)
        outs[off + j] = lab
    return DimMap((tuple(ins),), (tuple(outs),), partial_any=(0,))


def _permuted(call: OpCall, order: list[int]) -> DimMap:
    ins = tuple(("p", j) for j in range(len(call.inputs[0].shape)))
    return DimMap((ins,), (tuple(ins[j] for j in order),), partial_any=(0,))


@register(aten.transpose.int, view=True)
def _transpose(call: OpCall) -> DimMap:
    r = len(call.inputs[0].shape)
    a, b = call.arg(1, "dim0") % r, call.arg(2, "dim1") % r
    order = list(range(r))
    order[a], order[b] = order[b], order[a]
    return _permuted(call, order)


@register(aten.t.default, view=True)
def _t(call: OpCall) -> DimMap:
    return _permuted(call, list(range(len(call.inputs[0].shape)))[::-1])


@register(aten.permute.default, view=True)
def _permute(call: OpCall) -> DimMap:
    r = len(call.inputs[0].shape)
    return _permuted(call, [d % r for d in call.arg(1, "dims")])


@register(aten.unsqueeze.default, view=True)
def _unsqueeze(call: OpCall) -> DimMap:
    r = len(call.outputs[0].shape)
    d = call.arg(1, "dim") % r
    ins = tuple(("u", j) for j in range(r - 1))
    outs = ins[:d] + (None,) + ins[d:]
    return DimMap((ins,), (outs,), partial_any=(0,))


@register(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, view=True)
def _squeeze(call: OpCall) -> DimMap:
    src = call.inputs[0].shape
    dims = call.arg(1, "dim", None)
    drop = set(norm_dims(dims, len(src))) if dims is not None else {j for j, s in enumerate(src) if s == 1}
    drop = {j for j in drop if src[j] == 1}
    ins = tuple(("q", j) if j not in drop else None for j in range(len(src)))
    return DimMap((ins,), (tuple(lab for lab in ins if lab is not None),), partial_any=(0,))


@register(aten.slice.Tensor, view=True)
def _slice(call: OpCall) -> DimMap:
    meta = call.inputs[0]
    r = len(meta.shape)
    d = call.arg(1, "dim", 0) % r
    start, end, step = call.arg(2, "start", None), call.arg(3, "end", None), call.arg(4, "step", 1)
    size = meta.shape[d]
    to_end = end is None or (isinstance(end, int) and isinstance(size, int) and end >= size)
    full = start in (None, 0) and step == 1 and to_end
    # x[..., k::s] with 0 <= k < s over the whole dim: one element of every group of s (the
    # gate rows of a fused [g0, u0, g1, u1, ...] projection). Pieces cut on group boundaries
    # (the label's units are the groups, label_units) make it this rank's k::s, unchanged.
    strided = isinstance(step, int) and step > 1 and isinstance(start or 0, int) and \
        0 <= (start or 0) < step and to_end and isinstance(size, int) and size % step == 0
    ins = tuple(("s", j) if (j != d or full or strided) else None for j in range(r))
    return DimMap((ins,), (ins,), partial_any=(0,))


@register(aten.select.int, view=True)
def _select(call: OpCall) -> DimMap:
    r = len(call.inputs[0].shape)
    d = call.arg(1, "dim") % r
    ins = tuple(("s", j) if j != d else None for j in range(r))
    return DimMap((ins,), (tuple(lab for lab in ins if lab is not None),), partial_any=(0,))


@register(aten.cat.default, keeps=keeps_nothing)
def _cat(call: OpCall) -> DimMap:
    r = len(call.outputs[0].shape)
    d = call.arg(1, "dim", 0) % r
    labels = tuple(("c", j) if j != d else None for j in range(r))
    ins = tuple(labels if len(m.shape) == r else tuple(None for _ in m.shape) for m in call.inputs)
    return DimMap(ins, (labels,), partial_all=True)


# split: the split dim itself can carry a *blocked* shard whose blocks are the split sizes
# (a fused QKV output): every output is then an ordinary Shard of that dim.

def _split_sizes(call: OpCall) -> tuple[int, list[int]]:
    meta = call.inputs[0]
    r = len(meta.shape)
    d = call.arg(2, "dim", 0) % r
    if call.node.target is aten.chunk.default:  # torch.chunk: split in ceil(total / chunks)
        size_arg = -(-meta.shape[d] // call.arg(1, "chunks"))
    else:
        size_arg = call.arg(1, "split_size")
    if isinstance(size_arg, int):
        total = meta.shape[d]
        sizes = [size_arg] * (total // size_arg) + ([total % size_arg] if total % size_arg else [])
    else:
        sizes = list(size_arg)
    return d, sizes


def _split(call: OpCall) -> DimMap:
    d, _ = _split_sizes(call)
    labels = tuple(("x", j) if j != d else None for j in range(len(call.inputs[0].shape)))
    return DimMap((labels,), tuple(labels for _ in call.outputs), partial_any=(0,), multi=True)


def _split_extra(call: OpCall) -> list[Strategy]:
    d, sizes = _split_sizes(call)
    n = call.world_size
    meta = call.inputs[0]
    if len(sizes) < 2 or meta.dynamic[d] or any(s % n or s < n for s in sizes):
        return []
    if call.node.target is aten.chunk.default and len(set(sizes)) > 1:
        return []  # the local chunk of unequal blocks would cut elsewhere (no size to rewrite)
    return [Strategy((Shard(d, tuple(sizes)),), tuple(Shard(d) for _ in sizes))]


def _split_hints(call: OpCall) -> list[tuple[int, int, tuple[int, ...]]]:
    d, sizes = _split_sizes(call)
    return [(0, d, tuple(sizes))] if len(sizes) > 1 else []


def _split_localize(node: fx.Node, strategy: Strategy, n: int, rank: int) -> None:
    src = strategy.inputs[0]
    if not (isinstance(src, Shard) and src.blocks is not None):
        return
    args = list(node.args)
    if isinstance(args[1], int):
        args[1] = args[1] // n  # blocked splits are offered only when n divides every block
    else:
        args[1] = [b - a for a, b in shard_ranges(src, sum(args[1]), rank, n)]
    node.args = tuple(args)


register(aten.split.Tensor, aten.split_with_sizes.default, extra=_split_extra,
         localize=_split_localize, hints=_split_hints, view=True)(_split)
# chunk(x, k): k equal blocks, so this rank's chunk(local, k) is its piece of every block as it
# stands (no argument to rewrite)
register(aten.chunk.default, extra=_split_extra, hints=_split_hints, view=True)(_split)


# x[idx] (advanced indexing, aten.index.Tensor): the indexed dims are gathered by data, so they
# stay whole, as do the index tensors; every other dim of x passes through to the output
# (its position: where the indexed dims were when they are adjacent, after the index's
# broadcast dims when not, as numpy's rule). Linear in x.
def _index(call: OpCall) -> DimMap | None:
    src, out = call.inputs[0], call.outputs[0]
    indices = call.arg(1, "indices")
    r = len(src.shape)
    pos = [j for j, t in enumerate(indices) if t is not None]
    if not pos or any(m.dtype == torch.bool for m in call.inputs[1:]):
        return None  # boolean masks: a data-dependent shape
    labels = [("ix", j) for j in range(r)]
    rest = [j for j in range(r) if j not in pos]
    b = len(out.shape) - len(rest)
    if pos == list(range(pos[0], pos[-1] + 1)):
        outs = labels[:pos[0]] + [None] * b + labels[pos[-1] + 1:]
    else:
        outs = [None] * b + [labels[j] for j in rest]
    ins = tuple(None if j in pos else labels[j] for j in range(r))
    return DimMap((ins, *(tuple(None for _ in m.shape) for m in call.inputs[1:])), (tuple(outs),),
                  partial_any=(0,))


register(aten.index.Tensor, keeps=keeps_nothing)(_index)


# repeat_interleave(x, r, dim): each slice along dim repeated r times in place, so the n
# contiguous chunks of the input map onto the n contiguous chunks of the output (GQA's
# key/value head repetition keeps every query head with its key/value head). The label's
# dims differ in size (h_kv, r h_kv): unevenly they split in units of kv heads, the output in
# grains of r (see label_units).
def _repeat_interleave(call: OpCall) -> DimMap | None:
    if not isinstance(call.arg(1, "repeats"), int):
        return None  # per-element repeat counts: no rule
    r = len(call.inputs[0].shape)
    dim = call.arg(2, "dim", None)
    if dim is None:
        return None  # flattens the input
    labels = tuple(("ri", j) for j in range(r))
    return DimMap((labels,), (labels,), partial_any=(0,))


def _repeat_interleave_localize(node: fx.Node, strategy: Strategy, n: int, rank: int) -> None:
    if isinstance(strategy.output, Shard) and node.kwargs.get("output_size") is not None:
        node.kwargs = {**node.kwargs,
                       "output_size": local_size(strategy.output, node.kwargs["output_size"], n, rank)}


register(aten.repeat_interleave.self_int, localize=_repeat_interleave_localize,
         keeps=keeps_nothing)(_repeat_interleave)
