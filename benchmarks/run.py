"""All benchmarks side by side in one run: runtime against the peers (and the tensor_parallel
package), plan time against depth, plan quality against Megatron's closed form, cost-model
accuracy after calibration, and the recapture cost of other modes and call structures with the
cost of dropout that draws like one device. Prints each part's table, stores everything in
benchmarks/results.json and writes docs/benchmarks.md with plots in docs/benchmarks/.

    python benchmarks/run.py [--quick] [--parts runtime plan_time plan_quality cost_model modes decode frontier
                              scale_out compile pipeline]
    python benchmarks/run.py --from-json      # redraw the report from benchmarks/results.json

The full run takes about 20 minutes on a 2-core machine; --quick about 5."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import (collectives, decode, frontier, modes, peer_hf_tp, plan_quality, plan_time,  # noqa: E402
                        report, runtime, scale_out)
from benchmarks.common import ROOT, describe, load_average, machine  # noqa: E402

PARTS = ("runtime", "plan_time", "plan_quality", "cost_model", "modes", "decode", "frontier", "scale_out",
         "compile", "pipeline")


def run_part(name: str, quick: bool, peer: bool) -> dict:
    if name == "runtime":
        res = runtime.run(iters=10 if quick else 30, peer=peer)
        print(runtime.report(res))
    elif name == "plan_time":
        res = plan_time.run([4, 8, 16] if quick else [8, 16, 32, 64, 80])
        print(plan_time.report(res))
    elif name == "plan_quality":
        res = plan_quality.run([2, 4, 8], layers=2 if quick else None)
        print(plan_quality.report(res))
    elif name == "modes":
        layers = 4 if quick else 12
        res = {"recapture": modes.run_recapture(repeats=1 if quick else 3, models=2, layers=layers),
               "dropout": modes.run_dropout(iters=4 if quick else 10, layers=layers)}
        print(modes.report_recapture(res["recapture"]))
        print(modes.report_dropout(res["dropout"]))
    elif name == "decode":
        res = decode.run([2, 3], rounds=2 if quick else 5, new=8 if quick else 32, layers=2 if quick else 8)
        print(decode.report(res))
        try:  # transformers' own tensor parallelism needs accelerate (the bench extra)
            import accelerate  # noqa: F401
            res["peer_hf"] = peer_hf_tp.run([2, 3], rounds=2 if quick else 5)
            print(peer_hf_tp.report(res["peer_hf"]))
        except ImportError:
            res["peer_hf"] = None
    elif name == "frontier":  # the largest shapes: plan time and params per rank, both objectives
        shapes = ["llama70b"] if quick else list(frontier.SHAPES)
        res = {"rows": [frontier.plan_shape(s, obj) for obj in ("time", "memory") for s in shapes]}
        print(frontier.report(res["rows"]))
    elif name == "scale_out":  # issue 16: layout choice time, its accuracy on gloo, FSDP x TP vs the recipe
        res = {"layout": scale_out.layout_70b(repeats=1 if quick else 2),
               "decision": scale_out.decision(iters=4 if quick else 8,
                                              cases=scale_out.CASES[:4] if quick else None),
               "recipe": scale_out.recipe(iters=4 if quick else 10)}
        print(scale_out.report_layout(res["layout"]))
        print(scale_out.report_decision(res["decision"]))
        print(scale_out.report_recipe(res["recipe"]))
    elif name == "compile":  # issue 17 (imported here: it turns inductor's caches off for the process)
        from benchmarks import compile as compile_bench
        res = compile_bench.run(iters=4 if quick else 20)
        print(compile_bench.report(res))
    elif name == "pipeline":  # issue 18: 3-D layout of the 405B shape, bubble on gloo pp 2
        from benchmarks import pipeline as pipeline_bench
        res = {"bubble": pipeline_bench.bubble(iters=6 if quick else 10), "layout": pipeline_bench.layout()}
        print(pipeline_bench.report_bubble(res["bubble"]))
        print(pipeline_bench.report_layout(res["layout"]))
    else:
        res = collectives.run(repeats=9 if quick else 15, iters=5 if quick else 10,
                              step_configs=collectives.STEP_CONFIGS[:2] if quick else collectives.STEP_CONFIGS)
        print(collectives.report(res))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer iterations, shallower models")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--no-peer", action="store_true", help="skip the tensor_parallel package")
    ap.add_argument("--from-json", action="store_true", help="only redraw the report from --json")
    ap.add_argument("--fresh", action="store_true",
                    help="with --parts, drop the other parts' stored results instead of keeping them")
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results.json"))
    ap.add_argument("--md", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    ap.add_argument("--img-dir", default=os.path.join(ROOT, "docs", "benchmarks"))
    a = ap.parse_args()
    if a.from_json:
        with open(a.json) as f:
            results = json.load(f)
    else:
        logging.getLogger("torch._export").setLevel(logging.ERROR)
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        results = {"machine": machine(), "quick": a.quick, "parts": {}}
        if set(a.parts) != set(PARTS) and not a.fresh and os.path.exists(a.json):
            with open(a.json) as f:  # keep the other parts; each carries its own machine line
                old = json.load(f)
            results["parts"] = {k: v for k, v in old.get("parts", {}).items() if k not in a.parts}
            for v in results["parts"].values():
                v.setdefault("machine", old.get("machine"))
                v["kept_from_earlier_run"] = True
        print(describe(results["machine"]), flush=True)
        for name in a.parts:
            print(f"\n== {name} ==", flush=True)
            t = time.perf_counter()
            mach = machine()
            results["parts"][name] = run_part(name, a.quick, not a.no_peer)
            mach["load_end"] = load_average()
            results["parts"][name]["machine"] = mach
            results["parts"][name]["wall_s"] = time.perf_counter() - t
            print(f"({name}: {time.perf_counter() - t:.0f} s)", flush=True)
        results["machine"]["load_end"] = load_average()
        results["wall_s"] = time.perf_counter() - t0
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\n{describe(results['machine'])}\nwall time {results['wall_s']:.0f} s; wrote {a.json}")
    report.write(results, a.md, a.img_dir)
    print(f"wrote {a.md} and plots in {a.img_dir}")


if __name__ == "__main__":
    main()
