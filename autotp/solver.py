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
from typing import Iterable, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from .cost import (MODES, TRAINING_STATE_FACTOR, Transition, compute_time, param_bytes,
                   transition, transition_time)
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


def _param_mem(c: Candidates, name: str, s: int) -> float:
    nc = c.nodes[name]
    if nc.kind != "param":
        return 0.0
    return param_bytes(nc.metas[0].nbytes, nc.strategies[s].output, c.world_size)


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
        edges.append(EdgeCost(value, p, q, g, tuple(cons), t, nbytes,
                              transition_time(t, nbytes, c.world_size, spec, _edge_mode(c, value, mode))))
    comm = sum(e.time_s for e in edges)
    return Evaluation(compute, comm, mem, tuple(edges))


# ---------------------------------------------------------------------------------------------

class _Program:
    """The 0/1 program over some nodes of Candidates, built once and solved with different
    objectives and pins. Variables, in order of creation:

    x[v, s]  binary, one per (node, strategy) of ``names``; one-hot per node.
    e[u, P]  binary, one per placement P of an *external* value (its producer is not in the
             program; a caller pins one): one-hot per value.
    w[b, k]  binary, one per table entry k of a block (a run of identical layers solved
             separately, see decompose.py); one-hot per block.
    y        continuous, the joint indicator of (producer placement P, consumer's (Q, G)) on
             one edge, when both sides have a choice: sum_Q y = X(P), sum_P y = Y(Q, G).
    z        continuous, one per (value, P, Q, G) with a positive cost: z >= every consumer's
             joint indicator of that key, so the transition is paid once.

    X(P) of a value is a sum of x (its producer's strategies with output P), of e, or of w.
    With binary x, the marginal rows force y to be the product X(P) * Y(Q, G): the program is
    exactly Alpa's, and its LP relaxation is the local-marginal one, much tighter than
    z >= x + x' - 1 (which let HiGHS branch for minutes on 16 layers)."""

    def __init__(self, c: Candidates, spec: DeviceSpec, mode: str, names: Iterable[str] | None = None,
                 externals: dict[Value, Sequence[Placement]] | None = None,
                 blocks: Sequence = ()):
        self.c = c
        self.names = list(c.nodes) if names is None else list(names)
        inside = set(self.names)
        self.time: list[float] = []
        self.mem: list[float] = []
        self.integral: list[int] = []
        self.rows: list[tuple[dict[int, float], float, float]] = []
        self.index: dict[tuple[str, int], int] = {}
        groups: dict[Value, dict[Placement, list[int]]] = defaultdict(lambda: defaultdict(list))
        for name in self.names:
            nc = c.nodes[name]
            row = {}
            for s, st in enumerate(nc.strategies):
                i = self._var(_node_time(c, name, s, spec, mode), _param_mem(c, name, s), 1)
                self.index[(name, s)] = i
                row[i] = 1.0
                for oi, p in enumerate(st.outputs()):
                    groups[(name, oi)][p].append(i)
            self.rows.append((row, 1.0, 1.0))
        self.ext_index: dict[tuple[Value, Placement], int] = {}
        for value, places in (externals or {}).items():
            row = {}
            for p in dict.fromkeys(places):
                i = self._var(0.0, 0.0, 1)
                self.ext_index[(value, p)] = i
                groups[value][p].append(i)
                row[i] = 1.0
            self.rows.append((row, 1.0, 1.0))
        self.block_index: list[list[int]] = []
        for b in blocks:
            ws = [self._var(e.time, e.mem, 1) for e in b.entries]
            self.block_index.append(ws)
            self.rows.append(({i: 1.0 for i in ws}, 1.0, 1.0))
            for k, value in enumerate(b.outs):
                for e, i in zip(b.entries, ws):
                    groups[value][e.b[k]].append(i)
        for b, ws in zip(blocks, self.block_index):  # block inputs equal their producers' outputs
            for values, pick in ((b.ins, lambda e, k: e.a[k]), (b.shared, lambda e, k: e.sigma[k])):
                for k, value in enumerate(values):
                    by_p: dict[Placement, dict[int, float]] = defaultdict(dict)
                    for e, i in zip(b.entries, ws):
                        by_p[pick(e, k)][i] = 1.0
                    for p, xs in groups[value].items():
                        for i in xs:
                            by_p[p][i] = by_p[p].get(i, 0.0) - 1.0
                    for row in by_p.values():
                        self.rows.append((row, 0.0, 0.0))
        self.n_x = len(self.time)
        self._edges(spec, mode, groups, inside)
        self.n = len(self.time)

    def _var(self, time: float, mem: float, integral: int) -> int:
        self.time.append(time)
        self.mem.append(mem)
        self.integral.append(integral)
        return len(self.time) - 1

    def _edges(self, spec: DeviceSpec, mode: str, groups: dict, inside: set[str]) -> None:
        c = self.c
        zkey: dict[tuple, int] = {}

        def pay(key: tuple, cost: float, ind: dict[int, float]) -> None:
            if key not in zkey:
                zkey[key] = self._var(cost, 0.0, 0)
            row = {zkey[key]: 1.0}
            for i, v in ind.items():
                row[i] = row.get(i, 0.0) - v
            self.rows.append((row, 0.0, np.inf))

        for value, cons in c.consumers.items():
            by_p = groups.get(value)
            if not by_p:
                continue
            nbytes = c.bytes_of(value)
            is_param = c.nodes[value[0]].kind == "param"
            emode = _edge_mode(c, value, mode)
            for name, slot in cons:
                if name not in inside:
                    continue
                by_t: dict[tuple[Placement, Placement], list[int]] = defaultdict(list)
                for s, st in enumerate(c.nodes[name].strategies):
                    by_t[(st.inputs[slot], st.grad_placement(slot))].append(self.index[(name, s)])
                cost: dict[tuple, float | None] = {}
                for p in by_p:
                    for (q, g) in by_t:
                        t = transition(p, q, g, is_param)
                        cost[(p, q, g)] = None if t is None else \
                            transition_time(t, nbytes, c.world_size, spec, emode)
                if len(by_p) == 1 or len(by_t) == 1:
                    # one side is fixed: the joint indicator is the other side's sum
                    for (p, q, g), t in cost.items():
                        side = by_t[(q, g)] if len(by_p) == 1 else by_p[p]
                        if t is None:
                            self.rows.append(({i: 1.0 for i in side}, 0.0, 0.0))
                        elif t > 0:
                            pay((value, p, q, g), t, {i: 1.0 for i in side})
                    continue
                ys: dict[tuple, int] = {}
                for (p, q, g), t in cost.items():
                    if t is not None:
                        ys[(p, q, g)] = y = self._var(0.0, 0.0, 0)
                        if t > 0:
                            pay((value, p, q, g), t, {y: 1.0})
                for p, xs in by_p.items():
                    row = {y: 1.0 for (pp, _, _), y in ys.items() if pp == p}
                    for i in xs:
                        row[i] = -1.0
                    self.rows.append((row, 0.0, 0.0))
                for (q, g), xs in by_t.items():
                    row = {y: 1.0 for (_, qq, gg), y in ys.items() if (qq, gg) == (q, g)}
                    for i in xs:
                        row[i] = -1.0
                    self.rows.append((row, 0.0, 0.0))

    def solve(self, weights: Sequence[float], extra: list[tuple[dict[int, float], float, float]],
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
        res = milp(np.asarray(weights, dtype=float), constraints=LinearConstraint(a, lb, ub),
                   integrality=np.asarray(self.integral), bounds=Bounds(0, 1),
                   options={"time_limit": time_limit, "mip_rel_gap": 1e-7})
        if res.x is None:
            if res.status == 2:  # infeasible
                return None
            raise AutoTPError(f"the plan solver failed: {res.message}")
        if res.status == 1:
            log.warning("the plan solver hit its time limit (%.0f s): the plan may not be optimal",
                        time_limit)
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
