"""Runtime of the autotp module against a hand-written Megatron-style tensor-parallel model
and PyTorch's parallelize_module (ColwiseParallel / RowwiseParallel plan, torchtitan style),
same Llama-style model and weights, gloo, interleaved repetitions, medians and ratios, and the
collectives each one issues (counted as they run, by a dispatch mode that sees c10d and
functional collectives alike). If the `tensor_parallel` package imports, it runs too: on the
process group (forward only: its collectives are not differentiable there) and as thread
shards in rank 0's process (trains; no torch.distributed), see peer_tensor_parallel.py.

    python benchmarks/runtime.py [--world-size 2] [--iters 20] [--hidden 512] [--layers 2]

Every variant is first checked to compute the same outputs as the single-process model."""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import fmt_collectives, recorder, stats, summarize, spawn_collect  # noqa: E402


class Attention(nn.Module):
    def __init__(self, h: int, heads: int, kv: int):
        super().__init__()
        self.heads, self.kv, self.d = heads, kv, h // heads
        self.q = nn.Linear(h, heads * self.d, bias=False)
        self.k = nn.Linear(h, kv * self.d, bias=False)
        self.v = nn.Linear(h, kv * self.d, bias=False)
        self.o = nn.Linear(heads * self.d, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, -1, self.d).transpose(1, 2)  # -1: works for local head counts
        k = self.k(x).view(b, t, -1, self.d).transpose(1, 2)
        v = self.v(x).view(b, t, -1, self.d).transpose(1, 2)
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, h: int, heads: int, kv: int, ffn: int):
        super().__init__()
        self.n1, self.n2 = nn.RMSNorm(h), nn.RMSNorm(h)
        self.attn = Attention(h, heads, kv)
        self.gate = nn.Linear(h, ffn, bias=False)
        self.up = nn.Linear(h, ffn, bias=False)
        self.down = nn.Linear(ffn, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.n1(x))
        y = self.n2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class Model(nn.Module):
    def __init__(self, h: int, layers: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(h, 8, 4, 4 * h) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


# ---- hand-written Megatron (f / g as autograd Functions, column/row-parallel Linear) ----

class _F(torch.autograd.Function):  # identity forward, all-reduce backward
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g)
        return g


class _G(torch.autograd.Function):  # all-reduce forward, identity backward
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, g):
        return g


def megatron(model: Model) -> Model:
    r, n = dist.get_rank(), dist.get_world_size()
    m = copy.deepcopy(model)

    def col(lin: nn.Linear) -> None:
        lin.weight = nn.Parameter(lin.weight.detach().chunk(n, 0)[r].clone())

    def row(lin: nn.Linear) -> None:
        lin.weight = nn.Parameter(lin.weight.detach().chunk(n, 1)[r].clone())

    for b in m.blocks:
        for lin in (b.attn.q, b.attn.k, b.attn.v, b.gate, b.up):
            col(lin)
        for lin in (b.attn.o, b.down):
            row(lin)
        attn_fwd = b.attn.forward

        def attn(x, _f=attn_fwd):
            return _G.apply(_f(_F.apply(x)))
        b.attn.forward = attn

        def block(x, _b=b):
            x = x + _b.attn(_b.n1(x))
            y = _F.apply(_b.n2(x))
            return x + _G.apply(_b.down(F.silu(_b.gate(y)) * _b.up(y)))
        b.forward = block
    return m


