"""Plan time for frontier model shapes (issue 15's targets), each on the smallest deployment
its bf16 weights fit, on the meta device, inference, input (1, 2048):

- Llama-3.1-405B shape (126 layers, hidden 16384, 128 heads, 8 kv heads, intermediate 53248,
  vocab 128256) on 8 x h200;
- DeepSeek-V3 shape (61 layers, the first 3 dense, MLA with q_lora 1536 / kv_lora 512, 256
  routed experts top-8 + 1 shared, moe_intermediate 2048, vocab 129280) on 16 x h200;
- Qwen3-235B-A22B shape (94 layers, 128 experts top-8, moe_intermediate 1536, 64 heads, 4 kv
  heads, vocab 151936) on 8 x h100;
- Llama-2-70B (80 layers) on 8 x h100, the plan_time.py reference.

Prints per shape: model -> Plan seconds (capture, strategies, solve), graph nodes, parameters
per rank against total / N, and what the solver reported (optimal, or stopped by its time
limit). ``--objective memory`` plans for least parameter bytes per rank (the target there is
<= 1.001 x total / N). Targets (not timed tests): <= 10 s each on the 2-core machine.

    python benchmarks/frontier.py [--shapes llama405b deepseek_v3 qwen3_235b llama70b]
                                  [--objective time|memory] [--json out.json]
"""
from __future__ import annotations

import argparse
import logging
import json
import os
import sys
import time
import warnings
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.plan_time import _SolverLog, solver_status  # noqa: E402

SEQ = 2048


def _meta_lm(cls_name: str, config_name: str, **config: object):
    """transformers' ``cls_name`` built from ``config_name(**config)`` on the meta device in
    bf16, and keyword inputs of shape (1, SEQ)."""
    import torch
    import transformers as T
    cfg = getattr(T, config_name)(max_position_embeddings=4096, **config)
    with torch.device("meta"):
        model = getattr(T, cls_name)(cfg).to(torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (1, SEQ), device="meta")
    return model, {"input_ids": ids, "use_cache": False}


def llama405b():
    return _meta_lm("LlamaForCausalLM", "LlamaConfig", num_hidden_layers=126, hidden_size=16384,
                    num_attention_heads=128, num_key_value_heads=8, intermediate_size=53248,
                    vocab_size=128256)


def llama70b():
    return _meta_lm("LlamaForCausalLM", "LlamaConfig", num_hidden_layers=80, hidden_size=8192,
                    num_attention_heads=64, num_key_value_heads=8, intermediate_size=28672,
                    vocab_size=32000)


def deepseek_v3():
    return _meta_lm("DeepseekV3ForCausalLM", "DeepseekV3Config", num_hidden_layers=61,
                    first_k_dense_replace=3, hidden_size=7168, intermediate_size=18432,
                    moe_intermediate_size=2048, n_routed_experts=256, num_experts_per_tok=8,
                    n_shared_experts=1, q_lora_rank=1536, kv_lora_rank=512,
                    num_attention_heads=128, num_key_value_heads=128, qk_rope_head_dim=64,
                    qk_nope_head_dim=128, v_head_dim=128, vocab_size=129280)


def qwen3_235b():
    return _meta_lm("Qwen3MoeForCausalLM", "Qwen3MoeConfig", num_hidden_layers=94, hidden_size=4096,
                    intermediate_size=12288, moe_intermediate_size=1536, num_experts=128,
                    num_experts_per_tok=8, num_attention_heads=64, num_key_value_heads=4,
                    head_dim=128, vocab_size=151936)


SHAPES: dict[str, tuple[Callable, int, str]] = {
    "llama405b": (llama405b, 8, "h200"),
    "deepseek_v3": (deepseek_v3, 16, "h200"),
    "qwen3_235b": (qwen3_235b, 8, "h100"),
    "llama70b": (llama70b, 8, "h100"),
}


