"""ruff, as pyproject.toml configures it, finds nothing in the package, tests, examples and
benchmarks (unused or undefined names, syntax, likely bugs): the README's test command
covers the lint."""
from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing() -> None:
    exe = shutil.which("ruff", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("ruff")
    assert exe, "ruff is not installed: pip install -e '.[test]' installs it"
    r = subprocess.run([exe, "check", "--output-format", "concise", "."], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
