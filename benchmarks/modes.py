"""Programs for other modes and call structures, and dropout that draws like one device
(issue 13's targets), on real gloo processes (OMP_NUM_THREADS=1, one thread per rank):

1. Recapture cost. Hugging Face GPT-2 (default: small, 124M, randomly initialised with a
   fixed seed, dropout 0.1) at world 2: the time of the first ``autotp.parallelize`` (train
   mode, ``input_ids`` + ``use_cache=False``) against the first call after ``tp.eval()``
   (a new mode: capture, plan and rewrite of the eval program) and the first call with a new
   call structure (``attention_mask=`` added, train mode), each minus the median of three
   cached calls of the same kind, so that only the capture is counted (target: <= 0.5x the
   first parallelize). Where each one's time goes (capture / candidates / solve / plan
   broadcast / rewrite) is read by wrapping the pipeline's functions for the duration.
   Each of ``--repeats`` fresh process pairs builds ``--models`` fresh models: the first is
   the first parallelize in its process (imports and torch.export's own warm-up included, as
   a user sees it), the later ones are warm. Every time is the slowest rank's.
2. Dropout overhead. A training step (forward + backward + AdamW) of GPT-2 with dropout 0.1
   (resid, embd and attn pdrop) against the same model and weights with p = 0, at world 2
   and on one device (each rank runs its own single-device copy at the same time, so both
   cores are busy in both cases), four variants interleaved in rotated order, barrier to
   barrier. overhead_tp = t_tp(0.1) / t_tp(0), overhead_1 = t_1(0.1) / t_1(0); target
   overhead_tp / overhead_1 <= 1.2. With p = 0 the dropouts are the identity: the dropout
   nodes stay in the graph as no-ops (``dropout(x, 0.0, True)``) and attention runs the
   fused kernel without a mask. Also reports how many random ops each plan has and how many
   of them are split (``SplitRandom``: they draw the full-size mask on every rank).

    python benchmarks/modes.py [--parts recapture dropout] [--repeats 3] [--models 2]
                               [--iters 10] [--layers 12] [--drop-layers 12] [--seq 128]"""
from __future__ import annotations

import argparse
import copy
import logging
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

P = 0.1
STAGES = ("capture", "derive", "candidates", "solve", "broadcast", "rewrite", "other")
_PROGRESS = {"capturing": "capture", "building": "candidates", "solving": "solve"}


def gpt2(layers: int, p: float, seed: int = 0):
    """GPT-2 small's shape (768 wide, 12 heads, vocab 50257) with ``layers`` blocks and every
    dropout at ``p``, initialised from ``seed``: the same weights for any ``p``."""
    import transformers as T
    torch.manual_seed(seed)
    cfg = T.GPT2Config(n_layer=layers, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p)
    return T.GPT2LMHeadModel(cfg)


def _quiet() -> None:
    warnings.simplefilter("ignore")
    logging.getLogger("torch._export").setLevel(logging.ERROR)
    logging.getLogger("autotp").setLevel(logging.ERROR)
    import transformers
    transformers.logging.set_verbosity_error()  # the config's loss_type=None notice


