"""The pipeline, written once: capture -> candidates -> solve -> plan (``plan_model``), then
this rank's rewritten module (``rank_module``).

``autotp.plan`` / ``plan_details``, ``autotp.parallelize`` and the thread simulator
(``autotp.simulate``) all run these two steps; they differ only in what surrounds them (a
process group and a plan broadcast, or threads), so the simulator runs exactly what
``parallelize`` runs: the same options, memory budget, optimizer state, data-parallel pricing
and meta-device capture.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import gc
import math
import logging
import warnings
import contextlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from autotp._compat import pytree

from autotp.capture import Captured, capture, fetch_attr, set_attr
from autotp.capture.modes import derive_eval, keep_source
from autotp.core.attrs import has_attr
from autotp.rewrite.collectives import Comm
from autotp.cost.devices import DeviceSpec, get_device
from autotp.errors import AutoTPError, AutoTPInternalError, CaptureError, InfeasiblePlanError, PlanError
from autotp.core.options import PlanOptions
from autotp.core.placements import Placement, Replicate, parse, parse_out, shard_tensor
from autotp.cost.pipeline import floor_segments, in_flight, least_memory
from autotp.plans import Plan, make_plan, size_text, with_pipeline
from autotp.rewrite.rewrite import rewrite
from autotp.cost.evaluate import Choice, evaluate, memory_floor, time_lower_bound
from autotp.solve.solve import solve
from autotp.candidates import Candidates, NodeKind, build
from autotp.runtime.weights import WeightSource

Progress = Callable[[str], Any]

log = logging.getLogger(__name__)


def check_args(example_inputs: Any, example_kwargs: Any) -> tuple[tuple, dict]:
    """The example inputs as (args tuple, kwargs dict); a single tensor is wrapped."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise AutoTPError("example_inputs must be a tuple of positional arguments "
                          f"(got {type(example_inputs).__name__}); wrap a single tensor as (x,)")
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise AutoTPError(f"example_kwargs must be a dict, got {type(example_kwargs).__name__}")
    return tuple(example_inputs), dict(example_kwargs or {})


@contextmanager
def gc_paused() -> Iterator[None]:
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


def on_meta(model: nn.Module) -> bool:
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


def capture_model(model: nn.Module, args: tuple, kwargs: dict, cut: bool = True
                  ) -> tuple[Captured, dict[str, torch.Tensor]]:
    """Capture ``model``; one whose parameters are on meta is captured wholly on meta (inputs
    and buffers moved there). Returns the capture and the model's real buffers by name.
    ``cut``: capture stacks of identical layers once (capture.capture). Capture runs on fake
    tensors and should draw nothing; a later program is captured mid-training, so the random
    generator is kept exactly as it was (randomness equal to one device)."""
    with torch.random.fork_rng(devices=[]):
        if not on_meta(model):
            return capture(model, args, kwargs, cut=cut), {}
        with buffers_on_meta(model) as real_buffers:
            captured = capture(model, *meta_call(args, kwargs), cut=cut)
        return captured, real_buffers


