"""Solver: one strategy per node, minimum predicted step time (or least parameter memory,
then least time) under the memory budget. Exact: a 0/1 integer program solved by HiGHS
(scipy.optimize.milp), in the formulation of Alpa's intra-operator pass:

    x[v,s] in {0,1}, sum_s x[v,s] = 1                      one strategy per node  (_Program)
    minimize   sum compute(v,s) x[v,s] + sum cost(k) z[k]                      (solve, _weight)
    per edge u -> (c, slot), with X(P) = sum_{s: out(s)=P} x[u,s] and
    Y(Q,G) = sum_{t: need(t)=(Q,G)} x[c,t]:                                     (_Program._edges)
      y[P,Q,G] >= 0 for possible (P,Q,G) only,  sum_(Q,G) y = X(P),  sum_P y = Y(Q,G)
      z[u,P,Q,G] >= y[P,Q,G]              (one z per key: paid once for all consumers)
    memory per rank <= memory budget                                   (_Program.budget_rows)
      training:  sum state_bytes(v,s) x[v,s] + sum kept(u,Q) k[u,Q] <= budget, where
                 k[u,Q] >= sum_{t: need(t)=Q} x[c,t] for every op c that keeps value u
      inference: sum param_bytes(v,s) x[v,s] + U m <= budget, and for every op v
                 sum_s working_bytes(v,s) x[v,s] <= U m    (m in [0, 1]: the peak is a max)

With binary x the marginal rows make y the product X(P) * Y(Q,G), so this is Alpa's program;
its LP relaxation is the local-marginal one, tight enough that HiGHS usually finds an
integral LP optimum (``_Program.solve`` tries the LP first and accepts it when integral).
The older ``z >= X(P) + Y(Q,G) - 1`` relaxation let HiGHS branch past its time limit on 32
Llama layers. A z variable is shared by every consumer of one producer value that needs the
same (Q, G): the rewrite issues one collective for all of them, and the model charges it once.

Runs of identical layers (decompose.py) are solved once per boundary state and joined by a
min-plus product; ``solve`` uses that when the memory bound does not bind and solves the
whole program when it does, so the result is the optimum either way.
``objective="memory"`` is lexicographic: first least parameter bytes, then least time among
plans within MEMORY_SLACK (0.1%) of the total parameter bytes of that least; both under the
budget. Activations enter only through the budget: when it binds, the solver keeps fewer of
them (a sequence-split norm region keeps 1/n of its outputs), never to save time. ``evaluate`` is
the one definition of a plan's cost; the program is its linearization, and ``brute_force``
(tests) enumerates it directly.
"""
from __future__ import annotations

import itertools
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from .cost import (MODES, Transition, compute_time, dp_grad_sync_time,
                   local_bytes, pad_factor, param_bytes, saves_inputs, transition, transition_time,
                   state_bytes, working_bytes)
from .devices import DeviceSpec
from .errors import AutoTPError, AutoTPInternalError, InfeasiblePlanError
from .placements import Placement
from .strategies import Candidates, Value
from .decompose import find_runs, solve_runs

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
    activation_bytes: float = 0.0  # per rank: saved for the backward, or the inference peak
    memory_bytes: float = 0.0  # per rank: state (params, grads, optimizer) + activations

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


def _keepers(c: Candidates, mode: str) -> dict[Value, list[tuple[str, int]]]:
    """Training: per activation value, the (op, slot)s that keep it for the backward (found
    once per Candidates: ``memory_bytes`` runs for every plan evaluated)."""
    if mode != "training":
        return {}
    if "keepers" in c.cache:
        return c.cache["keepers"]
    out: dict[Value, list[tuple[str, int]]] = {}
    for value, cons in c.consumers.items():
        if c.nodes[value[0]].kind in ("param", "buffer"):
            continue  # parameters are counted as state
        keep = [(n, slot) for n, slot in cons if c.nodes[n].kind == "op" and n in c.needs_grad
                and saves_inputs(c.nodes[n].target, len(c.nodes[n].slots))]
        if keep:
            out[value] = keep
    c.cache["keepers"] = out
    return out