class Stages:
    """Seconds per pipeline stage while active: plan_model's ``progress`` marks (capture,
    candidates, solve), ModeFamily._derived (an eval program derived from the train one
    instead of captured: capture/modes.py), rank0_plan (the plan broadcast) and rewrite, by wrapping those
    functions where parallelize and ModeFamily.program look them up (autotp reports no
    timings itself). ``take()`` returns the stages since the last ``take()``."""

    def __enter__(self) -> "Stages":
        import autotp.runtime.api as api
        import autotp.runtime.pipeline as pl
        self._saved = [(m, n, getattr(m, n)) for m in (api, pl) for n in ("plan_model", "rank0_plan")
                       if hasattr(m, n)] + [(pl, "rewrite", pl.rewrite),
                                            (pl.ModeFamily, "_derived", pl.ModeFamily._derived)]
        self.t: dict[str, float] = {}
        plan_model, rank0_plan, rewrite = pl.plan_model, pl.rank0_plan, pl.rewrite

        def add(stage: str, s: float) -> None:
            self.t[stage] = self.t.get(stage, 0.0) + s

        def timed_plan_model(*a: Any, progress: Any = None, **k: Any) -> Any:
            marks: list[tuple[str, float]] = []

            def note(stage: str) -> None:
                marks.append((_PROGRESS.get(stage.split()[0], stage), time.perf_counter()))
                if progress is not None:
                    progress(stage)
            out = plan_model(*a, progress=note, **k)
            marks.append(("end", time.perf_counter()))
            for (stage, t0), (_, t1) in zip(marks, marks[1:]):
                add(stage, t1 - t0)
            return out

        def timed(stage: str, fn: Any) -> Any:
            def call(*a: Any, **k: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    add(stage, time.perf_counter() - t0)
            return call

        for m in (api, pl):
            m.plan_model = timed_plan_model
            m.rank0_plan = timed("broadcast", rank0_plan)
        pl.rewrite = timed("rewrite", rewrite)
        # an eval program derived from the train one (record both modes, edit, map the plan)
        pl.ModeFamily._derived = timed("derive", pl.ModeFamily._derived)
        return self

    def __exit__(self, *exc: object) -> None:
        for m, n, f in self._saved:
            setattr(m, n, f)

    def take(self, total: float) -> dict[str, float]:
        out = {s: self.t.get(s, 0.0) for s in STAGES[:-1]}
        out["other"] = total - sum(out.values())
        self.t = {}
        return out


def _slowest(row: dict[str, Any]) -> dict[str, Any]:
    """Every rank's row -> the slowest rank's time per field (stages: of the rank whose total
    was slowest, so that they add up)."""
    rows: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, dict) and "total" in v:
            out[k] = max((r[k] for r in rows), key=lambda d: d["total"])
        elif isinstance(v, float):
            out[k] = max(r[k] for r in rows)
        else:
            out[k] = v
    return out


def _first_and_cached(fn: Any, st: Stages, cached: int = 3) -> tuple[dict[str, float], float]:
    """The first call's time and stages, and the median of ``cached`` later calls."""
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    stages = st.take(first)
    again = []
    for _ in range(cached):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        again.append(time.perf_counter() - t0)
    st.take(0.0)
    return {"total": first, **stages}, statistics.median(again)


def recapture_worker(rank: int, world: int, cfg: dict[str, Any]) -> list[dict[str, Any]] | None:
    import autotp
    _quiet()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    with Stages() as st:
        for m in range(cfg["models"]):
            model = gpt2(cfg["layers"], P, seed=m)
            model.train()
            torch.manual_seed(100 + m)
            ids = torch.randint(0, model.config.vocab_size, (cfg["batch"], cfg["seq"]))
            kw = {"input_ids": ids, "use_cache": False}
            dist.barrier()
            t0 = time.perf_counter()
            tp = autotp.parallelize(model, (), kw)
            first = time.perf_counter() - t0
            row: dict[str, Any] = {"model": m, "parallelize": {"total": first, **st.take(first)}}
            tp(**kw)  # the train program's own first run, not part of any capture
            st.take(0.0)
            tp.eval()
            with torch.no_grad():
                row["eval_first"], row["eval_cached"] = _first_and_cached(lambda tp=tp: tp(**kw), st)
            tp.train()
            kw_mask = {**kw, "attention_mask": torch.ones_like(ids)}
            row["mask_first"], row["mask_cached"] = _first_and_cached(lambda tp=tp: tp(**kw_mask), st)
            row["programs"] = tp.programs
            row["modes"] = list(tp.modes)
            row["made"] = list(tp._family.made)
            rows.append(_slowest(row))
            del tp, model
    dist.barrier()
    dist.destroy_process_group()
    return rows if rank == 0 else None


def run_recapture(repeats: int = 3, models: int = 2, layers: int = 12, batch: int = 2, seq: int = 128,
                  world_size: int = 2) -> dict[str, Any]:
    cfg = {"models": models, "layers": layers, "batch": batch, "seq": seq}
    rows = []
    for r in range(repeats):
        for row in spawn_collect(recapture_worker, world_size, cfg):
            row["process"] = r
            rows.append(row)
    for row in rows:  # the capture alone: the first call minus a cached call of the same kind
        for kind in ("eval", "mask"):
            first = row[f"{kind}_first"]
            row[f"{kind}_capture"] = first["total"] - row[f"{kind}_cached"]
            row[f"{kind}_ratio"] = row[f"{kind}_capture"] / row["parallelize"]["total"]
    res: dict[str, Any] = {"config": {**cfg, "repeats": repeats, "world_size": world_size, "p": P,
                                      "OMP_NUM_THREADS": "1"}, "rows": rows, "summary": {}}
    for label, sel in (("cold", [r for r in rows if r["model"] == 0]),
                       ("warm", [r for r in rows if r["model"] > 0]), ("all", rows)):
        if not sel:
            continue
        s: dict[str, Any] = {"n": len(sel)}
        for key in ("parallelize", "eval_first", "mask_first"):
            s[key] = {st: statistics.median(r[key][st] for r in sel) for st in ("total", *STAGES)}
        for key in ("eval_cached", "mask_cached", "eval_capture", "mask_capture", "eval_ratio", "mask_ratio"):
            s[key] = stats([r[key] for r in sel])
        res["summary"][label] = s
    return res


