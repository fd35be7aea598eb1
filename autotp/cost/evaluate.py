"""The cost of a plan: per node and strategy compute time, parameter bytes and memory footprint, and
``evaluate``, the one definition of a plan's predicted step time and memory that the solver's
program linearizes (solve/program.py) and ``brute_force`` enumerates (solve/solve.py)."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator


from autotp.cost.model import (Transition, compute_time, dp_grad_sync_time, dp_step_latency, fsdp_state_bytes, fsdp_sync_time, local_bytes, pad_factor, param_bytes, saves_inputs, transition, transition_time, state_bytes, working_bytes)
from autotp.cost.devices import DeviceSpec
from autotp.core.placements import Placement
from autotp.candidates import Candidates, Value, NodeKind


Choice = dict[str, int]


@dataclass(frozen=True)
class EdgeCost:
    value: Value
    src: Placement
    dst: Placement
    grad: Placement
    consumers: tuple[tuple[str, int], ...]
    transition: Transition
    nbytes: int
    time_s: float


@dataclass(frozen=True)
class Evaluation:
    compute_s: float
    comm_s: float
    param_bytes: float  # per rank
    edges: tuple[EdgeCost, ...]
    activation_bytes: float = 0.0  # per rank: saved for the backward, or the inference peak
    memory_bytes: float = 0.0  # per rank: state (params, grads, optimizer, KV cache) + activations
    state_bytes: float = 0.0  # per rank: buffers the program writes in place (a KV cache)
    dp_s: float = 0.0  # of comm_s: data parallelism across replicas (DDP or FSDP, ``_dp_time``)

    @property
    def time_s(self) -> float:
        return self.compute_s + self.comm_s


def _node_time(c: Candidates, name: str, s: int, spec: DeviceSpec, mode: str) -> float:
    nc = c.nodes[name]
    if nc.kind is not NodeKind.OP:
        return 0.0
    ins = tuple(c.nodes[v[0]].metas[v[1]] for v in nc.slots)
    return compute_time(nc.target, ins, nc.metas, nc.strategies[s], c.world_size, spec, mode, nc.flops)


def _dp_time(c: Candidates, name: str, s: int, spec: DeviceSpec, mode: str) -> float:
    """Data parallelism across ``c.dp_size`` replicas in training, at the parameter's local
    size: DDP's gradient all-reduce of a trained parameter, or FSDP's all-gather of every
    parameter and reduce-scatter of a trained one's gradient (``c.dp_mode``)."""
    if c.dp_size <= 1 or mode != "training" or c.nodes[name].kind is not NodeKind.PARAM:
        return 0.0
    if c.dp_mode == "fsdp":
        return fsdp_sync_time(_param_mem(c, name, s), c.dp_size, spec, name in c.needs_grad,
                              name in _fsdp_layers(c))
    if name not in c.needs_grad:
        return 0.0
    return dp_grad_sync_time(_param_mem(c, name, s), c.dp_size, spec)


def _fsdp_layers(c: Candidates) -> dict[str, int]:
    """Parameter node -> the number of layers of its stack, for the parameters FSDP gathers
    layer by layer (every layer of a stack is a unit: rewrite/units.py); the rest, in the root
    unit, are absent."""
    if "fsdp_layers" not in c.cache:
        c.cache["fsdp_layers"] = {n: len(per) for per in c.layers for names in per for n in names
                                  if c.nodes[n].kind is NodeKind.PARAM}
    return c.cache["fsdp_layers"]


def _dp_latency(c: Candidates, spec: DeviceSpec, mode: str) -> float:
    """Data parallelism's per-step latency, the same for every plan of ``c``."""
    if mode != "training":
        return 0.0
    return dp_step_latency(c.dp_mode, c.dp_size, spec, sum(len(per) for per in c.layers))


def _param_mem(c: Candidates, name: str, s: int) -> float:
    nc = c.nodes[name]
    if nc.kind is not NodeKind.PARAM:
        return 0.0
    return param_bytes(nc.metas[0].nbytes, nc.strategies[s].output, c.world_size, nc.metas[0].shape)