def _working(c: Candidates, name: str, s: int) -> float:
    """Inference: bytes live while op ``name`` runs with strategy ``s``."""
    nc = c.nodes[name]
    if nc.kind != "op":
        return 0.0
    ins = tuple(c.nodes[v[0]].metas[v[1]] for v in nc.slots)
    return working_bytes(ins, nc.metas, nc.strategies[s], c.world_size)


def _footprint(c: Candidates, name: str, s: int, mode: str) -> float:
    """State bytes per rank (parameters; in training also gradients and optimizer states)."""
    nc = c.nodes[name]
    if nc.kind != "param":
        return 0.0
    return state_bytes(_param_mem(c, name, s), nc.metas[0].dtype.itemsize, mode,
                       name in c.needs_grad, c.optimizer_bytes)


def memory_bytes(c: Candidates, choice: Choice, mode: str) -> tuple[float, float]:
    """(activation bytes, total memory bytes) per rank of a full assignment."""
    state = sum(_footprint(c, v, s, mode) for v, s in choice.items())
    if mode == "training":
        kept = {(value, c.nodes[n].strategies[choice[n]].inputs[slot])
                for value, keep in _keepers(c, mode).items() for n, slot in keep}
        act = sum(local_bytes(c.nodes[v[0]].metas[v[1]], q, c.world_size) for v, q in kept)
    else:
        act = max([0.0] + [_working(c, v, s) for v, s in choice.items()])
    return act, state + act


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
    act, total = memory_bytes(c, choice, mode)
    return Evaluation(compute, comm, mem, tuple(edges), act, total)


# ---------------------------------------------------------------------------------------------

