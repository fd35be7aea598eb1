"""Models bigger than one rank: a model built without its weights (autotp.empty_weights) gets
each rank's slices from a state dict, a .safetensors file or a Hugging Face sharded folder;
outputs equal the model loaded whole in one process; a rank's memory rises by its shard only."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import autotp
from dist_utils import run_ranks
from models import build, first_tensor


def _empty_like(model: nn.Module) -> nn.Module:
    with autotp.empty_weights():
        empty = type(model)(model.config)
    assert all(p.device.type == "meta" for p in empty.parameters())
    assert all(b.device.type != "meta" for b in empty.buffers())  # rotary frequencies stay real
    return empty


def _load_and_compare(rank: int, world: int, cases: list[tuple[str, object]]) -> dict:
    errors = {}
    for name, weights in cases:
        model, args, kwargs, make = build(name)  # the truth, loaded whole in this process
        tp = autotp.parallelize(_empty_like(model), args, kwargs, weights=weights, objective="memory")
        held = sum(p.numel() for p in tp.parameters())
        total = sum(p.numel() for p in model.parameters())
        torch.manual_seed(5)
        a, k = make(3, 7)
        out, ref = first_tensor(tp(*a, **k)), first_tensor(model(*a, **k))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        errors[name] = ((out - ref).abs().max().item(), held / total)
    return errors


def test_load_state_dict_and_hf_sharded_folder(tmp_path) -> None:
    gpt2, *_ = build("gpt2")
    folder = tmp_path / "gpt2"
    # Hugging Face's own writer: several shards + model.safetensors.index.json, the tied
    # lm_head.weight left out (it is transformer.wte.weight)
    gpt2.save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").exists()
    assert len(list(folder.glob("*.safetensors"))) > 1
    llama, *_ = build("llama")
    single = tmp_path / "llama.safetensors"
    save_file({k: v.contiguous() for k, v in llama.state_dict().items()}, single)
    cases = [("gpt2", str(folder)), ("llama", str(single)), ("llama", llama.state_dict())]
    for errors in run_ranks(_load_and_compare, 2, cases):
        for name, (err, held) in errors.items():
            assert err <= 1e-5 and held < 0.6, (name, err, held)


class Wide(nn.Module):
    """Fat feed-forward blocks: 403 MB of fp32 weights in total."""

    def __init__(self, d: int = 2048, h: int = 4096, layers: int = 6):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))
                                    for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b(x)
        return x


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _load_measured(rank: int, world: int, path: str, x: torch.Tensor) -> dict:
    with autotp.empty_weights():
        model = Wide()
    try:  # reset the peak (VmHWM) to the current resident size
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then the peak since start: nothing before this allocated much
    before = _status("VmRSS")
    tp = autotp.parallelize(model, (x,), weights=path, mode="inference")
    rise = _status("VmHWM") - before
    shard = sum(p.numel() * p.element_size() for p in tp.parameters())
    with torch.no_grad():
        out = tp(x)
    return {"rise": rise, "shard": shard, "out": out}


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak memory read from /proc (Linux)")
def test_each_rank_reads_only_its_slices(tmp_path) -> None:
    torch.manual_seed(0)
    model = Wide()
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    path = tmp_path / "wide.safetensors"
    save_file(model.state_dict(), path)
    x = torch.randn(2, 3, 2048)
    with torch.no_grad():
        ref = model(x)
    del model
    allowance = 64 * 2**20  # capture, planning, the interpreter's own growth
    for r in run_ranks(_load_measured, 2, str(path), x):
        torch.testing.assert_close(r["out"], ref, rtol=1e-5, atol=1e-5)
        assert r["shard"] <= 0.51 * full
        assert r["rise"] <= 1.2 * r["shard"] + allowance, (
            f"peak rise {r['rise'] / 2**20:.0f} MiB for a {r['shard'] / 2**20:.0f} MiB shard "
            f"of a {full / 2**20:.0f} MiB model")


def _errors(rank: int, world: int, folder: str) -> list[str]:
    msgs = []
    model, args, kwargs, _ = build("llama")
    with torch.device("meta"):
        meta = type(model)(model.config)
    for call in (
        lambda: autotp.parallelize(_empty_like(model), args, kwargs),  # no weights
        lambda: autotp.parallelize(meta, args, kwargs, weights=model.state_dict()),  # meta buffers
        lambda: autotp.parallelize(_empty_like(model), args, kwargs,
                                   weights={k: v for k, v in model.state_dict().items() if "o_proj" not in k}),
        lambda: autotp.parallelize(_empty_like(model), args, kwargs,
                                   weights={k: v[..., :1] if "q_proj" in k else v for k, v in model.state_dict().items()}),
        lambda: autotp.parallelize(_empty_like(model), args, kwargs, weights=folder + "/nowhere"),
    ):
        with pytest.raises(autotp.AutoTPError) as info:
            call()
        msgs.append(str(info.value))
    return msgs


def test_bad_weights_are_refused_with_the_reason(tmp_path) -> None:
    no_weights, meta_buffers, missing, shape, nowhere = run_ranks(_errors, 1, str(tmp_path))[0]
    assert "weights=" in no_weights and "meta" in no_weights
    assert "rotary_emb.inv_freq" in meta_buffers and "autotp.empty_weights" in meta_buffers
    assert "model.layers.0.self_attn.o_proj.weight" in missing
    assert "q_proj.weight" in shape and "(64, 1)" in shape
    assert "does not exist" in nowhere
