"""Public entry points: plan, parallelize, gather_state_dict."""
from __future__ import annotations

import gc
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .capture import Captured, capture, fetch_attr
from .collectives import Comm, DistComm
from .devices import DeviceSpec, get_device
from .errors import AutoTPError, PlanError, ProcessGroupError
from .placements import Placement, Shard, parse, parse_out, unshard
from .plans import Plan, make_plan
from .rewrite import rewrite
from .solver import Choice, evaluate, solve
from .strategies import Candidates, build

log = logging.getLogger(__name__)


def _check_args(example_inputs: Any, example_kwargs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise AutoTPError("example_inputs must be a tuple of positional arguments "
                          f"(got {type(example_inputs).__name__}); wrap a single tensor as (x,)")
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise AutoTPError(f"example_kwargs must be a dict, got {type(example_kwargs).__name__}")
    return tuple(example_inputs), dict(example_kwargs or {})


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while planning: torch.export and the graphs of
    an 80-layer model make hundreds of thousands of objects, which every collection scans
    again (a third of the plan time of Llama-2-70B). Reference counting still frees what
    is not in a cycle; peak memory measured the same. The previous state is restored."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _on_meta(model: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def _plan_from(c: Candidates, spec: DeviceSpec, objective: str, mode: str,
               memory_budget: float | None) -> tuple[Plan, Choice]:
    choice = solve(c, spec, mode, objective, memory_budget)
    ev = evaluate(c, choice, spec, mode)
    assert ev is not None, "the solver returned an infeasible assignment"
    return make_plan(c, choice, ev, spec.name, objective, mode), choice


@dataclass
class Planned:
    """A plan with what produced it: the candidates, the chosen strategy per node, the
    device. The CLI's explain, diff and dot output read these."""

    plan: Plan
    candidates: Candidates
    choice: Choice
    spec: DeviceSpec


def plan_details(model: nn.Module, example_inputs: Any, example_kwargs: dict | None = None, *,
                 world_size: int, device: "str | DeviceSpec" = "h100", objective: str = "time",
                 mode: str = "training", memory_budget: float | None = None,
                 progress: Callable[[str], Any] | None = None) -> Planned:
    """``plan`` plus the candidates and choice behind it. ``progress(stage)`` is called as
    each stage starts (capture, strategies, solve)."""
    args, kwargs = _check_args(example_inputs, example_kwargs)
    if not isinstance(world_size, int) or world_size < 1:
        raise AutoTPError(f"world_size must be a positive int, got {world_size!r}")
    if _on_meta(model):
        to_meta = lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x  # noqa: E731
        args = tuple(to_meta(a) for a in args)
        kwargs = {k: to_meta(v) for k, v in kwargs.items()}
    note = progress or (lambda _stage: None)
    spec = get_device(device)
    with _gc_paused():
        note("capturing the model with torch.export")
        captured = capture(model, args, kwargs)
        note("building candidate strategies")
        c = build(captured, world_size)
        note("solving")
        p, choice = _plan_from(c, spec, objective, mode, memory_budget)
    return Planned(p, c, choice, spec)


def plan(model: nn.Module, example_inputs: Any, example_kwargs: dict | None = None, *,
         world_size: int, device: "str | DeviceSpec" = "h100", objective: str = "time",
         mode: str = "training", memory_budget: float | None = None) -> Plan:
    """Plan tensor parallelism for ``model`` at ``world_size`` without a process group.
    The model may live on the meta device (example inputs are moved there too)."""
    return plan_details(model, example_inputs, example_kwargs, world_size=world_size,
                        device=device, objective=objective, mode=mode,
                        memory_budget=memory_budget).plan


def choice_from_plan(c: Candidates, p: Plan) -> Choice:
    """Map a Plan's decisions back onto the candidates of a freshly captured graph."""
    if p.world_size != c.world_size:
        raise PlanError(f"the plan is for world size {p.world_size}, the group has {c.world_size}")
    by_node = {d.node: d for d in p.decisions}
    choice: Choice = {}
    for name, nc in c.nodes.items():
        d = by_node.get(name)
        if d is None:
            raise PlanError(f"the plan has no decision for node {name!r} ({nc.op} in "
                            f"'{nc.module}'): was it made for another model or other inputs?")
        want = (tuple(parse(x) for x in d.inputs), parse_out(d.output))
        for s, st in enumerate(nc.strategies):
            if (st.inputs, st.output) == want:
                choice[name] = s
                break
        else:
            raise PlanError(f"the plan's placement {list(d.inputs)} -> {d.output} for node {name!r} "
                            f"({nc.op} in '{nc.module}') is not a valid strategy here; valid: "
                            + "; ".join(str(s) for s in nc.strategies))
    return choice