def meta_call(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call's tensor arguments moved to the meta device (for a model on meta)."""
    to_meta = lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x  # noqa: E731
    return tuple(to_meta(a) for a in args), {k: to_meta(v) for k, v in kwargs.items()}


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


@dataclass
class Planned:
    """A plan with what produced it: the candidates, the chosen strategy per node, the
    device, the options. The CLI's explain, diff and dot output read these; ``rank_module``
    turns it into a rank's module."""

    plan: Plan
    candidates: Candidates
    choice: Choice
    spec: DeviceSpec
    options: PlanOptions
    # the model's real buffers by name when it was captured on meta (``capture_model``)
    real_buffers: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    on_meta: bool = False

    @property
    def budget(self) -> float | None:
        """The memory budget asked for (None: the device's memory)."""
        return self.options.memory_budget

    def with_plan(self, p: Plan) -> "Planned":
        """The same capture with ``p``'s decisions (a plan made elsewhere, e.g. by rank 0)."""
        return dataclasses.replace(self, plan=p, choice=choice_from_plan(self.candidates, p))


def candidates(captured: Captured, options: PlanOptions) -> Candidates:
    """The candidate strategies of ``captured``, with the options the cost model reads
    (``dp_mode="auto"`` builds them for DDP; ``solve_dp`` may switch them to FSDP)."""
    return build(captured, options.world_size, dp_size=options.dp_size,
                 optimizer_bytes=options.optimizer_bytes,
                 shared_pieces=options.mode == "inference",
                 dp_mode="fsdp" if options.dp_mode == "fsdp" else "ddp")


def solve_dp(c: Candidates, options: PlanOptions, spec: DeviceSpec,
             pinned: dict[str, int] | None = None) -> tuple[Candidates, Plan, Choice]:
    """``solve_plan``, choosing the data-parallel kind when ``options.dp_mode`` is "auto" and
    it matters (training with replicas): the plan is solved under DDP and under FSDP and the
    faster one that fits is kept (DDP on a tie: it gathers nothing); when neither fits, FSDP's
    error, which needs less memory, is raised. Returns the candidates priced as chosen."""
    if options.dp_mode != "auto" or options.dp_size <= 1 or options.mode != "training":
        return (c, *solve_plan(c, options, spec, pinned))
    found, error = [], None
    for kind in ("ddp", "fsdp"):
        ck = c.with_dp_mode(kind)
        try:
            found.append((ck, *solve_plan(ck, options, spec, pinned)))
        except PlanError as e:
            error = e
    if not found:
        raise error
    best = min(found, key=lambda f: f[1].predicted_time_s)
    log.info("autotp: data parallelism across %d replicas: %s", options.dp_size,
             ", ".join(f"{f[0].dp_mode} {f[1].predicted_time_s * 1e3:.3f} ms/step, "
                       f"{f[1].memory_bytes_per_rank / 1e9:.2f} GB/rank" for f in found))
    return best


def solve_stages(c: Candidates, options: PlanOptions, spec: DeviceSpec) -> tuple[Candidates, Plan, Choice]:
    """The plan of a program cut into ``options.pp_size`` pipeline stages: tensor parallelism
    solved for the whole program at one microbatch (every layer alike), then the layers cut
    into stages balanced by time that each fit the per-rank budget, the activations in flight
    included (plans.with_pipeline, cost/pipeline.py). Tried in turn until a cut fits:

    1. the fastest plan with no memory bound (by layers: fast);
    2. the plan of least parameter bytes (objective "memory");
    3. the fastest plan keeping fewer activations: under a whole-program budget ``X = S +
       (pp * B - S) / f``, S the least plan's state, B the per-rank budget and f the
       microbatches the first stage keeps in flight, so that S + f * A <= pp * B (the first
       stage holds about 1/pp of the state and f/pp of one microbatch's activations A); the
       solver then splits more (norm regions on the sequence dim) to keep fewer.

    When none fits, the InfeasiblePlanError with the least largest stage is raised."""
    budget = options.memory_budget or spec.memory_bytes
    pp = options.pp_size
    _, kept_floor = memory_floor(c, options.mode)
    # no plan and no cut beats this: the best cut of every segment's floor (its state and kept
    # activations split as far as they go), with the schedule's microbatches in flight (inf
    # when there is no cut at all: too few layers, or none; with_pipeline says which)
    v = options.stages_per_rank
    # interleaved, least_memory is no lower bound (cost/pipeline.py): no early refusal
    floor = least_memory(floor_segments(c, options.mode), pp, options.microbatches,
                         options.schedule, options.mode, spec) if v == 1 else -math.inf
    if math.isfinite(floor) and floor > budget:
        raise InfeasiblePlanError(
            f"no plan cut into {pp} stages fits {size_text(budget)} per rank at world size "
            f"{c.world_size}: the largest stage of any cut holds more than {size_text(floor)} "
            f"(the state and the kept activations split as far as they go, "
            f"{options.schedule}'s microbatches in flight counted); use more stages or "
            "tensor-parallel ranks, or a smaller batch", floor)
    # replicas across stages are DDP's (runtime/stages.py): FSDP with stages is not run yet
    free = dataclasses.replace(options, memory_budget=math.inf, dp_mode="ddp")
    errors: list[InfeasiblePlanError] = []

    def plans() -> Iterator[tuple[Candidates, Plan, Choice]]:
        least_state = math.inf
        for objective in dict.fromkeys((options.objective, "memory")):  # 1 and 2
            found = solve_dp(c, dataclasses.replace(free, objective=objective), spec)
            if objective == "memory":
                least_state = found[1].memory_bytes_per_rank - found[1].activation_bytes_per_rank
            yield found
        # microbatches of its layers' activations the first rank keeps (interleaved: its
        # stage-microbatches in flight, each 1/v of its layers)
        flight = in_flight(0, pp, options.microbatches, options.schedule, v) / v
        if flight <= 1 or least_state + flight * kept_floor > pp * budget:
            return  # 3 cannot help: one microbatch in flight, or no plan keeps few enough
        bound = least_state + (pp * budget - least_state) / flight
        try:
            yield solve_dp(c, dataclasses.replace(free, memory_budget=bound, objective="time"), spec)
        except InfeasiblePlanError as e:
            errors.append(e)

    for cs, p, choice in plans():
        try:
            return cs, dataclasses.replace(with_pipeline(p, cs, choice, spec, pp, options.microbatches,
                                                         options.schedule, budget, v),
                                           objective=options.objective), choice
        except InfeasiblePlanError as e:
            errors.append(e)
    raise min(errors, key=lambda e: e.least_bytes if e.least_bytes is not None else math.inf)


def _pins(c: Candidates, placements: dict[str, Placement]) -> dict[str, int]:
    """The strategy index of every parameter (or state buffer: a KV cache) node named in
    ``placements`` whose output is that placement (AutoTPError when this capture offers no
    such split)."""
    pins = {}
    for name, nc in c.nodes.items():
        want = placements.get(str(nc.target)) if nc.target is not None else None
        if want is None or nc.kind not in (NodeKind.PARAM, NodeKind.STATE):
            continue
        s = next((s for s, st in enumerate(nc.strategies) if st.output == want), None)
        if s is None:
            raise AutoTPError(f"parameter {nc.target} is held as {want} but the new capture offers "
                              f"only {', '.join(str(st.output) for st in nc.strategies)} for it")
        pins[name] = s
    return pins


def solve_plan(c: Candidates, options: PlanOptions, spec: DeviceSpec | None = None,
               pinned: dict[str, int] | None = None) -> tuple[Plan, Choice]:
    """The optimal Plan of ``c`` under ``options`` (and the Choice behind it); ``pinned``
    fixes some nodes' strategies (their indices). A pin restricts its node's candidates to
    the pinned strategy, so layers pinned alike stay identical and are still solved once per
    run of layers (solve/runs.py) instead of as one whole graph."""
    spec = spec or get_device(options.device)
    extra = {} if options.time_limit is None else {"time_limit": options.time_limit}
    pinned = dict(pinned or {})
    cs = c if not pinned else dataclasses.replace(
        c, cache={}, nodes={n: dataclasses.replace(nc, strategies=[nc.strategies[pinned[n]]]) if n in pinned else nc
                            for n, nc in c.nodes.items()})
    choice = solve(cs, spec, options.mode, options.objective, options.memory_budget, **extra)
    if set(choice) != set(c.nodes):  # stage invariant: one strategy for every node
        raise AutoTPInternalError(f"the solver's choice misses {len(set(c.nodes) - set(choice))} "
                                  f"nodes and names {len(set(choice) - set(c.nodes))} unknown ones")
    choice = {n: pinned.get(n, s) for n, s in choice.items()}
    return plan_of(c, choice, options, spec), choice


def plan_of(c: Candidates, choice: Choice, options: PlanOptions, spec: DeviceSpec) -> Plan:
    """The Plan of strategy ``choice`` on ``c``: its predicted time and memory under ``options``."""
    ev = evaluate(c, choice, spec, options.mode)
    if ev is None:
        raise AutoTPInternalError("a chosen assignment is infeasible by its own evaluation")
    return make_plan(c, choice, ev, spec.name, options.objective, options.mode)


# a later program whose pinned plan is predicted this much slower than its own free optimum
# is reported (a warning with both times): its shards were chosen for another call
PIN_WARN_RATIO = 1.2


def solve_pinned(c: Candidates, options: PlanOptions, spec: DeviceSpec,
                 placements: dict[str, Placement]) -> tuple[Plan, Choice]:
    """The plan of a later program over parameters that already have placements: solved with
    every such parameter pinned, and once more without pins (the free optimum) to warn when
    the pins make it much slower (``PIN_WARN_RATIO``), unless the pinned plan is already
    within that ratio of a bound no plan beats (``time_lower_bound``)."""
    p, choice = solve_plan(c, options, spec, _pins(c, placements))
    if p.predicted_time_s <= PIN_WARN_RATIO * time_lower_bound(c, spec, options.mode):
        return p, choice  # within the ratio of any plan's time: the free optimum cannot warn
    try:
        free, _ = solve_plan(c, options, spec)
    except PlanError:  # the free problem has no better plan to report
        return p, choice
    if p.predicted_time_s > PIN_WARN_RATIO * free.predicted_time_s:
        warnings.warn(
            f"autotp: this call's program keeps the parameters' placements from the first "
            f"program; predicted {p.predicted_time_s * 1e3:.3f} ms per {options.mode} step against "
            f"{free.predicted_time_s * 1e3:.3f} ms for its own best plan "
            f"({p.predicted_time_s / free.predicted_time_s:.2f}x). If this call is the one that "
            "matters (e.g. serving after training), parallelize with example inputs like it",
            stacklevel=4)
    return p, choice


def plan_model(model: nn.Module, example_inputs: Any, example_kwargs: dict | None,
               options: PlanOptions, *, plan: Plan | None = None,
               progress: Progress | None = None,
               pinned_params: dict[str, Placement] | None = None, cut: bool = True) -> Planned:
    """Capture ``model`` (on meta when its parameters are), build its candidates and solve
    them under ``options``; with ``plan`` given, map that plan onto the capture instead of
    solving. ``progress(stage)`` is called as each stage starts. ``pinned_params``: parameter
    name -> the placement it must keep (a program captured later over the same shards)."""
    args, kwargs = check_args(example_inputs, example_kwargs)
    note = progress or (lambda _stage: None)
    spec = get_device(options.device)
    meta = on_meta(model)
    with gc_paused():
        note("capturing the model with torch.export")
        captured, real_buffers = capture_model(model, args, kwargs, cut)
        note("building candidate strategies")
        c = candidates(captured, options)
        if plan is None:
            note("solving")
            if pinned_params:
                p, choice = solve_pinned(c, options, spec, pinned_params)
            elif options.pp_size > 1:
                c, p, choice = solve_stages(c, options, spec)
            else:
                c, p, choice = solve_dp(c, options, spec)
        else:
            if plan.dp_mode in ("ddp", "fsdp"):
                c = c.with_dp_mode(plan.dp_mode)
            p, choice = plan, choice_from_plan(c, plan)
    return Planned(p, c, choice, spec, options, real_buffers, meta)


def call_structure(args: tuple, kwargs: dict) -> tuple:
    """A call's structure: which arguments are given or None, tensor ranks and dtypes, other
    values by value. Sizes are dynamic and never make a new program."""
    leaves, spec = pytree.tree_flatten((args, dict(sorted(kwargs.items()))))  # keyword order is free
    sig = tuple(("T", x.dim(), x.dtype) if isinstance(x, torch.Tensor) else ("V", type(x).__name__, repr(x))
                for x in leaves)
    return (str(spec), sig)


def _arg_names(args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    return [(f"positional argument {i}", a) for i, a in enumerate(args)] + sorted(kwargs.items())


def _describe_value(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor({x.dim()}-D {str(x.dtype).removeprefix('torch.')})"
    if x is None or isinstance(x, (bool, int, float, str)):
        return repr(x)
    leaves = pytree.tree_leaves(x)
    if len(leaves) == 1 and leaves[0] is x:
        return type(x).__name__
    return f"{type(x).__name__} of {len(leaves)}"


def describe_call(args: tuple, kwargs: dict) -> str:
    """A call's structure in words: ``input_ids: Tensor(2-D int64), use_cache: False``."""
    return ", ".join(f"{n}: {_describe_value(a)}" for n, a in _arg_names(args, kwargs)) or "no arguments"


_EXPORTABLE = (torch.Tensor, bool, int, float, str, type(None), torch.dtype, torch.device)


def check_exportable(args: tuple, kwargs: dict, captured_with: str) -> None:
    """AutoTPError naming the first argument torch.export cannot take as an input: a leaf
    (after flattening lists, tuples, dicts and registered pytree types) that is not a tensor,
    a number, a bool, a string or None, e.g. a KV-cache object or a custom class."""
    for name, a in _arg_names(args, kwargs):
        bad = next((x for x in pytree.tree_leaves(a) if not isinstance(x, _EXPORTABLE)), None)
        if bad is None:
            continue
        raise AutoTPError(
            f"argument {name} is a {type(bad).__name__}" + (f" inside a {type(a).__name__}" if bad is not a else "")
            + ", which torch.export cannot take as an input, so no program can be captured for "
            f"this call; the module was captured with ({captured_with}). Pass tensors, numbers, "
            "bools, strings or None (for a Hugging Face cache: use_cache=False and no "
            "past_key_values), or register the type with torch.utils._pytree.register_pytree_node")


def missing_weights_error() -> AutoTPError:
    return AutoTPError(
        "the model's parameters are on the meta device and no weights were given: pass "
        "weights=<state dict | .safetensors file | checkpoint folder> so each rank can "
        "load its slices (build the model under autotp.empty_weights())")


class ParallelModule(nn.Module):
    """This rank's tensor-parallel module. Called like the original model; returns the same
    output structure, replicated on every rank. ``parameters()`` are this rank's shards."""

    def __init__(self, gm: torch.fx.GraphModule, plan: Plan, comm: Comm,
                 placements: dict[str, Placement], captured: Captured,
                 layers: tuple[tuple[tuple[str, ...], ...], ...] = ()):
        super().__init__()
        # the first program; its module tree (the model's own, with the shards) is this
        # module's tree, so parameters, buffers and state_dict keys keep the model's names
        object.__setattr__(self, "module", gm)
        self._adopt_tree(gm)
        self.plan = plan
        self.comm = comm
        self.placements = placements
        self.state_keys = captured.state_keys
        self.state_meta = captured.state_meta
        # a program captured in eval mode may lack what train mode adds (a dropout written
        # ``if self.training: ...`` leaves no node in eval): only a train-mode capture with
        # no mode-dependent op is known to serve both modes
        self._mode_sensitive = captured.mode_sensitive or (() if captured.training else ("<eval capture>",))
        self.training = captured.training
        self._captured_training = captured.training
        self._ddp: nn.Module | None = None
        self.dp_group: dist.ProcessGroup | None = None
        # FSDP2 across the data-parallel replicas (``fully_shard``): the program's own
        # top-level parameter names, re-pointed at this module's before each call
        object.__setattr__(self, "_fsdp_roots", None)
        object.__setattr__(self, "fsdp_units", ())  # layer module paths FSDP gathers one by one
        # per layer of each stack: (its module path, the names of its decision nodes)
        object.__setattr__(self, "_layer_nodes", [(st.layer(i), names) for st, per in zip(captured.stacks, layers)
                                                  for i, names in enumerate(per)])
        # the programs by (mode, call structure); the first is ``module``. Kept outside the
        # module tree: every program reads the same Parameter objects, under the same names
        object.__setattr__(self, "_programs", {})
        object.__setattr__(self, "_by_light", {})  # _light_key -> program (torch.compile)
        # parallelize(compile=...): torch.compile's keywords, which generate's programs get too
        object.__setattr__(self, "_compile_kwargs", None)
        object.__setattr__(self, "_family", None)
        object.__setattr__(self, "_serving", {})  # (batch, cache length) -> generate.Serving

    def _adopt_tree(self, gm: torch.fx.GraphModule) -> None:
        """Register the program's submodules, parameters and buffers as this module's own (the
        same objects): ``named_parameters()`` / ``state_dict()`` read ``up.weight``, as the
        original model does, not ``module.up.weight``; the collectives' and random draws'
        helper modules stay the program's."""
        for name, child in gm.named_children():
            if name.startswith("autotp_") or name == "_guards_fn":
                continue
            if hasattr(type(self), name) or name in self.__dict__:
                raise AutoTPError(f"the model has a submodule named {name!r}, which is an attribute "
                                  "of autotp's ParallelModule; rename it to parallelize the model")
            self.add_module(name, child)
        for name, p in gm.named_parameters(recurse=False, remove_duplicate=False):
            self.register_parameter(name, p)
        kept = {k for k in gm.state_dict(keep_vars=True) if "." not in k}
        for name, b in gm.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name in kept)

    def adopt(self, family: "ModeFamily", args: tuple, kwargs: dict) -> None:
        """Let this module capture programs for other modes and call structures (parallelize
        does this); ``args``/``kwargs`` are the example inputs ``module`` was captured with."""
        object.__setattr__(self, "_family", family)
        self._remember(self._key(self.training, args, kwargs), self.module, args, kwargs)
        self._captured_with = describe_call(args, kwargs)

    def _key(self, mode: bool, args: tuple, kwargs: dict) -> tuple:
        """What makes a call need its own program: the mode (when the model has dropout or batch
        norm) and the call's structure (``call_structure``)."""
        return (mode if self._mode_sensitive else None, *call_structure(args, kwargs))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._family is None:  # one program (made by simulate, or from a given plan)
            if self._mode_sensitive and self.training != self._captured_training:
                raise AutoTPError(
                    f"the model was captured in {'train' if self._captured_training else 'eval'} "
                    + (f"mode and has mode-dependent ops ({', '.join(self._mode_sensitive[:3])}); "
                       if self._captured_training else "mode, which may lack ops train mode adds; ")
                    + "this module holds one program (it was made from a given plan or by "
                    f"simulate): call model.{'train' if self.training else 'eval'}() before "
                    "making it instead")
            return self._run_first(*args, **kwargs)
        if torch.compiler.is_compiling():
            gm = self._compiled_program(args, kwargs)
        else:
            key = self._key(self.training, args, kwargs)
            gm = self._programs.get(key)
            if gm is None:  # a program serving both modes is captured in the mode the first was
                gm = self._capture_mode(self.training if key[0] is not None else self._captured_training,
                                        args, kwargs)
                self._remember(key, gm, args, kwargs)
        if gm is self.module:
            return self._run_first(*args, **kwargs)
        return gm(*args, **kwargs)

    def _light_key(self, args: tuple, kwargs: dict) -> tuple:
        """The part of ``_key`` torch.compile can trace: the mode (when it matters), the number
        of positional arguments, and which keywords are given (and which of them are None)."""
        return (self.training if self._mode_sensitive else None, len(args),
                tuple((k, kwargs[k] is None) for k in sorted(kwargs)))

    def _remember(self, key: tuple, gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> None:
        self._programs[key] = gm
        light = self._light_key(args, kwargs)
        # two programs alike to the light key (e.g. other dtypes) can't be told apart compiled
        self._by_light[light] = gm if self._by_light.get(light, gm) is gm else None

    def _compiled_program(self, args: tuple, kwargs: dict) -> torch.fx.GraphModule:
        """The program of this call under torch.compile, which traces this module's forward,
        found by the light key. Capturing a new program (torch.export, planning) cannot run
        inside a compiled graph: a call that needs one is an AutoTPError asking for one call
        without torch.compile first."""
        if self._ddp is not None or self._fsdp_roots is not None:
            raise AutoTPError("torch.compile of a data-parallel (mesh) module is not supported "
                              "yet: compile a tensor-parallel module (parallelize without mesh=)")
        gm = self._by_light.get(self._light_key(args, kwargs))
        if gm is None:
            raise AutoTPError(
                f"this call ({len(args)} positional arguments, keywords {', '.join(sorted(kwargs)) or 'none'}; "
                f"{'train' if self.training else 'eval'} mode) has no program yet, or one that the "
                "compiled module cannot tell apart "
                "from another: call the module once in this mode with such arguments without "
                "torch.compile first (e.g. under torch.compiler.set_stance('force_eager')), so "
                "that its program is captured")
        return gm

    def _run_first(self, *args: Any, **kwargs: Any) -> Any:
        """Call the first program: through DDP when data-parallel by DDP; under FSDP, whose
        hooks on this module have just gathered the parameters and set them on their owners
        (the model's submodules, shared with the program, and this module for top-level ones),
        after pointing the program's top-level parameters at this module's."""
        if self._fsdp_roots:
            for name in self._fsdp_roots:
                self.module._parameters[name] = self._parameters[name]
        return (self._ddp or self.module)(*args, **kwargs)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 generation_config: Any = None, **kwargs: Any) -> Any:
        """Generate tokens like the model's own ``generate`` (a Hugging Face causal LM), with
        the KV cache split across the ranks: greedy or sampling, ``max_new_tokens``,
        ``eos_token_id``, ``attention_mask`` with left padding, ``return_dict_in_generate``
        (see runtime/generate.py for what is supported and why autotp runs its own loop).
        Call on every rank with the same arguments (and the same seed when sampling)."""
        from autotp.runtime.generate import generate
        return generate(self, input_ids, attention_mask, generation_config, **kwargs)

    @property
    def programs(self) -> int:
        """How many programs (mode x call structure) this module holds."""
        return max(1, len(self._programs))

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes captured so far ("train", "eval"), in order; a model without dropout or
        batch norm runs one program in both, listed as its capture mode."""
        modes = [self._captured_training if k[0] is None else k[0] for k in self._programs]
        return tuple(dict.fromkeys("train" if m else "eval" for m in modes or [self._captured_training]))

    def _capture_mode(self, mode: bool, args: tuple, kwargs: dict) -> torch.fx.GraphModule:
        """The first call in a mode or call structure with no program: capture the model with
        this call's inputs in that mode on every rank (SPMD: every rank makes this call), plan
        it with every parameter pinned to the placement it already has (rank 0's plan is
        broadcast), and rewrite it over the same Parameter objects, so the optimizer and its
        state stay valid."""
        if self._ddp is not None or self._fsdp_roots is not None:
            raise AutoTPError("a new mode or call structure on a data-parallel (mesh) module is "
                              "not supported yet: call it the way the example inputs did, in "
                              "the mode it was made in")
        check_exportable(args, kwargs, self._captured_with)
        try:
            return self._family.program(self, mode, args, kwargs)
        except CaptureError as e:
            raise CaptureError(
                f"this call ({describe_call(args, kwargs)}) needs a new program, and capturing "
                f"it failed; the module was captured with ({self._captured_with}). Call it with "
                f"arguments like those, or fix what follows:\n{e}") from e

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

    def fully_shard(self, dp_mesh: "DeviceMesh") -> None:
        """Shard this tensor-parallel module's parameters, gradients and optimizer state across
        the 1-D ``dp_mesh`` with FSDP2 (``torch.distributed.fsdp.fully_shard``): each piece
        becomes a DTensor split on its first dim across the replicas. Every layer of a stack
        is its own FSDP unit (rewrite/units.py runs it as one call of the layer module): its
        parameters are gathered as it starts and freed when it ends, in forward and again in
        backward, where its gradients are reduce-scattered (averaged across replicas as DDP's
        are). The rest (embeddings, final norm, head) is the root unit, gathered for the whole
        step. Build the optimizer afterwards, from ``parameters()``."""
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
        from autotp.rewrite.units import METHOD, outline_layers
        object.__setattr__(self, "_fsdp_roots",
                           [n for n, _ in self.module.named_parameters(recurse=False, remove_duplicate=False)])
        units = outline_layers(self.module, self._layer_nodes)
        for path in units:
            layer = self.module.get_submodule(path)
            fully_shard(layer, mesh=dp_mesh)
            register_fsdp_forward_method(layer, METHOD)
        fully_shard(self, mesh=dp_mesh)
        # refuse a call needing a new program before FSDP's own pre-forward hook gathers the
        # parameters (an error after it would leave them gathered until the next backward)
        self.register_forward_pre_hook(self._refuse_new_program, prepend=True, with_kwargs=True)
        self.dp_group = dp_mesh.get_group()
        object.__setattr__(self, "fsdp_units", tuple(units))

    def _refuse_new_program(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._family is not None and self._key(self.training, args, kwargs) not in self._programs:
            self._capture_mode(self.training, args, kwargs)  # raises: a mesh module holds one program

    def train(self, mode: bool = True) -> "ParallelModule":
        """Like nn.Module.train (recursive). A model with mode-dependent ops (dropout, batch
        norm) gets a program per mode: the first call in a mode not captured yet captures it
        (see ``_capture_mode``); a model captured in train mode without them runs one program
        in both."""
        return super().train(mode)

    @property
    def collective_counts(self) -> dict[tuple[str, str], int]:
        """Collectives issued so far, by (kind, phase)."""
        return dict(self.comm.counts)


def rank0_plan(planned: Planned, group: "dist.ProcessGroup | None") -> Planned:
    """Every rank solves the same program, but rank 0's plan (of ``group``; None: the default
    group) is authoritative: broadcast, and taken by every rank whose own plan differs, so that
    every rank holds the same shards and issues the same collectives."""
    mine = planned.plan.to_json()
    box = [mine if dist.get_rank(group) == 0 else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0,
                               group=group)
    return planned if box[0] == mine else planned.with_plan(Plan.from_json(box[0]))


@dataclass
class ModeFamily:
    """What capturing the same model in another mode needs: the model itself (its code and
    module tree; its weights are not read), the options it was planned with, the group whose
    rank 0's plan is authoritative, and the device the module runs on.

    ``sources``: per call structure, a train-mode program with dropout as it was before its
    rewrite (its capture, a copy over the same tensors, and its plan): the eval program of
    that structure is derived from it when the model's code allows (capture/modes.py) instead
    of exported, and keeps its whole plan. ``made``: how each program was made, in order."""
    model: nn.Module
    options: PlanOptions
    group: "dist.ProcessGroup | None"
    here: torch.device
    sources: dict[tuple, Planned] = field(default_factory=dict, repr=False)
    made: list[str] = field(default_factory=list)

    def keep(self, args: tuple, kwargs: dict, planned: Planned) -> None:
        """Keep ``planned`` (about to be rewritten) as the source of its eval program."""
        cap = planned.candidates.captured
        if cap.training and cap.mode_sensitive:
            c = dataclasses.replace(planned.candidates, captured=keep_source(cap), cache={})
            self.sources[call_structure(args, kwargs)] = dataclasses.replace(planned, candidates=c)

    def _derived(self, mode: bool, args: tuple, kwargs: dict) -> Planned | None:
        """The eval program of a structure whose train program is kept, with that program's
        plan (the same graph: the same decisions, parameters included); None when it cannot be
        derived (the reason is logged) and must be exported."""
        src = self.sources.get(call_structure(args, kwargs))
        if mode or src is None:
            return None
        a, kw = meta_call(args, kwargs) if src.on_meta else (args, kwargs)
        with buffers_on_meta(self.model) if src.on_meta else contextlib.nullcontext():
            captured, why = derive_eval(src.candidates.captured, self.model, a, kw)
        if captured is None:
            log.info("autotp: exporting the eval program (it cannot be derived from the train "
                     "program: %s)", why)
            return None
        c = candidates(captured, self.options)
        choice = choice_from_plan(c, src.plan)
        return dataclasses.replace(src, plan=plan_of(c, choice, self.options, src.spec),
                                   candidates=c, choice=choice)

    def program(self, pm: ParallelModule, mode: bool, args: tuple, kwargs: dict) -> torch.fx.GraphModule:
        planned = self._derived(mode, args, kwargs)
        self.made.append(("train" if mode else "eval") + (" derived" if planned else " exported"))
        if planned is None:
            model, was = self.model, self.model.training
            model.train(mode)
            try:
                planned = plan_model(model, args, kwargs, self.options,
                                     pinned_params=dict(pm.placements))
            finally:
                model.train(was)
        # broadcast on both paths: every rank makes one broadcast at this call whichever it took
        planned = rank0_plan(planned, self.group)
        self.keep(args, kwargs, planned)
        gm, _ = self.rewrite_over(pm, planned, "train" if mode else "eval")
        return gm

    def serving_program(self, pm: ParallelModule, wrapper: nn.Module, args: tuple, what: str,
                        pinned: dict[str, Placement], shared: dict[str, torch.Tensor]
                        ) -> tuple[torch.fx.GraphModule, dict[str, Placement], Plan]:
        """A generation program (runtime/generate.py: prefill or decode of ``wrapper``, a
        ``CachedLM`` over this family's model): captured in ``pm``'s mode, planned in mode
        inference at ``args``' shapes with ``pinned`` placements (parameters, the KV cache),
        rank 0's plan broadcast, rewritten over ``pm``'s shards and the ``shared`` cache."""
        options = dataclasses.replace(self.options, mode="inference")
        was = self.model.training
        self.model.train(pm.training)  # the wrapper shares the model's submodules, and so their mode
        try:
            with torch.no_grad():
                planned = plan_model(wrapper, args, {}, options, pinned_params=pinned, cut=False)
        finally:
            self.model.train(was)
        planned = rank0_plan(planned, self.group)
        gm, placements = self.rewrite_over(pm, planned, what, shared=shared)
        self.made.append(what)
        return gm, placements, planned.plan

    def rewrite_over(self, pm: ParallelModule, planned: Planned, what: str,
                     shared: dict[str, torch.Tensor] | None = None
                     ) -> tuple[torch.fx.GraphModule, dict[str, Placement]]:
        """Rewrite a later program over ``pm``'s parameters: the same Parameter objects (one
        set of shards) and buffers, and ``shared``'s tensors (by attribute path: a KV cache
        another program already holds). Returns the module and its placements."""
        c = planned.candidates
        if planned.on_meta:
            retarget_device(c.captured.gm, torch.device("meta"), self.here)
        existing = dict(pm.module.named_parameters(remove_duplicate=False))

        def load(names: list[str], full: torch.Tensor, place: Placement) -> torch.Tensor:
            have = next((n for n in names if n in existing), None)
            if have is None:
                raise AutoTPError(f"the {what} program reads parameter {names[0]}, which the "
                                  "first program did not hold")
            return existing[have].detach()
        gm, placements = rewrite(c, planned.choice, pm.comm, load)
        differ = [f"{n}: {placements[n]} here, {pm.placements[n]} in the first program"
                  for n in placements if n in pm.placements and placements[n] != pm.placements[n]]
        if differ:  # impossible by construction (the pins); a broken pin must not run silently
            raise AutoTPInternalError("the new program's plan places parameters unlike the first "
                                      "program's: " + "; ".join(differ[:5]))
        for name, p in existing.items():  # the same Parameter objects: one set of shards
            if has_attr(gm, name):
                set_attr(gm, name, p)
        for name, b in [*pm.module.named_buffers(), *(shared or {}).items()]:
            if has_attr(gm, name):
                set_attr(gm, name, b)
        return gm, placements


def rank_module(planned: Planned, comm: Comm, *, weights: WeightSource | None = None,
                here: torch.device = torch.device("cpu"), copy_graph: bool = False,
                skip: Callable[[list[str]], bool] | None = None) -> ParallelModule:
    """``comm.rank``'s ParallelModule of ``planned``: its parameters sliced (read from
    ``weights`` when given; required for a model captured on meta), collectives inserted,
    factory ops and buffers of a meta capture moved to ``here``. ``copy_graph``: rewrite a
    copy of the captured graph (several ranks of one process each rewrite their own).
    ``skip(names)``: parameters not read from ``weights`` but left on the meta device (another
    pipeline stage's layers: this rank keeps only its own stage)."""
    c = planned.candidates
    if planned.on_meta and weights is None:
        raise missing_weights_error()
    if copy_graph:
        with warnings.catch_warnings():  # torch's own TreeSpec deepcopy warns (FutureWarning)
            warnings.simplefilter("ignore", FutureWarning)
            c = dataclasses.replace(c, captured=copy.deepcopy(c.captured))
    if planned.on_meta:
        retarget_device(c.captured.gm, torch.device("meta"), here)
    load = None if weights is None else _loader(weights, comm.rank, comm.world_size, here, skip)
    gm, placements = rewrite(c, planned.choice, comm, load)
    if planned.on_meta:
        _fill_buffers(gm, planned.real_buffers, weights, here)
    return ParallelModule(gm, planned.plan, comm, placements, c.captured, c.layers)


def _loader(source: WeightSource, rank: int, world_size: int, here: torch.device,
            skip: Callable[[list[str]], bool] | None = None):
    keys = set(source.keys())

    def load(names: list[str], full: torch.Tensor, place: Placement) -> torch.Tensor:
        if skip is not None and skip(names):
            return shard_tensor(full.to("meta"), place, rank, world_size)
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
