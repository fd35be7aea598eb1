"""The autotp command: plan, explain, diff, layout, run and devices.

    autotp plan examples/nanogpt.py:gpt --world-size 2
    autotp layout examples/hf_models.py:llama2_70b --nodes 8 --gpus-per-node 8 --global-batch 16
    autotp explain examples/hf_models.py:llama2_7b model.layers.0.mlp --world-size 8
    autotp diff plan_a.json examples/nanogpt.py:gpt --world-size 4
    autotp run examples/hf_models.py:gpt2 --world-size 2
    autotp devices

TARGET is ``path/to/file.py:factory`` or ``package.module:factory``; the factory returns
``(model, example_inputs)`` or ``(model, example_inputs, example_kwargs)``.
Exit codes: 0 ok, 1 a check failed or autotp refused (message says why), 2 usage error.
"""
from __future__ import annotations

import argparse
import math
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

from autotp.candidates import NodeKind
from autotp.core.options import ADAM_FP32_BYTES
from autotp.errors import AutoTPError, AutoTPInternalError, RankError
from autotp.rules import op_info_named
from autotp.tools.targets import UsageError, load_target
from autotp.tools.report import _bytes, _shown, _time, matmul_rows, out, print_table, to_dot, in_module, print_whole, why_whole


err = Console(stderr=True, highlight=False)


def _device(name: str) -> Any:
    from autotp.cost.devices import get_device
    return get_device(name)


def _prompt(model: Any, args: tuple, kwargs: dict) -> Any:
    """The token ids of a target's example call (for --mode decode)."""
    import torch
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or not hasattr(model, "config"):
        raise UsageError("--mode decode needs a Hugging Face causal LM target whose example call "
                         "passes input_ids (batch, prompt length)")
    return ids


def _planned(target: str, a: argparse.Namespace, world: int | None = None, device: str | None = None):
    from autotp.runtime.api import plan_decode, plan_details
    model, args, kwargs = load_target(target)
    budget = a.memory_gb * 1e9 if getattr(a, "memory_gb", None) else None
    with err.status("planning…", spinner="dots") as status:
        if getattr(a, "mode", None) == "decode":
            return plan_decode(model, _prompt(model, args, kwargs), a.new_tokens,
                               world_size=world or a.world_size, device=_device(device or a.device),
                               objective=a.objective, memory_budget=budget,
                               progress=lambda stage: status.update(stage + "…"))
        return plan_details(model, args, kwargs, world_size=world or a.world_size,
                            device=_device(device or a.device), objective=a.objective,
                            mode=a.mode, memory_budget=budget,
                            data_parallel=getattr(a, "data_parallel", 1) or 1,
                            dp_mode=getattr(a, "dp_mode", "auto"),
                            pipeline_parallel=getattr(a, "pipeline_parallel", 1) or 1,
                            microbatches=getattr(a, "microbatches", 1) or 1,
                            schedule=getattr(a, "schedule", "1f1b"),
                            stages_per_rank=getattr(a, "stages_per_rank", None),
                            optimizer_bytes=getattr(a, "optimizer_bytes", ADAM_FP32_BYTES),
                            progress=lambda stage: status.update(stage + "…"))


def cmd_plan(a: argparse.Namespace) -> int:
    pd = _planned(a.target, a)
    text = pd.plan.to_json() if a.format == "json" else to_dot(pd) if a.format == "dot" else None
    if text is None:
        if a.out:
            with open(a.out, "w") as f:
                print_table(pd, Console(file=f, width=200, highlight=False))
            err.print(f"wrote {a.out}")
        else:
            print_table(pd)
        if a.mode == "decode":
            p = pd.plan
            out.print(f"decode: {p.predicted_time_s * 1e3:.3f} ms per token predicted "
                      f"({p.count('all_reduce')} all-reduces, {p.count()} collectives per token); "
                      f"KV cache {_bytes(p.state_bytes_per_rank)} per rank of {_bytes(p.state_bytes_total)}")
    elif a.out:
        Path(a.out).write_text(text)
        err.print(f"wrote {a.out}")
    else:
        print(text)
    return 0


