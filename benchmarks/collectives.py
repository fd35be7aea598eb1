"""Cost-model accuracy on this machine: calibrate the cost model on a gloo group, then compare
predicted with measured time (1) per collective and size and (2) per whole step: a
Llama-style model (benchmarks/runtime.py) planned with the calibrated spec, its plan's
predicted training-step and forward time against the measured median of the autotp module
running that plan, with the time spent inside collectives measured separately.

    python benchmarks/collectives.py [--world-size 2] [--repeats 15] [--iters 10] [--no-steps]

(1) compares with a second, independent measurement taken after calibration (same method:
autotp.runtime.calibrate.measure_collectives, the collectives as a Redistribute runs them, the
calibration's quantile of interleaved rounds), at the calibration's sizes (16 KiB .. 64 MiB
by 2x) and at the sizes halfway between them in log scale (24 KiB .. 48 MiB, which the fit
never saw), so the error is out of sample in time and in size. The median of the same
samples is printed beside it, with its error, to show what load from other processes does.
Errors are (predicted - measured) / measured."""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import spawn_collect, stats  # noqa: E402

# (hidden, layers, batch, seq) of the whole-step models
STEP_CONFIGS = [(256, 2, 2, 64), (512, 2, 4, 128), (1024, 2, 4, 128)]
# the calibration's sizes and the ones halfway between them (log scale), 16 KiB .. 64 MiB
CHECK_SIZES = tuple(sorted({16 * 1024 * 2 ** k for k in range(13)} | {24 * 1024 * 2 ** k for k in range(12)}))

_ACC = {"s": 0.0}


def _time_conversions() -> dict[str, float]:
    """Time every conversion that issues a collective (``autotp.rewrite.collectives.convert``, which
    each Redistribute calls: the collective with its clone, padding and cat, what the
    calibration measured); returns the accumulator."""
    import autotp.rewrite.collectives as C
    if getattr(C.convert, "_timed", False):
        return _ACC
    fn = C.convert

    def timed(x, src, dst, *a, **k):
        if all(op == "slice" for op in C.convert_ops(src, dst) or ()):
            return fn(x, src, dst, *a, **k)
        t0 = time.perf_counter()
        try:
            return fn(x, src, dst, *a, **k)
        finally:
            _ACC["s"] += time.perf_counter() - t0
    timed._timed = True  # type: ignore[attr-defined]
    C.convert = timed
    return _ACC


