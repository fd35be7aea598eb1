"""Plan quality: communication bytes per training step of autotp's plan against Megatron's
closed form, and parameter bytes per rank against total/N, for GPT-2 small, Llama-2-7B width
and BERT-base shapes built on the meta device (bf16), at world sizes 2, 4, 8, planned for h100.

Megatron-LM's tensor parallelism issues, per transformer layer, 2 all-reduces of b*s*h
elements in forward (after attention and after the MLP, "g") and 2 in backward (before QKV
and before the MLP-up, "f"). autotp's collectives inside the layers (module path
``...h.N...``, ``...layers.N...``, ``...layer.N...``) are compared with 2*L*b*s*h*bytes per
direction; the ones outside the layers (embeddings, LM head, pooler) are listed with their
modules, since Megatron handles those with vocab-parallel embedding and cross-entropy, which
is not the same graph (an autotp module returns replicated logits).

Bytes are payload bytes of the full tensor on one rank, the Plan's convention (an all-reduce's
input, an all-gather's output); the ring model's wire traffic is 2(n-1)/n resp. (n-1)/n of that.

    python benchmarks/plan_quality.py [--world-sizes 2 4 8] [--layers N] [--objectives time memory]"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LAYER = re.compile(r"(^|\.)(h|layers|layer)\.\d+(\.|$)")
DTYPE_BYTES = 2  # bf16


def shapes(layers: int | None = None) -> dict[str, dict[str, Any]]:
    """name -> build kwargs; ``layers`` overrides the real depth (quick runs)."""
    return {
        "GPT-2 small": dict(kind="gpt2", layers=layers or 12, hidden=768, heads=12, ffn=3072,
                            vocab=50257, batch=8, seq=1024),
        "Llama-2-7B": dict(kind="llama", layers=layers or 32, hidden=4096, heads=32, ffn=11008,
                           vocab=32000, batch=1, seq=2048),
        "BERT-base": dict(kind="bert", layers=layers or 12, hidden=768, heads=12, ffn=3072,
                          vocab=30522, batch=8, seq=512),
    }


def build(s: dict[str, Any]):
    import torch
    import transformers as T
    if s["kind"] == "gpt2":
        cfg = T.GPT2Config(n_layer=s["layers"], n_embd=s["hidden"], n_head=s["heads"],
                           n_inner=s["ffn"], vocab_size=s["vocab"], n_positions=s["seq"],
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        cls, kw = T.GPT2LMHeadModel, {"use_cache": False}
    elif s["kind"] == "llama":
        cfg = T.LlamaConfig(num_hidden_layers=s["layers"], hidden_size=s["hidden"],
                            num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                            intermediate_size=s["ffn"], vocab_size=s["vocab"],
                            max_position_embeddings=s["seq"], bos_token_id=0, eos_token_id=0,
                            pad_token_id=0)
        cls, kw = T.LlamaForCausalLM, {"use_cache": False}
    else:
        cfg = T.BertConfig(num_hidden_layers=s["layers"], hidden_size=s["hidden"],
                           num_attention_heads=s["heads"], intermediate_size=s["ffn"],
                           vocab_size=s["vocab"], hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
        cls, kw = T.BertModel, {}
    with torch.device("meta"):
        model = cls(cfg).to(torch.bfloat16)
    ids = torch.zeros(s["batch"], s["seq"], dtype=torch.long, device="meta")
    return model, (), {"input_ids": ids, **kw}


def analyse(plan, s: dict[str, Any]) -> dict[str, Any]:
    n = plan.world_size
    mega = 2 * s["layers"] * s["batch"] * s["seq"] * s["hidden"] * DTYPE_BYTES
    inside = {"forward": 0, "backward": 0}
    count = {"forward": 0, "backward": 0}
    outside: dict[tuple[str, str, str], list[int]] = {}
    for c in plan.collectives:
        if LAYER.search(c.module):
            inside[c.phase] += c.bytes
            count[c.phase] += 1
        else:
            outside.setdefault((c.phase, c.kind, c.module or "(root)"), []).append(c.bytes)
    replicated = []
    for p in plan.params:
        nbytes = DTYPE_BYTES
        for d in p.shape:
            nbytes *= d
        if p.placement == "R":
            replicated.append({"name": p.name, "shape": list(p.shape), "bytes": nbytes})
    replicated_bytes = sum(p["bytes"] for p in replicated)
    replicated = sorted(replicated, key=lambda p: -p["bytes"])[:4]  # the largest ones
    return {
        "world_size": n, "objective": plan.objective,
        "megatron_bytes_per_direction": mega, "megatron_count_per_direction": 2 * s["layers"],
        "layers_forward_bytes": inside["forward"], "layers_backward_bytes": inside["backward"],
        "layers_forward_count": count["forward"], "layers_backward_count": count["backward"],
        "forward_vs_megatron": inside["forward"] / mega, "backward_vs_megatron": inside["backward"] / mega,
        "outside": [{"phase": k[0], "kind": k[1], "module": k[2], "count": len(v), "bytes": sum(v)}
                    for k, v in sorted(outside.items())],
        "outside_bytes": sum(sum(v) for v in outside.values()),
        "param_bytes_per_rank": plan.param_bytes_per_rank, "param_bytes_total": plan.param_bytes_total,
        "params_vs_total_over_n": plan.param_bytes_per_rank / (plan.param_bytes_total / n),
        "replicated_large_params": replicated, "replicated_bytes": replicated_bytes,
        "predicted_step_ms": plan.predicted_time_s * 1e3,
    }


def run(world_sizes: list[int] = (2, 4, 8), layers: int | None = None,
        objectives: list[str] = ("memory", "time")) -> dict[str, Any]:
    from autotp.runtime.api import plan
    out: dict[str, Any] = {"config": {"device": "h100", "mode": "training", "dtype": "bfloat16",
                                      "world_sizes": list(world_sizes), "objectives": list(objectives)},
                           "models": {}}
    for name, s in shapes(layers).items():
        model, args, kwargs = build(s)
        rows = []
        for n in world_sizes:
            for obj in objectives:
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    p = plan(model, args, kwargs, world_size=n, device="h100", objective=obj)
                row = analyse(p, s)
                row["plan_s"] = time.perf_counter() - t0
                rows.append(row)
        out["models"][name] = {"shape": s, "rows": rows}
    return out


def report(res: dict[str, Any]) -> str:
    from benchmarks.common import fmt_bytes
    lines = []
    for name, m in res["models"].items():
        s = m["shape"]
        lines.append(f"{name}: {s['layers']} layers, hidden {s['hidden']}, {s['heads']} heads, ffn "
                     f"{s['ffn']}, vocab {s['vocab']}, batch {s['batch']} x seq {s['seq']}, bf16; "
                     f"Megatron in layers: {2 * s['layers']} all_reduce of "
                     f"{fmt_bytes(s['batch'] * s['seq'] * s['hidden'] * DTYPE_BYTES)} per direction")
        lines.append(f"  {'N':>2} {'objective':>9} {'layers fwd':>12} {'vs Meg':>7} {'layers bwd':>12} "
                     f"{'vs Meg':>7} {'outside layers':>15} {'params/rank vs total/N':>23}")
        for r in m["rows"]:
            lines.append(f"  {r['world_size']:>2} {r['objective']:>9} "
                         f"{fmt_bytes(r['layers_forward_bytes']):>12} {r['forward_vs_megatron']:>6.3f}x "
                         f"{fmt_bytes(r['layers_backward_bytes']):>12} {r['backward_vs_megatron']:>6.3f}x "
                         f"{fmt_bytes(r['outside_bytes']):>15} {r['params_vs_total_over_n']:>22.4f}x")
            for o in r["outside"]:
                lines.append(f"       outside: {o['phase']} {o['count']}x {o['kind']} "
                             f"{fmt_bytes(o['bytes'])} in {o['module']}")
            for p in r["replicated_large_params"]:
                lines.append(f"       replicated: {p['name']} {tuple(p['shape'])} ({fmt_bytes(p['bytes'])})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--layers", type=int, default=None, help="override every model's depth")
    ap.add_argument("--objectives", nargs="+", default=["memory", "time"])
    a = ap.parse_args()
    from benchmarks.common import describe, load_average, machine
    mach = machine()
    res = run(a.world_sizes, a.layers, a.objectives)
    mach["load_end"] = load_average()
    print(describe(mach))
    print(report(res))


if __name__ == "__main__":
    main()
