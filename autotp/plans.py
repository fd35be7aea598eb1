"""Plan: plain data describing a tensor-parallel plan; round-trips through JSON.

``decisions`` hold the chosen placements per node (inputs per tensor slot, output);
``collectives`` what the rewritten module issues per step, with ``bytes`` the size on one rank
of the full tensor involved (an all-reduce's input, an all-gather's output, a
reduce-scatter's input)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from autotp.cost.model import MODES
from autotp.errors import AutoTPInternalError
from autotp.core.placements import format_out
from autotp.cost.evaluate import Choice, Evaluation
from autotp.candidates import Candidates, NodeKind


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
