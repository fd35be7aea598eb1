"""Pipeline stages (issue 18): choose_layout with pipeline stages for the Llama-3.1-405B shape,
training on 16 nodes x 8 h100, global batch 64 of 2048 tokens (meta device, bf16): every
layout (pp x tp x dp), whether it fits 80 GB, its predicted step time, the best 2-D and the
best 3-D layout, and the wall time from model to choice (target <= 30 s).

    python benchmarks/pipeline.py [--nodes 16] [--global-batch 64]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.frontier import llama405b  # noqa: E402


def main() -> None:
    import autotp
    import torch
    import transformers
    from autotp.errors import InfeasiblePlanError
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--global-batch", type=int, default=64)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    model, kw = llama405b()
    t0 = time.perf_counter()
    try:
        lay = autotp.choose_layout(model, (), kw, nodes=a.nodes, gpus_per_node=8, device="h100",
                                   global_batch=a.global_batch, pipeline=True)
    except InfeasiblePlanError as e:
        print(f"model -> answer: {time.perf_counter() - t0:.1f} s")
        print(f"NO LAYOUT FITS: {e}")
        return
    took = time.perf_counter() - t0
    print(f"{'layout':34} {'micro':>5} {'fits':>4} {'step s':>8} {'GiB/dev':>8}  note")
    for x in lay.alternatives:
        gib = x.memory_bytes_per_rank / 2 ** 30 if x.memory_bytes_per_rank < float("inf") else float("nan")
        print(f"{x.label:34} {x.microbatches:>5} {'yes' if x.fits else 'no':>4} "
              f"{x.predicted_time_s if x.fits else float('nan'):8.3f} {gib:8.1f}  {x.why[:70]}")
    two = [x for x in lay.alternatives if x.fits and x.pp == 1]
    three = [x for x in lay.alternatives if x.fits and x.pp > 1]
    print(f"best: {lay.best.label}; best 2-D: {two[0].label if two else 'none fits'}; "
          f"best 3-D: {three[0].label if three else 'none fits'}")
    print(f"model -> choice: {took:.1f} s (target <= 30 s)")


if __name__ == "__main__":
    main()
