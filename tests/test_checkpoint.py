"""Saving: a full safetensors checkpoint that transformers' from_pretrained (and autotp's own
loader, at another world size) reads back; a sharded torch.distributed.checkpoint that a run
at world size 4 resumes from a checkpoint written at world size 2, reaching the same weights
as an uninterrupted single-device run; and one written on a dp 2 x tp 2 mesh under FSDP that
meshes 1 x 4 and 4 x 1 resume."""
from __future__ import annotations

import json

import torch

import autotp
from dist_utils import run_ranks
from models import build, first_tensor


NAMES = ("gpt2", "llama")


def _save(rank: int, world: int, root: str) -> dict[str, list[str]]:
    keys = {}
    for name in NAMES:
        model, args, kwargs, _ = build(name)
        tp = autotp.parallelize(model, args, kwargs, objective="memory")
        keys[name] = autotp.save_pretrained(tp, f"{root}/{name}", config=model.config,
                                            max_shard_bytes=100_000)
    return keys


def _reload_one(name: str, path: str) -> float:
    model, args, kwargs, make = build(name)
    with autotp.empty_weights():
        empty = type(model)(model.config)
    tp = autotp.parallelize(empty, args, kwargs, weights=path, objective="memory")
    torch.manual_seed(1)
    a, k = make(3, 6)
    return (first_tensor(tp(*a, **k)) - first_tensor(model(*a, **k))).abs().max().item()


def _reload(rank: int, world: int, root: str) -> dict[str, float]:
    return {name: _reload_one(name, f"{root}/{name}") for name in NAMES}


def test_save_pretrained_loads_in_transformers_and_at_another_world_size(tmp_path) -> None:
    saved = run_ranks(_save, 2, str(tmp_path))[0]
    for name in NAMES:
        out = tmp_path / name
        keys = saved[name]
        model, *_ = build(name)
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(keys)
        if name == "gpt2":  # tied: written once, under the first key, as transformers does
            assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
        loaded = type(model).from_pretrained(out)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    for errors in run_ranks(_reload, 4, str(tmp_path)):
        assert all(err <= 1e-5 for err in errors.values()), errors


def _batches(make):
    torch.manual_seed(7)
    return [make(2, 5) for _ in range(4)]


def _loss(out) -> torch.Tensor:
    return first_tensor(out).square().mean()


def _train(rank: int, world: int, root: str, steps: tuple[int, int], resume: bool):
    states = {}
    for name in NAMES:
        # the resumed run starts from other weights (seed 3): all must come from the checkpoint
        model, args, kwargs, make = build(name, seed=3 if resume else 0)
        tp = autotp.parallelize(model, args, kwargs, objective="memory")
        opt = torch.optim.SGD(tp.parameters(), lr=0.1, momentum=0.9)
        if resume:
            autotp.load_checkpoint(tp, f"{root}/{name}", opt)
        for a, k in _batches(make)[steps[0]:steps[1]]:
            opt.zero_grad()
            _loss(tp(*a, **k)).backward()
            opt.step()
        if resume:
            states[name] = autotp.gather_state_dict(tp)
        else:
            autotp.save_checkpoint(tp, f"{root}/{name}", opt)
    return states


