"""SPMD simulation: every rank of a tensor-parallel group as a thread of this process.

The ranks run the same rewritten per-rank GraphModules and the same collective autograd
Functions as on torch.distributed; only the transport differs (``ThreadComm``: a barrier and
shared slots). It checks a plan on one CPU without launching processes, and makes
property-based tests cheap. Each rank sums contributions in rank order, so every rank gets
bit-identical results, as a real all-reduce does.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import torch
from torch import nn

from autotp.rewrite.collectives import Comm
from autotp.cost.model import ADAM_FP32_BYTES
from autotp.cost.devices import DeviceSpec
from autotp.core.options import Mode, Objective, PlanOptions
from autotp.runtime.pipeline import ParallelModule, check_args, plan_model, rank_module
from autotp.plans import Plan
from autotp.runtime.weights import open_weights


class _Hub:
    def __init__(self, world_size: int):
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size)
        self.slots: list[Any] = [None] * world_size

    def exchange(self, rank: int, value: Any) -> list[Any]:
        self.slots[rank] = value
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return values


class ThreadComm(Comm):
    """A Comm over threads of one process."""

    def __init__(self, hub: _Hub, rank: int):
        super().__init__()
        self.hub, self.rank, self.world_size = hub, rank, hub.world_size

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        parts = self.hub.exchange(self.rank, t.detach().clone())
        out = parts[0].clone()
        for p in parts[1:]:
            out += p
        return out

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        return [p.clone() for p in self.hub.exchange(self.rank, t.detach().clone())]

    def reduce_scatter(self, chunks: Sequence[torch.Tensor]) -> torch.Tensor:
        parts = self.hub.exchange(self.rank, [c.detach().clone() for c in chunks])
        out = parts[0][self.rank].clone()
        for p in parts[1:]:
            out += p[self.rank]
        return out


def simulated_modules(model: nn.Module, example_inputs: Any, example_kwargs: dict | None = None,
                      *, world_size: int, device: "str | DeviceSpec | None" = None,
                      objective: Objective = "time", plan: Plan | None = None,
                      mode: Mode = "training", memory_budget: float | None = None,
                      optimizer_bytes: float = ADAM_FP32_BYTES, data_parallel: int = 1,
                      weights: Any = None) -> list[ParallelModule]:
    """Every rank's ParallelModule, connected by ThreadComm. Run them with ``run_ranks``.

    The plan is made as ``autotp.parallelize`` makes it (``pipeline.plan_model``), from the
    same options. ``data_parallel`` prices the gradient all-reduce across that many replicas
    (the plan a 2-D mesh would get); only one tensor-parallel group is simulated. ``weights``
    as for ``parallelize`` (required for a model on the meta device)."""
    options = PlanOptions(world_size=world_size, device=device, mode=mode, objective=objective,
                          memory_budget=memory_budget, optimizer_bytes=optimizer_bytes,
                          dp_size=data_parallel)
    planned = plan_model(model, example_inputs, example_kwargs, options, plan=plan)
    source = open_weights(weights) if weights is not None else None
    hub = _Hub(world_size)
    return [rank_module(planned, ThreadComm(hub, rank), weights=source, copy_graph=True)
            for rank in range(world_size)]


def run_ranks(fn: Callable[[int, ParallelModule], Any], modules: Sequence[ParallelModule]) -> list[Any]:
    """Run ``fn(rank, module)`` on every rank at once (one thread each); returns the results
    and re-raises the first rank's error."""
    results: list[Any] = [None] * len(modules)
    errors: list[BaseException | None] = [None] * len(modules)

    def target(r: int) -> None:
        try:
            results[r] = fn(r, modules[r])
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors[r] = e
            hub = modules[r].comm.hub  # type: ignore[attr-defined]
            hub.barrier.abort()  # wake the other ranks instead of deadlocking

    threads = [threading.Thread(target=target, args=(r,)) for r in range(len(modules))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)),
                 next((e for e in errors if e is not None), None))
    if first is not None:
        raise first
    return results


def simulate(model: nn.Module, example_inputs: Any, example_kwargs: dict | None = None, *,
             world_size: int, device: "str | DeviceSpec | None" = None, objective: Objective = "time",
             plan: Plan | None = None, mode: Mode = "training", memory_budget: float | None = None,
             optimizer_bytes: float = ADAM_FP32_BYTES, data_parallel: int = 1,
             weights: Any = None) -> list[Any]:
    """Every rank's outputs on the example inputs, computed by the tensor-parallel modules
    running as threads of this process (no process group needed). The keywords are
    ``simulated_modules``'."""
    args, kwargs = check_args(example_inputs, example_kwargs)
    modules = simulated_modules(model, args, kwargs, world_size=world_size, device=device,
                                objective=objective, plan=plan, mode=mode,
                                memory_budget=memory_budget, optimizer_bytes=optimizer_bytes,
                                data_parallel=data_parallel, weights=weights)
    with torch.no_grad():
        return run_ranks(lambda r, m: m(*args, **kwargs), modules)
