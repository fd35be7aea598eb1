"""Issue 14: autotp's generation against transformers' own tensor parallelism
(``from_pretrained(dir, tp_plan="auto")``, its per-model hand-written plan, here on gloo through
``accelerate``; both need the `bench` extra), launched alike by ``torchrun`` on this machine.

A Llama (hidden 256, 4 layers, 8 heads, 4 kv heads, vocab 1000, fp32) is saved to a temporary
folder; each tool loads it at world 2 and 3 and generates 32 greedy tokens from a 16-token
prompt, after one warm-up call, ``--rounds`` times; tokens are compared with the single
device's ``model.generate`` and tokens/s reported (medians). One thread per process.

    python benchmarks/peer_hf_tp.py [--worlds 2 3] [--rounds 5]"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import describe, load_average, machine, stats  # noqa: E402

NEW, PROMPT = 32, 16
CONFIG = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)


def _prompt() -> torch.Tensor:
    return torch.randint(2, CONFIG["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(1))


def worker(tool: str, folder: str, rounds: int, out: str) -> None:
    """Run under torchrun: load the model with ``tool`` and time greedy generation."""
    import torch.distributed as dist
    import transformers as T
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    res: dict[str, Any] = {"tool": tool}
    try:
        ids = _prompt()
        if tool == "hf":
            m = T.AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto", dtype=torch.float32)
            gen = m.generate
        else:
            import autotp
            m = T.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            objective = "memory" if tool == "autotp-memory" else "time"
            tp = autotp.parallelize(m, (ids,), {"use_cache": False}, mode="inference", device="cpu-gloo",
                                    objective=objective)
            gen = tp.generate
        t = time.perf_counter()
        tokens = gen(ids, max_new_tokens=NEW, do_sample=False)  # warm-up (autotp: captures programs)
        res["first_s"] = time.perf_counter() - t
        ts = []
        for _ in range(rounds):
            dist.barrier()
            t = time.perf_counter()
            tokens = gen(ids, max_new_tokens=NEW, do_sample=False)
            ts.append(time.perf_counter() - t)
        res.update(ok=True, tokens=tokens.tolist(), s=stats(ts))
        if tool != "hf":
            sv = next(iter(tp._serving.values()))
            res["note"] = (f"decode plan: {sv.plans['decode'].count()} collectives per token "
                           f"({sv.plans['decode'].count('all_reduce')} all-reduces), parameters per rank "
                           f"{sum(p.numel() for p in tp.parameters()) / sum(p.numel() for p in m.parameters()):.2f} "
                           f"of the model, KV cache per rank {sv.cache_bytes / max(sv.plans['decode'].state_bytes_total, 1):.2f}")
        else:
            local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in m.parameters())
            res["note"] = f"parameters per rank {local / sum(p.numel() for p in m.parameters()):.2f} of the model"
    except Exception as e:  # noqa: BLE001 - the failure is a result here
        res.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    dist.destroy_process_group()


def _launch(tool: str, folder: str, world: int, rounds: int) -> dict[str, Any]:
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           os.path.abspath(__file__), "--worker", tool, folder, str(rounds), out]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    try:
        with open(out) as f:
            text = f.read()
        res = json.loads(text) if text else {"tool": tool, "ok": False, "error": "no result"}
    finally:
        os.unlink(out)
    if not res.get("ok") and res.get("error") == "no result":
        tail = [ln for ln in p.stderr.splitlines() if "Error" in ln]
        res["error"] = tail[-1][:200] if tail else f"exit code {p.returncode}"
    return res


def run(worlds: list[int], rounds: int = 5) -> dict[str, Any]:
    import transformers as T
    res: dict[str, Any] = {"machine": machine(), "config": CONFIG, "new": NEW, "prompt": PROMPT, "worlds": {}}
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        m = T.LlamaForCausalLM(T.LlamaConfig(**CONFIG, pad_token_id=0, bos_token_id=1, eos_token_id=None)).eval()
        m.save_pretrained(folder)
        torch.set_num_threads(1)
        want = m.generate(_prompt(), max_new_tokens=NEW, do_sample=False)
        ts = []
        for _ in range(rounds):
            t = time.perf_counter()
            m.generate(_prompt(), max_new_tokens=NEW, do_sample=False)
            ts.append(time.perf_counter() - t)
        res["one_device"] = {"s": stats(ts)}
        for w in worlds:
            row = {}
            for tool in ("autotp", "autotp-memory", "hf"):
                r = _launch(tool, folder, w, rounds)
                if r.get("ok"):
                    r["same_tokens"] = r.pop("tokens") == want.tolist()
                row[tool] = r
            res["worlds"][str(w)] = row
    res["machine"]["load_end"] = load_average()
    return res


def report(res: dict[str, Any]) -> str:
    one = NEW / res["one_device"]["s"]["median"]
    lines = [f"generation vs transformers' tp_plan='auto': Llama hidden 256, 4 layers, 8 heads / 4 kv heads, "
             f"fp32, prompt {res['prompt']}, {res['new']} greedy tokens; one device {one:.1f} tokens/s; "
             + describe(res["machine"]),
             "| world | tool | tokens/s (median) | same tokens as one device | first call | note |",
             "|---|---|---|---|---|---|"]
    for w, row in res["worlds"].items():
        for tool, r in row.items():
            name = {"autotp": "autotp (objective time)", "autotp-memory": "autotp (objective memory)",
                    "hf": "transformers tp_plan=auto"}[tool]
            if r.get("ok"):
                lines.append(f"| {w} | {name} | {NEW / r['s']['median']:.1f} | {r['same_tokens']} | "
                             f"{r['first_s']:.1f} s | {r.get('note', '')} |")
            else:
                lines.append(f"| {w} | {name} | - | - | - | fails: {r['error']} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        tool, folder, rounds, out = sys.argv[2:6]
        worker(tool, folder, int(rounds), out)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    print(report(run(a.worlds, a.rounds)))


if __name__ == "__main__":
    main()
