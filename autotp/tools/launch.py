"""Local multi-process launch for the CLI, examples, benchmarks and tests: N spawned ranks on
this machine, rendezvous on a free loopback port, one thread each (OMP_NUM_THREADS=1: a
forked or oversubscribed BLAS pool hangs or crawls on small machines)."""
from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, join: bool = True):
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes. The children
    inherit MASTER_ADDR / MASTER_PORT, so ``init_process_group(backend, rank=rank,
    world_size=world_size)`` rendezvouses. Returns the ProcessContext when ``join=False``."""
    os.environ.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return mp.start_processes(fn, args=(world_size, *args), nprocs=world_size, join=join,
                              start_method="spawn")
