"""Solver: one strategy per node, minimum predicted step time (or least parameter memory,
then least time) under the memory budget. Exact: a 0/1 integer program solved by HiGHS
(scipy.optimize.milp), in the formulation of Alpa's intra-operator pass:

    x[v,s] in {0,1}, sum_s x[v,s] = 1                      one strategy per node  (_one_hot)
    minimize   sum compute(v,s) x[v,s] + sum cost(e) z[e]                        (_objective)
    z[u,P,c,Q,G] >= sum_{s: out(s)=P} x[u,s] + sum_{t: need(t)=(Q,G)} x[c,t] - 1  (_edges)
    sum_{s: out(s)=P} x[u,s] + sum_{t: need(t)=(Q,G)} x[c,t] <= 1   for impossible (P,Q,G)
    sum param_bytes(v,s) * state_factor * x[v,s] <= memory budget                (_memory)

A z variable is shared by every consumer of one producer value that needs the same (Q, G):
the rewrite issues one collective for all of them, and the model charges it once.
``objective="memory"`` is lexicographic: first least parameter bytes, then least time among
plans within MEMORY_SLACK (0.1%) of the total parameter bytes of that least. ``evaluate`` is the one definition of a plan's cost; the program
is its linearization, and ``brute_force`` (tests) enumerates it directly.
"""
from __future__ import annotations

import itertools
import logging
import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from .cost import (MODES, TRAINING_STATE_FACTOR, Transition, compute_time, dp_grad_sync_time,
                   pad_factor, param_bytes, transition, transition_time)
from .devices import DeviceSpec
from .errors import AutoTPError, InfeasiblePlanError
from .placements import Placement
from .strategies import Candidates, Value

log = logging.getLogger(__name__)
Choice = dict[str, int]
# objective="memory" accepts plans within this fraction of the total parameter bytes of the
# least-memory plan: it keeps a norm's few weights whole rather than gather activations for them
MEMORY_SLACK = 1e-3
TIE_BREAK_US_PER_MB = 1e-4


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

    @property
    def time_s(self) -> float:
        return self.compute_s + self.comm_s


def _node_time(c: Candidates, name: str, s: int, spec: DeviceSpec, mode: str) -> float:
    nc = c.nodes[name]
    if nc.kind != "op":
        return 0.0
    ins = tuple(c.nodes[v[0]].metas[v[1]] for v in nc.slots)
    return compute_time(nc.target, ins, nc.metas, nc.strategies[s], c.world_size, spec, mode)


def _dp_time(c: Candidates, name: str, s: int, spec: DeviceSpec, mode: str) -> float:
    """Data-parallel gradient all-reduce of a trained parameter, at its local size."""
    if c.dp_size <= 1 or mode != "training" or name not in c.needs_grad:
        return 0.0
    return dp_grad_sync_time(_param_mem(c, name, s), c.dp_size, spec)


def _param_mem(c: Candidates, name: str, s: int) -> float:
    nc = c.nodes[name]
    if nc.kind != "param":
        return 0.0
    return param_bytes(nc.metas[0].nbytes, nc.strategies[s].output, c.world_size, nc.metas[0].shape)


def _edge_mode(c: Candidates, value: Value, mode: str) -> str:
    """A value without a gradient (token ids, masks, frozen weights) has no backward."""
    return mode if value[0] in c.needs_grad else "inference"


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
            groups[(value, p, st.inputs[slot], st.grad_placement(slot))].append((name, slot))
    edges = []
    for (value, p, q, g), cons in groups.items():
        t = transition(p, q, g, c.nodes[value[0]].kind == "param")
        if t is None:
            return None
        if not t.forward and not t.backward:
            continue
        nbytes = c.bytes_of(value)
        pad = pad_factor((p, q, g), c.nodes[value[0]].metas[value[1]].shape, c.world_size)
        edges.append(EdgeCost(value, p, q, g, tuple(cons), t, nbytes,
                              transition_time(t, nbytes, c.world_size, spec, _edge_mode(c, value, mode),
                                              pad)))
    comm = sum(e.time_s for e in edges) + sum(_dp_time(c, v, s, spec, mode) for v, s in choice.items())
    return Evaluation(compute, comm, mem, tuple(edges))


