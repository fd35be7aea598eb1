"""Tensor parallelism inside a mesh dim "tp", data parallelism across "dp", by DDP or by FSDP2
(``fully_shard``: parameters, gradients and optimizer state divided across the replicas): a
2 x 2 gloo mesh trains Llama (grouped-query attention) and GPT-2 for 3 AdamW steps under each
and matches one process training on the global batch; the FSDP GPT-2 is saved with
save_pretrained and loaded by transformers; bad mesh inputs raise the same AutoTPError on
every rank. One spawned group runs all of that. A 2 x 3 mesh (tensor-parallel world 3, which
does not divide Llama's 4 heads / 2 kv heads) trains under FSDP in a second group."""
from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import autotp
from autotp.errors import AutoTPError
from dist_utils import raised, run_ranks
from models import build, first_tensor

STEPS = 3
CASES = [("llama", "ddp"), ("gpt2", "ddp"), ("llama", "fsdp"), ("gpt2", "fsdp")]
SAVED = ("gpt2", "fsdp")  # the case written with save_pretrained after training
LAYOUT_MODEL = "llama_6"  # deep enough that FSDP's layer units hold less than DDP at dp 2


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


def _train(mesh, name: str, dp_mode: str, root: str | None = None) -> dict:
    dp_rank, dp = mesh.get_local_rank("dp"), mesh.size(0)
    model, args, kwargs, make = build(name)
    tp = autotp.parallelize(model, args, kwargs, mesh=mesh, objective="memory", dp_mode=dp_mode)
    assert tp.comm.world_size == mesh.size(1) and tp.dp_group is not None
    opt = _optimizer(tp.parameters())
    between = {}
    for a, k in _batches(make):
        a, k = _slice(a, dp_rank, dp), _slice(k, dp_rank, dp)
        opt.zero_grad()
        out = tp(*a, **k)
        # between forward and backward: every layer unit freed its gathered parameters (FSDP
        # gathers layer by layer), the root unit (embeddings, head) still holds its own
        between = {n: isinstance(p, DTensor) for n, p in tp.named_parameters()}
        _loss(out).backward()
        opt.step()
    total = sum(p.numel() for p in model.parameters())
    moments = sum(_local(st["exp_avg"]).numel() for st in opt.state.values())
    out = {"state": autotp.gather_state_dict(tp), "plan_dp_mode": tp.plan.dp_mode,
           "held": sum(_local(p).numel() for p in tp.parameters()) / total,
           "moments": moments / total, "dtensor": all(isinstance(p, DTensor) for p in tp.parameters()),
           "counts": dict(tp.collective_counts), "units": tp.fsdp_units, "between": between}
    if root is None:
        return out
    if (name, dp_mode) == SAVED:  # collective: every rank, one writer
        out["saved"] = autotp.save_pretrained(tp, f"{root}/{name}_{dp_mode}", config=model.config)
    # a call needing a new program (here: one more keyword) is refused on a mesh module,
    # before FSDP gathers anything: the parameters stay sharded
    mask = torch.ones(k["input_ids"].shape, dtype=torch.long)
    out["new_call"] = raised(lambda: tp(*a, **k, attention_mask=mask))
    out["dtensor_after_refusal"] = all(isinstance(p, DTensor) for p in tp.parameters())
    return out


def _bad_inputs(mesh) -> dict[str, str]:
    """Errors read only from arguments every rank holds alike: raised on every rank before any
    collective, so none waits on a peer that gave up."""
    model, args, kwargs, _ = build("llama")
    no_tp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "x"))
    return {"zero3": raised(lambda: autotp.parallelize(model, args, kwargs, mesh=mesh, dp_mode="zero3")),
            "no_tp": raised(lambda: autotp.parallelize(model, args, kwargs, mesh=no_tp))}