def cmd_explain(a: argparse.Namespace) -> int:
    from autotp.cost.evaluate import _node_time, _param_mem, evaluate
    from autotp.solve.solve import solve
    pd = _planned(a.target, a)
    c, choice = pd.candidates, pd.choice
    base = evaluate(c, choice, pd.spec, pd.plan.mode)
    if base is None:
        raise AutoTPInternalError("the chosen plan evaluates as infeasible")
    found = False
    for path in a.module:
        names = [n for n, nc in c.nodes.items()
                 if in_module(nc.module, path) and
                 len(nc.strategies) > 1 and (nc.kind is NodeKind.PARAM or _shown(nc.target) or
                                             (a.all and nc.kind is NodeKind.OP))]
        whole = why_whole(pd, [path], 20 if len(c.nodes) <= a.resolve_limit else 0)
        if not names:
            print_whole(whole)
            found = found or bool(whole)
            mods = sorted({nc.module for nc in c.nodes.values() if nc.module})
            close = [m for m in mods if path.split(".")[-1] in m][:5]
            err.print(f"no splittable op in module {path!r}" + (f"; did you mean: {', '.join(close)}" if close else ""))
            continue
        found = True
        for name in names:
            nc = c.nodes[name]
            t = Table(title=f"{path}: {name} ({nc.op}) in {nc.module}", title_justify="left")
            for col in ("", "strategy (inputs → output)", "compute", "Δ communication",
                        "Δ step time", "Δ best plan with it", "param bytes/rank"):
                t.add_column(col)
            resolve = _shown(nc.target) and len(c.nodes) <= a.resolve_limit
            for s, st in enumerate(nc.strategies):
                alt = dict(choice)
                alt[name] = s
                ev = evaluate(c, alt, pd.spec, pd.plan.mode)
                mark = "✔ chosen" if s == choice[name] else ""
                best = ""
                if resolve and s != choice[name]:
                    try:  # the best whole plan that uses this candidate here
                        pinned = solve(c, pd.spec, pd.plan.mode, pd.plan.objective,
                                       a.memory_gb * 1e9 if a.memory_gb else None, pinned={name: s})
                        pe = evaluate(c, pinned, pd.spec, pd.plan.mode)
                        best = f"{(pe.time_s - base.time_s) * 1e6:+.2f} µs" if pe else ""
                    except AutoTPError:
                        best = "no feasible plan"
                elif s == choice[name]:
                    best = "+0.00 µs"
                if ev is None:
                    t.add_row(mark, str(st), "", "impossible with the neighbours' placements", "", best,
                              _bytes(_param_mem(c, name, s)) if nc.kind is NodeKind.PARAM else "")
                    continue
                t.add_row(mark, str(st), _time(_node_time(c, name, s, pd.spec, pd.plan.mode)),
                          _time(ev.comm_s - base.comm_s), f"{(ev.time_s - base.time_s) * 1e6:+.2f} µs", best,
                          _bytes(_param_mem(c, name, s)) if nc.kind is NodeKind.PARAM else "")
            out.print(t)
        print_whole(whole)
        out.print("The chosen strategy minimizes the whole plan's predicted step time (objective "
                  f"{pd.plan.objective!r}). Δ communication / Δ step time: changing only this node, "
                  "the others fixed; Δ best plan with it: the best whole plan that uses this "
                  "candidate here (matmuls; re-solved for each).")
    for w in a.also_world_size or []:
        other = _planned(a.target, a, world=w)
        rows = [r for r in matmul_rows(other) if any(_match(r[0], m) for m in a.module)]
        out.print(f"[bold]at world size {w}[/bold]: " + ("; ".join(f"{r[0]} {r[2]}" for r in rows) or "no matmuls in these modules"))
    for d in a.also_device or []:
        other = _planned(a.target, a, device=d)
        rows = [r for r in matmul_rows(other) if any(_match(r[0], m) for m in a.module)]
        out.print(f"[bold]on {d}[/bold]: " + ("; ".join(f"{r[0]} {r[2]}" for r in rows) or "no matmuls in these modules"))
    return 0 if found else 1