def keepers(c: Candidates, mode: str) -> dict[Value, list[tuple[str, int]]]:
    """Training: per activation value, the (op, slot)s that keep it for the backward (found
    once per Candidates: ``memory_bytes`` runs for every plan evaluated)."""
    if mode != "training":
        return {}
    if "keepers" in c.cache:
        return c.cache["keepers"]
    out: dict[Value, list[tuple[str, int]]] = {}
    for value, cons in c.consumers.items():
        if c.nodes[value[0]].kind in (NodeKind.PARAM, NodeKind.BUFFER, NodeKind.STATE):
            continue  # parameters are counted as state
        keep = [(n, slot) for n, slot in cons if c.nodes[n].kind is NodeKind.OP and n in c.needs_grad
                and saves_inputs(c.nodes[n].target, len(c.nodes[n].slots))]
        if keep:
            out[value] = keep
    c.cache["keepers"] = out
    return out


def _working(c: Candidates, name: str, s: int) -> float:
    """Inference: bytes live while op ``name`` runs with strategy ``s``."""
    nc = c.nodes[name]
    if nc.kind is not NodeKind.OP:
        return 0.0
    ins = tuple(c.nodes[v[0]].metas[v[1]] for v in nc.slots)
    return working_bytes(ins, nc.metas, nc.strategies[s], c.world_size)


def state_mem(c: Candidates, name: str, s: int) -> float:
    """Bytes per rank of a buffer the program writes in place (a KV cache) placed by
    strategy ``s``; 0 for every other node."""
    nc = c.nodes[name]
    if nc.kind is not NodeKind.STATE:
        return 0.0
    return param_bytes(nc.metas[0].nbytes, nc.strategies[s].output, c.world_size, nc.metas[0].shape)


def held_bytes(c: Candidates, name: str, s: int) -> float:
    """Bytes per rank a node's placement holds for good, the term the solver's objective
    minimizes ("memory", and the tie-break of "time"): a parameter's piece or a KV cache's."""
    return _param_mem(c, name, s) + state_mem(c, name, s)


def _footprint(c: Candidates, name: str, s: int, mode: str) -> float:
    """State bytes per rank (parameters; in training also gradients and optimizer states;
    buffers the program writes, e.g. a KV cache)."""
    nc = c.nodes[name]
    if nc.kind is NodeKind.STATE:
        return state_mem(c, name, s)
    if nc.kind is not NodeKind.PARAM:
        return 0.0
    if c.dp_mode == "fsdp" and c.dp_size > 1 and mode == "training":
        layers = _fsdp_layers(c).get(name)
        return fsdp_state_bytes(_param_mem(c, name, s), nc.metas[0].dtype.itemsize, mode,
                                name in c.needs_grad, c.dp_size, c.optimizer_bytes,
                                1.0 if layers is None else min(1.0, 2.0 / layers))
    return state_bytes(_param_mem(c, name, s), nc.metas[0].dtype.itemsize, mode,
                       name in c.needs_grad, c.optimizer_bytes)


def floor_items(c: Candidates, mode: str) -> Iterator[tuple[str, float, float]]:
    """(node, state bytes, kept activation bytes) per rank that no plan of ``c`` goes below,
    charged where ``breakdown`` charges them: a parameter's state split as far as it goes, at
    the parameter; in training each activation the backward keeps split ``world_size`` ways,
    at its first keeper (``breakdown`` charges at least that much there)."""
    for v, nc in c.nodes.items():
        if nc.kind is NodeKind.PARAM:
            yield v, min(_footprint(c, v, s, mode) for s in range(len(nc.strategies))), 0.0
    for (v, i), keep in keepers(c, mode).items():
        yield keep[0][0], 0.0, c.nodes[v].metas[i].nbytes / c.world_size


def memory_floor(c: Candidates, mode: str) -> tuple[float, float]:
    """Bytes per rank no plan of ``c`` goes below: (every parameter's state split as far as it
    goes, every activation the backward keeps split ``world_size`` ways; 0 in inference)."""
    state = kept = 0.0
    for _, s, k in floor_items(c, mode):
        state, kept = state + s, kept + k
    return state, kept


def memory_bytes(c: Candidates, choice: Choice, mode: str) -> tuple[float, float]:
    """(activation bytes, total memory bytes) per rank of a full assignment."""
    state = sum(_footprint(c, v, s, mode) for v, s in choice.items())
    if mode == "training":
        kept = {(value, c.nodes[n].strategies[choice[n]].inputs[slot])
                for value, keep in keepers(c, mode).items() for n, slot in keep}
        act = sum(local_bytes(c.nodes[v[0]].metas[v[1]], q, c.world_size) for v, q in kept)
    else:
        act = max([0.0] + [_working(c, v, s) for v, s in choice.items()])
    return act, state + act


