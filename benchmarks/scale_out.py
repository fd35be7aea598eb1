"""Scale out (issue 16): data parallelism beside tensor parallelism, and choose_layout.

Three parts, each printing its table; run.py stores them as part 9 of docs/benchmarks.md.

- ``layout``: ``autotp.choose_layout`` for the Llama-2-70B shape, training, 8 nodes x 8 h100,
  global batch 16 (meta device, bf16): the chosen layout, every alternative, and the wall time
  from model to choice (target <= 15 s).
- ``decision``: does the cost model pick the layout that measures faster? On this machine's
  gloo (2 processes, calibrated first with ``autotp.calibrate``), for models on both sides of
  the crossover (hidden 64 to 1024, batch 2 to 16): tp 2 x dp 1, tp 1 x dp 2 with DDP and
  with FSDP, each a training step (forward, backward, AdamW) of the same global batch, timed
  interleaved; the predicted and the measured ratio between the alternatives, the noise floor
  (the same variant's two halves of the samples), and whether the predicted best is the
  measured best or within the noise of it.
- ``recipe``: FSDP x TP on a 2 x 2 gloo mesh (4 processes on 2 cores: the ratio, not the
  times, is the figure) against torchtitan's recipe written by hand, ``parallelize_module``
  (Colwise/Rowwise) on the "tp" dim then ``fully_shard`` per block and at the root on "dp",
  same model and weights, training steps interleaved (target autotp / recipe <= 1.00).

    python benchmarks/scale_out.py [--parts layout decision recipe] [--iters 8]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import interleaved, spawn_collect, stats  # noqa: E402
from benchmarks.runtime import Model, megatron_plan  # noqa: E402

# (hidden, layers, batch, seq): small models on few tokens favour data parallelism's one
# gradient all-reduce; wide models on many tokens... the cases span the crossover either way
CASES = [(64, 2, 4, 32), (128, 2, 4, 32), (256, 2, 4, 32), (512, 2, 4, 32), (768, 2, 4, 32),
         (1024, 2, 4, 32), (256, 2, 16, 128), (512, 2, 16, 128), (768, 2, 16, 128),
         (1024, 2, 16, 128), (1024, 2, 2, 16), (512, 4, 8, 64)]


def layout_70b(repeats: int = 2) -> dict[str, Any]:
    import autotp
    from examples import hf_models
    times, lay = [], None
    for _ in range(repeats):
        model, args, kwargs = hf_models.llama2_70b()
        t0 = time.perf_counter()
        lay = autotp.choose_layout(model, args, kwargs, nodes=8, gpus_per_node=8, device="h100",
                                   global_batch=16)
        times.append(time.perf_counter() - t0)
    rows = [{"tp": x.tp, "dp": x.dp, "dp_mode": x.dp_mode, "fits": x.fits, "why": x.why,
             "time_s": x.predicted_time_s if x.fits else None,
             "memory_gib": x.memory_bytes_per_rank / 2 ** 30 if x.memory_bytes_per_rank < float("inf") else None}
            for x in lay.alternatives]
    return {"seconds": stats(times), "best": rows[0], "rows": rows}


def report_layout(res: dict[str, Any]) -> str:
    lines = ["Llama-2-70B shape, training, 8 nodes x 8 h100, global batch 16 (choose_layout)",
             f"model -> choice: median {res['seconds']['median']:.1f} s (target <= 15 s)",
             "| tp | dp | dp kind | predicted step | memory/device | fits |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        t = "-" if r["time_s"] is None else f"{r['time_s']:.3f} s"
        mem = "-" if r["memory_gib"] is None else f"{r['memory_gib']:.1f} GiB"
        fits = "yes" if r["fits"] else "no: " + r["why"]
        lines.append(f"| {r['tp']} | {r['dp']} | {r['dp_mode']} | {t} | {mem} | {fits} |")
    return "\n".join(lines)


# ---- decision accuracy on gloo ----------------------------------------------------------------

def _step(m: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    m(x).square().mean().backward()
    opt.step()


def _decision_worker(rank: int, world: int, cases: list, iters: int) -> dict[str, Any] | None:
    import autotp
    from torch.distributed.device_mesh import init_device_mesh
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    spec, _ = autotp.calibrate(name="gloo-2-calibrated")
    meshes = {"tp2": init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "tp")),
              "dp2": init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "tp"))}
    out = []
    for hidden, layers, batch, seq in cases:
        torch.manual_seed(0)
        model = Model(hidden, layers)
        x = torch.randn(batch, seq, hidden)
        half = x.chunk(2)[rank]
        lay = autotp.choose_layout(model, (x,), nodes=1, gpus_per_node=2, device=spec)
        predicted = {f"tp{a.tp} {a.dp_mode}": a.predicted_time_s for a in lay.alternatives if a.fits}
        variants = {
            "tp2 none": (autotp.parallelize(copy.deepcopy(model), (x,), mesh=meshes["tp2"], device=spec), x),
            "tp1 ddp": (autotp.parallelize(copy.deepcopy(model), (half,), mesh=meshes["dp2"], device=spec,
                                           dp_mode="ddp"), half),
            "tp1 fsdp": (autotp.parallelize(copy.deepcopy(model), (half,), mesh=meshes["dp2"], device=spec,
                                            dp_mode="fsdp"), half)}
        opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, (m, _) in variants.items()}
        times = interleaved({k: (lambda k=k: _step(variants[k][0], opts[k], variants[k][1])) for k in variants},
                            iters, warmup=1)
        if rank == 0:
            meas = {k: stats(v)["median"] for k, v in times.items()}
            # noise floor: the two halves of one variant's samples, the largest spread of the three
            noise = max(max(stats(v[::2])["median"], stats(v[1::2])["median"]) /
                        min(stats(v[::2])["median"], stats(v[1::2])["median"]) for v in times.values())
            pbest = min(predicted, key=predicted.get)
            mbest = min(meas, key=meas.get)
            out.append({"case": [hidden, layers, batch, seq], "predicted_s": predicted, "measured_s": meas,
                        "predicted_best": pbest, "measured_best": mbest, "noise": noise,
                        "right": pbest == mbest, "within_noise": meas[pbest] / meas[mbest] <= noise})
    dist.barrier()
    dist.destroy_process_group()
    return {"cases": out, "spec": spec.name} if rank == 0 else None


def decision(iters: int = 8, cases: list | None = None) -> dict[str, Any]:
    res = spawn_collect(_decision_worker, 2, cases or CASES, iters)
    cs = res["cases"]
    res["right"] = sum(c["right"] for c in cs)
    res["within_noise"] = sum(c["right"] or c["within_noise"] for c in cs)
    return res


def report_decision(res: dict[str, Any]) -> str:
    lines = ["Layout choice on gloo, 2 processes (tp 2 / tp 1 + DDP / tp 1 + FSDP), AdamW step of one global batch",
             "| hidden, layers, batch, seq | predicted ms (tp2 / ddp / fsdp) | measured ms | predicted best | "
             "measured best | noise | right |", "|---|---|---|---|---|---|---|"]
    order = ("tp2 none", "tp1 ddp", "tp1 fsdp")
    for c in res["cases"]:
        p = " / ".join(f"{c['predicted_s'].get(k, float('nan')) * 1e3:.1f}" for k in order)
        m = " / ".join(f"{c['measured_s'][k] * 1e3:.1f}" for k in order)
        right = "yes" if c["right"] else ("within noise" if c["within_noise"] else "no")
        lines.append(f"| {', '.join(map(str, c['case']))} | {p} | {m} | {c['predicted_best']} | "
                     f"{c['measured_best']} | {c['noise']:.2f}x | {right} |")
    n = len(res["cases"])
    lines.append(f"measured-faster layout chosen in {res['right']} of {n} cases "
                 f"({res['within_noise']} of {n} counting choices within the noise floor); target >= 90%")
    return "\n".join(lines)


# ---- FSDP x TP against torchtitan's recipe ----------------------------------------------------

def _recipe(model: torch.nn.Module, mesh) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module
    m = copy.deepcopy(model)
    parallelize_module(m, mesh["tp"], megatron_plan(m))
    for b in m.blocks:
        fully_shard(b, mesh=mesh["dp"])
    fully_shard(m, mesh=mesh["dp"])
    return m


def _recipe_worker(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any] | None:
    import autotp
    from torch.distributed.device_mesh import init_device_mesh
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = Model(cfg["hidden"], cfg["layers"])
    x = torch.randn(cfg["batch"], cfg["seq"], cfg["hidden"]).chunk(2)[mesh.get_local_rank("dp")]
    variants = {"autotp fsdp": autotp.parallelize(copy.deepcopy(model), (x,), mesh=mesh, dp_mode="fsdp",
                                                  objective="memory"),
                "recipe": _recipe(model, mesh),
                "autotp ddp": autotp.parallelize(copy.deepcopy(model), (x,), mesh=mesh, dp_mode="ddp",
                                                 objective="memory")}
    # the same step from the same weights: the first losses agree
    losses = {k: m(x).square().mean().item() for k, m in variants.items()}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in variants.items()}
    names = list(variants)
    times = interleaved({k: (lambda k=k: _step(variants[k], opts[k], x)) for k in names}, cfg["iters"], warmup=2)
    out = None
    if rank == 0:
        out = {"config": cfg, "loss": losses, "ms": {k: stats([t * 1e3 for t in v]) for k, v in times.items()},
               "paired": {k: stats([a / b for a, b in zip(times[k], times["recipe"])]) for k in names}}
    dist.barrier()
    dist.destroy_process_group()
    return out


def recipe(hidden: int = 512, layers: int = 2, batch: int = 8, seq: int = 128, iters: int = 10) -> dict[str, Any]:
    return spawn_collect(_recipe_worker, 4, dict(hidden=hidden, layers=layers, batch=batch, seq=seq, iters=iters))


def report_recipe(res: dict[str, Any]) -> str:
    c = res["config"]
    lines = [f"FSDP x TP on a 2 x 2 gloo mesh (4 processes, 2 cores), hidden {c['hidden']}, {c['layers']} layers, "
             f"global batch {c['batch']} x {c['seq']}, AdamW step",
             "| variant | step ms (median) | paired ratio to the recipe (median) | first loss |", "|---|---|---|---|"]
    for k, s in res["ms"].items():
        lines.append(f"| {k} | {s['median']:.1f} | {res['paired'][k]['median']:.3f} | {res['loss'][k]:.6f} |")
    lines.append("target: autotp fsdp / recipe <= 1.00")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=["layout", "decision", "recipe"],
                    default=["layout", "decision", "recipe"])
    ap.add_argument("--iters", type=int, default=8)
    a = ap.parse_args()
    if "layout" in a.parts:
        print(report_layout(layout_70b()))
    if "decision" in a.parts:
        print(report_decision(decision(a.iters)))
    if "recipe" in a.parts:
        print(report_recipe(recipe(iters=a.iters)))


if __name__ == "__main__":
    main()
