"""Saving and resuming a tensor-parallel module.

Two formats, two purposes:

- a *normal* checkpoint (``gather_state_dict``, ``save_pretrained``): full tensors under the
  original ``model.state_dict()`` keys, gathered one tensor at a time, so no rank ever holds
  the whole model twice. ``save_pretrained`` writes safetensors (sharded with a Hugging Face
  index when ``max_shard_bytes`` is given) that the original model, ``autotp.parallelize(...,
  weights=path)`` or ``transformers``' ``from_pretrained`` load.
- a *sharded* training checkpoint (``save_checkpoint``, ``load_checkpoint``) through
  ``torch.distributed.checkpoint`` (DCP): every rank writes only its shards of the model and
  the optimizer state, as DTensors on a mesh over the tensor-parallel group; DCP reshards on
  load, so a run saved at world size 2 resumes at world size 4.

A ``Shard(d, blocks=...)`` parameter (fused QKV) has no DTensor placement: each block is saved
as its own DTensor (``name#block<j>``) with ``Shard(d)``; the block sizes are a property of the
model, not of the world size, so that too reshards. ``autotp_layout.json`` records the blocks
and the optimizer's state names and hyperparameters.

Uneven splits: an element-wise one (vocab 257 on 3 ranks: 86, 86, 85) is DTensor's own
torch.chunk rule, so it is saved and loaded as a DTensor ``Shard``. A head-boundary one
(``Shard(d, grain=g)``) has no DTensor placement, nor does one whose pieces several ranks
share (``Shard(d, rep=k)``, an inference plan's kv heads): it is gathered and saved whole (DCP
keeps one copy of identical replicated entries) and loaded whole, then sliced.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Shard as DShard

from autotp.runtime.api import ParallelModule
from autotp.capture import fetch_attr
from autotp.rewrite.collectives import DistComm, gather_shards
from autotp.errors import AutoTPError
from autotp.core.placements import (Placement, Replicate, Shard, local_size, shard_ranges, shard_tensor)
from autotp.runtime.weights import nbytes, write_safetensors

LAYOUT = "autotp_layout.json"


def _check(tp: Any) -> ParallelModule:
    if not isinstance(tp, ParallelModule):
        raise AutoTPError(f"expected the module returned by autotp.parallelize, got {type(tp).__name__}")
    return tp


def unique_state(tp: ParallelModule) -> list[tuple[list[str], torch.Tensor, Placement]]:
    """(every key naming it, local tensor, placement) per distinct state tensor, in
    ``state_dict()`` order; tied weights once, under all their keys."""
    out: list[tuple[list[str], torch.Tensor, Placement]] = []
    seen: dict[int, int] = {}
    for key in tp.state_keys:
        t = fetch_attr(tp, key)  # this module's (FSDP re-registers parameters on their owners)
        if id(t) in seen:
            out[seen[id(t)]][0].append(key)
            continue
        seen[id(t)] = len(out)
        out.append(([key], t, tp.placements.get(key, Replicate())))
    return out


def iter_state_dict(tp: ParallelModule) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Full tensors one at a time: (keys, tensor). Collective: every rank must consume the
    iterator to the end (each step all-gathers one tensor)."""
    _check(tp)
    for keys, t, place in unique_state(tp):
        full = tp_piece(t.detach())
        if isinstance(place, Shard):
            full = gather_shards(tp.comm, full, place, tp.state_meta[keys[0]][0][place.dim % full.dim()])
        else:
            full = full.clone()
        yield keys, full


def gather_state_dict(tp_module: ParallelModule) -> dict[str, torch.Tensor]:
    """Full tensors under the original ``model.state_dict()`` keys. Collective: call on every
    rank; each rank gets the whole state (tied weights under every original key)."""
    _check(tp_module)
    got = {k: full for keys, full in iter_state_dict(tp_module) for k in keys}
    pp_group = getattr(tp_module, "pp_group", None)
    if pp_group is not None:  # pipeline stages: each holds its layers; every rank gets them all
        parts: list[Any] = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(parts, got, group=pp_group)
        got = {k: v for part in parts for k, v in part.items()}
        return {k: got[k] for k in tp_module.model_state_keys}
    return {k: got[k] for k in tp_module.state_keys}  # state_dict() order


