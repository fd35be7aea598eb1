"""The documented launch works: torchrun --standalone (the single-machine stand-in for the
multi-node command in docs/distributed.md) runs examples/train_torchrun.py, whose ranks
train on a ('dp', 'tp') mesh with FSDP across "dp", match one process, save a checkpoint,
and a second launch, pipelined into 2 stages, loads it slice by slice and trains."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torchrun(*args: str, procs: int = 2) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
           os.path.join(ROOT, "examples", "train_torchrun.py"), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_torchrun_standalone_trains_saves_and_reloads(tmp_path) -> None:
    """4 ranks standing in for 2 nodes x 2 (FSDP across the "nodes", TP inside) train, match
    one process and save; 2 ranks as 2 pipeline stages (GPT-2's 2 blocks, one each) load the
    checkpoint, each its stage's slices, and train a step over 2 microbatches."""
    out = _torchrun("--nodes", "2", "--dp-mode", "fsdp", "--steps", "2", "--check",
                    "--save", str(tmp_path / "ckpt"), procs=4)
    assert "-> match" in out and "step 1: loss" in out and "tp 2 x dp 2 (fsdp)" in out, out
    assert (tmp_path / "ckpt" / "model.safetensors").exists()
    assert (tmp_path / "ckpt" / "config.json").exists()
    again = _torchrun("--pp", "2", "--microbatches", "2", "--steps", "1", "--weights", str(tmp_path / "ckpt"))
    assert "step 0: loss" in again and "plan: pp 2 (1, 1 layers) x tp 1 x dp 1" in again, again