def _match(folded_path: str, module: str) -> bool:
    import re
    pattern = re.sub(r"\d+–\d+|\d+(,\d+)+", "*", folded_path.split(" ×")[0])
    parts_a, parts_b = pattern.split("."), module.split(".")
    if len(parts_b) > len(parts_a):
        return False
    return all(x == "*" or x == y for x, y in zip(parts_a, parts_b))


def _load_plan(spec: str, a: argparse.Namespace, prefix: str):
    from autotp.plans import Plan
    if spec.endswith(".json") and Path(spec).is_file():
        return Plan.from_json(Path(spec).read_text())
    ns = argparse.Namespace(**vars(a))
    for key in ("world_size", "device", "objective", "mode"):
        v = getattr(a, f"{prefix}{key}", None)
        if v is not None:
            setattr(ns, key, v)
    return _planned(spec, ns).plan


def cmd_diff(a: argparse.Namespace) -> int:
    pa, pb = _load_plan(a.a, a, "a_"), _load_plan(a.b, a, "b_")
    db = {d.node: d for d in pb.decisions}
    t = Table(title=f"splits that differ (A: {a.a}, B: {a.b})", title_justify="left")
    for col in ("node", "module", "op", "A", "B"):
        t.add_column(col)
    changed = 0
    for d in pa.decisions:
        e = db.get(d.node)
        if e is None or (d.inputs, d.output) == (e.inputs, e.output):
            continue
        if op_info_named(d.op).display is None and not d.op.startswith("get_attr"):
            continue
        changed += 1
        fmt = lambda x: f"{', '.join(x.inputs)} → {x.output}" if x.inputs else x.output  # noqa: E731
        t.add_row(d.node, d.module, d.op.replace("aten.", ""), fmt(d), fmt(e))
    only = len(set(db) ^ {d.node for d in pa.decisions})
    out.print(t if changed else "no matmul or parameter split differs")
    if only:
        out.print(f"{only} nodes exist in only one plan (different model or inputs)")
    rows = [("world size", pa.world_size, pb.world_size), ("device", pa.device, pb.device),
            ("predicted step time", _time(pa.predicted_time_s), _time(pb.predicted_time_s)),
            ("parameters per rank", _bytes(pa.param_bytes_per_rank), _bytes(pb.param_bytes_per_rank)),
            ("collectives per step", pa.count(), pb.count()),
            ("forward comm", _bytes(sum(c.bytes for c in pa.collectives if c.phase == "forward")),
             _bytes(sum(c.bytes for c in pb.collectives if c.phase == "forward"))),
            ("backward comm", _bytes(sum(c.bytes for c in pa.collectives if c.phase == "backward")),
             _bytes(sum(c.bytes for c in pb.collectives if c.phase == "backward")))]
    t = Table(title="totals", title_justify="left")
    for col in ("", "A", "B"):
        t.add_column(col)
    for r in rows:
        t.add_row(*map(str, r))
    out.print(t)
    out.print(f"Δ predicted step time {(pb.predicted_time_s - pa.predicted_time_s) * 1e3:+.3f} ms, "
              f"Δ parameters per rank {_bytes(pb.param_bytes_per_rank - pa.param_bytes_per_rank)}")
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from autotp.tools.check import run_check
    load_target(a.target)  # fail fast, in this process, on a bad target
    with err.status(f"running {a.world_size} ranks…", spinner="dots"):
        r = run_check(a.target, a.world_size, objective=a.objective, device=a.device,
                      rtol=a.rtol, atol=a.atol, steps=a.steps, generate=a.generate)
    t = Table(title=f"autotp run {a.target}: {a.world_size} ranks ({r['backend']})", title_justify="left")
    for col in ("check", "value", "ok"):
        t.add_column(col)
    ok = lambda b: "[green]yes[/green]" if b else "[red]NO[/red]"  # noqa: E731
    t.add_row("forward max |error|", f"{r['fwd_err']:.3e}", ok(r["fwd_ok"]))
    t.add_row("gradient max |error| (this rank's slice)", f"{r['grad_err']:.3e}", ok(r["grad_ok"]))
    t.add_row("weights after SGD step max |error|", f"{r['step_err']:.3e}", ok(r["step_ok"]))
    for key in sorted(set(r["planned"]) | set(r["issued"])):
        t.add_row(f"collectives {key}", f"issued {r['issued'].get(key, 0)} / planned {r['planned'].get(key, 0)}",
                  ok(r["issued"].get(key, 0) == r["planned"].get(key, 0)))
    t.add_row("parameters on rank 0", f"{r['local']} of {r['full']} ({r['local'] / r['full']:.1%})", "")
    t.add_row("time per step (fwd+bwd+step)", f"{r['tp_ms']:.2f} ms parallel, {r['ref_ms']:.2f} ms one device", "")
    if "gen_same" in r:
        t.add_row(f"generation: {r['gen_tokens']} greedy tokens", "token-identical" if r["gen_same"] else
                  "tokens DIFFER", ok(r["gen_same"]))
        t.add_row("generation: logits max |error|", f"{r['gen_err']:.3e}", ok(r["gen_ok"]))
        t.add_row("generation: KV cache on rank 0", f"{_bytes(r['gen_cache'])} of {_bytes(r['gen_cache_total'])}", "")
    if not r["all_ranks_ok"]:
        t.add_row("checks on the other ranks", "a rank's outputs, grads or weights differ", ok(False))
    out.print(t)
    good = r["fwd_ok"] and r["grad_ok"] and r["step_ok"] and r["all_ranks_ok"] and r.get("gen_ok", True) and \
        r["issued"] == r["planned"]
    out.print("[green]the parallel model equals the original[/green]" if good else
              "[red]MISMATCH: the parallel model differs from the original[/red]")
    return 0 if good else 1


