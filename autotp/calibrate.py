"""Calibration: measure the current process group and fit a DeviceSpec, so plans on this
machine (gloo on CPU, or an unlisted GPU) reflect it.

Collectives: all_reduce, all_gather and reduce_scatter over sizes (bytes of the full tensor on
one rank, as the cost model counts them), median of ``repeats`` timed runs after a warm-up.
The ring model t = alpha + c * B / beta (c = 2(n-1)/n for all_reduce, (n-1)/n otherwise) is
fitted by least squares on relative error (sizes span four orders of magnitude), once over all
kinds (the spec's latency and link bandwidth) and once per kind (``spec.collectives``, which
the cost model prefers: gloo's reduce_scatter is not a ring and is slower than its all_gather).
Compute: a square matmul per dtype (FLOP/s) and a large copy (memory bandwidth).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .collectives import DistComm
from .cost import all_gather_time, all_reduce_time, reduce_scatter_time
from .devices import DeviceSpec
from .errors import ProcessGroupError

DEFAULT_SIZES = tuple(16 * 1024 * 4 ** k for k in range(7))  # 16 KiB .. 64 MiB


@dataclass(frozen=True)
class Measurement:
    kind: str
    nbytes: int
    seconds: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_collectives(comm: DistComm, sizes=DEFAULT_SIZES, repeats: int = 5,
                        device: torch.device | None = None) -> list[Measurement]:
    device = device or torch.device("cpu")
    n = comm.world_size
    out = []
    for nbytes in sizes:
        numel = max(n, nbytes // 4 // n * n)
        full = torch.ones(numel, device=device)
        shard = full[: numel // n].clone()
        ops = {"all_reduce": lambda: comm.all_reduce(full),
               "all_gather": lambda: comm.all_gather(shard),
               "reduce_scatter": lambda: comm.reduce_scatter(full.chunk(n))}
        for kind, op in ops.items():
            op()  # warm-up
            times = []
            for _ in range(repeats):
                dist.barrier(group=comm.group)
                _sync(device)
                t0 = time.perf_counter()
                op()
                _sync(device)
                times.append(time.perf_counter() - t0)
            # every rank uses the slowest rank's time: a collective ends when all ranks are done
            t = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=comm.group)
            out.append(Measurement(kind, numel * 4, float(t.item())))
    return out


_COEF = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
         "reduce_scatter": lambda n: (n - 1) / n}


def fit_ring(points: list[Measurement], n: int) -> tuple[float, float]:
    """(alpha seconds, beta bytes/s) minimizing squared relative error of the ring model."""
    a = np.array([[1.0, _COEF[p.kind](n) * p.nbytes] for p in points])
    t = np.array([p.seconds for p in points])
    w = 1.0 / t
    sol, *_ = np.linalg.lstsq(a * w[:, None], t * w, rcond=None)
    alpha = max(float(sol[0]), 1e-7)
    inv_beta = max(float(sol[1]), 1e-15)
    return alpha, 1.0 / inv_beta


def predicted(p: Measurement, n: int, spec: DeviceSpec) -> float:
    f = {"all_reduce": all_reduce_time, "all_gather": all_gather_time,
         "reduce_scatter": reduce_scatter_time}[p.kind]
    return f(p.nbytes, n, spec)


def _matmul_flops(dtype: torch.dtype, device: torch.device, size: int = 1024, repeats: int = 5) -> float:
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - t0)


def _memory_bandwidth(device: torch.device, nbytes: int = 64 * 2 ** 20, repeats: int = 5) -> float:
    x = torch.empty(nbytes // 4, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        y.copy_(x)
    _sync(device)
    return 2 * nbytes * repeats / (time.perf_counter() - t0)


def calibrate(group: dist.ProcessGroup | None = None, *, sizes=DEFAULT_SIZES, repeats: int = 5,
              name: str | None = None) -> tuple[DeviceSpec, list[Measurement]]:
    """Measure this process group; returns the fitted DeviceSpec and the raw measurements.
    Collective: call on every rank. ``spec.extra`` holds the fit's relative errors."""
    if not dist.is_initialized():
        raise ProcessGroupError("autotp.calibrate measures a process group: call "
                                "torch.distributed.init_process_group first (torchrun)")
    comm = DistComm(group)
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    points = measure_collectives(comm, sizes, repeats, device)
    n = comm.world_size
    alpha, beta = fit_ring(points, n)
    per_kind = {k: fit_ring([p for p in points if p.kind == k], n) for k in _COEF}
    flops = {str(dt).removeprefix("torch."): _matmul_flops(dt, device)
             for dt in (torch.float32, torch.bfloat16)}
    if device.type == "cuda":
        capacity = float(torch.cuda.get_device_properties(device).total_memory)
    else:
        import os
        capacity = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / comm.world_size
    spec = DeviceSpec(name or f"calibrated-{backend}-{n}", flops, capacity,
                      _memory_bandwidth(device), beta, alpha, collectives=per_kind)
    errs = [abs(predicted(p, comm.world_size, spec) - p.seconds) / p.seconds for p in points]
    extra = {"fit_error_median": f"{statistics.median(errs):.3f}", "fit_error_max": f"{max(errs):.3f}",
             "world_size": str(comm.world_size), "backend": backend}
    return DeviceSpec(**{**spec.__dict__, "extra": extra}), points
