"""The CLI driven as a user would: a subprocess, checking output, JSON schema and exit codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


def autotp(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS]), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "autotp", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_plan_table_folds_layers_and_names_splits() -> None:
    r = autotp("plan", "examples/nanogpt.py:gpt", "--world-size", "2", "--objective", "memory")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "h.0–1.mlp.c_fc ×2" in out and "column" in out and "row" in out
    assert "column (fused, 3 blocks)" in out  # the fused QKV projection
    assert "all_reduce" in out and "forward" in out and "backward" in out
    assert "parameters per rank" in out and "total/N" in out and "predicted step time" in out


def test_local_weight_column_is_each_ranks_size() -> None:
    """The "local weight" column is placements.local_size, not size // n: an uneven split
    (vocab 50257 at world 2: rank 0 holds 25129 rows) and a head-boundary split (32 heads of
    128 on 6 ranks: rank 0 holds 6 heads = 768, the last rank 2 heads = 256)."""
    r = autotp("plan", "cli_targets:vocab", "--world-size", "2", "--objective", "memory")
    assert r.returncode == 0, r.stderr
    assert "25129/25128×16" in r.stdout and "16×25129/25128" in r.stdout, r.stdout
    r = autotp("plan", "cli_targets:heads", "--world-size", "6")
    assert r.returncode == 0, r.stderr
    assert "768/256×4096" in r.stdout and "4096×768/256" in r.stdout, r.stdout
    assert "682" not in r.stdout and "683" not in r.stdout


def test_plan_json_and_dot(tmp_path) -> None:
    path = tmp_path / "p.json"
    r = autotp("plan", "cli_targets:mlp", "--world-size", "2", "--objective", "memory",
               "--format", "json", "--out", str(path))
    assert r.returncode == 0, r.stderr
    d = json.loads(path.read_text())
    assert d["world_size"] == 2 and d["param_bytes_per_rank"] * 2 == d["param_bytes_total"]
    for c in d["collectives"]:
        assert c["kind"] in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
        assert c["phase"] in ("forward", "backward") and c["bytes"] > 0
    r = autotp("plan", "cli_targets:mlp", "--world-size", "2", "--objective", "memory", "--format", "dot")
    assert r.returncode == 0 and r.stdout.startswith("digraph autotp") and "color=red" in r.stdout


def test_explain_diff_devices(tmp_path) -> None:
    r = autotp("explain", "cli_targets:mlp", "up", "--world-size", "2", "--objective", "memory",
               "--also-world-size", "4")
    assert r.returncode == 0, r.stderr
    assert "✔ chosen" in r.stdout and "at world size 4" in r.stdout
    a = tmp_path / "a.json"
    autotp("plan", "cli_targets:mlp", "--world-size", "2", "--format", "json", "--out", str(a))
    r = autotp("diff", str(a), "cli_targets:mlp", "--world-size", "2", "--b-objective", "memory")
    assert r.returncode == 0, r.stderr
    assert "splits that differ" in r.stdout and "parameters per rank" in r.stdout
    r = autotp("devices")
    assert r.returncode == 0 and "h100" in r.stdout and "a100-40gb" in r.stdout


def test_run_checks_against_one_device() -> None:
    r = autotp("run", "cli_targets:mlp", "--world-size", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the parallel model equals the original" in r.stdout
    assert "issued" in r.stdout and "planned" in r.stdout
    # zero tolerance: fp32 rounding differs, so the checker must say MISMATCH and exit 1
    r = autotp("run", "cli_targets:mlp", "--world-size", "2", "--rtol", "0", "--atol", "0")
    assert r.returncode == 1 and "MISMATCH" in r.stdout


def test_run_debug_prints_the_failing_ranks_traceback() -> None:
    """The rank's own traceback (verify._worker's), not only the parent's, under --debug."""
    r = autotp("--debug", "run", "cli_targets:fails_on_ranks", "--world-size", "2")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "traceback on rank 0:" in r.stderr and "in _worker" in r.stderr, r.stderr
    assert "rank 0 failed: CaptureError" in r.stderr and "only in a rank process" in r.stderr


