"""Pipeline stages (issue 18), two parts:

- ``layout``: choose_layout with pipeline stages for the Llama-3.1-405B shape, training on 16
  nodes x 8 h100, global batch 64 of 2048 tokens (meta device, bf16): every layout (pp x tp x
  dp), whether it fits 80 GB, its predicted step time, the best 2-D and the best 3-D layout,
  and the wall time from model to choice (target <= 30 s).
- ``bubble``: on this machine's gloo, pp 2 x tp 1 (2 processes, one core each), a 4-layer
  Llama (hidden 256) training on a global batch of 16 x 64 tokens under 1F1B and interleaved
  1F1B (2 stages per rank) with 2, 4 and 8 microbatches: the measured idle fraction, 1 - M *
  t / T, where T is the step's wall time and t the slowest rank's forward and backward of one
  microbatch (through each of its stages) timed alone, against the schedule's bubble (pp - 1)
  / (v M + pp - 1) and against the cost model's idle fraction with the sends, 1 - M t / ((M +
  (pp - 1) / v)(t + sends)), sends those of the rank's stages (cost/pipeline.py's step: every slot is the slowest rank's
  stages plus their sends); the noise floor is the measured fraction's spread between the two
  halves of the samples.

    python benchmarks/pipeline.py [--parts layout bubble] [--nodes 16] [--global-batch 64] [--iters 10]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.frontier import llama405b  # noqa: E402


def _bubble_rank(rank: int, world: int, iters: int) -> dict:
    import statistics

    import autotp
    from autotp.cost.devices import get_device
    from autotp.cost.pipeline import send_time
    from examples import hf_models
    from torch.distributed.device_mesh import init_device_mesh
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("pp", "tp"))
    out = {}
    for schedule, m in [(s, m) for s in ("1f1b", "interleaved") for m in (2, 4, 8)]:
        model, _, kw = hf_models.llama(n_layer=4, hidden=256, heads=8, kv_heads=4, intermediate=768,
                                       batch=16, seq=64, seed=0)
        call = {**kw, "labels": kw["input_ids"]}
        tp = autotp.parallelize(model, (), call, mesh=mesh, microbatches=m, device="cpu-gloo",
                                schedule=schedule)
        v = tp.plan.pipeline.stages_per_rank

        def alone() -> float:  # this rank's stages' forward and backward of one microbatch, no sends
            t0 = time.perf_counter()
            for mod, inputs, kwargs in tp.example_stage_calls:
                outs = [o for o in mod(*inputs, **kwargs) if o.requires_grad]
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            return time.perf_counter() - t0

        steps, stage = [], []
        for i in range(iters + 1):
            torch.distributed.barrier()
            t0 = time.perf_counter()
            tp.step((), call, loss_fn=lambda o: o.loss)
            if i:
                steps.append(time.perf_counter() - t0)
            torch.distributed.barrier()
            stage.append(alone())
        slowest = [0.0] * world
        torch.distributed.all_gather_object(slowest, statistics.median(stage[1:]))
        t = max(slowest)

        def measured(xs: list[float]) -> float:
            return 1.0 - m * t / statistics.median(xs)

        # the schedule's idle fraction with the sends: each of the M + (pp - 1) / v slots is the
        # slowest rank's microbatch (measured alone) plus its stages' sends (the cost model's, cpu-gloo)
        pipe = tp.plan.pipeline
        sends = max(sum(send_time(pipe.stages[s].send_bytes, get_device("cpu-gloo"), "training")
                        for s in pipe.on_rank(r)) for r in range(pipe.ranks))
        idle = 1.0 - m * t / ((m + (tp.stages - 1) / v) * (t + sends))
        half = len(steps) // 2
        out[f"{schedule} {m}"] = {"schedule": schedule, "micro": m, "predicted": tp.plan.pipeline.bubble, "predicted_idle": idle, "send_s": sends,
                  "measured": measured(steps),
                  "noise": abs(measured(steps[:half]) - measured(steps[half:])),
                  "step_s": statistics.median(steps), "stage_s": t,
                  "predicted_step_s": tp.plan.pipeline.step_time_s}
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return out


def bubble(iters: int = 10) -> dict:
    from benchmarks.common import spawn_collect
    return spawn_collect(_bubble_rank, 2, iters)


def report_bubble(res: dict) -> str:
    lines = [f"{'schedule':>11} {'micro':>5} {'bubble':>6} {'idle pred':>9} {'measured':>8} {'noise':>6} "
             f"{'|diff|':>6} {'within':>6} {'step ms':>8} {'stage ms':>8} {'send ms':>7}"]
    for key, r in res.items():
        pred = r.get("predicted_idle", r["predicted"])
        diff = abs(pred - r["measured"])
        sched, m = r.get("schedule", "1f1b"), r.get("micro", key)
        lines.append(f"{sched:>11} {m:>5} {r['predicted']:6.3f} {pred:9.3f} {r['measured']:8.3f} {r['noise']:6.3f} "
                     f"{diff:6.3f} {'yes' if diff <= r['noise'] else 'no':>6} {r['step_s'] * 1e3:8.1f} "
                     f"{r['stage_s'] * 1e3:8.1f} {r.get('send_s', 0.0) * 1e3:7.2f}")
    lines.append("bubble: (pp - 1) / (v M + pp - 1), v stages per rank (interleaved 2, else 1); idle pred: "
                 "1 - M t / ((M + (pp - 1) / v)(t + sends)), t the slowest rank's microbatch through its "
                 "stages measured alone, sends the cost model's for the rank's stages (cpu-gloo); measured: 1 - M t / T, T the "
                 "step's median; noise: measured from each half of the samples")
    return "\n".join(lines)


def layout(nodes: int = 16, global_batch: int = 64) -> dict:
    import autotp
    from autotp.errors import InfeasiblePlanError
    model, kw = llama405b()
    t0 = time.perf_counter()
    try:
        lay = autotp.choose_layout(model, (), kw, nodes=nodes, gpus_per_node=8, device="h100",
                                   global_batch=global_batch, pipeline=True,
                                   progress=lambda s: print(f"  {time.perf_counter() - t0:6.1f} s  {s}", flush=True))
    except InfeasiblePlanError as e:
        return {"seconds": time.perf_counter() - t0, "error": str(e)}
    took = time.perf_counter() - t0
    rows = [{"label": x.label, "pp": x.pp, "microbatches": x.microbatches, "fits": x.fits,
             "time_s": x.predicted_time_s if x.fits else None, "why": x.why,
             "memory_gib": x.memory_bytes_per_rank / 2 ** 30 if x.memory_bytes_per_rank < float("inf") else None}
            for x in lay.alternatives]
    two = [r for r in rows if r["fits"] and r["pp"] == 1]
    three = [r for r in rows if r["fits"] and r["pp"] > 1]
    return {"seconds": took, "rows": rows, "best": rows[0]["label"],
            "best_2d": two[0]["label"] if two else None, "best_3d": three[0]["label"] if three else None,
            "nodes": nodes, "global_batch": global_batch}


def report_layout(res: dict) -> str:
    if "error" in res:
        return f"model -> answer: {res['seconds']:.1f} s\nNO LAYOUT FITS: {res['error']}"
    lines = [f"{'layout':34} {'micro':>5} {'fits':>4} {'step s':>8} {'GiB/dev':>8}  note"]
    for r in res["rows"]:
        lines.append(f"{r['label']:34} {r['microbatches']:>5} {'yes' if r['fits'] else 'no':>4} "
                     f"{r['time_s'] if r['fits'] else float('nan'):8.3f} "
                     f"{r['memory_gib'] if r['memory_gib'] is not None else float('nan'):8.1f}  {r['why'][:70]}")
    lines.append(f"best: {res['best']}; best 2-D: {res['best_2d'] or 'none fits'}; "
                 f"best 3-D: {res['best_3d'] or 'none fits'}")
    lines.append(f"model -> choice: {res['seconds']:.1f} s (target <= 30 s)")
    return "\n".join(lines)


def main() -> None:
    import transformers
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--parts", nargs="+", default=["layout", "bubble"])
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    if "bubble" in a.parts:
        print(report_bubble(bubble(a.iters)))
    if "layout" in a.parts:
        print(report_layout(layout(a.nodes, a.global_batch)))


if __name__ == "__main__":
    main()
