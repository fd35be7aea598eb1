"""Issue 14: generation on the parallel module against the unmodified model in one process.

A Llama of hidden 2048, 8 layers, 16 heads, 4 kv heads (GQA), ffn 5632, vocab 32000, fp32,
batch 1, prompt 128 tokens. Every process runs one thread (OMP_NUM_THREADS=1). Per round, rank 0
first runs ``model.generate`` (transformers' loop, dynamic cache) while the other ranks wait at
a barrier, then every rank runs ``tp.generate`` (autotp's loop, split static cache); rounds
repeat, and medians are taken. Per-token decode latency is (t(1 + T new) - t(1 new)) / T, so
prefill and the first token cancel; prefill is t(1 new). The first ``tp.generate`` call also
captures and plans the prefill and decode programs: reported apart ("first call"). The tokens
of both are compared (greedy, token for token).

    python benchmarks/decode.py [--worlds 2 3] [--rounds 3] [--new 32] [--layers 8]

Target (issue 14): per-token latency at world 2 <= 0.70x the single process's."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import describe, load_average, machine, spawn_collect, stats  # noqa: E402

CONFIG = dict(hidden_size=2048, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
              intermediate_size=5632, vocab_size=32000, max_position_embeddings=1024)


def _model(layers: int, hidden: int) -> torch.nn.Module:
    import transformers as T
    torch.manual_seed(0)
    cfg = T.LlamaConfig(**{**CONFIG, "num_hidden_layers": layers, "hidden_size": hidden,
                           "intermediate_size": CONFIG["intermediate_size"] * hidden // 2048},
                        pad_token_id=0, bos_token_id=1, eos_token_id=None)
    return T.LlamaForCausalLM(cfg).eval()


def _timed(fn, *a, **kw) -> tuple[float, Any]:
    dist.barrier()
    t = time.perf_counter()
    out = fn(*a, **kw)
    return time.perf_counter() - t, out


def worker(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    import autotp
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    m = _model(cfg["layers"], cfg["hidden"])
    ids = torch.randint(2, CONFIG["vocab_size"], (1, cfg["prompt"]), generator=torch.Generator().manual_seed(1))
    t = time.perf_counter()
    tp = autotp.parallelize(m, (ids,), {"use_cache": False}, mode="inference", device="cpu-gloo")
    parallelize_s = time.perf_counter() - t
    t = time.perf_counter()
    tp.generate(ids, max_new_tokens=cfg["new"] + 1, do_sample=False)  # captures both programs
    first_s = time.perf_counter() - t
    ref_t: dict[int, list[float]] = {1: [], cfg["new"] + 1: []}
    tp_t: dict[int, list[float]] = {1: [], cfg["new"] + 1: []}
    same = True
    for _ in range(cfg["rounds"]):
        for n in (1, cfg["new"] + 1):
            with torch.no_grad():
                if rank == 0:
                    t = time.perf_counter()
                    want = m.generate(ids, max_new_tokens=n, do_sample=False)
                    ref_t[n].append(time.perf_counter() - t)
                dist.barrier()
                dt, got = _timed(tp.generate, ids, max_new_tokens=n, do_sample=False)
                tp_t[n].append(dt)
            if rank == 0:
                same = same and torch.equal(want, got)
    sv = next(iter(tp._serving.values()))
    out = {"world": world, "same_tokens": same, "parallelize_s": parallelize_s, "first_call_s": first_s,
           "cache_bytes_rank": sv.cache_bytes, "cache_bytes_total": sv.plans["decode"].state_bytes_total,
           "decode_collectives": sv.plans["decode"].count(), "decode_all_reduces": sv.plans["decode"].count("all_reduce"),
           "predicted_token_ms": sv.plans["decode"].predicted_time_s * 1e3}
    for who, tt in (("ref", ref_t), ("tp", tp_t)):
        if not tt[1]:
            continue
        per = [(b - a) / cfg["new"] for a, b in zip(tt[1], tt[cfg["new"] + 1])]
        out[who] = {"prefill_s": stats(tt[1]), "token_s": stats(per),
                    "tokens_per_s": cfg["new"] / stats([b - a for a, b in zip(tt[1], tt[cfg["new"] + 1])])["median"]}
    if "ref" in out:
        out["token_ratio"] = out["tp"]["token_s"]["median"] / out["ref"]["token_s"]["median"]
        out["prefill_ratio"] = out["tp"]["prefill_s"]["median"] / out["ref"]["prefill_s"]["median"]
    dist.barrier()
    dist.destroy_process_group()
    return out


def floor_worker(rank: int, world: int, nbytes: float, syncs: int, rounds: int) -> float:
    """The machine's floor for one decode step without autotp: this rank's share of ``nbytes``
    of fp32 weights read by matrix-vector products (2048 x 2048 blocks), with ``syncs`` 8 KiB
    all-reduces spread among them (Megatron's 2 per layer); median ms over ``rounds``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    blocks = [torch.randn(2048, 2048) for _ in range(max(1, int(nbytes / 4 / world / 2048 ** 2)))]
    x = torch.randn(1, 2048)
    every = max(1, len(blocks) // syncs) if syncs else 0
    ts = []
    for _ in range(rounds):
        dist.barrier()
        t = time.perf_counter()
        for i, w in enumerate(blocks):
            y = x @ w
            if every and i % every == 0:
                dist.all_reduce(y)
        ts.append((time.perf_counter() - t) * 1e3)
    dist.barrier()
    dist.destroy_process_group()
    return stats(ts)["median"]


def run(worlds: list[int], rounds: int = 3, new: int = 32, layers: int = 8, hidden: int = 2048,
        prompt: int = 128) -> dict[str, Any]:
    cfg = dict(rounds=rounds, new=new, layers=layers, hidden=hidden, prompt=prompt)
    res = {"machine": machine(), "config": {**CONFIG, **cfg}, "worlds": {}}
    for w in worlds:
        res["worlds"][str(w)] = spawn_collect(worker, w, cfg)
    # what the hardware allows: the same weight bytes as bare matrix-vector products
    nbytes = 4.0 * sum(p.numel() for p in _model(layers, hidden).parameters())
    res["floor_ms"] = {"one process": spawn_collect(floor_worker, 1, nbytes, 0, 8)}
    for w in worlds:
        res["floor_ms"][f"{w} processes, no collectives"] = spawn_collect(floor_worker, w, nbytes, 0, 8)
        res["floor_ms"][f"{w} processes, {2 * layers} all-reduces"] = spawn_collect(
            floor_worker, w, nbytes, 2 * layers, 8)
    res["machine"]["load_end"] = load_average()
    return res


def report(res: dict[str, Any]) -> str:
    c = res["config"]
    lines = [f"decode: Llama hidden {c['hidden']}, {c['layers']} layers, 16 heads / 4 kv heads, fp32, "
             f"batch 1, prompt {c['prompt']}, {c['new']} new tokens, {c['rounds']} rounds; "
             + describe(res["machine"]),
             "| world | per token, one process | per token, autotp | ratio (target <= 0.70 at 2) | "
             "prefill one / autotp | tokens/s one / autotp | same tokens | first call (plan) | "
             "KV cache per rank / total | decode collectives (all-reduces) | predicted per token |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for w, r in res["worlds"].items():
        ref, tp = r["ref"], r["tp"]
        lines.append(
            f"| {w} | {ref['token_s']['median'] * 1e3:.1f} ms | {tp['token_s']['median'] * 1e3:.1f} ms "
            f"[{tp['token_s']['p25'] * 1e3:.1f}-{tp['token_s']['p75'] * 1e3:.1f}] | {r['token_ratio']:.3f} | "
            f"{ref['prefill_s']['median'] * 1e3:.0f} / {tp['prefill_s']['median'] * 1e3:.0f} ms "
            f"({r['prefill_ratio']:.2f}x) | {ref['tokens_per_s']:.2f} / {tp['tokens_per_s']:.2f} | "
            f"{r['same_tokens']} | {r['first_call_s']:.1f} s | "
            f"{r['cache_bytes_rank'] / 2**20:.2f} / {r['cache_bytes_total'] / 2**20:.2f} MiB | "
            f"{r['decode_collectives']} ({r['decode_all_reduces']}) | {r['predicted_token_ms']:.2f} ms |")
    fl = res.get("floor_ms", {})
    if fl:
        base = fl["one process"]
        lines.append("")
        lines.append("Floor (no autotp, no model: the same fp32 weight bytes as 2048x2048 matrix-vector "
                     "products per step, one thread per process): " + "; ".join(
                         f"{k}: {v:.1f} ms ({v / base:.2f}x)" for k, v in fl.items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--prompt", type=int, default=128)
    a = ap.parse_args()
    print(report(run(a.worlds, a.rounds, a.new, a.layers, a.hidden, a.prompt)))


if __name__ == "__main__":
    main()
