"""Runtime of the autotp module against a hand-written Megatron-style tensor-parallel model
and PyTorch's parallelize_module (ColwiseParallel / RowwiseParallel plan, torchtitan style),
same Llama-style model and weights, gloo, interleaved repetitions, medians and ratios.

    python benchmarks/runtime.py [--world-size 2] [--iters 20] [--hidden 512] [--layers 2]

All three are first checked to compute the same outputs as the single-process model."""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def torch_tp(model: Model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    m = copy.deepcopy(model)
    plan = {}
    for i in range(len(m.blocks)):
        for name in ("attn.q", "attn.k", "attn.v", "gate", "up"):
            plan[f"blocks.{i}.{name}"] = ColwiseParallel()
        for name in ("attn.o", "down"):
            plan[f"blocks.{i}.{name}"] = RowwiseParallel()
    return parallelize_module(m, mesh, plan)


def worker(rank: int, world: int, a: argparse.Namespace) -> None:
    import autotp
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = Model(a.hidden, a.layers)
    x = torch.randn(a.batch, a.seq, a.hidden)
    want = model(x)
    variants = {"autotp": autotp.parallelize(copy.deepcopy(model), (x,), objective="memory"),
                "megatron": megatron(model), "parallelize_module": torch_tp(model)}
    for name, m in variants.items():
        err = (m(x) - want).abs().max().item()
        assert err < 1e-4, (name, err)
    times: dict[str, dict[str, list[float]]] = {k: {"train": [], "fwd": []} for k in variants}
    for _ in range(a.iters):  # interleaved: each iteration times every variant once
        for name, m in variants.items():
            dist.barrier()
            t0 = time.perf_counter()
            m(x).square().mean().backward()
            dist.barrier()
            times[name]["train"].append(time.perf_counter() - t0)
            with torch.no_grad():
                dist.barrier()
                t0 = time.perf_counter()
                m(x)
                dist.barrier()
                times[name]["fwd"].append(time.perf_counter() - t0)
    if rank == 0:
        med = {k: {p: statistics.median(v) * 1e3 for p, v in d.items()} for k, d in times.items()}
        print(f"Llama-style, hidden {a.hidden}, {a.layers} layers, batch {a.batch} x seq {a.seq}, "
              f"gloo world {world}, {a.iters} interleaved iterations, medians:")
        print(f"{'':<20} {'fwd+bwd ms':>11} {'fwd ms':>9} {'fwd+bwd vs megatron':>20} {'vs parallelize_module':>22}")
        for k in variants:
            print(f"{k:<20} {med[k]['train']:>11.2f} {med[k]['fwd']:>9.2f} "
                  f"{med[k]['train'] / med['megatron']['train']:>20.3f} "
                  f"{med[k]['train'] / med['parallelize_module']['train']:>22.3f}")
        p = variants["autotp"].plan
        print(f"autotp collectives per step: {p.count('all_reduce', 'forward')} all_reduce forward, "
              f"{p.count('all_reduce', 'backward')} all_reduce backward, {p.count() } in all")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    a = ap.parse_args()
    from autotp.launch import spawn
    spawn(worker, a.world_size, a)


if __name__ == "__main__":
    main()
