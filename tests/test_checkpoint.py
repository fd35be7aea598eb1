"""Saving: a full safetensors checkpoint that transformers' from_pretrained (and autotp's own
loader, at another world size) reads back; a sharded torch.distributed.checkpoint that a run
at world size 4 resumes from a checkpoint written at world size 2, reaching the same weights
as an uninterrupted single-device run."""
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


def _reload(rank: int, world: int, root: str) -> dict[str, float]:
    errors = {}
    for name in NAMES:
        model, args, kwargs, make = build(name)
        with autotp.empty_weights():
            empty = type(model)(model.config)
        tp = autotp.parallelize(empty, args, kwargs, weights=f"{root}/{name}", objective="memory")
        torch.manual_seed(1)
        a, k = make(3, 6)
        errors[name] = (first_tensor(tp(*a, **k)) - first_tensor(model(*a, **k))).abs().max().item()
    return errors


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