class ParallelModule(nn.Module):
    """This rank's tensor-parallel module. Called like the original model; returns the same
    output structure, replicated on every rank. ``parameters()`` are this rank's shards."""

    def __init__(self, gm: torch.fx.GraphModule, plan: Plan, comm: Comm,
                 placements: dict[str, Placement], captured: Captured):
        super().__init__()
        self.module = gm
        self.plan = plan
        self.comm = comm
        self.placements = placements
        self.state_keys = captured.state_keys
        self._mode_sensitive = captured.mode_sensitive
        self.training = captured.training

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> "ParallelModule":
        # The exported graph fixed dropout/batch-norm behaviour at capture time (and
        # ep.module() refuses train()/eval()). Switching is only harmless when nothing depends
        # on the mode.
        if mode != self.training and self._mode_sensitive:
            raise AutoTPError(
                f"the model was captured in {'train' if self.training else 'eval'} mode and has "
                f"mode-dependent ops ({', '.join(self._mode_sensitive[:3])}); call "
                f"model.{'train' if mode else 'eval'}() before autotp.parallelize instead")
        self.training = mode
        return self

    @property
    def collective_counts(self) -> dict[tuple[str, str], int]:
        """Collectives issued so far, by (kind, phase)."""
        return dict(self.comm.counts)


def parallelize(model: nn.Module, example_inputs: Any, example_kwargs: dict | None = None, *,
                device: "str | DeviceSpec | None" = None, objective: str = "time",
                plan: Plan | None = None, group: dist.ProcessGroup | None = None,
                mode: str = "training") -> ParallelModule:
    """Return this rank's tensor-parallel version of ``model``. Call on every rank of
    ``group`` (default: the default process group) after ``init_process_group``."""
    if not dist.is_available() or not dist.is_initialized():
        raise ProcessGroupError(
            "autotp.parallelize needs an initialized torch.distributed process group: launch "
            "with `torchrun --nproc-per-node N script.py` and call "
            "torch.distributed.init_process_group('gloo' on CPU or 'nccl' on GPUs) first; "
            "use autotp.plan(...) to plan without processes")
    args, kwargs = _check_args(example_inputs, example_kwargs)
    comm = DistComm(group)
    with _gc_paused():
        captured = capture(model, args, kwargs)
        c = build(captured, comm.world_size)
    backend = dist.get_backend(group)
    if plan is None:
        spec = get_device(device, backend)
        with _gc_paused():
            p, choice = _plan_from(c, spec, objective, mode, None)
        # every rank solves the same program; rank 0's plan is authoritative all the same
        box = [p.to_json() if comm.rank == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group else 0, group=group)
        if box[0] != p.to_json():
            p = Plan.from_json(box[0])
            choice = choice_from_plan(c, p)
    else:
        p = plan
        choice = choice_from_plan(c, p)
    gm, placements = rewrite(c, choice, comm)
    return ParallelModule(gm, p, comm, placements, captured)


def gather_state_dict(tp_module: ParallelModule) -> dict[str, torch.Tensor]:
    """Full tensors under the original ``model.state_dict()`` keys. Collective: call on every
    rank; each rank gets the whole state (tied weights under every original key)."""
    if not isinstance(tp_module, ParallelModule):
        raise AutoTPError("gather_state_dict takes the module returned by autotp.parallelize")
    out: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor] = {}
    for key in tp_module.state_keys:
        t = fetch_attr(tp_module.module, key)
        if id(t) in done:
            out[key] = done[id(t)]
            continue
        place = tp_module.placements.get(key)
        full = t.detach()
        if isinstance(place, Shard):
            full = unshard(tp_module.comm.all_gather(full), place)
        done[id(t)] = out[key] = full.clone()
    return out