def megatron_plan(model: Model) -> dict:
    """torchtitan's hand-written plan for ``Model``: q, k, v, gate, up column; o, down row."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    plan = {}
    for i in range(len(model.blocks)):
        for name in ("attn.q", "attn.k", "attn.v", "gate", "up"):
            plan[f"blocks.{i}.{name}"] = ColwiseParallel()
        for name in ("attn.o", "down"):
            plan[f"blocks.{i}.{name}"] = RowwiseParallel()
    return plan


def torch_tp(model: Model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    m = copy.deepcopy(model)
    return parallelize_module(m, mesh, megatron_plan(m))


def _train(m: nn.Module, x: torch.Tensor) -> None:
    m(x).square().mean().backward()


def _fwd(m: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        m(x)


def _count(fn, m: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    rec = recorder()
    with rec:
        fn(m, x)
    return summarize(rec.log, rec.ops)


def worker(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any] | None:
    import autotp
    from benchmarks import peer_tensor_parallel as peer
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = Model(cfg["hidden"], cfg["layers"])
    x = torch.randn(cfg["batch"], cfg["seq"], cfg["hidden"])
    want = model(x)
    variants: dict[str, nn.Module] = {
        "autotp": autotp.parallelize(copy.deepcopy(model), (x,), objective="memory"),
        "megatron": megatron(model), "parallelize_module": torch_tp(model)}
    fwd_only: set[str] = set()
    rank0_only: set[str] = set()
    notes: dict[str, str] = {}
    tp, peer_note = peer.load() if cfg.get("peer", True) else (None, "skipped (--no-peer)")
    if tp is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            variants["tensor_parallel (gloo)"] = peer.distributed_shard(copy.deepcopy(model), tp)
            fwd_only.add("tensor_parallel (gloo)")
            try:  # is it really forward-only? record what backward says
                _train(variants["tensor_parallel (gloo)"], x)
                fwd_only.discard("tensor_parallel (gloo)")
            except RuntimeError as e:
                notes["tensor_parallel (gloo)"] = f"backward fails: {e}"
            if rank == 0:
                variants["tensor_parallel (threads)"] = peer.threaded(copy.deepcopy(model), tp, world)
                rank0_only.add("tensor_parallel (threads)")
                notes["tensor_parallel (threads)"] = (
                    f"{world} thread shards in rank 0's process while rank 1 waits in a barrier; "
                    "collectives are in-memory cat/sum, not gloo")
    names = [n for n in variants]
    all_names = names if rank == 0 else names + ["tensor_parallel (threads)"] * bool(tp)
    for name in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            err = (variants[name](x) - want).abs().max().item()
        assert err < 1e-4, (name, err)
    # collectives, counted on one extra untimed step of each
    coll: dict[str, dict[str, Any]] = {}
    for name in names:
        if name in rank0_only:
            continue
        m = variants[name]
        fwd = _count(_fwd, m, x)
        train = None if name in fwd_only else _count(_train, m, x)
        coll[name] = {"forward": fwd, "train": train}
    times: dict[str, dict[str, list[float]]] = {k: {"train": [], "fwd": []} for k in all_names}

    def timed(name: str, phase: str) -> None:
        here = name in variants
        dist.barrier()
        t0 = time.perf_counter()
        if here:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                (_train if phase == "train" else _fwd)(variants[name], x)
        dist.barrier()
        times[name][phase].append(time.perf_counter() - t0)

    for it in range(cfg["warmup"] + cfg["iters"]):
        # interleaved, and the order rotated every iteration so no variant always runs first
        k = it % len(all_names)
        for name in all_names[k:] + all_names[:k]:
            if name not in fwd_only:
                timed(name, "train")
            timed(name, "fwd")
        if it < cfg["warmup"]:
            times = {k: {"train": [], "fwd": []} for k in all_names}
    out = None
    if rank == 0:
        p = variants["autotp"].plan
        out = {"config": {**cfg, "world_size": world, "torch_threads": torch.get_num_threads(),
                          "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
               "variants": {}, "peer": peer_note, "notes": notes,
               "autotp_plan": {"forward": p.count(phase="forward"), "backward": p.count(phase="backward"),
                               "all_reduce": p.count("all_reduce")},
               "megatron_closed_form": {"all_reduce_forward": 2 * cfg["layers"],
                                        "all_reduce_backward": 2 * cfg["layers"],
                                        "bytes_each": cfg["batch"] * cfg["seq"] * cfg["hidden"] * 4}}
        for name in all_names:
            out["variants"][name] = {
                "train_ms": stats([t * 1e3 for t in times[name]["train"]]) if times[name]["train"] else None,
                "fwd_ms": stats([t * 1e3 for t in times[name]["fwd"]]),
                "raw_ms": {k: [round(t * 1e3, 3) for t in ts] for k, ts in times[name].items()},
                "collectives": coll.get(name)}
    dist.barrier()
    dist.destroy_process_group()
    return out


def run(world_size: int = 2, iters: int = 20, hidden: int = 512, layers: int = 2, batch: int = 4,
        seq: int = 128, warmup: int = 2, peer: bool = True) -> dict[str, Any]:
    """Spawn the ranks, return rank 0's results (times in ms, collectives per step)."""
    cfg = dict(iters=iters, hidden=hidden, layers=layers, batch=batch, seq=seq, warmup=warmup, peer=peer)
    res = spawn_collect(worker, world_size, cfg)
    v = res["variants"]
    res["ratios"], res["paired_ratios"] = {}, {}
    for phase in ("train", "fwd"):
        for ref in ("megatron", "parallelize_module"):
            a, b = v["autotp"][f"{phase}_ms"], v[ref][f"{phase}_ms"]
            res["ratios"][f"{phase} autotp/{ref}"] = a["median"] / b["median"]
            # the same iteration's two times saw the same load: the median of their ratios is
            # robust to load that drifts during the run
            pairs = zip(v["autotp"]["raw_ms"][phase], v[ref]["raw_ms"][phase])
            res["paired_ratios"][f"{phase} autotp/{ref}"] = stats([x / y for x, y in pairs])
    return res