def _from_layout_and_weights(mesh, root: str) -> dict:
    """The best layout choose_layout finds for 2 x 2 devices, passed as plan= on a mesh of its
    shape: a 6-layer Llama under a budget between the least memory of DDP and of FSDP at tp 2
    (FSDP frees each layer after use, so only FSDP fits); and the GPT-2 saved above loaded
    slice by slice from its checkpoint into a model built without weights, on an FSDP mesh."""
    model, args, kwargs, make = build(LAYOUT_MODEL)
    least = {m: autotp.plan(model, args, kwargs, world_size=2, data_parallel=2, dp_mode=m, device="h100",
                            objective="memory").memory_bytes_per_rank for m in ("ddp", "fsdp")}
    lay = autotp.choose_layout(model, args, kwargs, nodes=2, gpus_per_node=2, device="h100",
                               global_batch=4, memory_budget=(least["ddp"] + least["fsdp"]) / 2)
    best = lay.best
    shaped = init_device_mesh("cpu", (best.dp, best.tp), mesh_dim_names=("dp", "tp"))
    dp_rank, dp = shaped.get_local_rank("dp"), best.dp
    a, k = _slice(_batches(make)[0], dp_rank, dp)  # a replica's batch: what the plan was made for
    assert (a[0] if a else k["input_ids"]).shape[0] == best.batch_per_replica
    tp = autotp.parallelize(model, a, k, mesh=shaped, plan=best.plan)
    opt = _optimizer(tp.parameters())
    for a, k in _batches(make):
        a, k = _slice(a, dp_rank, dp), _slice(k, dp_rank, dp)
        opt.zero_grad()
        _loss(tp(*a, **k)).backward()
        opt.step()
    out = {"best": (best.tp, best.dp, best.dp_mode), "state": autotp.gather_state_dict(tp),
           "layout_dp_mode": tp.plan.dp_mode, "dtensor": all(isinstance(p, DTensor) for p in tp.parameters())}
    gpt2, args, kwargs, make = build("gpt2")
    with autotp.empty_weights():
        empty = type(gpt2)(gpt2.config)
    loaded = autotp.parallelize(empty, args, kwargs, mesh=mesh, dp_mode="fsdp", objective="memory",
                                weights=f"{root}/gpt2_fsdp")
    torch.manual_seed(5)
    a, k = make(2, 6)
    out["loaded_logits"] = first_tensor(loaded(*a, **k)).detach()
    out["loaded_input"] = (a, k)
    return out


def _all_cases(rank: int, world: int, root: str) -> dict:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    cases = [_train(mesh, name, mode, root) for name, mode in CASES]
    return {"cases": cases, "errors": _bad_inputs(mesh), "layout": _from_layout_and_weights(mesh, root)}


def _one_device(name: str) -> dict[str, torch.Tensor]:
    model, _, _, make = build(name)
    opt = _optimizer(model.parameters())
    for a, k in _batches(make):
        opt.zero_grad()
        _loss(model(*a, **k)).backward()
        opt.step()
    return model.state_dict()


def _assert_close(got: dict, want: dict, label: str) -> None:
    for key, v in want.items():
        torch.testing.assert_close(got[key], v, rtol=1e-5, atol=1e-5, msg=lambda m: f"{label} {key}: {m}")