def save_pretrained(tp: ParallelModule, path: str | os.PathLike, *, config: Any = None,
                    max_shard_bytes: int | None = None) -> list[str]:
    """Write a full safetensors checkpoint of ``tp`` into the folder ``path`` from rank 0,
    streaming one tensor at a time. Tied weights are written once, under their first key (as
    Hugging Face does). ``config`` (an object with ``save_pretrained``, e.g. a transformers
    config) is saved beside it. Collective: call on every rank. Returns the keys written."""
    _check(tp)
    folder = Path(path)
    if getattr(tp, "pp_group", None) is not None:
        return _save_stages(tp, folder, config)
    # one writer: tensor-parallel rank 0 of the first data-parallel replica
    rank0 = tp.comm.rank == 0 and (tp.dp_group is None or dist.get_rank(tp.dp_group) == 0)
    if rank0:
        folder.mkdir(parents=True, exist_ok=True)
    state = unique_state(tp)
    entries = [(keys[0], *tp.state_meta[keys[0]]) for keys, _, _ in state]
    sizes = [nbytes(s, d) for _, s, d in entries]
    # files: greedy by size, in order (HF's layout)
    files: list[list[int]] = [[]]
    acc = 0
    for i, n in enumerate(sizes):
        if max_shard_bytes is not None and files[-1] and acc + n > max_shard_bytes:
            files.append([])
            acc = 0
        files[-1].append(i)
        acc += n
    names = (["model.safetensors"] if len(files) == 1 else
             [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
    stream = iter_state_dict(tp)
    for fname, idx in zip(names, files):
        tensors = (full.to(entries[i][2]) for i, (_, full) in zip(idx, stream))
        if rank0:
            write_safetensors(folder / fname, [entries[i] for i in idx], tensors)
        else:
            for _ in tensors:  # take part in the gathers
                pass
    if rank0:
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(sizes)},
                     "weight_map": {entries[i][0]: fname for fname, idx in zip(names, files) for i in idx}}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(folder)
    _barrier(tp)
    return [e[0] for e in entries]


def _save_stages(tp: Any, folder: Path, config: Any) -> list[str]:
    """save_pretrained of a pipelined module: the whole state gathered on every rank
    (``gather_state_dict``: each stage gathers its layers, then the stages exchange them), one
    file written by global rank 0, a tied weight once under its first key."""
    state = gather_state_dict(tp)
    keys = [group[0] for group in tp.tied_keys]
    if dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        entries = [(k, *tp.state_meta[k]) for k in keys]
        write_safetensors(folder / "model.safetensors", entries,
                          (state[k].to(dtype) for k, _, dtype in entries))
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(folder)
    dist.barrier()
    return keys


def _barrier(tp: ParallelModule) -> None:
    if isinstance(tp.comm, DistComm):
        dist.barrier(group=tp.comm.group)
    else:
        tp.comm.all_reduce(torch.zeros(1))


# ---------------------------------------------------------------------------------------------
# sharded training checkpoints (torch.distributed.checkpoint)

def tp_piece(t: torch.Tensor) -> torch.Tensor:
    """This rank's tensor-parallel piece of a parameter or optimizer state: under FSDP across
    data-parallel replicas (dp_mode="fsdp") a DTensor split once more on dim 0, gathered here
    (collective over the replicas: every rank calls it in the same order)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _dp_target(target: torch.Tensor) -> tuple[torch.Tensor, Callable[[], Any]]:
    """Where to load a tensor-parallel piece so it ends up in ``target``: itself, or under
    FSDP (a DTensor split on dim 0 across the replicas, in torch.chunk sizes as FSDP2 splits)
    a whole piece, of which this replica's chunk is copied into the target after the load."""
    if not isinstance(target, DTensor):
        return target, lambda: None
    whole = torch.empty(tuple(target.shape), dtype=target.dtype, device=target.to_local().device)
    mesh = target.device_mesh
    return whole, lambda: target.to_local().copy_(
        torch.chunk(whole, mesh.size(), dim=0)[mesh.get_local_rank()])


def _mesh(tp: ParallelModule) -> DeviceMesh:
    if not isinstance(tp.comm, DistComm):
        raise AutoTPError("sharded checkpoints need a torch.distributed process group "
                          "(autotp.parallelize), not the simulator")
    group = tp.comm.group or dist.group.WORLD
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    return DeviceMesh.from_group(group, device)