class _CellLog:
    """Counts the layer-table cells (Program.solve_bounded: warm-started LPs, which
    _SolverLog's milp wrapper does not see) and their seconds."""

    def __enter__(self) -> "_CellLog":
        from autotp.solve.program import Program
        self._cls, self._orig, self.n, self.seconds = Program, Program.solve_bounded, 0, 0.0

        def solve_bounded(prog, *a, **k):
            t0 = time.perf_counter()
            try:
                return self._orig(prog, *a, **k)
            finally:
                self.n += 1
                self.seconds += time.perf_counter() - t0
        Program.solve_bounded = solve_bounded
        return self

    def __exit__(self, *exc: object) -> None:
        self._cls.solve_bounded = self._orig


class _Priced(logging.Handler):
    """Whether the solver took a Lagrangian (priced) path: every program it solved may be
    optimal while the plan is not proven so (autotp.solve.solve logs which path it took)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen = False
        self._log = logging.getLogger("autotp.solve.solve")

    def emit(self, record: logging.LogRecord) -> None:
        self.seen = self.seen or "pricing" in record.getMessage()

    def __enter__(self) -> "_Priced":
        self._level = self._log.level
        self._log.setLevel(logging.INFO)
        self._log.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._log.removeHandler(self)
        self._log.setLevel(self._level)


def plan_shape(name: str, objective: str) -> dict[str, Any]:
    from autotp.runtime.api import plan_details
    build, world, device = SHAPES[name]
    t0 = time.perf_counter()
    model, kwargs = build()
    built = time.perf_counter() - t0
    marks = [("start", time.perf_counter())]
    cells = _CellLog()
    priced = _Priced()
    with warnings.catch_warnings(), _SolverLog() as solves, cells, priced:
        warnings.simplefilter("ignore")
        pd = plan_details(model, (), kwargs, world_size=world, device=device, mode="inference",
                          objective=objective,
                          progress=lambda stage: marks.append((stage, time.perf_counter())))
    marks.append(("end", time.perf_counter()))
    t = [marks[i + 1][1] - marks[i][1] for i in range(len(marks) - 1)]
    p = pd.plan
    return {"shape": name, "world_size": world, "device": device, "objective": objective,
            "build_s": built, "capture_s": t[1], "strategies_s": t[2], "solve_s": t[3],
            "total_s": marks[-1][1] - marks[0][1], "nodes": len(pd.candidates.nodes),
            "layers": model.config.num_hidden_layers, "solves": solves,
            "table_cells": cells.n, "table_cells_s": cells.seconds,
            "optimal": not any(x["status"] == 1 for x in solves), "priced": priced.seen,
            "params_vs_total_over_n": p.param_bytes_per_rank / (p.param_bytes_total / world),
            "param_gb_per_rank": p.param_bytes_per_rank / 1e9}


def report(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'shape':<12} {'world':>5} {'device':>6} {'objective':>9} {'capture':>8} {'strat':>7} "
             f"{'solve':>7} {'total':>7} {'nodes':>6} {'params/rank vs total/N':>22}  solver"]
    for r in rows:
        lines.append(f"{r['shape']:<12} {r['world_size']:>5} {r['device']:>6} {r['objective']:>9} "
                     f"{r['capture_s']:>7.1f}s {r['strategies_s']:>6.1f}s {r['solve_s']:>6.1f}s "
                     f"{r['total_s']:>6.1f}s {r['nodes']:>6} {r['params_vs_total_over_n']:>21.4f}x  "
                     f"{solver_status(r)}, {r['table_cells']} table cells in {r['table_cells_s']:.1f} s  (target: <= 10 s" +
                     (", <= 1.001x)" if r["objective"] == "memory" else ")"))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--objective", default="time", choices=["time", "memory"])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from benchmarks.common import load_average, machine
    mach = machine()
    rows = []
    for s in a.shapes:
        rows.append(plan_shape(s, a.objective))
        print(report(rows[-1:]), flush=True)
    mach["load_end"] = load_average()
    print(report(rows))
    print(", ".join(f"{k} {v}" for k, v in mach.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "machine": mach}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
