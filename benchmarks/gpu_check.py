"""The GPU check (issue 17): autotp's NCCL path on one GPU, the same code as N GPUs minus the
peers, against the unmodified model.

World 1 over NCCL (gloo on a machine without CUDA), a Llama of hidden 4096, 4 layers, bf16
(on CPU a small one, hidden 256: the 4096 one takes minutes per step on 2 cores):
1. parallelize; eager forward and backward against the unmodified model (outputs, grads);
2. compiled (``torch.compile(fullgraph=True)``, inductor) forward and backward against the
   compiled unmodified model;
3. the per-rank graph's training step time against the unmodified module's, eager and
   compiled (target <= 1.02x both), medians of interleaved steps;
4. peak CUDA memory of a step against the unmodified model's (CUDA only).
Prints a table and one PASS/FAIL line; parts that need CUDA print "skipped: no CUDA".

    python benchmarks/gpu_check.py [--iters 10] [--no-compile] [--hidden 4096 --layers 4]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import autotp  # noqa: E402
from examples import hf_models  # noqa: E402


def _init() -> torch.device:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    return torch.device("cuda", 0) if cuda else torch.device("cpu")


def _model(hidden: int, layers: int, dev: torch.device, seq: int, batch: int):
    heads = max(4, hidden // 128)
    model, _, _ = hf_models.llama(n_layer=layers, hidden=hidden, heads=heads, kv_heads=max(1, heads // 4),
                                  intermediate=int(hidden * 3.5) // 64 * 64, vocab=32000,
                                  dtype=torch.bfloat16)
    model = model.to(dev)
    ids = torch.randint(0, 32000, (batch, seq), device=dev)
    return model, {"input_ids": ids, "use_cache": False}


def _loss(m: torch.nn.Module, kw: dict) -> torch.Tensor:
    return m(**kw).logits.float().square().mean()


def _fwd_bwd(m: torch.nn.Module, kw: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    for p in m.parameters():
        p.grad = None
    out = m(**kw).logits
    out.float().square().mean().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def _compare(ref: torch.nn.Module, tp: torch.nn.Module, kw: dict, run_ref: Callable, run_tp: Callable) -> dict:
    want, wgrads = _fwd_bwd(run_ref, kw)
    got, ggrads = _fwd_bwd(run_tp, kw)
    grad = max(_rel(ggrads[n], wgrads[n]) for n in wgrads if n in ggrads)
    return {"out_rel": _rel(got, want), "grad_rel": grad}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _times(fns: dict[str, Callable[[], Any]], iters: int, dev: torch.device) -> dict[str, float]:
    ts: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for it in range(iters + 2):
        k0 = it % len(names)
        for name in names[k0:] + names[:k0]:
            _sync(dev)
            t0 = time.perf_counter()
            fns[name]()
            _sync(dev)
            if it >= 2:
                ts[name].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in ts.items()}


def _peak(fn: Callable[[], Any], dev: torch.device) -> float | None:
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=None, help="default 4096 on CUDA, 256 on CPU")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=None, help="default 2048 on CUDA, 64 on CPU")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args()
    dev = _init()
    cuda = dev.type == "cuda"
    hidden = a.hidden or (4096 if cuda else 256)
    seq = a.seq or (2048 if cuda else 64)
    print(f"device: {torch.cuda.get_device_name(0) if cuda else 'CPU (no CUDA: small model, CUDA parts skipped)'}; "
          f"backend {dist.get_backend()}, world 1; torch {torch.__version__}; Llama hidden {hidden}, "
          f"{a.layers} layers, bf16, batch {a.batch} x {seq}", flush=True)
    torch.manual_seed(0)
    ref, kw = _model(hidden, a.layers, dev, seq, a.batch)
    tp = autotp.parallelize(copy.deepcopy(ref), (), kw, device="h100" if cuda else "cpu-gloo")
    ok = True
    rows: list[tuple[str, str, str]] = []
    eager = _compare(ref, tp, kw, ref, tp)
    # bf16: one device and the per-rank graph round alike at world 1 (same ops), so the
    # difference is kernel choice only
    good = eager["out_rel"] < 2e-2 and eager["grad_rel"] < 5e-2
    ok &= good
    rows.append(("eager vs unmodified", f"out {eager['out_rel']:.2e}, grads {eager['grad_rel']:.2e}",
                 "ok" if good else "MISMATCH"))
    fns = {"unmodified eager": lambda: _loss(ref, kw).backward(), "autotp eager": lambda: _loss(tp, kw).backward()}
    if not a.no_compile:
        t0 = time.perf_counter()
        cref = torch.compile(ref, fullgraph=True)
        ctp = torch.compile(tp, fullgraph=True)
        comp = _compare(ref, tp, kw, cref, ctp)
        rows.append(("compile (first call, both)", f"{time.perf_counter() - t0:.1f} s", ""))
        good = comp["out_rel"] < 2e-2 and comp["grad_rel"] < 5e-2
        ok &= good
        rows.append(("compiled vs compiled unmodified", f"out {comp['out_rel']:.2e}, grads {comp['grad_rel']:.2e}",
                     "ok" if good else "MISMATCH"))
        fns.update({"unmodified compiled": lambda: _loss(cref, kw).backward(),
                    "autotp compiled": lambda: _loss(ctp, kw).backward()})
    t = _times(fns, a.iters, dev)
    for name, v in t.items():
        rows.append((f"step (fwd+bwd) {name}", f"{v * 1e3:.2f} ms", ""))
    for mode in ("eager", "compiled"):
        if f"autotp {mode}" in t:
            r = t[f"autotp {mode}"] / t[f"unmodified {mode}"]
            rows.append((f"autotp / unmodified, {mode}", f"{r:.3f}x", "ok" if r <= 1.02 else "above 1.02x"))
    if cuda:
        pu = _peak(lambda: _loss(ref, kw).backward(), dev)
        pt = _peak(lambda: _loss(tp, kw).backward(), dev)
        rows.append(("peak CUDA memory, step", f"autotp {pt / 2**30:.2f} GiB vs unmodified {pu / 2**30:.2f} GiB "
                     f"({pt / pu:.3f}x)", ""))
    else:
        rows.append(("peak CUDA memory", "skipped: no CUDA", ""))
    w = max(len(r[0]) for r in rows)
    for name, val, verdict in rows:
        print(f"{name:<{w}}  {val}  {verdict}")
    print("PASS" if ok else "FAIL", "(outputs and gradients; timing ratios are reported, not asserted)")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
