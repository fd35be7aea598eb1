"""choose_layout: the tensor-parallel degree, the data-parallel kind and degree, and the TP
splits of a training (or serving) job on ``nodes`` x ``gpus_per_node`` devices, from the cost
model's predicted step time under the device's memory.

The candidates: every TP degree ``tp`` that divides ``gpus_per_node`` (a TP group never spans
nodes, where links are slow; 1 = no tensor parallelism, uneven degrees such as 3 and 6 where the
node allows them), with ``dp = nodes * gpus_per_node / tp`` replicas, each by DDP and by FSDP
(one replica: neither). The global batch is fixed: each replica plans for
``global_batch / dp`` rows (the example inputs' rows repeated or cut to that count), so every
alternative processes the same samples per step and their predicted step times compare
directly. A layout that fits nothing records the least memory it would need
(``InfeasiblePlanError.least_bytes``). ``best``: the fastest that fits.

The model is captured once per distinct replica (or microbatch) batch and its candidates
built once per TP degree and batch, pipelined layouts included; each data-parallel kind is one
solve (runtime/pipeline.py's stages, called directly).
Data-parallel traffic is priced on the inter-node link even when some replicas share a node.

Pipeline stages (``pipeline=True``, training): every stage count ``pp`` dividing ``nodes``
(stages span nodes, a TP group stays inside one) up to the layers there are, with ``dp =
nodes * gpus_per_node / (tp * pp)`` replicas by DDP (FSDP across stages is not run yet), each
replica's rows split into ``microbatches`` (default: one row each, the least bubble; 1F1B
keeps at most ``pp`` in flight whatever their count). The plan is made at one microbatch and
cut into balanced stages (cost/pipeline.py); its step time is the pipeline's.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from autotp._compat import pytree
from autotp.core.options import ADAM_FP32_BYTES, Mode, PlanOptions
from autotp.cost.devices import DeviceSpec, get_device
from autotp.errors import AutoTPError, InfeasiblePlanError, PlanError
from autotp.plans import Plan
from autotp.runtime.pipeline import candidates, capture_model, gc_paused, solve_plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """One way to lay the job out. ``predicted_time_s``: one step of the global batch (every
    replica's step runs at once); ``memory_bytes_per_rank``: the plan's, or the least any plan
    needs when nothing fits; ``plan``: the TP plan at this degree (None when nothing fits or
    the layout was not planned, ``why`` says). To run it: a ("dp", "tp") mesh of shape
    (dp, tp), and ``parallelize(model, <a replica's batch of batch_per_replica rows>, mesh=mesh,
    plan=layout.plan)``: a plan is made for one capture, whose sizes it names."""

    tp: int
    dp: int
    dp_mode: str  # "none" (one replica), "ddp" or "fsdp"
    predicted_time_s: float
    memory_bytes_per_rank: float
    fits: bool
    plan: Plan | None = None
    why: str = ""
    # rows of the global batch each replica runs: the plan was made for inputs of this many
    # rows, so parallelize(..., plan=layout.plan) needs example inputs of that batch size
    batch_per_replica: int = 0
    pp: int = 1  # pipeline stages (a ("pp", "dp", "tp") mesh); the plan's ``pipeline`` has them
    microbatches: int = 1

    @property
    def label(self) -> str:
        return (f"pp {self.pp} x " if self.pp > 1 else "") + f"tp {self.tp} x dp {self.dp}" + \
            (f" ({self.dp_mode})" if self.dp > 1 else "")


@dataclass(frozen=True)
class Layouts:
    """``best``: the fastest layout that fits; ``alternatives``: every layout considered,
    fastest first (those that fit before those that don't)."""

    best: Layout
    alternatives: tuple[Layout, ...]
    nodes: int
    gpus_per_node: int
    device: str
    global_batch: int


def tp_degrees(gpus_per_node: int) -> list[int]:
    """TP degrees that keep every group inside one node: the divisors of ``gpus_per_node``."""
    return [t for t in range(1, gpus_per_node + 1) if gpus_per_node % t == 0]


def _batch_of(args: tuple, kwargs: dict) -> int:
    sizes = {t.shape[0] for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0}
    if len(sizes) != 1:
        raise AutoTPError(f"choose_layout needs example inputs whose tensors share one batch dim "
                          f"(their first); got first dims {sorted(sizes)}")
    return sizes.pop()


def _rebatch(args: tuple, kwargs: dict, b: int, rows: int) -> tuple[tuple, dict]:
    """The example call with ``rows`` rows: its rows cycled (or cut) along dim 0."""
    def one(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != b or rows == b:
            return t
        idx = torch.arange(rows, device=t.device) % b
        return t[idx] if t.device.type != "meta" else t.new_empty((rows, *t.shape[1:]))
    return pytree.tree_map(one, args), pytree.tree_map(one, kwargs)


def choose_layout(model: nn.Module, example_inputs: Any = None, example_kwargs: dict | None = None, *,
                  nodes: int, gpus_per_node: int, device: "str | DeviceSpec" = "h100",
                  mode: Mode = "training", global_batch: int | None = None,
                  optimizer_bytes: float = ADAM_FP32_BYTES, memory_budget: float | None = None,
                  progress: Callable[[str], Any] | None = None, pipeline: bool = False,
                  microbatches: int | None = None) -> Layouts:
    """Choose the TP degree (1 = no TP ... ``gpus_per_node``), the data-parallel kind (DDP or
    FSDP) and degree for the rest of ``nodes * gpus_per_node`` devices, and the TP splits,
    by predicted step time under memory (``memory_budget`` per device, default the device's
    memory). ``example_inputs``/``example_kwargs``: one call of the model whose first dim is
    the batch; ``global_batch`` (default: the example's batch) rows per step are split across
    the data-parallel replicas. ``Layouts.best.plan`` can be given to ``parallelize`` as
    ``plan=`` on a ("dp", "tp") mesh of the best layout's shape. ``pipeline``: also pipeline
    stages across nodes (module docstring), ``microbatches`` per replica step (default: one
    row each); a pipelined best layout runs on a ("pp", "dp", "tp") mesh."""
    from autotp.runtime.api import resolve_inputs
    for name, v in (("nodes", nodes), ("gpus_per_node", gpus_per_node)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise AutoTPError(f"{name} must be a positive int, got {v!r}")
    args, kwargs = resolve_inputs(model, example_inputs, example_kwargs)
    spec = get_device(device)
    if nodes == 1 and (spec.inter_link_bandwidth or spec.inter_latency):
        # every replica shares the node: data parallelism runs on the intra-node link (NVLink),
        # not the inter-node one the cost model prices it on by default
        spec = dataclasses.replace(spec, inter_link_bandwidth=0.0, inter_latency=0.0)
    b = _batch_of(args, kwargs)
    batch = b if global_batch is None else global_batch
    total = nodes * gpus_per_node
    note = progress or (lambda _s: None)
    found: list[Layout] = []
    captured_at: dict[int, Any] = {}  # rows -> capture
    built: dict[tuple[int, int], Any] = {}  # (tp, rows) -> candidates (DDP-priced, training)
    with gc_paused():
        for tp in tp_degrees(gpus_per_node):
            dp = total // tp
            if batch % dp:
                found.append(_undivided(tp, dp, batch))
                continue
            rows = batch // dp
            if rows not in captured_at:
                note(f"capturing at {rows} rows")
                captured_at[rows] = capture_model(model, *_rebatch(args, kwargs, b, rows))[0]
            base = PlanOptions(world_size=tp, device=spec, mode=mode, optimizer_bytes=optimizer_bytes,
                               memory_budget=memory_budget, dp_size=dp)
            note(f"planning tp {tp} x dp {dp}")
            c = candidates(captured_at[rows], base)
            if mode == "training":
                built[(tp, rows)] = c
            kinds = ("ddp", "fsdp") if dp > 1 and mode == "training" else ("ddp",)
            for kind in kinds:
                ck = c.with_dp_mode(kind)
                shown = kind if dp > 1 else "none"
                try:
                    plan, _ = solve_plan(ck, dataclasses.replace(base, dp_mode=kind), spec)
                except InfeasiblePlanError as e:
                    least = e.least_bytes if e.least_bytes is not None else math.inf
                    found.append(Layout(tp, dp, shown, math.inf, least, False,
                                        why=str(e).split(":")[0], batch_per_replica=rows))
                    continue
                found.append(Layout(tp, dp, shown, plan.predicted_time_s, plan.memory_bytes_per_rank,
                                    True, plan, batch_per_replica=rows))
        if pipeline and mode == "training":
            found += _pipelined(model, args, kwargs, b, batch, nodes, gpus_per_node, spec,
                                optimizer_bytes, memory_budget, microbatches, note, captured_at, built)
    found.sort(key=lambda x: (not x.fits, x.predicted_time_s, x.memory_bytes_per_rank))
    fits = [x for x in found if x.fits]
    if not captured_at:  # the batch divides into no replica count: nothing was planned
        raise AutoTPError(
            f"the global batch {batch} divides into none of the replica counts "
            f"{', '.join(str(total // t) for t in tp_degrees(gpus_per_node))} of {nodes} x "
            f"{gpus_per_node} devices: pass global_batch= (--global-batch) as a multiple of "
            f"{total // gpus_per_node} at least (the replicas at tp {gpus_per_node})")
    if not fits:
        planned = [x for x in found if math.isfinite(x.memory_bytes_per_rank)]
        least = min(planned, key=lambda x: x.memory_bytes_per_rank, default=None)
        budget = memory_budget or spec.memory_bytes
        hint = ("" if least is None else
                f"; the least memory is {least.memory_bytes_per_rank / 1e9:.1f} GB per device "
                f"({least.label}), so about {math.ceil(total * least.memory_bytes_per_rank / budget)} "
                f"devices of {budget / 1e9:.0f} GB or devices with that much memory would fit")
        raise InfeasiblePlanError(
            f"no layout of {nodes} x {gpus_per_node} {spec.name} fits {budget / 1e9:.1f} GB per "
            f"device ({mode}, global batch {batch}){hint}. Add nodes, use a smaller batch or "
            "sequence, or an optimizer with less state (optimizer_bytes)",
            None if least is None else least.memory_bytes_per_rank)
    log.info("autotp: %d layouts, best %s", len(found), fits[0].label)
    return Layouts(fits[0], tuple(found), nodes, gpus_per_node, spec.name, batch)


def _undivided(tp: int, dp: int, batch: int, pp: int = 1) -> Layout:
    """A layout not planned: its replica count does not divide the global batch."""
    return Layout(tp, dp, "none" if dp == 1 else "ddp", math.inf, math.inf, False, pp=pp,
                  why=f"the global batch {batch} does not divide into {dp} replicas")


def _pipelined(model: nn.Module, args: tuple, kwargs: dict, b: int, batch: int, nodes: int,
               gpus_per_node: int, spec: DeviceSpec, optimizer_bytes: float,
               memory_budget: float | None, microbatches: int | None, note: Callable[[str], Any],
               captured_at: dict[int, Any], built: dict[tuple[int, int], Any]) -> list[Layout]:
    """The pipelined layouts (module docstring): one capture per microbatch size and one
    candidate build per (TP degree, microbatch size), both shared with the unpipelined
    layouts (``captured_at``: rows -> capture; ``built``: (tp, rows) -> candidates, which
    the data-parallel degree only prices); one solve and stage cut per (tp, pp)."""
    from autotp.runtime.pipeline import solve_stages
    out: list[Layout] = []
    for tp in tp_degrees(gpus_per_node):
        for pp in [p for p in range(2, nodes + 1) if nodes % p == 0]:
            dp = nodes * gpus_per_node // (tp * pp)
            if batch % dp:
                out.append(_undivided(tp, dp, batch, pp))
                continue
            rows = batch // dp
            m = microbatches or rows
            if rows % m:
                out.append(Layout(tp, dp, "ddp" if dp > 1 else "none", math.inf, math.inf, False, pp=pp,
                                  why=f"{rows} rows per replica do not split into {m} microbatches"))
                continue
            mb = rows // m
            if mb not in captured_at:
                note(f"capturing at {mb} rows")
                captured_at[mb] = capture_model(model, *_rebatch(args, kwargs, b, mb))[0]
            options = PlanOptions(world_size=tp, device=spec, mode="training", optimizer_bytes=optimizer_bytes,
                                  memory_budget=memory_budget, dp_size=dp, dp_mode="ddp", pp_size=pp,
                                  microbatches=m)
            note(f"planning pp {pp} x tp {tp} x dp {dp}")
            shown = "ddp" if dp > 1 else "none"
            try:
                if (tp, mb) not in built:  # the strategies depend on tp; dp only prices them
                    built[(tp, mb)] = candidates(captured_at[mb], options)
                c = dataclasses.replace(built[(tp, mb)], dp_size=dp, cache={})
                _, plan, _ = solve_stages(c, options, spec)
            except InfeasiblePlanError as e:
                least = e.least_bytes if e.least_bytes is not None else math.inf
                out.append(Layout(tp, dp, shown, math.inf, least, False, why=str(e).split(":")[0],
                                  batch_per_replica=rows, pp=pp, microbatches=m))
                continue
            except PlanError as e:  # too few layers, or no cut fits
                out.append(Layout(tp, dp, shown, math.inf, math.inf, False, why=str(e).split(":")[0],
                                  batch_per_replica=rows, pp=pp, microbatches=m))
                continue
            out.append(Layout(tp, dp, shown, plan.predicted_time_s, plan.memory_bytes_per_rank, True, plan,
                              batch_per_replica=rows, pp=pp, microbatches=m))
    return out
