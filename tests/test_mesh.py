"""Tensor parallelism inside a mesh dim "tp", data parallelism across "dp", by DDP or by FSDP2
(``fully_shard``: parameters, gradients and optimizer state divided across the replicas): a
2 x 2 gloo mesh trains Llama (grouped-query attention) and GPT-2 for 3 AdamW steps under each
and matches one process training on the global batch. One spawned group runs all four."""
from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import autotp
from autotp.errors import AutoTPError
from dist_utils import run_ranks
from models import build, first_tensor

STEPS = 3
CASES = [("llama", "ddp"), ("gpt2", "ddp"), ("llama", "fsdp"), ("gpt2", "fsdp")]


def _batches(make):
    torch.manual_seed(11)
    return [make(4, 6) for _ in range(STEPS)]  # global batch 4


def _loss(out) -> torch.Tensor:
    return first_tensor(out).square().mean()


def _slice(tree, dp_rank: int, dp: int):
    return torch.utils._pytree.tree_map(
        lambda t: t.chunk(dp)[dp_rank] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, tree)


def _optimizer(params) -> torch.optim.Optimizer:
    # Adam divides by sqrt(v) + eps: a gradient element near zero, where one device and the
    # mesh differ by float rounding, moves by up to lr either way. eps 1e-6 (torch's 1e-8)
    # keeps such elements' updates proportional to their gradients, so 1e-5 can hold
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, eps=1e-6)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _train(mesh, name: str, dp_mode: str) -> dict:
    dp_rank, dp = mesh.get_local_rank("dp"), mesh.size(0)
    model, args, kwargs, make = build(name)
    tp = autotp.parallelize(model, args, kwargs, mesh=mesh, objective="memory", dp_mode=dp_mode)
    assert tp.comm.world_size == 2 and tp.dp_group is not None
    opt = _optimizer(tp.parameters())
    for a, k in _batches(make):
        opt.zero_grad()
        _loss(tp(*_slice(a, dp_rank, dp), **_slice(k, dp_rank, dp))).backward()
        opt.step()
    total = sum(p.numel() for p in model.parameters())
    moments = sum(_local(st["exp_avg"]).numel() for st in opt.state.values())
    return {"state": autotp.gather_state_dict(tp), "plan_dp_mode": tp.plan.dp_mode,
            "held": sum(_local(p).numel() for p in tp.parameters()) / total,
            "moments": moments / total, "dtensor": all(isinstance(p, DTensor) for p in tp.parameters()),
            "counts": dict(tp.collective_counts)}


def _all_cases(rank: int, world: int) -> list[dict]:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    return [_train(mesh, name, mode) for name, mode in CASES]


def _one_device(name: str) -> dict[str, torch.Tensor]:
    model, _, _, make = build(name)
    opt = _optimizer(model.parameters())
    for a, k in _batches(make):
        opt.zero_grad()
        _loss(model(*a, **k)).backward()
        opt.step()
    return model.state_dict()


def test_two_by_two_mesh_trains_like_one_device_with_ddp_and_fsdp() -> None:
    want = {name: _one_device(name) for name in ("llama", "gpt2")}
    for rank, results in enumerate(run_ranks(_all_cases, 4)):
        for (name, mode), r in zip(CASES, results):
            assert r["plan_dp_mode"] == mode
            assert r["counts"].get(("all_reduce", "forward"), 0) > 0  # tensor-parallel collectives ran
            if mode == "ddp":
                assert 0.4 < r["held"] < 0.6, r["held"]  # about half: the tp split
                assert 0.4 < r["moments"] < 0.6, r["moments"]
            else:  # FSDP divides the tp shard once more across the 2 replicas: about a quarter
                assert r["dtensor"]
                assert 0.2 < r["held"] < 0.3, (name, rank, r["held"])
                assert 0.2 < r["moments"] < 0.3, (name, rank, r["moments"])
            for key, v in want[name].items():
                torch.testing.assert_close(r["state"][key], v, rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{name} {mode} rank {rank} {key}: {m}")


def test_fsdp_plan_divides_state_and_auto_picks_what_fits() -> None:
    """The cost model's two data-parallel kinds: FSDP divides parameters, gradients and
    optimizer state across replicas, DDP does not; "auto" keeps DDP while it fits (it moves
    no more bytes and copies less) and switches to FSDP when only FSDP fits."""
    model, args, kwargs, _ = build("llama")
    common = dict(world_size=2, data_parallel=4, device="h100")
    ddp = autotp.plan(model, args, kwargs, dp_mode="ddp", **common)
    fsdp = autotp.plan(model, args, kwargs, dp_mode="fsdp", **common)
    auto = autotp.plan(model, args, kwargs, **common)
    assert (ddp.dp_mode, fsdp.dp_mode, auto.dp_mode) == ("ddp", "fsdp", "ddp")
    assert ddp.dp_size == fsdp.dp_size == 4 and ddp.dp_time_s > 0 and fsdp.dp_time_s > 0
    assert fsdp.memory_bytes_per_rank < ddp.memory_bytes_per_rank
    assert fsdp.predicted_time_s > ddp.predicted_time_s  # FSDP's copies and second latency
    # a budget between the least each needs: only FSDP fits, and auto finds it
    least = {m: autotp.plan(model, args, kwargs, dp_mode=m, objective="memory", **common).memory_bytes_per_rank
             for m in ("ddp", "fsdp")}
    budget = (least["ddp"] + least["fsdp"]) / 2
    tight = autotp.plan(model, args, kwargs, memory_budget=budget, **common)
    assert tight.dp_mode == "fsdp" and tight.memory_bytes_per_rank <= budget
    with pytest.raises(AutoTPError, match="dp_mode='fsdp'"):
        autotp.plan(model, args, kwargs, memory_budget=budget, dp_mode="ddp", **common)
    with pytest.raises(AutoTPError, match="dp_mode must be one of"):
        autotp.plan(model, args, kwargs, dp_mode="zero3", **common)
