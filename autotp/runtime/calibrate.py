"""Calibration: measure the current process group and fit a DeviceSpec, so plans on this
machine (gloo on CPU, or an unlisted GPU) reflect it.

What is timed is what the rewritten module runs: ``collectives.convert`` (the code path of
every ``Redistribute``) through ``DistComm``, on a 1-D float32 tensor of B bytes (the full
tensor on one rank, as the cost model counts them):

    all_reduce      Partial -> Replicate    a clone, then the all-reduce
    all_gather      Shard(0) -> Replicate   the all-gather into fresh outputs, then the cat
    reduce_scatter  Partial -> Shard(0)     the reduce-scatter into a fresh output

Sizes: ``DEFAULT_SIZES``, 16 KiB to 64 MiB in steps of 2x. ``repeats`` rounds each time every
(size, kind) once, after a barrier, in ascending order of size in even rounds and descending
in odd ones: a burst of load from other processes then costs one sample of many points
rather than every sample of one point, and each collective follows one of a similar size
(not a cold cache after a 64 MiB sweep). A sample is the slowest rank's time in its round (a
collective ends when every rank is done). A point's time is the ``quantile`` (default 0.2)
of its samples: on a machine shared with other jobs, more than half of the samples can be
slowed by them (the median then measures the other jobs); the low quantile is the time of
the collective itself, and it is what the cost model predicts.

Fit per kind (``fit_link``), the ring model with up to two bandwidth regimes:

    t = alpha + c * B / beta          B < K
    t = alpha + c * B / beta_above    B >= K

c = 2(n-1)/n for all_reduce and (n-1)/n otherwise, by nonnegative least squares on relative
error (the sizes span four orders of magnitude). The knee K is one of the measured sizes
(at least two below it, one at or above it: a regime is taken to start at the first measured
size that shows it; the thresholds known to cause one, cache sizes and glibc's 32 MiB mmap
threshold, are powers of two like the sizes); it is kept only if it halves the squared
relative error of the single-regime fit (K = infinity, the plain ring model) and that fit is
off by more than 5% (root mean square relative error). Gloo on CPU needs it: glibc's malloc
serves allocations above its mmap threshold (adaptive, at most 32 MiB) with a fresh mmap and
unmaps it on free, so every such buffer a collective allocates (DistComm's clone for
all_reduce, the gathered output for all_gather, the B/n output for reduce_scatter, gloo's
own) page-faults in, and from 32 or 64 MiB on collectives take 2-5x the time the smaller
sizes predict (docs/cost_model.md has the numbers). ``spec.collectives`` holds the
per-kind fits, which the cost model prefers; ``latency`` and ``link_bandwidth`` are the
single-regime fit over all kinds. Compute: a square matmul per dtype (FLOP/s) and a large
copy (memory bandwidth).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from scipy.optimize import nnls

from autotp.rewrite.collectives import KINDS, DistComm, convert
from autotp.cost.model import all_gather_time, all_reduce_time, reduce_scatter_time
from autotp.cost.devices import DeviceSpec
from autotp.errors import ProcessGroupError
from autotp.core.placements import Partial, Replicate, Shard

DEFAULT_SIZES = tuple(16 * 1024 * 2 ** k for k in range(13))  # 16 KiB .. 64 MiB
DEFAULT_REPEATS = 15
DEFAULT_QUANTILE = 0.2


@dataclass(frozen=True)
class Measurement:
    kind: str
    nbytes: int
    seconds: float  # the quantile of the samples
    samples: tuple[float, ...] = ()  # every round's time (slowest rank)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(nbytes: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    numel = max(n, nbytes // 4 // n * n)
    full = torch.ones(numel, device=device)
    return full, full[: numel // n].clone()


def run_collective(kind: str, comm: DistComm, full: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
    """One collective as a ``Redistribute`` runs it (``full``: the whole tensor, ``shard``: this
    rank's piece of it along dim 0)."""
    if kind == "all_reduce":
        return convert(full, Partial(), Replicate(), comm, "calibrate")
    if kind == "all_gather":
        return convert(shard, Shard(0), Replicate(), comm, "calibrate", full.shape[0])
    return convert(full, Partial(), Shard(0), comm, "calibrate")


def measure_collectives(comm: DistComm, sizes=DEFAULT_SIZES, repeats: int = DEFAULT_REPEATS,
                        device: torch.device | None = None,
                        quantile: float = DEFAULT_QUANTILE) -> list[Measurement]:
    """Time every kind at every size (see the module docstring); collective: call on every
    rank. Returns one Measurement per (size, kind), ascending in size."""
    device = device or torch.device("cpu")
    n = comm.world_size
    sizes = sorted(sizes)
    times = torch.zeros(len(sizes), len(KINDS), repeats, dtype=torch.float64)
    for nbytes in sizes:  # warm-up: every point once
        full, shard = _inputs(nbytes, n, device)
        for kind in KINDS:
            run_collective(kind, comm, full, shard)
    for r in range(repeats):
        up = r % 2 == 0
        for i in (range(len(sizes)) if up else reversed(range(len(sizes)))):
            full, shard = _inputs(sizes[i], n, device)
            for j in (range(len(KINDS)) if up else reversed(range(len(KINDS)))):
                dist.barrier(group=comm.group)
                _sync(device)
                t0 = time.perf_counter()
                run_collective(KINDS[j], comm, full, shard)
                _sync(device)
                times[i, j, r] = time.perf_counter() - t0
            del full, shard
    # every rank uses the slowest rank's time: a collective ends when all ranks are done
    t = times.to(device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=comm.group)
    times = t.cpu()
    q = torch.quantile(times, quantile, dim=-1)
    return [Measurement(kind, max(n, nbytes // 4 // n * n) * 4, float(q[i, j]), tuple(times[i, j].tolist()))
            for i, nbytes in enumerate(sizes) for j, kind in enumerate(KINDS)]


_COEF = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
         "reduce_scatter": lambda n: (n - 1) / n}


def _solve(points: list[Measurement], n: int, knee: float) -> tuple[np.ndarray, float]:
    """Nonnegative least squares on relative error of the ring model with a knee (infinite:
    one regime); returns (alpha, 1/beta[, 1/beta_above]) and the sum of squared relative
    residuals."""
    c = np.array([_COEF[p.kind](n) for p in points])
    b = np.array([float(p.nbytes) for p in points])
    t = np.array([p.seconds for p in points])
    above = b >= knee
    cols = [np.ones_like(b), c * b * ~above]
    if math.isfinite(knee):
        cols.append(c * b * above)
    a = np.stack(cols, axis=1)
    w = 1.0 / t
    x, _ = nnls(a * w[:, None], t * w)
    r = (a @ x - t) * w
    return x, float(r @ r)


def _link(x: np.ndarray) -> tuple[float, ...]:
    alpha = max(float(x[0]), 1e-7)
    return (alpha, *(1.0 / max(float(v), 1e-15) for v in x[1:]))


def fit_ring(points: list[Measurement], n: int) -> tuple[float, float]:
    """(alpha seconds, beta bytes/s) minimizing squared relative error of the ring model."""
    x, _ = _solve(points, n, math.inf)
    return _link(x)  # type: ignore[return-value]


def fit_link(points: list[Measurement], n: int, gain: float = 0.5,
             tolerance: float = 0.05) -> tuple[float, ...]:
    """(alpha, beta) of the ring model, or (alpha, beta, knee bytes, beta_above) when a knee at
    one of the measured sizes (at least two sizes below it) leaves less than ``gain`` times the
    single-regime fit's squared relative error, and that fit is off by more than ``tolerance``
    (root mean square relative error; see the module docstring)."""
    x, sse = _solve(points, n, math.inf)
    sizes = sorted({p.nbytes for p in points})
    best = None
    if sse <= tolerance ** 2 * len(points):
        return _link(x)
    for knee in sizes[2:]:
        xk, sse_k = _solve(points, n, knee)
        if best is None or sse_k < best[1]:
            best = (knee, sse_k, xk)
    if best is None or best[1] >= gain * sse:
        return _link(x)
    knee, _, xk = best
    alpha, beta, beta_above = _link(xk)
    return alpha, beta, float(knee), beta_above


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


def calibrate(group: dist.ProcessGroup | None = None, *, sizes=DEFAULT_SIZES,
              repeats: int = DEFAULT_REPEATS, quantile: float = DEFAULT_QUANTILE,
              name: str | None = None) -> tuple[DeviceSpec, list[Measurement]]:
    """Measure this process group; returns the fitted DeviceSpec and the raw measurements.
    Collective: call on every rank. ``spec.extra`` holds the fit's relative errors."""
    if not dist.is_initialized():
        raise ProcessGroupError("autotp.calibrate measures a process group: call "
                                "torch.distributed.init_process_group first (torchrun)")
    comm = DistComm(group)
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    points = measure_collectives(comm, sizes, repeats, device, quantile)
    n = comm.world_size
    alpha, beta = fit_ring(points, n)
    per_kind = {k: fit_link([p for p in points if p.kind == k], n) for k in _COEF}
    flops = {str(dt).removeprefix("torch."): _matmul_flops(dt, device)
             for dt in (torch.float32, torch.bfloat16)}
    if device.type == "cuda":
        capacity = float(torch.cuda.get_device_properties(device).total_memory)
    else:
        import os
        capacity = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / comm.world_size
    spec = DeviceSpec(name or f"calibrated-{backend}-{n}", flops, capacity,
                      _memory_bandwidth(device), beta, alpha, collectives=per_kind,
                      fused_elementwise=False)  # measured eager: each op its own pass
    errs = [abs(predicted(p, comm.world_size, spec) - p.seconds) / p.seconds for p in points]
    extra = {"fit_error_median": f"{statistics.median(errs):.3f}", "fit_error_max": f"{max(errs):.3f}",
             "world_size": str(comm.world_size), "backend": backend,
             "collective_time": f"quantile {quantile} of {repeats} interleaved rounds"}
    return DeviceSpec(**{**spec.__dict__, "extra": extra}), points