@pytest.mark.parametrize("args,code,words", [
    (("plan", "nope.py:f", "--world-size", "2"), 2, "no such file"),
    (("plan", "cli_targets:missing", "--world-size", "2"), 2, "has no function 'missing'"),
    (("plan", "cli_targets:not_a_tuple", "--world-size", "2"), 2, "must return (model, example_inputs)"),
    (("plan", "cli_targets:raises", "--world-size", "2"), 2, "raised ValueError: no weights here"),
    (("plan", "cli_targets", "--world-size", "2"), 2, "must be 'path/to/file.py:factory'"),
    (("plan", "cli_targets:mlp"), 2, "--world-size"),
    (("plan", "cli_targets:mlp", "--world-size", "0"), 2, "at least 1"),
    (("plan", "cli_targets:uncapturable", "--world-size", "2"), 1, "module: 1"),
])
def test_bad_input_is_one_clear_message(args, code, words) -> None:
    r = autotp(*args)
    assert r.returncode == code, (r.stdout, r.stderr)
    assert words in r.stderr
    assert "Traceback" not in r.stderr


def test_explain_says_why_weights_stay_whole() -> None:
    r = autotp("explain", "cli_targets:whole", "blk", "lin", "--world-size", "2")
    assert r.returncode == 0, r.stderr
    rows = {line.split("│")[1].strip(): line for line in r.stdout.splitlines()
            if line.startswith("│") and line.count("│") == 4}
    # a missing rule reads differently from a deliberate choice
    assert "no rule: aten.cumsum.default" in rows["blk.w"]
    assert "cost:" in rows["lin.weight"] and "µs" in rows["lin.weight"]


def test_plan_decode_is_megatrons_with_the_cache_split(tmp_path) -> None:
    """``--mode decode``: the generation step at its own shapes. One token per row reads every
    weight for a few KB of activations, so the plan splits them all and pays Megatron's two
    all-reduces per layer; the KV cache is split by kv heads (8 kv heads on 4 ranks)."""
    r = autotp("plan", "cli_targets:llama_decode", "--world-size", "4", "--mode", "decode")
    assert r.returncode == 0, r.stderr
    assert "decode:" in r.stdout and "ms per token predicted (4 all-reduces" in r.stdout, r.stdout
    assert "KV cache" in r.stdout
    out = tmp_path / "decode.json"
    r = autotp("plan", "cli_targets:llama_decode", "--world-size", "4", "--mode", "decode",
               "--format", "json", "--out", str(out))
    assert r.returncode == 0, r.stderr
    plan = json.loads(out.read_text())
    caches = {s["name"]: s["placement"] for s in plan["state"] if "cache_k" in s["name"] or "cache_v" in s["name"]}
    assert len(caches) == 4 and set(caches.values()) == {"S(1)"}, caches
    assert plan["state_bytes_per_rank"] * 4 <= plan["state_bytes_total"] + 4 * 8 * 2  # + the 0-d counters
    assert all(p["placement"] != "R" for p in plan["params"] if p["name"].endswith("proj.weight")), plan["params"]


def test_run_generate_checks_tokens() -> None:
    r = autotp("run", "examples/hf_models.py:llama", "--world-size", "2", "--generate", "8")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "generation: 8 greedy tokens" in r.stdout and "token-identical" in r.stdout, r.stdout
    assert "the parallel model equals the original" in r.stdout


def test_plan_pipeline_shows_stages_and_bubble() -> None:
    """--pipeline-parallel: the stage table (nanoGPT's 2 blocks: one each) and the step."""
    r = autotp("plan", "examples/nanogpt.py:gpt", "--world-size", "2", "--pipeline-parallel", "2",
               "--microbatches", "2", "--schedule", "gpipe")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "pipeline: 2 stages x 2 tensor-parallel ranks, gpipe, 2 microbatches" in out
    assert "h.0 .. 0 (1) + embeddings" in out and "h.1 .. 1 (1) + head" in out
    assert "= (2 + 2 - 1) x the slowest stage (*); bubble 33.3% of the step" in out
    r = autotp("plan", "examples/nanogpt.py:gpt", "--world-size", "2", "--pipeline-parallel", "3")
    assert r.returncode != 0 and "at most 2 stages" in r.stderr