def report_recapture(res: dict[str, Any]) -> str:
    c = res["config"]
    lines = [f"Recapture: GPT-2 ({c['layers']} layers, 768 wide, dropout {c['p']}), input_ids {c['batch']}x"
             f"{c['seq']}, gloo world {c['world_size']}, OMP_NUM_THREADS=1; {c['repeats']} process pairs x "
             f"{c['models']} fresh models; slowest rank; medians (s):",
             f"{'':<6} {'':<30} {'total':>7} " + " ".join(f"{s:>10}" for s in STAGES)]
    for label, s in res["summary"].items():
        if label == "all" and len(res["summary"]) > 2:
            continue
        names = {"parallelize": "first parallelize (train)", "eval_first": "first call after eval()",
                 "mask_first": "first call with attention_mask"}
        for key, name in names.items():
            d = s[key]
            lines.append(f"{label:<6} {name:<30} {d['total']:>7.2f} " + " ".join(f"{d[st]:>10.2f}" for st in STAGES))
        for kind, name in (("eval", "eval()"), ("mask", "attention_mask")):
            cap, cached, r = s[f"{kind}_capture"], s[f"{kind}_cached"], s[f"{kind}_ratio"]
            lines.append(f"{label:<6}   {name}: cached call {cached['median']:.2f} s, capture alone "
                         f"{cap['median']:.2f} s [{cap['p25']:.2f}-{cap['p75']:.2f}], "
                         f"/ first parallelize {r['median']:.3f} [{r['p25']:.3f}-{r['p75']:.3f}] "
                         f"(target <= 0.5: {'met' if r['median'] <= 0.5 else 'missed'}), n={r['n']}")
    lines.append("('other' in a first call: the call itself, run after the capture, and what the "
                 "stages above do not cover)")
    return "\n".join(lines)


# ---- dropout overhead ------------------------------------------------------------------------

def _random_ops(pm: Any) -> dict[str, int]:
    """The random ops in ``pm``'s program (ATen's nondeterministic_seeded tag: dropout, and
    scaled_dot_product_attention even at dropout_p 0) and how many of them are split."""
    from autotp.rewrite.rewrite import SplitRandom
    from autotp.rules import random_op
    gm = pm.module
    split = sum(isinstance(m, SplitRandom) for m in gm.modules())
    fns = [n for n in gm.graph.nodes if n.op == "call_function" and random_op(n.target)]
    drop = [n for n in fns if "dropout" in str(n.target)]
    p_nonzero = sum(1 for n in drop if len(n.args) > 1 and n.args[1])
    return {"split_random": split, "replicated_random": len(fns), "replicated_dropout": len(drop),
            "replicated_dropout_p_nonzero": p_nonzero}


