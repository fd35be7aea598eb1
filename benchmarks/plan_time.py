"""Plan time against layer count for Llama-2-70B-width models on the meta device (hidden 8192,
64 heads, 8 kv heads, intermediate 28672, vocab 32000, bf16, input (1, 2048), world size 8,
h100), split into capture (torch.export), strategies and solve, with a linear fit and the
80-layer (Llama-2-70B) plan time.

    python benchmarks/plan_time.py [--layers 8 16 32 64 80] [--compare-python VENV/bin/python]

``--compare-python`` runs the same measurement in another interpreter (a venv with another
transformers release, e.g. ``pip install transformers==5.23.0``) and prints the two side by
side: transformers' modelling code decides the captured graph, and 5.24's rotary tables once
made this plan 5x slower.

Mode inference (a serving plan): training Llama-2-70B at world size 8 on 80 GB devices does
not fit (parameters, bf16 gradients and fp32 Adam moments alone are 103 GB per rank), which
autotp reports in a few seconds. Also records the plan's collective count (Megatron: 2 forward
all-reduces per layer) and what the ILP solver reported (optimal, or stopped by its time
limit with a gap)."""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORLD = 8


class _SolverLog:
    """Records what HiGHS reported for each solve (optimal, or stopped by the time limit with
    a gap) by wrapping autotp.solve.program's milp for the duration; autotp itself does not say."""

    def __enter__(self) -> list[dict[str, Any]]:
        import autotp.solve.program as solver
        self._solver, self._orig, self.log = solver, solver.milp, []

        def milp(*a, **k):
            t0 = time.perf_counter()
            r = self._orig(*a, **k)
            self.log.append({"status": int(r.status), "message": str(r.message),
                             "gap": float(getattr(r, "mip_gap", float("nan")) or 0.0),
                             "seconds": time.perf_counter() - t0, "variables": len(a[0])})
            return r
        solver.milp = milp
        return self.log

    def __exit__(self, *exc: object) -> None:
        self._solver.milp = self._orig


def plan_once(n_layer: int) -> dict[str, Any]:
    import torch
    from autotp.runtime.api import plan_details
    from examples.hf_models import llama
    model, args, kwargs = llama(n_layer=n_layer, hidden=8192, heads=64, kv_heads=8,
                                intermediate=28672, vocab=32000, batch=1, seq=2048, meta=True,
                                dtype=torch.bfloat16)
    marks = [("start", time.perf_counter())]
    with warnings.catch_warnings(), _SolverLog() as solves:
        warnings.simplefilter("ignore")
        pd = plan_details(model, args, kwargs, world_size=WORLD, device="h100", mode="inference",
                          progress=lambda stage: marks.append((stage, time.perf_counter())))
    marks.append(("end", time.perf_counter()))
    t = [marks[i + 1][1] - marks[i][1] for i in range(len(marks) - 1)]
    p = pd.plan
    return {"layers": n_layer, "capture_s": t[1], "strategies_s": t[2], "solve_s": t[3],
            "total_s": marks[-1][1] - marks[0][1], "nodes": len(pd.candidates.nodes),
            "collectives": p.count(), "collectives_per_layer_megatron": 2,
            "solves": solves, "optimal": not any(x["status"] == 1 for x in solves),  # 1: time/iteration limit
            # (status 2 is expected: the per-layer tables try boundary placements that can't occur)
            "params_vs_total_over_n": p.param_bytes_per_rank / (p.param_bytes_total / WORLD)}


def run(layers: list[int] = (8, 16, 32, 64, 80)) -> dict[str, Any]:
    rows = [plan_once(n) for n in layers]
    out: dict[str, Any] = {"config": {"hidden": 8192, "heads": 64, "kv_heads": 8,
                                      "intermediate": 28672, "vocab": 32000, "dtype": "bfloat16",
                                      "input": [1, 2048], "world_size": WORLD, "device": "h100"},
                           "rows": rows}
    if len(rows) > 1:
        xs = np.array([r["layers"] for r in rows], dtype=float)
        ys = np.array([r["total_s"] for r in rows])
        slope, icpt = np.polyfit(xs, ys, 1)
        pred = np.polyval([slope, icpt], xs)
        r2 = 1 - ((ys - pred) ** 2).sum() / ((ys - ys.mean()) ** 2).sum()
        out["fit"] = {"s_per_layer": float(slope), "intercept_s": float(icpt), "r2": float(r2),
                      "predicted_80_s": float(slope * 80 + icpt)}
    seventy = [r for r in rows if r["layers"] == 80]
    out["llama2_70b_s"] = seventy[0]["total_s"] if seventy else None
    return out


def solver_status(r: dict[str, Any]) -> str:
    if r["optimal"] and r.get("priced"):
        return "priced by layers (each program optimal; the plan not proven so)"
    if r["optimal"]:
        return "optimal"
    worst = max((x for x in r["solves"] if x["status"] == 1), key=lambda x: x["gap"])
    return f"stopped: {worst['message'].split('.')[0]} after {worst['seconds']:.0f} s, gap {worst['gap']:.1%}"


def report(res: dict[str, Any]) -> str:
    lines = [f"{'layers':>6} {'capture':>9} {'strategies':>11} {'solve':>8} {'total':>8} {'nodes':>7} "
             f"{'params/rank vs total/8':>23} {'collectives':>11}  solver"]
    for r in res["rows"]:
        lines.append(f"{r['layers']:>6} {r['capture_s']:>8.1f}s {r['strategies_s']:>10.1f}s "
                     f"{r['solve_s']:>7.1f}s {r['total_s']:>7.1f}s {r['nodes']:>7} "
                     f"{r['params_vs_total_over_n']:>22.4f}x {r['collectives']:>11}  {solver_status(r)}")
    if "fit" in res:
        f = res["fit"]
        lines.append(f"linear fit: {f['s_per_layer']:.3f} s/layer + {f['intercept_s']:.2f} s "
                     f"(R^2 = {f['r2']:.3f}); Llama-2-70B (80 layers): "
                     + (f"{res['llama2_70b_s']:.1f} s measured" if res["llama2_70b_s"] else
                        f"{f['predicted_80_s']:.1f} s by the fit"))
    return "\n".join(lines)


def side_by_side(here: dict[str, Any], there: dict[str, Any]) -> str:
    """Total plan time per depth under two transformers releases, measured in one run."""
    a, b = here["machine"]["transformers"], there["machine"]["transformers"]
    lines = [f"{'layers':>6} {'transformers ' + a:>20} {'transformers ' + b:>20} {'ratio':>7}"]
    for r, q in zip(here["rows"], there["rows"]):
        lines.append(f"{r['layers']:>6} {r['total_s']:>19.1f}s {q['total_s']:>19.1f}s "
                     f"{r['total_s'] / q['total_s']:>6.2f}x")
    return "\n".join(lines)


def measure(layers: list[int]) -> dict[str, Any]:
    from benchmarks.common import load_average, machine
    mach = machine()
    res = run(layers)
    mach["load_end"] = load_average()
    res["machine"] = mach
    return res


def main() -> None:
    import json
    import subprocess
    import tempfile
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32, 64, 80])
    ap.add_argument("--compare-python", help="another interpreter (venv) to measure the same in")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    from benchmarks.common import describe
    res = measure(a.layers)
    print(describe(res["machine"]))
    print(report(res))
    if a.compare_python:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            subprocess.run([a.compare_python, os.path.abspath(__file__), "--layers",
                            *map(str, a.layers), "--json", f.name], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            other = json.load(open(f.name))
        print(describe(other["machine"]))
        print(report(other))
        print(side_by_side(res, other))
        res["compare"] = other
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
