"""Run a function on N real gloo processes (spawned, OMP_NUM_THREADS=1) and collect results."""
from __future__ import annotations

import datetime
import os
import tempfile
import traceback
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from autotp.tools.launch import spawn


def _worker(rank: int, world: int, fn: Callable, args: tuple, outdir: str) -> None:
    torch.set_num_threads(1)
    # a rank that fails leaves its peers waiting in a collective: gloo's timeout turns that
    # into an error on every rank instead of a hang until CI's limit
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        result = fn(rank, world, *args)
        torch.save({"ok": True, "result": result}, os.path.join(outdir, f"{rank}.pt"))
    except BaseException:  # noqa: BLE001 - reported to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(outdir, f"{rank}.pt"))
    finally:
        try:
            dist.barrier()  # nobody tears down gloo's sockets while a peer still uses them
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 600) -> list[Any]:
    """fn(rank, world, *args) on ``world`` gloo processes; returns each rank's result and
    raises with the rank's traceback if any rank failed."""
    with tempfile.TemporaryDirectory() as d:
        ctx = spawn(_worker, world, fn, args, d, join=False)
        crashed = None
        try:
            while not ctx.join(timeout=timeout):
                pass
        except mp.ProcessExitedException as e:  # a rank died: its saved error says why
            crashed = e
        results = []
        for r in range(world):
            path = os.path.join(d, f"{r}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} produced no result ({crashed})")
            out = torch.load(path, weights_only=False)
            if not out["ok"]:
                raise AssertionError(f"rank {r} failed:\n{out['error']}")
            results.append(out["result"])
        if crashed is not None:
            # every rank finished and saved its checks; the process died afterwards, in
            # gloo's teardown ("terminate called without an active exception", seen on 2
            # cores at world 3): not a correctness failure, but say so
            warnings.warn(f"a rank process crashed after finishing its work: {crashed}")
        return results


def raised(call) -> str:
    """The AutoTPError message ``call()`` raises ("<no error>" when it raises none): checks
    run on ranks return it, so the test can compare every rank's error."""
    from autotp.errors import AutoTPError
    try:
        call()
    except AutoTPError as e:
        return str(e)
    return "<no error>"