def cmd_calibrate(a: argparse.Namespace) -> int:
    from autotp.tools.check import run_calibration
    with err.status(f"measuring {a.world_size} ranks…", spinner="dots"):
        spec, points = run_calibration(a.world_size, a.repeats)
    t = Table(title=f"{spec.name}: fitted ring model per collective", title_justify="left")
    for col in ("collective", "latency", "bandwidth", "from (bytes of the tensor)", "bandwidth there"):
        t.add_column(col)
    for kind in spec.collectives:
        alpha, beta, knee, beta_above = spec.link_model(kind)
        big = ("", "") if math.isinf(knee) else (f"{knee / 2 ** 20:.0f} MiB", f"{beta_above / 1e9:.3f} GB/s")
        t.add_row(kind, f"{alpha * 1e6:.0f} µs", f"{beta / 1e9:.3f} GB/s", *big)
    out.print(t)
    out.print(f"collective times: {spec.extra.get('collective_time', '')}; "
              f"fit error (relative, in-sample): median {spec.extra['fit_error_median']}, "
              f"max {spec.extra['fit_error_max']} over {len(points)} measurements; "
              f"matmul fp32 {spec.flops['float32'] / 1e9:.1f} GFLOP/s, "
              f"memory bandwidth {spec.memory_bandwidth / 1e9:.1f} GB/s")
    if a.out:
        Path(a.out).write_text(spec.to_json())
        err.print(f"wrote {a.out}; use it with --device {a.out}")
    return 0


def cmd_layout(a: argparse.Namespace) -> int:
    from autotp.runtime.layout import choose_layout
    model, args, kwargs = load_target(a.target)
    with err.status("choosing a layout…", spinner="dots") as status:
        lay = choose_layout(model, args, kwargs, nodes=a.nodes, gpus_per_node=a.gpus_per_node,
                            device=_device(a.device), mode=a.mode, global_batch=a.global_batch,
                            optimizer_bytes=a.optimizer_bytes,
                            memory_budget=a.memory_gb * 1e9 if a.memory_gb else None,
                            progress=lambda stage: status.update(stage + "…"),
                            pipeline=a.pipeline, microbatches=a.microbatches)
    t = Table(title=f"layouts of {a.nodes} x {a.gpus_per_node} {lay.device}, {a.mode}, global batch "
              f"{lay.global_batch} (tp inside a node; dp across)", title_justify="left")
    pp = [("pp", lambda x: str(x.pp)), ("micro", lambda x: str(x.microbatches) if x.pp > 1 else "-")] \
        if a.pipeline else []
    for col in ("", *[c for c, _ in pp], "tp", "dp", "dp kind", "step time", "vs best", "memory/device",
                "fits", "note"):
        t.add_column(col)
    best = lay.best.predicted_time_s
    for x in lay.alternatives:
        t.add_row("*" if x is lay.best else "", *[f(x) for _, f in pp], str(x.tp), str(x.dp), x.dp_mode,
                  _time(x.predicted_time_s) if x.fits else "-",
                  f"{x.predicted_time_s / best:.2f}x" if x.fits else "-",
                  _bytes(x.memory_bytes_per_rank) if math.isfinite(x.memory_bytes_per_rank) else "-",
                  "yes" if x.fits else "no", x.why)
    out.print(t)
    b = lay.best
    out.print(f"best: {b.label}: {_time(b.predicted_time_s)} per step, "
              f"{_bytes(b.memory_bytes_per_rank)} per device")
    return 0