def dropout_worker(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any] | None:
    import autotp
    _quiet()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(1)
    ids = torch.randint(0, 50257, (cfg["batch"], cfg["seq"]))
    kw = {"input_ids": ids, "labels": ids, "use_cache": False}
    base = gpt2(cfg["layers"], P).state_dict()
    variants: dict[str, torch.nn.Module] = {}
    info: dict[str, Any] = {}
    for p in (P, 0.0):
        model = gpt2(cfg["layers"], p)
        model.load_state_dict(base)
        model.train()
        variants[f"one p={p}"] = copy.deepcopy(model)
        tp = autotp.parallelize(model, (), kw)
        variants[f"tp p={p}"] = tp
        info[f"tp p={p}"] = {**_random_ops(tp), "collectives": tp.plan.count(),
                             "split_params": sum(1 for x in tp.placements.values()
                                                 if not isinstance(x, autotp.Replicate))}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in variants.items()}
    names = [f"tp p={P}", "tp p=0.0", f"one p={P}", "one p=0.0"]
    times: dict[str, list[float]] = {k: [] for k in names}
    for it in range(cfg["warmup"] + cfg["iters"]):
        k = it % len(names)  # interleaved, order rotated so that no variant always runs first
        for name in names[k:] + names[:k]:
            dist.barrier()
            t0 = time.perf_counter()
            variants[name](**kw).loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            dist.barrier()
            if it >= cfg["warmup"]:
                times[name].append(time.perf_counter() - t0)
    out = None
    if rank == 0:
        out = {"config": {**cfg, "world_size": world, "p": P, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
               "info": info, "ms": {k: stats([t * 1e3 for t in v]) for k, v in times.items()},
               "raw_ms": {k: [round(t * 1e3, 2) for t in v] for k, v in times.items()}}
    dist.barrier()
    dist.destroy_process_group()
    return out


def run_dropout(iters: int = 10, layers: int = 12, batch: int = 2, seq: int = 128, warmup: int = 2,
                world_size: int = 2) -> dict[str, Any]:
    cfg = {"iters": iters, "layers": layers, "batch": batch, "seq": seq, "warmup": warmup}
    res = spawn_collect(dropout_worker, world_size, cfg)
    ms, raw = res["ms"], res["raw_ms"]
    o_tp = ms[f"tp p={P}"]["median"] / ms["tp p=0.0"]["median"]
    o_1 = ms[f"one p={P}"]["median"] / ms["one p=0.0"]["median"]
    # the same iteration's times saw the same load: medians of per-iteration ratios
    per_it = [(a / b) / (c / d) for a, b, c, d in zip(raw[f"tp p={P}"], raw["tp p=0.0"],
                                                     raw[f"one p={P}"], raw["one p=0.0"])]
    res["ratios"] = {"overhead_tp": o_tp, "overhead_1": o_1, "overhead_tp/overhead_1": o_tp / o_1,
                     "paired": stats(per_it)}
    return res


def report_dropout(res: dict[str, Any]) -> str:
    c, ms, r = res["config"], res["ms"], res["ratios"]
    lines = [f"Dropout: GPT-2 ({c['layers']} layers, 768 wide), training step (fwd + bwd + AdamW), "
             f"batch {c['batch']} x seq {c['seq']}, gloo world {c['world_size']} vs one device (one per "
             f"rank, concurrently), OMP_NUM_THREADS={c['OMP_NUM_THREADS']}, {c['iters']} interleaved "
             f"iterations after {c['warmup']} warm-up, medians [p25-p75] ms:"]
    for name, d in ms.items():
        lines.append(f"  {name:<12} {d['median']:>9.1f} [{d['p25']:.1f}-{d['p75']:.1f}]")
    pr = r["paired"]
    verdict = "met" if r["overhead_tp/overhead_1"] <= 1.2 else "missed"
    lines.append(f"  overhead_tp = {r['overhead_tp']:.3f}, overhead_1 = {r['overhead_1']:.3f}, "
                 f"overhead_tp/overhead_1 = {r['overhead_tp/overhead_1']:.3f} (target <= 1.2: {verdict}); "
                 f"median of per-iteration ratios {pr['median']:.3f} [{pr['p25']:.3f}-{pr['p75']:.3f}]")
    for name, d in res["info"].items():
        lines.append(f"  {name}: {d['split_random']} SplitRandom (split: full-size draw on every rank), "
                     f"{d['replicated_random']} replicated random ops ({d['replicated_dropout']} dropout, "
                     f"{d['replicated_dropout_p_nonzero']} of them p > 0); {d['collectives']} collectives "
                     f"per step, {d['split_params']} split parameters")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=("recapture", "dropout"), default=["recapture", "dropout"])
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="recapture: fresh process pairs")
    ap.add_argument("--models", type=int, default=2, help="recapture: fresh models per process")
    ap.add_argument("--layers", type=int, default=12, help="recapture: GPT-2 blocks (12: GPT-2 small)")
    ap.add_argument("--drop-layers", type=int, default=12, help="dropout: GPT-2 blocks")
    ap.add_argument("--iters", type=int, default=10, help="dropout: timed iterations")
    ap.add_argument("--warmup", type=int, default=2, help="dropout: untimed iterations first")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    a = ap.parse_args()
    from benchmarks.common import describe, load_average, machine
    mach = machine()
    out = []
    if "recapture" in a.parts:
        out.append(report_recapture(run_recapture(a.repeats, a.models, a.layers, a.batch, a.seq, a.world_size)))
        print(out[-1], flush=True)
    if "dropout" in a.parts:
        out.append(report_dropout(run_dropout(a.iters, a.drop_layers, a.batch, a.seq, a.warmup, a.world_size)))
        print(out[-1], flush=True)
    mach["load_end"] = load_average()
    print(describe(mach))


if __name__ == "__main__":
    main()
