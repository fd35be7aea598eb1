"""Plan time against layer count for Llama-2-70B-width models on the meta device (hidden 8192,
64 heads, 8 kv heads, intermediate 28672, vocab 32000, bf16, input (1, 2048), world size 8,
h100), split into capture (torch.export), strategies and solve, with a linear fit. "cut": the
stack of layers was exported for 4 layers and replicated (autotp/layers.py); "run": layers
solved once as one run of identical layers (autotp/decompose.py).

    python benchmarks/plan_time.py [--layers 8 16 32 80]"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    import torch
    from autotp.api import plan_details
    from autotp.decompose import find_runs
    from examples.hf_models import llama
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32, 80])
    a = ap.parse_args()
    print(f"{'layers':>6} {'capture':>9} {'strategies':>11} {'solve':>8} {'total':>8} {'nodes':>7} "
          f"{'cut':>4} {'run':>4} {'params/rank vs total/8':>23}")
    totals = []
    for n_layer in a.layers:
        model, args, kwargs = llama(n_layer=n_layer, hidden=8192, heads=64, kv_heads=8,
                                    intermediate=28672, vocab=32000, batch=1, seq=2048, meta=True,
                                    dtype=torch.bfloat16)
        marks = [("start", time.perf_counter())]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pd = plan_details(model, args, kwargs, world_size=8, device="h100",
                              progress=lambda stage: marks.append((stage, time.perf_counter())))
        marks.append(("end", time.perf_counter()))
        t = [marks[i + 1][1] - marks[i][1] for i in range(len(marks) - 1)]
        cap, strat, solve = t[1], t[2], t[3]
        total = marks[-1][1] - marks[0][1]
        totals.append(total)
        p = pd.plan
        cut = "yes" if pd.candidates.captured.cut else "no"
        run = sum(len(r.units) for r in find_runs(pd.candidates))
        print(f"{n_layer:>6} {cap:>8.1f}s {strat:>10.1f}s {solve:>7.1f}s {total:>7.1f}s "
              f"{len(pd.candidates.nodes):>7} {cut:>4} {run:>4} "
              f"{p.param_bytes_per_rank / (p.param_bytes_total / 8):>22.4f}x")
    if len(a.layers) > 1:
        slope, icpt = np.polyfit(a.layers, totals, 1)
        pred = np.polyval([slope, icpt], a.layers)
        r2 = 1 - ((np.array(totals) - pred) ** 2).sum() / ((np.array(totals) - np.mean(totals)) ** 2).sum()
        print(f"linear fit: {slope:.3f} s/layer + {icpt:.2f} s (R^2 = {r2:.3f}); target for 80 layers: <= 10 s")


if __name__ == "__main__":
    main()
