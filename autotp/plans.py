"""Plan: plain data describing a tensor-parallel plan; round-trips through JSON.

``decisions`` hold the chosen placements per node (inputs per tensor slot, output);
``collectives`` what the rewritten module issues per step, with ``bytes`` the size on one rank
of the full tensor involved (an all-reduce's input, an all-gather's output, a
reduce-scatter's input)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING

from autotp.cost.model import MODES
from autotp.cost.pipeline import balance, least_memory, segment_costs
from autotp.errors import AutoTPInternalError, InfeasiblePlanError, PlanError
from autotp.core.placements import format_out
from autotp.cost.evaluate import Choice, Evaluation
from autotp.candidates import Candidates, NodeKind

if TYPE_CHECKING:
    from autotp.cost.devices import DeviceSpec


@dataclass(frozen=True)
class Decision:
    node: str
    module: str
    op: str
    inputs: tuple[str, ...]
    output: str


@dataclass(frozen=True)
class Collective:
    kind: str  # all_reduce | all_gather | reduce_scatter
    phase: str  # forward | backward
    bytes: int
    module: str
    node: str  # the node whose value is redistributed


@dataclass(frozen=True)
class ParamShard:
    name: str
    shape: tuple[int, ...]
    placement: str


@dataclass(frozen=True)
class PipelineStage:
    """One pipeline stage: its layers (module paths, in order; the first stage also runs what
    comes before the layers, the last what comes after), its predicted time per microbatch
    (sends included), memory per rank (state and the activations in flight) and the bytes per
    microbatch it sends to the next stage."""
    layers: tuple[str, ...]
    time_s: float
    memory_bytes: int
    send_bytes: int


@dataclass(frozen=True)
class Pipeline:
    """Pipeline parallelism over the plan (cost/pipeline.py): ``stages`` run by ``ranks``
    groups of ``world_size`` ranks, ``microbatches`` per step run by ``schedule``;
    ``step_time_s`` = (microbatches + stages - 1) x the slowest stage's time; ``bubble`` the
    idle fraction. Interleaved, each group runs ``stages_per_rank`` stages (stage s on group
    s mod ranks) and the step is (microbatches + (ranks - 1) / stages_per_rank) x the slowest
    group's time (the sum of its stages')."""
    schedule: str
    microbatches: int
    step_time_s: float
    bubble: float
    stages: tuple[PipelineStage, ...]
    stages_per_rank: int = 1

    @property
    def size(self) -> int:
        """The number of stages the program is cut into."""
        return len(self.stages)

    @property
    def ranks(self) -> int:
        """The pipeline's size in rank groups (the mesh's "pp" dim)."""
        return len(self.stages) // self.stages_per_rank

    def on_rank(self, r: int) -> tuple[int, ...]:
        """The stages pipeline rank ``r`` runs, in order."""
        return tuple(range(r, self.size, self.ranks))

    def first_layers(self) -> tuple[str, ...]:
        """The first layer of every stage after the first: where the program is cut."""
        return tuple(st.layers[0] for st in self.stages[1:])


@dataclass(frozen=True)
class Plan:
    world_size: int
    device: str
    objective: str
    mode: str
    param_bytes_per_rank: int
    param_bytes_total: int
    predicted_time_s: float
    compute_time_s: float
    comm_time_s: float
    decisions: tuple[Decision, ...]
    collectives: tuple[Collective, ...]
    params: tuple[ParamShard, ...]
    # per rank, by the cost model: activations (training: kept for the backward; inference:
    # the largest working set of one op) and everything (state + activations)
    activation_bytes_per_rank: int = 0
    memory_bytes_per_rank: int = 0
    # ops whose output is split on a dynamic (batch/sequence) dim: sequence parallelism; the
    # module then needs that dim divisible by the world size at run time
    sequence_split: tuple[str, ...] = ()
    # buffers the program writes in place (a static KV cache) and their placements, and their
    # bytes per rank and in all (the cache is split like the attention heads that write it)
    state: tuple[ParamShard, ...] = ()
    state_bytes_per_rank: int = 0
    state_bytes_total: int = 0
    # the data-parallel axis: replicas of this tensor-parallel group, how they hold its shards
    # ("ddp": a full copy each; "fsdp": FSDP2 across them; "none" for one replica), and the
    # part of comm_time_s it costs per step (training)
    dp_size: int = 1
    dp_mode: str = "none"
    dp_time_s: float = 0.0
    # pipeline stages (``autotp.plan(..., pipeline_parallel=P)``; a mesh with a "pp" dim): then
    # the example inputs are one microbatch; decisions, collectives and the times and bytes
    # above are for the whole model at one microbatch, ``pipeline`` has the step and each stage
    pipeline: Pipeline | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @staticmethod
    def from_json(text: str) -> "Plan":
        d = json.loads(text)
        known = {f.name for f in fields(Plan)}
        d = {k: v for k, v in d.items() if k in known}
        d["decisions"] = tuple(Decision(**{**x, "inputs": tuple(x["inputs"])}) for x in d["decisions"])
        d["collectives"] = tuple(Collective(**x) for x in d["collectives"])
        d["sequence_split"] = tuple(d.get("sequence_split", ()))
        d["params"] = tuple(ParamShard(x["name"], tuple(x["shape"]), x["placement"]) for x in d["params"])
        d["state"] = tuple(ParamShard(x["name"], tuple(x["shape"]), x["placement"]) for x in d.get("state", ()))
        if d.get("pipeline") is not None:
            pp = d["pipeline"]
            d["pipeline"] = Pipeline(**{**pp, "stages": tuple(
                PipelineStage(**{**st, "layers": tuple(st["layers"])}) for st in pp["stages"])})
        return Plan(**d)

    def count(self, kind: str | None = None, phase: str | None = None) -> int:
        return sum(1 for c in self.collectives
                   if (kind is None or c.kind == kind) and (phase is None or c.phase == phase))


def make_plan(c: Candidates, choice: Choice, ev: Evaluation, device: str, objective: str,
              mode: str) -> Plan:
    if mode not in MODES:
        raise AutoTPInternalError(f"make_plan got mode {mode!r}, not one of {MODES}")
    decisions = []
    params = []
    state = []
    seq = []
    total = 0
    for name, nc in c.nodes.items():
        st = nc.strategies[choice[name]]
        decisions.append(Decision(name, nc.module, nc.op, tuple(map(str, st.inputs)), format_out(st.output)))
        if nc.kind is NodeKind.OP and any(m is not None and m.splits_dynamic(o) for o, m in zip(st.outputs(), nc.metas)):
            seq.append(name)
        if nc.kind is NodeKind.PARAM:
            total += nc.metas[0].nbytes
            params.append(ParamShard(str(nc.target), nc.metas[0].shape, str(st.output)))
        if nc.kind is NodeKind.STATE:
            state.append(ParamShard(str(nc.target), nc.metas[0].shape, str(st.output)))
    # parameters the graph never reads stay whole on every rank; count them too
    gm = c.captured.gm
    used = {id(gm.get_parameter(p.name)) for p in params}  # by identity: tied names are one
    unused = 0
    for pname, t in gm.named_parameters():
        if id(t) not in used:
            params.append(ParamShard(pname, tuple(t.shape), "R"))
            unused += t.numel() * t.element_size()
    total += unused
    collectives = []
    for e in ev.edges:
        module = c.nodes[e.value[0]].module
        phases = [("forward", e.transition.forward)]
        if mode == "training" and e.value[0] in c.needs_grad:
            phases.append(("backward", e.transition.backward))
        for phase, ops in phases:
            for op in ops:
                if op != "slice":
                    collectives.append(Collective(op, phase, e.nbytes, module, e.value[0]))
    return Plan(c.world_size, device, objective, mode, int(round(ev.param_bytes)) + unused, total,
                ev.time_s, ev.compute_s, ev.comm_s, tuple(decisions), tuple(collectives), tuple(params),
                int(round(ev.activation_bytes)),
                int(round(ev.memory_bytes + unused)), tuple(seq), tuple(state),
                int(round(ev.state_bytes)), sum(c.nodes[n].metas[0].nbytes for n in c.nodes
                                                if c.nodes[n].kind is NodeKind.STATE),
                c.dp_size, c.dp_mode if c.dp_size > 1 else "none", ev.dp_s)


def _cut_hint(gm) -> str:
    """Where a model without a stack could be cut: its biggest containers' children, by size."""
    best = None
    for path, mod in gm.named_modules():
        kids = [(n, sum(p.numel() for p in k.parameters())) for n, k in mod.named_children()]
        kids = [(n, k) for n, k in kids if k]
        if len(kids) >= 2 and (best is None or len(kids) > len(best[1])):
            best = (path, kids)
    if best is None:
        return "The model has no module with two or more parameter-holding children to cut between"
    path, kids = best
    where = ", ".join(f"{(path + '.' if path else '') + n} ({k:,} parameters)" for n, k in kids[:8])
    return (f"It could be cut between the children of {path or 'the model'}: {where}; put "
            "repeated blocks of equal structure in an nn.ModuleList to cut there")