def test_two_by_two_mesh_trains_like_one_device_saves_and_refuses_bad_input(tmp_path) -> None:
    want = {name: _one_device(name) for name in ("llama", "gpt2", LAYOUT_MODEL)}
    ranks = run_ranks(_all_cases, 4, str(tmp_path))
    for rank, results in enumerate(ranks):
        for (name, mode), r in zip(CASES, results["cases"]):
            assert r["plan_dp_mode"] == mode
            assert r["counts"].get(("all_reduce", "forward"), 0) > 0  # tensor-parallel collectives ran
            if mode == "ddp":
                assert 0.4 < r["held"] < 0.6, r["held"]  # about half: the tp split
                assert 0.4 < r["moments"] < 0.6, r["moments"]
            else:  # FSDP divides the tp shard once more across the 2 replicas: about a quarter
                assert r["dtensor"] and r["dtensor_after_refusal"]
                assert 0.2 < r["held"] < 0.3, (name, rank, r["held"])
                assert 0.2 < r["moments"] < 0.3, (name, rank, r["moments"])
                # every layer is its own FSDP unit, freed after its forward; the root unit isn't
                assert len(r["units"]) == 2, r["units"]  # both models have 2 layers
                in_unit = {n: any(n.startswith(u + ".") for u in r["units"]) for n in r["between"]}
                assert all(r["between"][n] for n in in_unit if in_unit[n]), r["between"]
                assert not any(r["between"][n] for n in in_unit if not in_unit[n]), r["between"]
            _assert_close(r["state"], want[name], f"{name} {mode} rank {rank}")
            assert "new mode or call structure on a data-parallel (mesh) module" in r["new_call"], r["new_call"]
    # every rank gathered the same full state
    gathered = ranks[0]["cases"][CASES.index(SAVED)]["state"]
    for results in ranks[1:]:
        for key, v in results["cases"][CASES.index(SAVED)]["state"].items():
            assert torch.equal(v, gathered[key]), key

    # save_pretrained under FSDP x TP: transformers loads exactly what gather_state_dict gave
    from transformers import GPT2LMHeadModel
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2_fsdp").state_dict()
    assert "lm_head.weight" not in ranks[0]["cases"][CASES.index(SAVED)]["saved"]  # tied: once
    assert set(loaded) == set(gathered), set(loaded) ^ set(gathered)
    for key, v in gathered.items():
        assert torch.equal(loaded[key], v), key
    _assert_close(loaded, want["gpt2"], "gpt2 fsdp from_pretrained")

    # the layout choose_layout picked (FSDP: the budget fits nothing else at tp 2) given as plan=
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2_fsdp")
    for rank, results in enumerate(ranks):
        lay = results["layout"]
        assert lay["best"][2] == "fsdp" and lay["layout_dp_mode"] == "fsdp" and lay["dtensor"], lay["best"]
        _assert_close(lay["state"], want[LAYOUT_MODEL], f"layout {lay['best']} rank {rank}")
        # the checkpoint written from the FSDP mesh, loaded slice by slice into an empty model
        a, k = lay["loaded_input"]
        with torch.no_grad():
            ref = first_tensor(hf(*a, **k))
        torch.testing.assert_close(lay["loaded_logits"], ref, rtol=1e-5, atol=1e-5)

    # bad input on a mesh: the same AutoTPError on every rank, no rank left waiting
    errors = [results["errors"] for results in ranks]
    assert all(e == errors[0] for e in errors), errors
    assert "dp_mode must be one of" in errors[0]["zero3"], errors[0]
    assert "'tp'" in errors[0]["no_tp"], errors[0]


def _two_by_three(rank: int, world: int) -> dict:
    mesh = init_device_mesh("cpu", (2, 3), mesh_dim_names=("dp", "tp"))
    return _train(mesh, "llama_h4", "fsdp")


def test_tensor_parallel_world_three_in_a_two_by_three_mesh_with_fsdp() -> None:
    """Tensor-parallel world 3 (uneven: 4 heads, 2 kv heads split on head boundaries) inside a
    2 x 3 mesh, FSDP across the 2 replicas: 3 AdamW steps equal one process."""
    want = _one_device("llama_h4")
    for rank, r in enumerate(run_ranks(_two_by_three, 6)):
        assert r["plan_dp_mode"] == "fsdp" and r["dtensor"]
        assert r["counts"].get(("all_reduce", "forward"), 0) > 0
        # about a sixth (3-way tp, uneven on head boundaries, then halved by FSDP)
        assert 0.14 < r["held"] < 0.2 and 0.14 < r["moments"] < 0.2, (rank, r["held"], r["moments"])
        _assert_close(r["state"], want, f"llama_h4 fsdp rank {rank}")


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
