"""Public entry points: plan, parallelize, gather_state_dict."""
from __future__ import annotations

import difflib
import gc
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.utils import _pytree as pytree  # see capture.py

from .capture import Captured, capture, fetch_attr, set_attr
from .collectives import Comm, DistComm
from .devices import DeviceSpec, get_device
from .errors import AutoTPError, AutoTPInternalError, PlanError, ProcessGroupError
from .placements import Placement, Replicate, parse, parse_out
from .plans import Plan, make_plan
from .rewrite import rewrite
from .solver import Choice, evaluate, solve
from .strategies import Candidates, build
from .weights import WeightSource, open_weights

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


@contextmanager
def buffers_on_meta(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """While capturing a model whose parameters are on meta, its buffers go to meta too (a
    real rotary buffer times a meta position tensor is a device mismatch); yields the real
    buffers by name and puts them back afterwards."""
    real: dict[str, torch.Tensor] = {}
    owners = []
    for mname, mod in model.named_modules():
        for bname, b in mod.named_buffers(recurse=False):
            if b is not None and b.device.type != "meta":
                real[f"{mname}.{bname}" if mname else bname] = b
                owners.append((mod, bname, b))
                setattr(mod, bname, b.to("meta"))
    try:
        yield real
    finally:
        for mod, bname, b in owners:
            setattr(mod, bname, b)


def retarget_device(gm: torch.fx.GraphModule, old: torch.device, new: torch.device) -> None:
    """Factory ops traced on meta tensors carry ``device=meta`` (``torch.arange(n,
    device=x.device)``); point them at the device the module will run on."""
    def swap(a: Any) -> Any:
        return new if isinstance(a, torch.device) and a == old else a
    for sub in gm.modules():  # higher-order ops (autocast regions) keep their own graphs
        if isinstance(sub, torch.fx.GraphModule):
            for node in sub.graph.nodes:
                node.args = pytree.tree_map(swap, node.args)
                node.kwargs = pytree.tree_map(swap, node.kwargs)
            sub.recompile()


def _plan_from(c: Candidates, spec: DeviceSpec, objective: str, mode: str,
               memory_budget: float | None) -> tuple[Plan, Choice]:
    choice = solve(c, spec, mode, objective, memory_budget)
    ev = evaluate(c, choice, spec, mode)
    if ev is None:
        raise AutoTPInternalError("the solver returned an assignment its own evaluation calls "
                                  "infeasible")
    return make_plan(c, choice, ev, spec.name, objective, mode), choice


@dataclass
class Planned:
    """A plan with what produced it: the candidates, the chosen strategy per node, the
    device. The CLI's explain, diff and dot output read these."""

    plan: Plan
    candidates: Candidates
    choice: Choice
    spec: DeviceSpec
    budget: float | None = None  # the memory budget asked for (None: the device's memory)


def plan_details(model: nn.Module, example_inputs: Any, example_kwargs: dict | None = None, *,
                 world_size: int, device: "str | DeviceSpec" = "h100", objective: str = "time",
                 mode: str = "training", memory_budget: float | None = None,
                 progress: Callable[[str], Any] | None = None, data_parallel: int = 1,
                 optimizer_bytes: float = 8.0) -> Planned:
    """``plan`` plus the candidates and choice behind it. ``progress(stage)`` is called as
    each stage starts (capture, strategies, solve)."""
    args, kwargs = _check_args(example_inputs, example_kwargs)
    if not isinstance(world_size, int) or world_size < 1:
        raise AutoTPError(f"world_size must be a positive int, got {world_size!r}")
    note = progress or (lambda _stage: None)
    spec = get_device(device)
    with _gc_paused():
        note("capturing the model with torch.export")
        captured, _ = _capture(model, args, kwargs)
        note("building candidate strategies")
        c = build(captured, world_size)
        c.dp_size = data_parallel
        c.optimizer_bytes = optimizer_bytes
        note("solving")
        p, choice = _plan_from(c, spec, objective, mode, memory_budget)
    return Planned(p, c, choice, spec, memory_budget)


def plan(model: nn.Module, example_inputs: Any, example_kwargs: dict | None = None, *,
         world_size: int, device: "str | DeviceSpec" = "h100", objective: str = "time",
         mode: str = "training", memory_budget: float | None = None,
         data_parallel: int = 1, optimizer_bytes: float = 8.0) -> Plan:
    """Plan tensor parallelism for ``model`` at ``world_size`` without a process group.
    The model may live on the meta device (example inputs are moved there too).
    ``data_parallel``: replicas of the tensor-parallel group (a 2-D mesh); their gradient
    all-reduce over the inter-node link counts in training. ``optimizer_bytes``: optimizer
    state per trained parameter element in training (8: Adam's two fp32 moments; 4 for SGD
    with momentum in fp32, 0 without state); ``memory_budget`` bounds parameters, gradients,
    optimizer state and activations per rank (default: the device's memory)."""
    return plan_details(model, example_inputs, example_kwargs, world_size=world_size,
                        device=device, objective=objective, mode=mode,
                        memory_budget=memory_budget, data_parallel=data_parallel,
                        optimizer_bytes=optimizer_bytes).plan


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
        self.state_meta = captured.state_meta
        self._mode_sensitive = captured.mode_sensitive
        self.training = captured.training
        self._ddp: nn.Module | None = None
        self.dp_group: dist.ProcessGroup | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return (self._ddp or self.module)(*args, **kwargs)

    def data_parallel(self, dp_group: dist.ProcessGroup, device: torch.device) -> None:
        """Replicate this tensor-parallel module across ``dp_group`` with DDP (gradients
        averaged across replicas in backward)."""
        from torch.nn.parallel import DistributedDataParallel
        used = {id(fetch_attr(self.module, n.target)) for n in self.module.graph.nodes if n.op == "get_attr"}
        unused = any(id(p) not in used for p in self.module.parameters())
        ddp = DistributedDataParallel(self.module, process_group=dp_group, forward_sync_buffers=False,
                                      find_unused_parameters=unused,
                                      device_ids=[device] if device.type == "cuda" else None)
        # kept outside the module tree so parameter and state names stay the model's own
        object.__setattr__(self, "_ddp", ddp)
        self.dp_group = dp_group

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
                mode: str = "training", weights: Any = None,
                mesh: DeviceMesh | None = None,
                memory_budget: float | None = None, optimizer_bytes: float = 8.0) -> ParallelModule:
    """Return this rank's tensor-parallel version of ``model``. Call on every rank of
    ``group`` (default: the default process group) after ``init_process_group``.

    ``weights`` (a state dict, a ``.safetensors`` file or a Hugging Face-style checkpoint
    folder) supplies the parameters: each rank reads only its slices. It is required when the
    model's parameters are on the meta device (see ``autotp.empty_weights``).

    ``mesh`` (instead of ``group``): a DeviceMesh with a dim named ``"tp"`` and optionally one
    more (e.g. ``init_device_mesh("cuda", (nodes, 8), mesh_dim_names=("dp", "tp"))``): tensor
    parallelism inside "tp", data parallelism (DDP) across the other dim. Each data-parallel
    replica is given its own slice of the global batch; ``example_inputs`` is such a slice.

    ``memory_budget``: bytes per rank the plan must fit (state + activations at the example
    inputs' sizes; default: the device's memory). When it binds the solver splits more,
    e.g. norm regions on the sequence dim (then the sequence length must stay divisible by
    the world size)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ProcessGroupError(
            "autotp.parallelize needs an initialized torch.distributed process group: launch "
            "with `torchrun --nproc-per-node N script.py` and call "
            "torch.distributed.init_process_group('gloo' on CPU or 'nccl' on GPUs) first; "
            "use autotp.plan(...) to plan without processes")
    args, kwargs = _check_args(example_inputs, example_kwargs)
    dp_group = None
    if mesh is not None:
        group, dp_group = _mesh_groups(mesh, group)
    comm = DistComm(group)
    backend = dist.get_backend(group)
    on_meta = _on_meta(model)
    if on_meta and weights is None:
        raise AutoTPError(
            "the model's parameters are on the meta device and no weights were given: pass "
            "weights=<state dict | .safetensors file | checkpoint folder> so each rank can "
            "load its slices (build the model under autotp.empty_weights())")
    source = open_weights(weights) if weights is not None else None
    here = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    with _gc_paused():
        captured, real_buffers = _capture(model, args, kwargs)
        if on_meta:
            retarget_device(captured.gm, torch.device("meta"), here)
        c = build(captured, comm.world_size)
    c.optimizer_bytes = optimizer_bytes
    if dp_group is not None:
        c.dp_size = dist.get_world_size(dp_group)
    if plan is None:
        spec = get_device(device, backend)
        with _gc_paused():
            p, choice = _plan_from(c, spec, objective, mode, memory_budget)
        # every rank solves the same program; rank 0's plan is authoritative all the same
        # (on a mesh: global rank 0's, so that data-parallel replicas hold the same shards)
        bgroup = None if dp_group is not None else group
        box = [p.to_json() if dist.get_rank(bgroup) == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(bgroup, 0) if bgroup else 0, group=bgroup)
        if box[0] != p.to_json():
            p = Plan.from_json(box[0])
            choice = choice_from_plan(c, p)
    else:
        p = plan
        choice = choice_from_plan(c, p)
    load = None if source is None else _loader(source, comm.rank, comm.world_size, here)
    gm, placements = rewrite(c, choice, comm, load)
    if on_meta:
        _fill_buffers(gm, real_buffers, source, here)
    pm = ParallelModule(gm, p, comm, placements, captured)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        pm.data_parallel(dp_group, here)
    return pm


def _mesh_groups(mesh: DeviceMesh, group: dist.ProcessGroup | None
                 ) -> tuple[dist.ProcessGroup, dist.ProcessGroup | None]:
    names = mesh.mesh_dim_names or ()
    if group is not None:
        raise AutoTPError("pass either group= or mesh=, not both")
    if "tp" not in names or mesh.ndim > 2:
        raise AutoTPError(
            f"mesh must have 1 or 2 named dims, one of them 'tp' (got {mesh.ndim} dims named "
            f"{names}): e.g. init_device_mesh('cuda', (nodes, gpus_per_node), "
            f"mesh_dim_names=('dp', 'tp'))")
    dp = [n for n in names if n != "tp"]
    return mesh.get_group("tp"), (mesh.get_group(dp[0]) if dp else None)


def _loader(source: WeightSource, rank: int, world_size: int, here: torch.device):
    keys = set(source.keys())

    def load(names: list[str], full: torch.Tensor, place: Placement) -> torch.Tensor:
        key = next((k for k in names if k in keys), None)
        if key is None:
            near = difflib.get_close_matches(names[0], list(keys), n=3)
            raise AutoTPError(
                f"{source.describe()} has no tensor for parameter {' / '.join(names)} "
                f"(shape {tuple(full.shape)})" + (f"; close: {', '.join(near)}" if near else "")
                + "; the checkpoint's keys must be the model's state_dict() keys")
        shape, _ = source.meta(key)
        if tuple(shape) != tuple(full.shape):
            raise AutoTPError(f"{source.describe()}: {key} has shape {tuple(shape)}, the model's "
                              f"parameter has {tuple(full.shape)}: was it built from another config?")
        return source.read(key, place, rank, world_size).to(device=here, dtype=full.dtype)
    return load


def _capture(model: nn.Module, args: tuple, kwargs: dict) -> tuple[Captured, dict[str, torch.Tensor]]:
    """Capture ``model``; one whose parameters are on meta is captured wholly on meta (inputs
    and buffers moved there). Returns the capture and the model's real buffers by name."""
    if not _on_meta(model):
        return capture(model, args, kwargs), {}
    to_meta = lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x  # noqa: E731
    with buffers_on_meta(model) as real_buffers:
        captured = capture(model, tuple(to_meta(a) for a in args),
                           {k: to_meta(v) for k, v in kwargs.items()})
    return captured, real_buffers


def _fill_buffers(gm: torch.fx.GraphModule, real: dict[str, torch.Tensor], source: WeightSource | None,
                  here: torch.device) -> None:
    keys = set(source.keys()) if source is not None else set()
    missing = []
    for name, b in list(gm.named_buffers()):
        if b.device.type != "meta":
            continue
        if name in real:
            set_attr(gm, name, real[name].to(here))
        elif name in keys:
            set_attr(gm, name, source.read(name, Replicate(), 0, 1).to(device=here, dtype=b.dtype))
        else:
            missing.append(name)
    if missing:
        raise AutoTPError(
            f"buffers {', '.join(missing[:5])} are on the meta device and not in the checkpoint "
            "(non-persistent buffers such as rotary frequencies never are): build the model "
            "under `with autotp.empty_weights():` instead of torch.device('meta'), which keeps "
            "buffers real and puts only parameters on meta")