def _pieces(local: torch.Tensor, place: Placement, global_shape: tuple[int, ...], rank: int, n: int,
            mesh: DeviceMesh, comm: DistComm) -> list[tuple[str, Any]]:
    """(key suffix, value to save) for one local tensor."""
    if not isinstance(place, Shard):
        return [("", local)]
    d = place.dim % len(global_shape)
    if place.grain is not None or place.rep is not None:
        # split on head boundaries unevenly, or pieces shared by several ranks: DTensor's Shard
        # chunks element by element over every rank, so it cannot describe these pieces; save
        # the whole tensor (every rank holds the same one)
        return [("", gather_shards(comm, local, place, global_shape[d]))]
    if place.blocks is None:
        return [("", DTensor.from_local(local, mesh, [DShard(d)], shape=torch.Size(global_shape),
                                        stride=_stride(global_shape)))]
    out = []
    lens = [b - a for a, b in shard_ranges(place, global_shape[d], rank, n)]
    for j, (piece, b) in enumerate(zip(local.split(lens, dim=d), place.blocks)):
        shape = global_shape[:d] + (b,) + global_shape[d + 1:]
        out.append((f"#block{j}", DTensor.from_local(piece.contiguous(), mesh, [DShard(d)],
                                                     shape=torch.Size(shape), stride=_stride(shape))))
    return out


def _stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= s
    return tuple(reversed(out))


def save_checkpoint(tp: ParallelModule, path: str | os.PathLike,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write this rank's shards of the model (and of ``optimizer``'s state) to the folder
    ``path`` with torch.distributed.checkpoint. Collective: call on every rank."""
    _check(tp)
    mesh = _mesh(tp)
    n, rank = tp.comm.world_size, tp.comm.rank
    state: dict[str, Any] = {}
    layout: dict[str, Any] = {"blocks": {}, "optim": {}, "param_groups": []}
    by_param = {}
    for keys, t, place in unique_state(tp):
        key = keys[0]
        shape = tp.state_meta[key][0]
        for suffix, v in _pieces(tp_piece(t.detach()), place, shape, rank, n, mesh, tp.comm):
            state[f"model/{key}{suffix}"] = v
        if isinstance(place, Shard) and place.blocks is not None:
            layout["blocks"][key] = {"dim": place.dim % len(shape), "blocks": list(place.blocks)}
        by_param[id(t)] = (key, place, shape)
    if optimizer is not None:
        for group in optimizer.param_groups:
            layout["param_groups"].append({k: v for k, v in group.items() if k != "params"
                                           and isinstance(v, (int, float, bool, str, type(None), list, tuple))})
            for p in group["params"]:
                if id(p) not in by_param:
                    raise AutoTPError("the optimizer holds a tensor that is not a parameter of this module")
                key, place, shape = by_param[id(p)]
                names = {}
                for name, v in optimizer.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0:
                        names[name] = "param"
                        for suffix, x in _pieces(tp_piece(v), place, shape, rank, n, mesh, tp.comm):
                            state[f"optim/{key}/{name}{suffix}"] = x
                    elif isinstance(v, torch.Tensor):
                        names[name] = "tensor"
                        state[f"optim/{key}/{name}"] = v
                    else:
                        names[name] = "value"
                        state[f"optim/{key}/{name}"] = torch.tensor(float(v))
                layout["optim"][key] = names
    dcp.save(state, checkpoint_id=str(path))
    # pipeline stages hold different layers: rank 0 writes every stage's blocks and optimizer
    # state names (a tensor two stages hold, a tied embedding, has one placement: one plan)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, layout)
    for part in parts:
        layout["blocks"].update(part["blocks"])
        layout["optim"].update(part["optim"])
    if dist.get_rank() == 0:
        (Path(path) / LAYOUT).write_text(json.dumps(layout, indent=2))
    dist.barrier()  # every rank (dcp.save's group): the layout is written when any returns


def load_checkpoint(tp: ParallelModule, path: str | os.PathLike,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a ``save_checkpoint`` folder into ``tp`` (and ``optimizer``), whatever world size
    and plan wrote it, pipelined or not (each stage reads its own layers). Collective: call on
    every rank."""
    _check(tp)
    folder = Path(path)
    if not (folder / LAYOUT).exists():
        raise AutoTPError(f"{folder} is not an autotp checkpoint (no {LAYOUT}); "
                          "full safetensors checkpoints load with parallelize(..., weights=path)")
    layout = json.loads((folder / LAYOUT).read_text())
    mesh = _mesh(tp)
    n, rank = tp.comm.world_size, tp.comm.rank
    # per target: (prefix, placement, global shape, local tensor to fill)
    todo: list[tuple[str, Placement, tuple[int, ...], torch.Tensor, str]] = []
    by_param = {}
    for keys, t, place in unique_state(tp):
        key = keys[0]
        todo.append((f"model/{key}", place, tp.state_meta[key][0], t, key))
        by_param[id(t)] = (key, place)
    if optimizer is not None:
        if len(layout["param_groups"]) != len(optimizer.param_groups):
            raise AutoTPError(f"the checkpoint has {len(layout['param_groups'])} optimizer param "
                              f"groups, the optimizer {len(optimizer.param_groups)}")
        for group, saved in zip(optimizer.param_groups, layout["param_groups"]):
            group.update(saved)
            for p in group["params"]:
                key, place = by_param[id(p)]
                st = optimizer.state[p]
                for name, kind in layout["optim"].get(key, {}).items():
                    if kind == "param":
                        st[name] = torch.zeros_like(p)
                        todo.append((f"optim/{key}/{name}", place, tp.state_meta[key][0], st[name], key))
                    else:
                        st[name] = torch.zeros(())
                        todo.append((f"optim/{key}/{name}", Replicate(), (), st[name], key))
    state: dict[str, Any] = {}
    finish = []
    for prefix, place, shape, target, key in todo:
        saved = layout["blocks"].get(key) if shape else None
        piece, scatter = _dp_target(target)
        state_part, done = _targets(prefix, place, shape, piece, saved, rank, n, mesh)
        state.update(state_part)
        finish.extend((done, scatter))
    dcp.load(state, checkpoint_id=str(folder))
    with torch.no_grad():
        for done in finish:
            done()
    if optimizer is not None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                key, _ = by_param[id(p)]
                for name, kind in layout["optim"].get(key, {}).items():
                    if kind == "value":
                        optimizer.state[p][name] = optimizer.state[p][name].item()
    _barrier(tp)