# ---------------------------------------------------------------------------------------------

class _Program:
    """The 0/1 program over Candidates, built once and solved with different objectives."""

    def __init__(self, c: Candidates, spec: DeviceSpec, mode: str):
        self.c = c
        self.index: dict[tuple[str, int], int] = {}
        for name, nc in c.nodes.items():
            for s in range(len(nc.strategies)):
                self.index[(name, s)] = len(self.index)
        self.n_x = len(self.index)
        self.time: list[float] = [0.0] * self.n_x
        self.mem: list[float] = [0.0] * self.n_x
        for (name, s), i in self.index.items():
            self.time[i] = _node_time(c, name, s, spec, mode) + _dp_time(c, name, s, spec, mode)
            self.mem[i] = _param_mem(c, name, s)
        self.rows: list[tuple[dict[int, float], float, float]] = []
        self._one_hot()
        self._edges(spec, mode)

    def _one_hot(self) -> None:
        for name, nc in self.c.nodes.items():
            self.rows.append(({self.index[(name, s)]: 1.0 for s in range(len(nc.strategies))}, 1.0, 1.0))

    def _edges(self, spec: DeviceSpec, mode: str) -> None:
        c = self.c
        zkey: dict[tuple, int] = {}
        for value, cons in c.consumers.items():
            u, oi = value
            by_p: dict[Placement, list[int]] = defaultdict(list)
            for s, st in enumerate(c.nodes[u].strategies):
                by_p[st.outputs()[oi]].append(self.index[(u, s)])
            nbytes = c.bytes_of(value)
            is_param = c.nodes[u].kind == "param"
            for name, slot in cons:
                by_t: dict[tuple[Placement, Placement], list[int]] = defaultdict(list)
                for s, st in enumerate(c.nodes[name].strategies):
                    by_t[(st.inputs[slot], st.grad_placement(slot))].append(self.index[(name, s)])
                for p, xs_u in by_p.items():
                    for (q, g), xs_c in by_t.items():
                        t = transition(p, q, g, is_param)
                        row = {i: 1.0 for i in xs_u + xs_c}
                        if t is None:
                            self.rows.append((row, -np.inf, 1.0))
                            continue
                        pad = pad_factor((p, q, g), c.nodes[u].metas[oi].shape, c.world_size)
                        cost = transition_time(t, nbytes, c.world_size, spec,
                                               _edge_mode(c, value, mode), pad)
                        if cost <= 0:
                            continue
                        key = (value, p, q, g)
                        if key not in zkey:
                            zkey[key] = self.n_x + len(zkey)
                            self.time.append(cost)
                            self.mem.append(0.0)
                        row[zkey[key]] = -1.0
                        self.rows.append((row, -np.inf, 1.0))
        self.n = self.n_x + len(zkey)

    def solve(self, weights: list[float], extra: list[tuple[dict[int, float], float, float]],
              time_limit: float) -> np.ndarray | None:
        rows = self.rows + extra
        r, cidx, vals, lb, ub = [], [], [], [], []
        for k, (row, lo, hi) in enumerate(rows):
            for i, v in row.items():
                r.append(k)
                cidx.append(i)
                vals.append(v)
            lb.append(lo)
            ub.append(hi)
        a = coo_matrix((vals, (r, cidx)), shape=(len(rows), self.n)).tocsr()
        res = milp(np.asarray(weights), constraints=LinearConstraint(a, lb, ub),
                   integrality=np.ones(self.n), bounds=Bounds(0, 1),
                   options={"time_limit": time_limit, "mip_rel_gap": 1e-7})
        if res.x is None:
            if res.status == 2:  # infeasible
                return None
            raise AutoTPError(f"the plan solver failed: {res.message}")
        return res.x

    def choice(self, x: np.ndarray) -> Choice:
        out: Choice = {}
        for (name, s), i in self.index.items():
            if x[i] > 0.5:
                out[name] = s
        return out


