"""Tensor parallelism inside a mesh dim "tp", data parallelism (DDP) across "dp": a 2 x 2 gloo
mesh trains for a few steps and matches single-device training on the global batch."""
from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh

import autotp
from dist_utils import run_ranks
from models import build, first_tensor

STEPS = 3


def _batches(make):
    torch.manual_seed(11)
    return [make(4, 6) for _ in range(STEPS)]  # global batch 4


def _loss(out) -> torch.Tensor:
    return first_tensor(out).square().mean()


def _slice(tree, dp_rank: int, dp: int):
    return torch.utils._pytree.tree_map(
        lambda t: t.chunk(dp)[dp_rank] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, tree)


def _train(rank: int, world: int, name: str):
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp_rank, dp = mesh.get_local_rank("dp"), mesh.size(0)
    model, args, kwargs, make = build(name)
    tp = autotp.parallelize(model, args, kwargs, mesh=mesh, objective="memory")
    assert tp.comm.world_size == 2 and tp.dp_group is not None
    opt = torch.optim.SGD(tp.parameters(), lr=0.2, momentum=0.9)
    for a, k in _batches(make):
        opt.zero_grad()
        _loss(tp(*_slice(a, dp_rank, dp), **_slice(k, dp_rank, dp))).backward()
        opt.step()
    held = sum(p.numel() for p in tp.parameters()) / sum(p.numel() for p in model.parameters())
    return autotp.gather_state_dict(tp), held, dict(tp.collective_counts)


def test_two_by_two_mesh_trains_like_one_device() -> None:
    for name in ("llama", "gpt2"):
        model, _, _, make = build(name)
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        for a, k in _batches(make):
            opt.zero_grad()
            _loss(model(*a, **k)).backward()
            opt.step()
        for state, held, counts in run_ranks(_train, 4, name):
            assert held < 0.6, held  # each rank holds about half: the tp split
            assert counts.get(("all_reduce", "forward"), 0) > 0  # tensor-parallel collectives ran
            for key, v in model.state_dict().items():
                torch.testing.assert_close(state[key], v, rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{name} {key}: {m}")