def _targets(prefix: str, place: Placement, shape: tuple[int, ...], target: torch.Tensor,
             saved: dict | None, rank: int, n: int, mesh: DeviceMesh):
    """What to ask DCP for so that ``target`` ends up as this rank's piece under ``place``,
    given how the tensor was saved (whole, or in blocks along a dim); and a function copying
    the loaded values into ``target``."""
    def tensor_like(s: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(s, dtype=target.dtype, device=target.device)

    if saved is None:  # saved as one tensor
        if isinstance(place, Shard) and place.blocks is None and place.grain is None and place.rep is None:
            d = place.dim % len(shape)
            v = DTensor.from_local(tensor_like(tuple(target.shape)), mesh, [DShard(d)],
                                   shape=torch.Size(shape), stride=_stride(shape))
            return {prefix: v}, lambda: target.copy_(v.to_local())
        if not isinstance(place, Shard):
            v = tensor_like(shape) if shape else target
            return {prefix: v}, (lambda: target.copy_(v)) if shape else (lambda: None)
        full = tensor_like(shape)  # blocked target from a whole tensor: read it all, slice
        return {prefix: full}, lambda: target.copy_(shard_tensor(full, place, rank, n))
    ds, blocks = saved["dim"], saved["blocks"]
    block_shapes = [shape[:ds] + (b,) + shape[ds + 1:] for b in blocks]
    if isinstance(place, Shard) and place.grain is None and place.rep is None and (
            place.dim % len(shape) != ds or tuple(blocks) == place.blocks):
        # chunking along d commutes with the concatenation of blocks along ds
        d = place.dim % len(shape)
        parts = []
        for s in block_shapes:
            local = list(s)
            local[d] = local_size(Shard(d), s[d], n, rank)
            parts.append(DTensor.from_local(tensor_like(tuple(local)), mesh, [DShard(d)],
                                            shape=torch.Size(s), stride=_stride(s)))
        return ({f"{prefix}#block{j}": v for j, v in enumerate(parts)},
                lambda: target.copy_(torch.cat([v.to_local() for v in parts], dim=ds)))
    parts = [tensor_like(s) for s in block_shapes]  # read whole blocks, then slice
    return ({f"{prefix}#block{j}": v for j, v in enumerate(parts)},
            lambda: target.copy_(shard_tensor(torch.cat(parts, dim=ds), place, rank, n)))


__all__ = ["gather_state_dict", "iter_state_dict", "save_pretrained", "save_checkpoint",
           "load_checkpoint"]