class _Program:
    """The 0/1 program over some nodes of Candidates, built once and solved with different
    objectives and pins. Variables, in order of creation:

    x[v, s]  binary, one per (node, strategy) of ``names``; one-hot per node.
    e[u, P]  binary, one per placement P of an *external* value (its producer is not in the
             program; a caller pins one): one-hot per value.
    w[b, k]  binary, one per entry k of a block (a run of identical layers solved separately,
             see decompose.py); one-hot per block.
    y        continuous, the joint indicator of (producer placement P, consumer's (Q, G)) on
             one edge, when both sides have a choice: sum_Q y = X(P), sum_P y = Y(Q, G).
    z        continuous, one per key (value, P, Q, G) with a positive cost: z >= every
             consumer's joint indicator of that key (and every block entry that uses it), so
             the transition is paid once.

    X(P) of a value is a sum of x (its producer's strategies with output P), of e, or of w.
    With binary x, the marginal rows force y to be the product X(P) * Y(Q, G): the program is
    exactly Alpa's, and its LP relaxation is the local-marginal one, much tighter than
    z >= x + x' - 1 (with which HiGHS branched for minutes on 16 layers)."""

    def __init__(self, c: Candidates, spec: DeviceSpec, mode: str, names: Iterable[str] | None = None,
                 externals: dict[Value, Sequence[Placement]] | None = None,
                 blocks: Sequence = ()):
        self.c, self.spec, self.mode = c, spec, mode
        self.names = list(c.nodes) if names is None else list(names)
        self.time: list[float] = []
        self.mem: list[float] = []
        self.integral: list[int] = []
        self.rows: list[tuple[dict[int, float], float, float]] = []
        self.index: dict[tuple[str, int], int] = {}
        self.zkey: dict[tuple, int] = {}
        self._base: tuple | None = None
        self.peak: int | None = None  # inference peak-activation variable (budget_rows)
        self.peak_scale = 0.0
        self.kept: dict[int, float] | None = None  # training: kept-activation variables
        self.foot: dict[int, float] = {}
        groups: dict[Value, dict[Placement, list[int]]] = defaultdict(lambda: defaultdict(list))
        for name in self.names:
            nc = c.nodes[name]
            row = {}
            for s, st in enumerate(nc.strategies):
                i = self._var(_node_time(c, name, s, spec, mode) + _dp_time(c, name, s, spec, mode),
                              _param_mem(c, name, s), 1)
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
            for k, value in enumerate(b.ins):
                by_p: dict[Placement, dict[int, float]] = defaultdict(dict)
                for e, i in zip(b.entries, ws):
                    by_p[e.a[k]][i] = 1.0
                for p, xs in groups[value].items():
                    for i in xs:
                        by_p[p][i] = by_p[p].get(i, 0.0) - 1.0
                for row in by_p.values():
                    self.rows.append((row, 0.0, 0.0))
        self._edges(groups, set(self.names))
        for b, ws in zip(blocks, self.block_index):
            self._shared_reads(b, ws, groups)
        self.n = len(self.time)

    def _shared_reads(self, b, ws: list[int], groups: dict) -> None:
        """A block's layers read a shared value u in placement (Q, G) when the chosen entry
        uses that read: R = sum of those entries' w, in {0, 1}. Its joint indicator with the
        producer's placement P, y[P] in [0, X(P)] with sum_P y[P] = R (only where P -> Q is
        possible), pays the transition (u, P, Q, G) once for all layers, shared with any
        consumer outside the block that needs the same."""
        for read in dict.fromkeys(r for e in b.entries for r in e.reads):
            k, q, g = read
            value = b.shared[k]
            row = {i: -1.0 for e, i in zip(b.entries, ws) if read in e.reads}
            for p, xs in groups[value].items():
                t = self.key_cost((value, p, q, g))
                if t is None:
                    continue
                y = self._var(0.0, 0.0, 0)
                row[y] = 1.0
                cap = {y: 1.0}
                for i in xs:
                    cap[i] = cap.get(i, 0.0) - 1.0
                self.rows.append((cap, -np.inf, 0.0))
                if t > 0:
                    self._pay((value, p, q, g), {y: 1.0})
            self.rows.append((row, 0.0, 0.0))
        self.n = len(self.time)

    def budget_rows(self, budget: float | None) -> list[tuple[dict[int, float], float, float]]:
        """Rows bounding memory per rank by ``budget`` bytes (None: only the inference peak's
        definition, for the least-memory objective). In KB (SCALE_M). Inference needs a peak
        variable ``m`` (scaled by an upper bound U of any op's working set so that m is in [0, 1])."""
        c, mode = self.c, self.mode
        foot = {i: _footprint(c, n, s, mode) * SCALE_M for (n, s), i in self.index.items()}
        rows = []
        if mode == "training":
            if self.kept is None:
                self.kept = self._kept_vars()
            for i, mb in self.kept.items():
                foot[i] = foot.get(i, 0.0) + mb
        if mode == "inference":
            if self.peak is None:
                work = {i: _working(c, n, s) * SCALE_M for (n, s), i in self.index.items()}
                self.peak_scale = max([1e-6] + list(work.values()))
                self.peak = self._var(0.0, 0.0, 0)
                self.n = len(self.time)
                self._base = None
                for name in self.names:
                    row = {self.index[(name, s)]: work[self.index[(name, s)]]
                           for s in range(len(c.nodes[name].strategies))}
                    if any(row.values()):
                        row[self.peak] = -self.peak_scale
                        self.rows.append((row, -np.inf, 0.0))
            foot[self.peak] = self.peak_scale
        if budget is not None:
            rows.append(({i: v for i, v in foot.items() if v}, -np.inf, bytes_bound(budget)))
        self.foot = foot
        return rows

    def _kept_vars(self) -> dict[int, float]:
        """Training activations: KB (SCALE_M) per variable. A value one op keeps puts its bytes
        (at the placement that op needs) on the op's strategies; a value several ops keep gets a
        variable k[u, Q] >= each keeper's indicator of needing Q, so it is counted once per
        placement however many ops keep it."""
        c = self.c
        out: dict[int, float] = defaultdict(float)
        for value, keep in _keepers(c, self.mode).items():
            keep = [(n, slot) for n, slot in keep if (n, 0) in self.index]
            meta = c.nodes[value[0]].metas[value[1]]
            size = {}
            for n, slot in keep:
                for s, st in enumerate(c.nodes[n].strategies):
                    q = st.inputs[slot]
                    if q not in size:
                        size[q] = local_bytes(meta, q, c.world_size) * SCALE_M
            if len(keep) == 1:
                n, slot = keep[0]
                for s, st in enumerate(c.nodes[n].strategies):
                    out[self.index[(n, s)]] += size[st.inputs[slot]]
                continue
            for q, mb in size.items():
                k = self._var(0.0, 0.0, 0)
                out[k] = mb
                for n, slot in keep:
                    row = {k: 1.0}
                    for s, st in enumerate(c.nodes[n].strategies):
                        if st.inputs[slot] == q:
                            row[self.index[(n, s)]] = -1.0
                    self.rows.append((row, 0.0, np.inf))
        self.n = len(self.time)
        self._base = None
        return dict(out)

    def _var(self, time: float, mem: float, integral: int) -> int:
        self.time.append(time)
        self.mem.append(mem)
        self.integral.append(integral)
        return len(self.time) - 1

    def key_cost(self, key: tuple) -> float | None:
        """Cost of the transition (value, P, Q, G); None when impossible."""
        value, p, q, g = key
        c = self.c
        t = transition(p, q, g, c.nodes[value[0]].kind == "param")
        if t is None:
            return None
        pad = pad_factor((p, q, g), c.nodes[value[0]].metas[value[1]].shape, c.world_size)
        return transition_time(t, c.bytes_of(value), c.world_size, self.spec,
                               _edge_mode(c, value, self.mode), pad)

    def _pay(self, key: tuple, ind: dict[int, float]) -> None:
        """z[key] >= ind: the key's cost is paid when the indicator is on."""
        if key not in self.zkey:
            self.zkey[key] = self._var(self.key_cost(key) or 0.0, 0.0, 0)
        row = {self.zkey[key]: 1.0}
        for i, v in ind.items():
            row[i] = row.get(i, 0.0) - v
        self.rows.append((row, 0.0, np.inf))

    def _edges(self, groups: dict, inside: set[str]) -> None:
        c = self.c
        for value, cons in c.consumers.items():
            by_p = groups.get(value)
            if not by_p:
                continue
            for name, slot in cons:
                if name not in inside:
                    continue
                by_t: dict[tuple[Placement, Placement], list[int]] = defaultdict(list)
                for s, st in enumerate(c.nodes[name].strategies):
                    by_t[(st.inputs[slot], st.grad_placement(slot))].append(self.index[(name, s)])
                cost = {(p, q, g): self.key_cost((value, p, q, g)) for p in by_p for (q, g) in by_t}
                if len(by_p) == 1 or len(by_t) == 1:
                    # one side is fixed: the joint indicator is the other side's sum
                    for (p, q, g), t in cost.items():
                        side = by_t[(q, g)] if len(by_p) == 1 else by_p[p]
                        if t is None:
                            self.rows.append(({i: 1.0 for i in side}, 0.0, 0.0))
                        elif t > 0:
                            self._pay((value, p, q, g), {i: 1.0 for i in side})
                    continue
                ys: dict[tuple, int] = {}
                for (p, q, g), t in cost.items():
                    if t is not None:
                        ys[(p, q, g)] = y = self._var(0.0, 0.0, 0)
                        if t > 0:
                            self._pay((value, p, q, g), {y: 1.0})
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

    @staticmethod
    def _coo(rows: list[tuple[dict[int, float], float, float]], first: int = 0) -> tuple:
        r, cidx, vals, lb, ub = [], [], [], [], []
        for k, (row, lo, hi) in enumerate(rows, first):
            r.extend([k] * len(row))
            cidx.extend(row.keys())
            vals.extend(row.values())
            lb.append(lo)
            ub.append(hi)
        return r, cidx, vals, lb, ub

    def solve(self, weights: Sequence[float], extra: list[tuple[dict[int, float], float, float]],
              time_limit: float) -> np.ndarray | None:
        if self._base is None:
            self._base = self._coo(self.rows)
        b = self._base
        e = self._coo(extra, len(self.rows))
        a = coo_matrix((b[2] + e[2], (b[0] + e[0], b[1] + e[1])),
                       shape=(len(self.rows) + len(extra), self.n)).tocsr()
        w = np.asarray(weights, dtype=float)
        cons = LinearConstraint(a, b[3] + e[3], b[4] + e[4])
        # the local-marginal relaxation is often integral: then its optimum is the program's
        lp = milp(w, constraints=cons, bounds=Bounds(0, 1), options={"time_limit": time_limit})
        if lp.status == 2:
            return None
        if lp.x is not None and lp.status == 0:
            xi = lp.x[np.asarray(self.integral, dtype=bool)]
            if np.all(np.minimum(xi, 1.0 - xi) < 1e-9):
                return lp.x
        res = milp(w, constraints=cons, integrality=np.asarray(self.integral), bounds=Bounds(0, 1),
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


SCALE_T = 1e6  # seconds -> microseconds keeps HiGHS' tolerances meaningful
# bytes -> KB. HiGHS accepts a MIP solution that breaks a row by 1e-6 of the row's unit
# (mip_feasibility_tolerance) and stops 1e-6 units from the optimum (mip_abs_gap): in KB that is
# a thousandth of a byte; in MB it was a whole byte, so plans a byte over the budget passed.
SCALE_M = 1e-3
SCALE_MB = 1e-6  # bytes -> MB (the time objective's tie-break)


def bytes_bound(nbytes: float) -> float:
    """The row bound (in SCALE_M units) for "at most ``nbytes`` bytes". Memory in the cost
    model is a whole number of bytes (whole elements of whole tensors), so the bound is
    floor(nbytes) plus half a byte: a plan within ``nbytes`` meets it with half a byte to spare
    and a plan over it breaks it by at least half a byte, far beyond HiGHS' tolerance."""
    return (math.floor(nbytes) + 0.5) * SCALE_M if math.isfinite(nbytes) else nbytes


# graphs larger than this whose memory budget binds are planned by pricing memory per layer
# (a Lagrangian search, not proven optimal) instead of one exact program over the whole graph,
# which HiGHS does not finish in minutes beyond a few thousand nodes with a binding budget
WHOLE_GRAPH_NODES = 1500
LAGRANGE_STEPS = 16
LEAN_FACTOR = 4.0


def _weight(kind: str) -> Callable[[float, float], float]:
    """Objective units of (seconds, parameter bytes): "memory" minimizes parameter KB;
    "time" minimizes microseconds, ties (a weight stored whole and sliced for use vs stored
    split) going to less parameter memory at 0.1 us per GB, far below any collective."""
    if kind == "memory":
        return lambda t, m: m * SCALE_M
    return lambda t, m: t * SCALE_T + TIE_BREAK_US_PER_MB * m * SCALE_MB


def _mem(c: Candidates, choice: Choice) -> float:
    return sum(_param_mem(c, n, s) for n, s in choice.items())


def solve(c: Candidates, spec: DeviceSpec, mode: str = "training", objective: str = "time",
          memory_budget: float | None = None, time_limit: float = 120.0,
          pinned: dict[str, int] | None = None, layers: bool = True) -> Choice:
    """The optimal Choice; ``pinned`` fixes some nodes' strategies (``autotp explain`` asks
    for the best plan given each candidate of a node). ``layers``: solve runs of identical
    layers once (decompose.py); the result is optimal either way."""
    if mode not in MODES:
        raise AutoTPError(f"mode must be one of {MODES}, got {mode!r}")
    if objective not in ("time", "memory"):
        raise AutoTPError(f"objective must be 'time' or 'memory', got {objective!r}")
    pinned = dict(pinned or {})
    budget = spec.memory_bytes if memory_budget is None else memory_budget
    runs = find_runs(c, set(pinned)) if layers else []
    programs: list[_Program] = []

    def whole(kind: str, bound: float | None, limit: float | None) -> Choice | None:
        """kind "time" / "memory" (parameter bytes) / "footprint" (memory per rank)."""
        if not programs:
            programs.append(_Program(c, spec, mode))
        prog = programs[0]
        extra = prog.budget_rows(limit)
        extra += [({prog.index[(n, s)]: 1.0}, 1.0, 1.0) for n, s in pinned.items()]
        if bound is not None:
            extra.append(({i: m * SCALE_M for i, m in enumerate(prog.mem) if m}, -np.inf,
                          bytes_bound(bound)))
        if kind == "footprint":
            w = [prog.foot.get(i, 0.0) for i in range(prog.n)]
        else:
            wf = _weight(kind)
            w = [wf(t, m) for t, m in zip(prog.time, prog.mem)]
        x = prog.solve(w, extra, time_limit)
        return None if x is None else prog.choice(x)

    def best(kind: str, bound: float | None = None, limit: float | None = None) -> Choice | None:
        """The optimum with parameter bytes <= bound and memory per rank <= limit bytes: by
        layers when neither binds."""
        if runs:
            choice = solve_runs(c, spec, mode, runs, kind, _weight(kind), pinned, time_limit)
            if choice is None:  # infeasible without the bounds: infeasible with them
                return None
            if (bound is None or _mem(c, choice) <= bound) and \
                    (limit is None or memory_bytes(c, choice, mode)[1] <= limit):
                return choice
            if len(c.nodes) > WHOLE_GRAPH_NODES and kind == "time" and bound is None \
                    and limit is not None and mode == "training":
                log.info("the memory budget binds on %d nodes: pricing memory per layer instead "
                         "of solving the whole graph (fits, not proven optimal)", len(c.nodes))
                return priced(limit)
            log.info("the memory bound binds: solving the whole graph instead of one layer per class")
        return whole(kind, bound, limit)

    def priced(limit: float) -> Choice | None:
        """Lagrangian search: minimize time + lam * memory by layers (decompose.py), lam in
        microseconds per KB (SCALE_M) raised until the plan fits, then bisected (geometrically) between
        the last lam that did not fit and the first that did; the fastest fitting plan wins.
        Falls back to the whole graph when no lam makes it fit."""
        w = _weight("time")
        fits: list[tuple[float, Choice]] = []

        def fit(choice: Choice | None) -> bool:
            """Keep ``choice`` (with its predicted time) when it fits the budget."""
            if choice is None or memory_bytes(c, choice, mode)[1] > limit:
                return False
            ev = evaluate(c, choice, spec, mode)
            fits.append((ev.time_s if ev is not None else math.inf, choice))
            return True

        lo, hi, lam = 0.0, None, 1e-3
        for _ in range(LAGRANGE_STEPS):
            if fit(solve_runs(c, spec, mode, runs, "time", w, pinned, time_limit, lam)):
                hi = lam
            else:
                lo = lam
            if hi is None:
                if lam > 1e9:
                    break
                lam *= 8.0
            else:
                if lo and hi / lo < 1.02:
                    break
                lam = math.sqrt(lo * hi) if lo else hi / 8.0
        if not fits:
            return whole("time", None, limit)
        if lo:  # mix: some layers as priced at the last lam that fit, the rest at the one before
            # (lean layers priced well above the flip point and the others well below it, so
            # that a short run of either keeps its cells despite the cost of changing layout)
            fit(solve_runs(c, spec, mode, runs, "time", w, pinned, time_limit,
                           lo / LEAN_FACTOR, (hi * LEAN_FACTOR, limit)))
        log.info("priced memory: %d plans fit, the fastest predicted %.3g s", len(fits),
                 min(f[0] for f in fits))
        return min(fits, key=lambda f: f[0])[1]

    def infeasible(least: float, floor_only: bool) -> InfeasiblePlanError:
        """``least``: the least memory any plan needs, or (``floor_only``) the parameters'
        state split as far as it goes, a lower bound found before planning activations."""
        n = c.world_size
        need_n = max(n + 1, math.ceil(n * least / max(budget, 1)))
        training = mode == "training"
        what = (f"more than {least / 1e9:.2f} GB per rank, what parameters"
                f"{', gradients and optimizer state' if training else ''} alone take when split as "
                f"far as they go, before activations" if floor_only else
                f"{least / 1e9:.2f} GB per rank (state and activations)")
        return InfeasiblePlanError(
            f"no plan fits {budget / 1e9:.2f} GB per rank at world size {n} ({mode}): the least "
            f"any plan needs is {what}. Use a world size of at least {need_n}, a device with more "
            f"memory{', an optimizer with less state (optimizer_bytes)' if floor_only and training else ''}"
            f"{', a smaller batch or sequence' if not floor_only else ''}, or mode='inference'.",
            least, need_n)

    # a quick bound first: every parameter split as far as it goes, no activations
    floor = sum(min(_footprint(c, v, s, mode) for s in range(len(nc.strategies)))
                for v, nc in c.nodes.items() if nc.kind == "param")
    if floor > budget:
        raise infeasible(floor, floor_only=True)
    if objective == "memory":
        choice = best("memory", None, budget)
        if choice is not None:
            total = sum(max(_param_mem(c, v, s) for s in range(len(nc.strategies)))
                        for v, nc in c.nodes.items())
            choice = best("time", _mem(c, choice) + MEMORY_SLACK * total + 1, budget)
            if choice is None:
                raise AutoTPInternalError("no plan within the least-memory plan's own memory "
                                          "bound (the least-memory plan itself should be one)")
    else:
        choice = best("time", None, budget)
    if choice is None:
        if pinned and best("time") is None:
            raise InfeasiblePlanError("no plan satisfies the pinned strategies")
        least_choice = whole("footprint", None, None)
        least = memory_bytes(c, least_choice, mode)[1] if least_choice is not None else math.inf
        raise infeasible(least, floor_only=False)
    return choice


def brute_force(c: Candidates, spec: DeviceSpec, mode: str = "training", objective: str = "time",
                memory_budget: float | None = None, limit: int = 200_000
                ) -> tuple[Choice, Evaluation] | None:
    """Exhaustive minimum of ``evaluate`` (for tests on small graphs)."""
    names = list(c.nodes)
    sizes = [len(c.nodes[n].strategies) for n in names]
    if math.prod(sizes) > limit:
        raise ValueError(f"{math.prod(sizes)} assignments exceed the brute-force limit")
    budget = spec.memory_bytes if memory_budget is None else memory_budget
    feasible = []
    for combo in itertools.product(*(range(k) for k in sizes)):
        choice = dict(zip(names, combo))
        ev = evaluate(c, choice, spec, mode)
        if ev is not None and ev.memory_bytes <= budget:
            feasible.append((choice, ev))
    if objective == "memory" and feasible:
        least = min(ev.param_bytes for _, ev in feasible)
        total = sum(c.nodes[v].metas[0].nbytes for v in names if c.nodes[v].kind == "param")
        feasible = [(ch, ev) for ch, ev in feasible if ev.param_bytes <= least + MEMORY_SLACK * total + 1]
    return min(feasible, key=lambda f: f[1].time_s) if feasible else None