def test_sharded_checkpoint_resumes_at_another_world_size(tmp_path) -> None:
    # GPT-2's fused QKV is saved block by block; momentum buffers are optimizer state
    run_ranks(_train, 2, str(tmp_path), (0, 2), False)
    resumed = run_ranks(_train, 4, str(tmp_path), (2, 4), True)
    for name in NAMES:
        ck = tmp_path / name
        model, _, _, make = build(name)
        ref_opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for a, k in _batches(make):  # uninterrupted, one device
            ref_opt.zero_grad()
            _loss(model(*a, **k)).backward()
            ref_opt.step()
        layout = json.loads((ck / "autotp_layout.json").read_text())
        if name == "gpt2":
            assert layout["blocks"], "the fused QKV should be saved in blocks"
        assert all(v == {"momentum_buffer": "param"} for v in layout["optim"].values())
        for states in resumed:
            for key, v in model.state_dict().items():
                torch.testing.assert_close(states[name][key], v, rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{name} {key}: {m}")


UNEVEN_NAMES = ("gpt2_v257", "llama_h4")


def _train_uneven(rank: int, world: int, ck: str, steps: tuple[int, int], resume: bool,
                  head_split: bool) -> dict:
    """Both uneven models; ``head_split``: Llama's attention on head boundaries (grain 16),
    which DTensor can't describe, so it is saved whole."""
    from test_parallel_gloo import head_split_plan
    out = {}
    for name in UNEVEN_NAMES:
        model, args, kwargs, make = build(name, seed=3 if resume else 0)
        if head_split and name == "llama_h4":
            tp = autotp.parallelize(model, args, kwargs, plan=head_split_plan(model, args, kwargs, world))
        else:
            tp = autotp.parallelize(model, args, kwargs, objective="memory")
        opt = torch.optim.SGD(tp.parameters(), lr=0.1, momentum=0.9)
        if not resume and name == "gpt2_v257":  # the initial weights, gathered from pieces
            autotp.save_pretrained(tp, f"{ck}/pretrained", config=model.config)
        if resume:
            autotp.load_checkpoint(tp, f"{ck}/{name}", opt)
        for a, k in _batches(make)[steps[0]:steps[1]]:
            opt.zero_grad()
            _loss(tp(*a, **k)).backward()
            opt.step()
        if not resume:
            autotp.save_checkpoint(tp, f"{ck}/{name}", opt)
            out[name] = {k: str(v) for k, v in tp.placements.items()}
        else:
            out[name] = autotp.gather_state_dict(tp)
    if resume and world == 3:  # safetensors read back slice by slice in uneven pieces
        out["reload"] = _reload_one("gpt2_v257", f"{ck}/pretrained")
    return out


def test_uneven_checkpoints_save_and_resume(tmp_path) -> None:
    """Saved at world 3 (vocab 257 in pieces 86, 86, 85 as DTensors; heads 2, 2, 0 whole),
    resumed at world 2 and at world 3: the same weights as two uninterrupted steps."""
    refs = {}
    for name in UNEVEN_NAMES:
        model, _, _, make = build(name)
        ref_opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for a, k in _batches(make):
            ref_opt.zero_grad()
            _loss(model(*a, **k)).backward()
            ref_opt.step()
        refs[name] = model.state_dict()
    placed = run_ranks(_train_uneven, 3, str(tmp_path), (0, 2), False, True)[0]
    assert "grain=" in placed["llama_h4"]["model.layers.0.self_attn.q_proj.weight"]
    assert placed["gpt2_v257"]["transformer.wte.weight"].startswith("S(")
    for world in (2, 3):
        for out in run_ranks(_train_uneven, world, str(tmp_path), (2, 4), True, False):
            for name in UNEVEN_NAMES:
                for key, v in refs[name].items():
                    torch.testing.assert_close(out[name][key], v, rtol=1e-5, atol=1e-5,
                                               msg=lambda m: f"{name} {key} world {world}: {m}")
            if world == 3:
                assert out["reload"] <= 1e-5, out["reload"]


def _adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, eps=1e-6)  # eps: see test_mesh.py


def _mesh_steps(mesh, name: str, seed: int, steps: tuple[int, int], dp_mode: str,
                root: str, resume: bool):
    dp_rank, dp = mesh.get_local_rank("dp"), mesh.size(0)
    model, args, kwargs, make = build(name, seed=seed)
    tp = autotp.parallelize(model, args, kwargs, mesh=mesh, objective="memory", dp_mode=dp_mode)
    opt = _adamw(tp.parameters())
    if resume:
        autotp.load_checkpoint(tp, root, opt)
    torch.manual_seed(7)
    batches = [make(4, 5) for _ in range(4)]
    for a, k in batches[steps[0]:steps[1]]:
        a, k = torch.utils._pytree.tree_map(
            lambda t: t.chunk(dp)[dp_rank] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, (a, k))
        opt.zero_grad()
        _loss(tp(*a, **k)).backward()
        opt.step()
    if resume:
        return autotp.gather_state_dict(tp)
    autotp.save_checkpoint(tp, root, opt)
    return tp.plan.dp_mode


def _mesh_resume(rank: int, world: int, root: str) -> dict:
    """Saved at dp 2 x tp 2 under FSDP, resumed at 1 x 4 (TP only) and at 4 x 1 (FSDP only),
    each from other initial weights; one spawned group, three meshes."""
    from torch.distributed.device_mesh import init_device_mesh
    out = {"saved": _mesh_steps(init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp")),
                                "llama", 0, (0, 2), "fsdp", root, False)}
    for shape in ((1, 4), (4, 1)):
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "tp"))
        out[shape] = _mesh_steps(mesh, "llama", 3, (2, 4), "fsdp", root, True)
    return out


def test_fsdp_mesh_checkpoint_resumes_at_other_mesh_shapes(tmp_path) -> None:
    results = run_ranks(_mesh_resume, 4, str(tmp_path / "ck"))
    model, _, _, make = build("llama")
    opt = _adamw(model.parameters())
    torch.manual_seed(7)
    for a, k in [make(4, 5) for _ in range(4)]:  # uninterrupted, one process, global batch
        opt.zero_grad()
        _loss(model(*a, **k)).backward()
        opt.step()
    for rank, r in enumerate(results):
        assert r["saved"] == "fsdp"
        for shape in ((1, 4), (4, 1)):
            for key, v in model.state_dict().items():
                torch.testing.assert_close(r[shape][key], v, rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"rank {rank} mesh {shape} {key}: {m}")