def _edge_mode(c: Candidates, value: Value, mode: str) -> str:
    """A value without a gradient (token ids, masks, frozen weights) has no backward."""
    return mode if value[0] in c.needs_grad else "inference"


def time_lower_bound(c: Candidates, spec: DeviceSpec, mode: str = "training") -> float:
    """No plan of ``c`` is predicted faster than this: every node at its fastest strategy
    and no collective (``evaluate``'s time is compute + collectives, each a sum of
    nonnegative terms, and a node's compute is at least its fastest strategy's)."""
    return sum(min(_node_time(c, name, s, spec, mode) for s in range(len(nc.strategies)))
               for name, nc in c.nodes.items() if nc.strategies) + _dp_latency(c, spec, mode)


def evaluate(c: Candidates, choice: Choice, spec: DeviceSpec, mode: str = "training") -> Evaluation | None:
    """Predicted cost of a full assignment; None if some edge is impossible."""
    compute = sum(_node_time(c, v, s, spec, mode) for v, s in choice.items())
    mem = sum(_param_mem(c, v, s) for v, s in choice.items())
    groups: dict[tuple, list[tuple[str, int]]] = defaultdict(list)
    for value, cons in c.consumers.items():
        u, oi = value
        p = c.nodes[u].strategies[choice[u]].outputs()[oi]
        for name, slot in cons:
            st = c.nodes[name].strategies[choice[name]]
            groups[(value, p, *c.need(name, st, slot))].append((name, slot))
    edges = []
    for (value, p, q, g), cons in groups.items():
        shape = c.nodes[value[0]].metas[value[1]].shape
        t = transition(p, q, g, c.nodes[value[0]].kind is NodeKind.PARAM,
                       c.nodes[value[0]].kind is NodeKind.STATE, shape, c.world_size)
        if t is None:
            return None
        if not t.forward and not t.backward:
            continue
        nbytes = c.bytes_of(value)
        pad = pad_factor((p, q, g), shape, c.world_size)
        edges.append(EdgeCost(value, p, q, g, tuple(cons), t, nbytes,
                              transition_time(t, nbytes, c.world_size, spec, _edge_mode(c, value, mode),
                                              pad)))
    dp = sum(_dp_time(c, v, s, spec, mode) for v, s in choice.items()) + _dp_latency(c, spec, mode)
    comm = sum(e.time_s for e in edges) + dp
    act, total = memory_bytes(c, choice, mode)
    return Evaluation(compute, comm, mem, tuple(edges), act, total,
                      sum(state_mem(c, v, s) for v, s in choice.items()), dp)


@dataclass(frozen=True)
class NodeCost:
    """One node's share of a plan's cost (``breakdown``): its compute, the collectives on the
    edges into it (charged to a value's first consumer), its data-parallel sync (a parameter),
    the state it holds and the activations it keeps (training: the values it saves for its
    backward, charged to the first node keeping each; inference: its working set)."""
    time_s: float
    state_bytes: float
    activation_bytes: float


def breakdown(c: Candidates, choice: Choice, spec: DeviceSpec, mode: str = "training") -> dict[str, NodeCost]:
    """``evaluate``'s cost split per node, in graph order: the times sum to ``evaluate``'s time
    less the step's data-parallel latency (``_dp_latency``, no node's), the state bytes to its
    state, and in training the activation bytes to its activations (in inference the largest
    node's is its peak). A pipeline cuts the program into stages and prices each by the sum
    of its nodes (cost/pipeline.py)."""
    ev = evaluate(c, choice, spec, mode)
    if ev is None:
        raise ValueError("breakdown of an infeasible assignment")
    time = {v: _node_time(c, v, s, spec, mode) + _dp_time(c, v, s, spec, mode) for v, s in choice.items()}
    for e in ev.edges:
        first = e.consumers[0][0]
        time[first] += e.time_s
    act = defaultdict(float)
    if mode == "training":
        kept: dict[tuple, str] = {}
        for value, keep in keepers(c, mode).items():
            for n, slot in keep:
                kept.setdefault((value, c.nodes[n].strategies[choice[n]].inputs[slot]), n)
        for (v, q), n in kept.items():
            act[n] += local_bytes(c.nodes[v[0]].metas[v[1]], q, c.world_size)
    else:
        for v, s in choice.items():
            act[v] = _working(c, v, s)
    return {v: NodeCost(time[v], _footprint(c, v, choice[v], mode), act[v]) for v in c.nodes}
