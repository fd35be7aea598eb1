"""The README's main job (examples/demo.py) runs and passes its own check against one device:
it went unnoticed once that the demo failed, because nothing ran it."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_main_job_passes_its_check() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "demo.py")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "MISMATCH" not in res.stdout + res.stderr
    assert "forward max |error| vs one device" in res.stdout
    assert "collectives per step: planned 17, issued 17" in res.stdout, res.stdout