def solve(c: Candidates, spec: DeviceSpec, mode: str = "training", objective: str = "time",
          memory_budget: float | None = None, time_limit: float = 120.0,
          pinned: dict[str, int] | None = None) -> Choice:
    """The optimal Choice; ``pinned`` fixes some nodes' strategies (``autotp explain`` asks
    for the best plan given each candidate of a node)."""
    if mode not in MODES:
        raise AutoTPError(f"mode must be one of {MODES}, got {mode!r}")
    if objective not in ("time", "memory"):
        raise AutoTPError(f"objective must be 'time' or 'memory', got {objective!r}")
    prog = _Program(c, spec, mode)
    scale_t = 1e6  # seconds -> microseconds keeps HiGHS' tolerances meaningful
    scale_m = 1e-6  # bytes -> MB
    factor = TRAINING_STATE_FACTOR if mode == "training" else 1
    time_w = [t * scale_t for t in prog.time]
    mem_row = {i: m * scale_m for i, m in enumerate(prog.mem) if m}
    extra: list[tuple[dict[int, float], float, float]] = [
        ({prog.index[(name, s)]: 1.0}, 1.0, 1.0) for name, s in (pinned or {}).items()]
    if objective == "memory":
        x = prog.solve([m * scale_m for m in prog.mem], list(extra), time_limit)
        if x is None:
            raise InfeasiblePlanError("no plan satisfies the pinned strategies")
        best = float(np.dot(prog.mem, x)) * scale_m
        total = sum(max(prog.mem[prog.index[(v, s)]] for s in range(len(nc.strategies)))
                    for v, nc in c.nodes.items()) * scale_m
        extra.append((mem_row, -np.inf, best + MEMORY_SLACK * total + 1e-6))
    else:
        budget = spec.memory_bytes if memory_budget is None else memory_budget
        extra.append((mem_row, -np.inf, budget / factor * scale_m))
    # ties in time (a weight stored whole and sliced for use vs stored split) go to the plan
    # with less parameter memory: 0.1 us per GB, far below any collective or matmul
    x = prog.solve([t + TIE_BREAK_US_PER_MB * m * scale_m for t, m in zip(time_w, prog.mem)],
                   extra, time_limit)
    if x is None:
        xm = prog.solve([m * scale_m for m in prog.mem], [], time_limit)
        least = float(np.dot(prog.mem, xm)) * factor if xm is not None else math.inf
        budget = spec.memory_bytes if memory_budget is None else memory_budget
        total = sum(c.nodes[n].metas[0].nbytes for n in c.nodes if c.nodes[n].kind == "param")
        need_n = max(2, math.ceil(total * factor / max(budget, 1)))
        raise InfeasiblePlanError(
            f"no plan fits {budget / 1e9:.2f} GB per rank at world size {c.world_size} "
            f"({mode}): the least any plan needs is {least / 1e9:.2f} GB per rank. "
            f"Use a world size of at least {need_n}, a device with more memory, "
            f"or mode='inference'.")
    return prog.choice(x)


def brute_force(c: Candidates, spec: DeviceSpec, mode: str = "training", objective: str = "time",
                memory_budget: float | None = None, limit: int = 200_000
                ) -> tuple[Choice, Evaluation] | None:
    """Exhaustive minimum of ``evaluate`` (for tests on small graphs)."""
    names = list(c.nodes)
    sizes = [len(c.nodes[n].strategies) for n in names]
    if math.prod(sizes) > limit:
        raise ValueError(f"{math.prod(sizes)} assignments exceed the brute-force limit")
    factor = TRAINING_STATE_FACTOR if mode == "training" else 1
    budget = spec.memory_bytes if memory_budget is None else memory_budget
    feasible = []
    for combo in itertools.product(*(range(k) for k in sizes)):
        choice = dict(zip(names, combo))
        ev = evaluate(c, choice, spec, mode)
        if ev is not None:
            feasible.append((choice, ev))
    if objective == "time":
        feasible = [(ch, ev) for ch, ev in feasible if ev.param_bytes * factor <= budget]
    else:
        least = min(ev.param_bytes for _, ev in feasible)
        total = sum(c.nodes[v].metas[0].nbytes for v in names if c.nodes[v].kind == "param")
        feasible = [(ch, ev) for ch, ev in feasible if ev.param_bytes <= least + MEMORY_SLACK * total + 1]
    return min(feasible, key=lambda f: f[1].time_s) if feasible else None