def _steps(spec, world: int, configs, iters: int) -> list[dict[str, Any]]:
    import autotp
    from autotp.runtime.api import plan_details
    from benchmarks.runtime import Model
    cases = []
    for h, layers, b, s in configs:
        torch.manual_seed(0)
        model = Model(h, layers)
        x = torch.randn(b, s, h)
        case = {"hidden": h, "layers": layers, "batch": b, "seq": s}
        for mode in ("training", "inference"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p = plan_details(model, (x,), world_size=world, device=spec, objective="memory",
                                 mode=mode).plan
                m = autotp.parallelize(copy.deepcopy(model), (x,), plan=p, mode=mode)
            case[mode] = {"plan": p, "module": m, "acc": _time_conversions(), "times": [], "comm": []}
        cases.append(case)

    def once(c: dict[str, Any], mode: str) -> None:
        d = c[mode]
        d["acc"]["s"] = 0.0
        dist.barrier()
        t0 = time.perf_counter()
        if mode == "training":
            d["module"](c["x"]).square().mean().backward()
        else:
            with torch.no_grad():
                d["module"](c["x"])
        dist.barrier()
        d["times"].append(time.perf_counter() - t0)
        d["comm"].append(d["acc"]["s"])

    for c in cases:
        c["x"] = torch.randn(c["batch"], c["seq"], c["hidden"])
    for it in range(iters + 1):  # the first round is a warm-up; interleaved over cases and modes
        for c in cases:
            for mode in ("training", "inference"):
                once(c, mode)
                if it == 0:
                    c[mode]["times"].clear()
                    c[mode]["comm"].clear()
    out = []
    for c in cases:
        row = {k: c[k] for k in ("hidden", "layers", "batch", "seq")}
        for mode in ("training", "inference"):
            d, p = c[mode], c[mode]["plan"]
            meas = statistics.median(d["times"])
            comm = statistics.median(d["comm"])
            row[mode] = {"measured_ms": stats([t * 1e3 for t in d["times"]]),
                         "measured_comm_ms": comm * 1e3, "measured_rest_ms": (meas - comm) * 1e3,
                         "predicted_ms": p.predicted_time_s * 1e3,
                         "predicted_comm_ms": p.comm_time_s * 1e3,
                         "predicted_compute_ms": p.compute_time_s * 1e3,
                         "collectives": p.count(),
                         "error": (p.predicted_time_s - meas) / meas,
                         "comm_error": (p.comm_time_s - comm) / comm if comm > 0 else None}
        out.append(row)
    return out


def worker(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any] | None:
    from autotp.runtime.calibrate import DEFAULT_SIZES, calibrate, measure_collectives, predicted
    from autotp.rewrite.collectives import DistComm
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    spec, cal = calibrate(repeats=cfg["repeats"], quantile=cfg["quantile"])
    cal_s = {(p.kind, p.nbytes): p.seconds for p in cal}
    fresh = measure_collectives(DistComm(), sizes=CHECK_SIZES, repeats=cfg["repeats"],
                                quantile=cfg["quantile"])
    steps = _steps(spec, world, [tuple(c) for c in cfg["step_configs"]], cfg["iters"])
    out = None
    if rank == 0:
        rows = []
        for p in fresh:
            pr = predicted(p, world, spec)
            med = statistics.median(p.samples)
            rows.append({"kind": p.kind, "bytes": p.nbytes, "calibrated_size": p.nbytes in DEFAULT_SIZES,
                         "measured_ms": p.seconds * 1e3, "median_ms": med * 1e3,
                         "predicted_ms": pr * 1e3, "error": (pr - p.seconds) / p.seconds,
                         "error_vs_median": (pr - med) / med})
            if (p.kind, p.nbytes) in cal_s:  # the same point as the calibration measured it
                rows[-1]["calibration_ms"] = cal_s[(p.kind, p.nbytes)] * 1e3

        def summary(rs, key="error"):
            e = [abs(r[key]) for r in rs]
            return {"median": statistics.median(e), "max": max(e), "n": len(e)}
        per_kind = {}
        for k in spec.collectives:
            a, b, knee, b2 = spec.link_model(k)
            per_kind[k] = {"latency_us": a * 1e6, "link_GBps": b / 1e9}
            if knee != float("inf"):
                per_kind[k].update(knee_bytes=knee, above_GBps=b2 / 1e9)
        overall = summary(rows)
        out = {"config": {**cfg, "world_size": world},
               "spec": {"latency_us": spec.latency * 1e6, "link_GBps": spec.link_bandwidth / 1e9,
                        "per_kind": per_kind,
                        "matmul_fp32_GFLOPs": spec.flops["float32"] / 1e9,
                        "memory_GBps": spec.memory_bandwidth / 1e9,
                        "fit_error_median": float(spec.extra["fit_error_median"]),
                        "fit_error_max": float(spec.extra["fit_error_max"])},
               "collectives": rows,
               "collective_error_median": overall["median"], "collective_error_max": overall["max"],
               "collective_error": {"all": overall,
                                    "calibrated_sizes": summary([r for r in rows if r["calibrated_size"]]),
                                    "between_sizes": summary([r for r in rows if not r["calibrated_size"]]),
                                    "vs_median": summary(rows, "error_vs_median"),
                                    # how far the check moved from the calibration's own
                                    # measurement of the same point: the noise floor
                                    "repeatability": summary([
                                        {"d": (r["calibration_ms"] - r["measured_ms"]) / r["measured_ms"]}
                                        for r in rows if "calibration_ms" in r], "d")},
               "steps": steps}
    dist.barrier()
    dist.destroy_process_group()
    return out


def run(world_size: int = 2, repeats: int = 15, iters: int = 10,
        step_configs: list[tuple[int, int, int, int]] = STEP_CONFIGS,
        quantile: float | None = None) -> dict[str, Any]:
    from autotp.runtime.calibrate import DEFAULT_QUANTILE
    cfg = {"repeats": repeats, "iters": iters, "step_configs": [list(c) for c in step_configs],
           "quantile": DEFAULT_QUANTILE if quantile is None else quantile}
    return spawn_collect(worker, world_size, cfg)


def _link_text(k: str, v: dict[str, Any]) -> str:
    from benchmarks.common import fmt_bytes
    t = f"{k} {v['latency_us']:.0f} µs / {v['link_GBps']:.3f} GB/s"
    if "knee_bytes" in v:
        t += f" below {fmt_bytes(v['knee_bytes'])}, {v['above_GBps']:.3f} GB/s from there on"
    return t


def report(res: dict[str, Any]) -> str:
    from benchmarks.common import fmt_bytes
    s = res["spec"]
    q = res["config"].get("quantile")
    lines = [f"gloo, {res['config']['world_size']} ranks: alpha = {s['latency_us']:.0f} µs, beta = "
             f"{s['link_GBps']:.3f} GB/s over all kinds; per kind: "
             + ", ".join(_link_text(k, v) for k, v in s["per_kind"].items())
             + f"; fit error median {s['fit_error_median']:.0%}, max {s['fit_error_max']:.0%}",
             f"matmul fp32 {s['matmul_fp32_GFLOPs']:.1f} GFLOP/s, copy {s['memory_GBps']:.1f} GB/s",
             f"independent measurement: {'quantile ' + str(q) if q is not None else 'median'} of "
             f"{res['config']['repeats']} interleaved rounds (* = a size the calibration measured)",
             f"{'collective':<15} {'bytes':>11} {'measured':>11} {'predicted':>11} {'error':>8} "
             f"{'median':>11} {'vs median':>9} {'calibration':>11}"]
    for r in res["collectives"]:
        star = "*" if r.get("calibrated_size", True) else " "
        med = (f"{r['median_ms']:>9.3f}ms {r['error_vs_median']:>+9.0%}" if "median_ms" in r else "")
        cal = f" {r['calibration_ms']:>9.3f}ms" if "calibration_ms" in r else ""
        lines.append(f"{r['kind']:<15} {fmt_bytes(r['bytes']):>10}{star} {r['measured_ms']:>9.3f}ms "
                     f"{r['predicted_ms']:>9.3f}ms {r['error']:>+7.0%} {med}{cal}")
    lines.append(f"|error| median {res['collective_error_median']:.0%}, worst "
                 f"{res['collective_error_max']:.0%} (target ±30%)")
    ce = res.get("collective_error")
    if ce:
        lines.append("  at the calibration's sizes: median {:.0%}, worst {:.0%}; between them: median "
                     "{:.0%}, worst {:.0%}; against the median of the samples: median {:.0%}, worst {:.0%}"
                     .format(ce["calibrated_sizes"]["median"], ce["calibrated_sizes"]["max"],
                             ce["between_sizes"]["median"], ce["between_sizes"]["max"],
                             ce["vs_median"]["median"], ce["vs_median"]["max"]))
        if "repeatability" in ce:
            lines.append("  the calibration's own measurement of the same points against this one (the noise "
                         "floor): median {:.0%}, worst {:.0%}".format(ce["repeatability"]["median"],
                                                                     ce["repeatability"]["max"]))
    if not res["steps"]:
        return "\n".join(lines)
    lines.append("whole step (autotp module running the plan made with the calibrated spec; "
                 f"{res['config']['iters']} interleaved iterations, medians):")
    lines.append(f"{'model':<22} {'mode':<10} {'measured':>9} {'predicted':>10} {'error':>7} "
                 f"{'comm meas':>10} {'comm pred':>10} {'comm err':>9} {'compute pred':>13}")
    for r in res["steps"]:
        name = f"h{r['hidden']} L{r['layers']} {r['batch']}x{r['seq']}"
        for mode in ("training", "inference"):
            d = r[mode]
            ce = f"{d['comm_error']:+.0%}" if d["comm_error"] is not None else "n/a"
            lines.append(f"{name:<22} {mode:<10} {d['measured_ms']['median']:>7.1f}ms "
                         f"{d['predicted_ms']:>8.1f}ms {d['error']:>+7.0%} {d['measured_comm_ms']:>8.1f}ms "
                         f"{d['predicted_comm_ms']:>8.1f}ms {ce:>9} {d['predicted_compute_ms']:>11.1f}ms")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15, help="rounds per collective and size")
    ap.add_argument("--quantile", type=float, default=None,
                    help="statistic of the rounds (default: autotp.calibrate's, 0.2)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-steps", action="store_true", help="only the per-collective part")
    a = ap.parse_args()
    from benchmarks.common import describe, load_average, machine
    mach = machine()
    res = run(a.world_size, a.repeats, a.iters, [] if a.no_steps else STEP_CONFIGS, a.quantile)
    mach["load_end"] = load_average()
    print(describe(mach))
    print(report(res))


if __name__ == "__main__":
    main()