def size_text(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def with_pipeline(p: Plan, c: Candidates, choice: Choice, spec: "DeviceSpec", pp: int, microbatches: int,
                  schedule: str, budget: float, v: int = 1) -> Plan:
    """``p`` with its layers cut into ``pp`` balanced stages (cost/pipeline.py's ``balance``;
    ``v pp`` stages, ``v`` per rank, interleaved) that each fit ``budget`` bytes per rank;
    PlanError when the program has fewer layers than stages or no cut fits."""
    paths, segs = segment_costs(c, choice, spec, p.mode)
    if not paths:
        raise PlanError(
            f"{pp} pipeline stages need layers to cut at, and the model has no stack of identical "
            "layers (an nn.ModuleList or nn.Sequential of structurally equal blocks, children "
            "named 0, 1, ...): autotp cuts stages only between such layers. "
            + _cut_hint(c.captured.gm) + "; or use tensor and data parallelism without a 'pp' dim")
    if len(paths) < pp * v:
        per = f" ({pp} ranks x {v} stages each, interleaved)" if v > 1 else ""
        raise PlanError(f"{pp * v} pipeline stages{per} need at least {pp * v} layers to cut at, and the "
                        f"model has {len(paths)} ({paths[0]} .. {paths[-1]}): use at most {len(paths)} stages"
                        + (" in all (fewer ranks or stages_per_rank)" if v > 1 else ""))
    found = balance(segs, pp, microbatches, schedule, p.mode, spec, budget, v=v)
    if found is None:
        least = least_memory(segs, pp, microbatches, schedule, p.mode, spec, v=v)
        raise InfeasiblePlanError(
            f"no cut of {len(paths)} layers into {pp * v} stages fits {size_text(budget)} per rank "
            f"under {schedule} with {microbatches} microbatches: the best cut "
            + (f"found needs {size_text(least)} on its fullest rank" if v > 1 else
               f"needs {size_text(least)} on its largest stage")
            + "; use more stages or tensor-parallel ranks, a smaller microbatch"
            + {"gpipe": " or schedule='1f1b' (fewer microbatches in flight)",
               "interleaved": " or schedule='1f1b' / fewer stages_per_rank (fewer stage-microbatches "
                              "in flight)"}.get(schedule, ""), least)
    ends = found.bounds[1:] + (len(paths),)
    stages = tuple(PipelineStage(tuple(paths[lo:hi]), t, int(round(m)), int(round(x)))
                   for lo, hi, t, m, x in zip(found.bounds, ends, found.time_s, found.memory_bytes,
                                              found.send_bytes))
    pipe = Pipeline(schedule, microbatches, found.step_time_s, found.bubble, stages, v)
    return replace(p, pipeline=pipe, predicted_time_s=found.step_time_s,
                   memory_bytes_per_rank=max(st.memory_bytes for st in stages))