def cmd_devices(a: argparse.Namespace) -> int:
    from autotp.cost.devices import PRESETS
    t = Table(title="device presets (sources: autotp/cost/devices.py, docs/cost_model.md)", title_justify="left")
    for col in ("name", "bf16 FLOP/s", "fp32 FLOP/s", "memory", "memory bw", "link bw/dir", "latency"):
        t.add_column(col)
    for name, s in PRESETS.items():
        t.add_row(name, f"{s.flops.get('bfloat16', 0):.3g}", f"{s.flops.get('float32', 0):.3g}",
                  f"{s.memory_bytes / 1e9:.0f} GB", f"{s.memory_bandwidth / 1e12:.2f} TB/s",
                  f"{s.link_bandwidth / 1e9:.0f} GB/s", f"{s.latency * 1e6:.0f} µs")
    out.print(t)
    return 0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="autotp", description="Inspect, explain, compare and verify "
                                 "tensor-parallel plans. TARGET: path/to/file.py:factory or package.module:factory")
    ap.add_argument("--debug", action="store_true", help="show Python tracebacks")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p: argparse.ArgumentParser, world: bool = True) -> None:
        if world:
            p.add_argument("--world-size", type=int, required=True, help="tensor-parallel ranks")
        p.add_argument("--device", default="h100", help="preset (see `autotp devices`) or spec.json")
        p.add_argument("--mode", choices=["training", "inference", "decode"], default="training",
                       help="decode: the generation step of a causal LM (one token per row, "
                       "with a KV cache of the prompt plus --new-tokens)")
        p.add_argument("--new-tokens", type=int, default=128, metavar="N",
                       help="--mode decode: tokens generated after the prompt (sets the cache length)")
        p.add_argument("--objective", choices=["time", "memory"], default="time")
        p.add_argument("--memory-gb", type=float, help="memory budget per device: parameters, "
                       "gradients, optimizer state and activations (default: the device's memory)")
        p.add_argument("--optimizer-bytes", type=float, default=ADAM_FP32_BYTES, metavar="B",
                       help="training: optimizer state bytes per parameter element (8: Adam, "
                            "fp32 moments; 4: SGD momentum; 0: none)")
        p.add_argument("--data-parallel", type=int, default=1, metavar="N",
                       help="replicas of the tensor-parallel group across nodes (2-D mesh); "
                            "their gradient traffic counts in training")
        p.add_argument("--dp-mode", choices=["auto", "ddp", "fsdp"], default="auto",
                       help="how the --data-parallel replicas hold the shards: DDP (full copies) "
                            "or FSDP (state divided across replicas); auto: the faster that fits")
        p.add_argument("--pipeline-parallel", type=int, default=1, metavar="P",
                       help="pipeline stages the layers are cut into (each a tensor-parallel group); "
                            "the example batch is split into --microbatches")
        p.add_argument("--microbatches", type=int, default=1, metavar="M",
                       help="--pipeline-parallel: microbatches per step (must divide the example batch)")
        p.add_argument("--schedule", choices=["1f1b", "gpipe", "interleaved"], default="1f1b",
                       help="--pipeline-parallel: the pipeline schedule (1f1b keeps fewer microbatches in "
                            "flight than gpipe; interleaved runs --stages-per-rank stages on each rank, "
                            "a smaller bubble for more sends)")
        p.add_argument("--stages-per-rank", type=int, default=None, metavar="V",
                       help="--schedule interleaved: stages each pipeline rank runs (default 2)")

    p = sub.add_parser("plan", help="show the plan for a model")
    p.add_argument("target")
    common(p)
    p.add_argument("--format", choices=["table", "json", "dot"], default="table")
    p.add_argument("--out", help="write json or dot here")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("explain", help="candidate strategies of a module's ops and their costs")
    p.add_argument("target")
    p.add_argument("module", nargs="+", help="module paths, e.g. model.layers.0.mlp")
    common(p)
    p.add_argument("--all", action="store_true", help="every op, not only matmuls and weights")
    p.add_argument("--resolve-limit", type=int, default=3000,
                   help="re-solve per candidate only for graphs up to this many nodes")
    p.add_argument("--also-world-size", type=int, nargs="*", help="show the splits at these world sizes too")
    p.add_argument("--also-device", nargs="*", help="show the splits on these devices too")
    p.set_defaults(fn=cmd_explain)

    p = sub.add_parser("diff", help="compare two plans (JSON files or TARGETs)")
    p.add_argument("a")
    p.add_argument("b")
    common(p, world=False)
    p.add_argument("--world-size", type=int, help="for TARGETs")
    for side in ("a", "b"):
        p.add_argument(f"--{side}-world-size", type=int, help=f"world size for {side.upper()} only")
        p.add_argument(f"--{side}-device", help=f"device for {side.upper()} only")
        p.add_argument(f"--{side}-objective", choices=["time", "memory"])
        p.add_argument(f"--{side}-mode", choices=["training", "inference"])
    p.set_defaults(fn=cmd_diff)

    p = sub.add_parser("layout", help="choose the TP degree and data parallelism for N nodes")
    p.add_argument("target")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--device", default="h100", help="preset (see `autotp devices`) or spec.json")
    p.add_argument("--mode", choices=["training", "inference"], default="training")
    p.add_argument("--global-batch", type=int, help="rows per step across all replicas "
                   "(default: the target's example batch)")
    p.add_argument("--memory-gb", type=float, help="memory budget per device (default: the device's)")
    p.add_argument("--optimizer-bytes", type=float, default=ADAM_FP32_BYTES, metavar="B")
    p.add_argument("--pipeline", action="store_true", help="training: also pipeline stages across "
                   "nodes (every stage count dividing --nodes; a ('pp', 'dp', 'tp') mesh)")
    p.add_argument("--microbatches", type=int, metavar="M",
                   help="--pipeline: microbatches per replica step (default: one row each)")
    p.set_defaults(fn=cmd_layout)

    p = sub.add_parser("run", help="run N local ranks and check against one device")
    p.add_argument("target")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--objective", choices=["time", "memory"], default="memory",
                   help="default memory, so small models really split")
    p.add_argument("--device", default=None, help="cost-model device (default: from the backend)")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="also generate N greedy tokens from the example input_ids (a causal LM), "
                   "N ranks against one device, token for token")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("calibrate", help="measure this machine's collectives and compute")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--repeats", type=int, default=15, help="rounds per collective and size")
    p.add_argument("--out", help="write the DeviceSpec JSON here")
    p.set_defaults(fn=cmd_calibrate)

    p = sub.add_parser("devices", help="list device presets")
    p.set_defaults(fn=cmd_devices)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    try:
        if getattr(a, "world_size", None) is not None and a.world_size < 1:
            raise UsageError("--world-size must be at least 1")
        return a.fn(a)
    except UsageError as e:
        if a.debug:
            traceback.print_exc()
        err.print(f"autotp: {e}")
        return 2
    except AutoTPError as e:
        if a.debug:
            traceback.print_exc()
            if isinstance(e, RankError) and e.trace:
                print(f"traceback on rank {e.rank}:\n{e.trace.rstrip()}", file=sys.stderr)
        err.print(f"autotp: {e}")
        return 1
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    sys.exit(main())
