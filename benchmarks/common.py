"""Shared helpers for the benchmark scripts: the machine description every result carries,
medians and spreads, a collective recorder that sees every implementation's collectives the
same way, and running a rank function on local gloo processes with its result returned."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict[str, Any]:
    """What the numbers were measured on. Call at the start; add ``load_end`` at the end."""
    import torch
    try:  # plan times depend on the graph transformers' modelling code produces (5.24: 5x)
        import transformers
        hf = transformers.__version__
    except ImportError:
        hf = "not installed"
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "transformers": hf,
            "python": platform.python_version(), "platform": platform.platform(),
            "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_start": load_average()}


def describe(m: dict[str, Any]) -> str:
    end = f", at end {m['load_end']}" if "load_end" in m else ""
    hf = f", transformers {m['transformers']}" if "transformers" in m else ""
    return (f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}{hf}, Python {m['python']}, "
            f"commit {m['commit']}, {m['date']}; load average at start {m['load_start']}{end}")


def stats(xs: list[float]) -> dict[str, float]:
    """Median and quartiles (in the unit of xs)."""
    xs = sorted(xs)
    if len(xs) < 2:
        return {"median": xs[0], "p25": xs[0], "p75": xs[0], "n": len(xs)}
    q = statistics.quantiles(xs, n=4)
    return {"median": statistics.median(xs), "p25": q[0], "p75": q[2], "n": len(xs)}


# ---- collectives as issued, whoever issues them -------------------------------------------

_KIND = {"allreduce_": "all_reduce", "all_reduce": "all_reduce", "all_reduce_": "all_reduce",
         "allgather_": "all_gather", "_allgather_base_": "all_gather",
         "all_gather_into_tensor": "all_gather", "all_gather_into_tensor_out": "all_gather",
         "reduce_scatter_": "reduce_scatter", "_reduce_scatter_base_": "reduce_scatter",
         "reduce_scatter_tensor": "reduce_scatter", "alltoall_": "all_to_all",
         "alltoall_base_": "all_to_all", "all_to_all_single": "all_to_all",
         "broadcast_": "broadcast", "broadcast": "broadcast"}


def _nbytes(x: Any) -> int:
    import torch
    from torch.utils._pytree import tree_leaves
    return sum(t.numel() * t.element_size() for t in tree_leaves(x) if isinstance(t, torch.Tensor))


def recorder():
    """A TorchDispatchMode that logs every collective (c10d ops from torch.distributed calls,
    functional collectives from DTensor) as (kind, bytes of the full tensor on one rank: an
    all-reduce's input, an all-gather's output, a reduce-scatter's input), the convention of
    autotp's Plan.collectives."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.log: list[tuple[str, int]] = []
            self.ops = 0  # every ATen-level op dispatched, collectives included

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            self.ops += 1
            if func.namespace in ("c10d", "_c10d_functional", "c10d_functional"):
                name = func._opname
                kind = _KIND.get(name)
                if kind is not None:
                    if name in ("allgather_", "_allgather_base_"):
                        nbytes = _nbytes(args[0])  # outputs
                    elif name in ("all_gather_into_tensor", "all_gather_into_tensor_out"):
                        nbytes = _nbytes(args[0]) * int(args[1])
                    elif name in ("reduce_scatter_", "_reduce_scatter_base_"):
                        nbytes = _nbytes(args[1])  # inputs
                    else:
                        nbytes = _nbytes(args[0])
                    self.log.append((kind, nbytes))
            return func(*args, **kwargs)

    return Recorder()


def summarize(log: list[tuple[str, int]], ops: int | None = None) -> dict[str, Any]:
    """{"count": n, "bytes": total, "by_kind": {kind: {"count", "bytes", "sizes": {bytes: n}}},
    "ops": ATen ops dispatched}"""
    by: dict[str, dict[str, Any]] = {}
    for kind, nbytes in log:
        d = by.setdefault(kind, {"count": 0, "bytes": 0, "sizes": {}})
        d["count"] += 1
        d["bytes"] += nbytes
        d["sizes"][str(nbytes)] = d["sizes"].get(str(nbytes), 0) + 1
    return {"count": len(log), "bytes": sum(b for _, b in log), "by_kind": by, "ops": ops}


def fmt_collectives(s: dict[str, Any] | None) -> str:
    """'4 all_reduce (4x 1.0 MiB)' style."""
    if s is None:
        return "n/a"
    if not s["count"]:
        return "none"
    parts = []
    for kind, d in sorted(s["by_kind"].items()):
        sizes = ", ".join(f"{n}x {fmt_bytes(int(b))}" for b, n in
                          sorted(d["sizes"].items(), key=lambda kv: -int(kv[0])))
        parts.append(f"{d['count']} {kind} ({sizes})")
    return "; ".join(parts)


def fmt_bytes(b: float) -> str:
    for unit, div in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(b) >= div:
            return f"{b / div:.3g} {unit}"
    return f"{int(b)} B"


def interleaved(fns: dict[str, Callable[[], Any]], iters: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each of ``fns`` over ``iters`` rounds after ``warmup`` untimed ones,
    interleaved and the order rotated every round so that no variant always runs first; each
    call between two barriers of the default process group, so every rank times the same call."""
    import torch.distributed as dist
    import time
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for it in range(warmup + iters):
        k0 = it % len(names)
        for name in names[k0:] + names[:k0]:
            dist.barrier()
            t0 = time.perf_counter()
            fns[name]()
            dist.barrier()
            if it >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


# ---- local gloo ranks with a result ---------------------------------------------------------

def _trampoline(rank: int, world: int, fn: Callable, path: str, args: tuple) -> None:
    out = fn(rank, world, *args)
    if rank == 0:
        with open(path, "w") as f:
            json.dump(out, f)


def spawn_collect(fn: Callable[..., Any], world_size: int, *args: Any) -> Any:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local processes (autotp.tools.launch:
    OMP_NUM_THREADS=1, spawn) and return rank 0's return value (JSON-serializable)."""
    from autotp.tools.launch import spawn
    fd, path = tempfile.mkstemp(suffix=".json", prefix="autotp-bench-")
    os.close(fd)
    try:
        spawn(_trampoline, world_size, fn, path, args)
        with open(path) as f:
            return json.load(f)
    finally:
        os.unlink(path)