def report(res: dict[str, Any]) -> str:
    c, v = res["config"], res["variants"]
    lines = [f"Llama-style, hidden {c['hidden']}, {c['layers']} layers, batch {c['batch']} x seq "
             f"{c['seq']}, gloo world {c['world_size']}, OMP_NUM_THREADS={c['OMP_NUM_THREADS']}, "
             f"{c['iters']} interleaved iterations (after {c['warmup']} warm-up), medians [p25-p75]:",
             f"{'':<27} {'fwd+bwd ms':>22} {'fwd ms':>22} {'fwd+bwd/megatron':>17} {'fwd+bwd/pm':>11}"]
    meg, pm = v["megatron"]["train_ms"]["median"], v["parallelize_module"]["train_ms"]["median"]
    for name, d in v.items():
        tr, fw = d["train_ms"], d["fwd_ms"]
        trs = f"{tr['median']:.1f} [{tr['p25']:.1f}-{tr['p75']:.1f}]" if tr else "n/a"
        fws = f"{fw['median']:.1f} [{fw['p25']:.1f}-{fw['p75']:.1f}]"
        r1 = f"{tr['median'] / meg:.3f}" if tr else "n/a"
        r2 = f"{tr['median'] / pm:.3f}" if tr else "n/a"
        lines.append(f"{name:<27} {trs:>22} {fws:>22} {r1:>17} {r2:>11}")
    lines.append("median of per-iteration ratios [p25-p75]: " + ", ".join(
        f"{k} {d['median']:.3f} [{d['p25']:.3f}-{d['p75']:.3f}]" for k, d in res["paired_ratios"].items()))
    lines.append("collectives per step (forward only | forward + backward):")
    for name, d in v.items():
        col = d["collectives"]
        if col is None:
            lines.append(f"  {name}: none over torch.distributed (in-process threads)")
            continue
        lines.append(f"  {name}: {fmt_collectives(col['forward'])} | "
                     f"{fmt_collectives(col['train']) if col['train'] else 'n/a (no backward)'}")
    ops = ", ".join(f"{n} {d['collectives']['train']['ops']}" for n, d in v.items()
                    if d["collectives"] and d["collectives"]["train"])
    lines.append(f"  ATen ops per training step: {ops}")
    mc = res["megatron_closed_form"]
    lines.append(f"  Megatron closed form: {mc['all_reduce_forward']} + {mc['all_reduce_backward']} "
                 f"all_reduce of {mc['bytes_each']} B")
    lines.append(f"tensor_parallel: {res['peer']}")
    for name, note in res["notes"].items():
        lines.append(f"  {name}: {note}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--no-peer", action="store_true", help="skip the tensor_parallel package")
    a = ap.parse_args()
    from benchmarks.common import describe, load_average, machine
    mach = machine()
    res = run(a.world_size, a.iters, a.hidden, a.layers, a.batch, a.seq, a.warmup, not a.no_peer)
    mach["load_end"] = load_average()
    print(describe(mach))
    print(report(res))


if __name__ == "__main__":
    main()
