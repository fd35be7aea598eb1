"""Cost-model accuracy on this machine: calibrate the ring model on a gloo group, then print
predicted against measured time per collective and size, side by side, from one run.

    python benchmarks/collectives.py [--world-size 2] [--repeats 7]

The fit uses the even-indexed repetitions' medians; the table compares with a second,
independent measurement, so the error is out-of-sample."""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worker(rank: int, world: int, repeats: int) -> None:
    from autotp.calibrate import calibrate, measure_collectives, predicted
    from autotp.collectives import DistComm
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    spec, _ = calibrate(repeats=repeats)
    fresh = measure_collectives(DistComm(), repeats=repeats)
    if rank == 0:
        print(f"gloo, {world} ranks, {os.cpu_count()} cores: alpha = {spec.latency * 1e6:.0f} µs, "
              f"beta = {spec.link_bandwidth / 1e9:.3f} GB/s (fit error median "
              f"{spec.extra['fit_error_median']}, max {spec.extra['fit_error_max']})")
        print(f"matmul fp32 {spec.flops['float32'] / 1e9:.1f} GFLOP/s, memory bandwidth "
              f"{spec.memory_bandwidth / 1e9:.1f} GB/s")
        print(f"{'collective':<15} {'bytes':>10} {'measured':>11} {'predicted':>11} {'error':>8}")
        worst = 0.0
        for p in fresh:
            pr = predicted(p, world, spec)
            err = (pr - p.seconds) / p.seconds
            worst = max(worst, abs(err))
            print(f"{p.kind:<15} {p.nbytes:>10} {p.seconds * 1e3:>9.3f}ms {pr * 1e3:>9.3f}ms {err:>+7.0%}")
        print(f"worst |error| {worst:.0%} (target ±30%)")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    from autotp.launch import spawn
    spawn(worker, a.world_size, a.repeats)


if __name__ == "__main__":
    main()
