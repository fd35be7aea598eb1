"""Solver: one strategy per node, minimum predicted step time (or least parameter memory,
then least time) under the memory budget. Exact: a 0/1 integer program solved by HiGHS
(scipy.optimize.milp), in the formulation of Alpa's intra-operator pass:

    x[v,s] in {0,1}, sum_s x[v,s] = 1               one strategy per node  (Program._one_hot)
    e[u,P] in {0,1}, sum_P e[u,P] = 1               an outside value's placement (_externals)
    w[b,k] in {0,1}, sum_k w[b,k] = 1, ins equal producers' outputs       (Program._blocks)
    R[b,u,Q,G] = sum_{k reads (u,Q,G)} w[b,k]; y[P] <= X(P), sum_P y = R (_shared_reads)
    minimize   sum compute(v,s) x[v,s] + sum cost(k) z[k]            (solve.py, _weight)
    per edge u -> (c, slot), with X(P) = sum_{s: out(s)=P} x[u,s] and
    Y(Q,G) = sum_{t: need(t)=(Q,G)} x[c,t]:                                     (Program._edges)
      y[P,Q,G] >= 0 for possible (P,Q,G) only,  sum_(Q,G) y = X(P),  sum_P y = Y(Q,G)
      z[u,P,Q,G] >= y[P,Q,G]              (one z per key: paid once for all consumers)
    memory per rank <= memory budget     (Program.add_memory_variables, Program.memory_rows)
      training:  sum state_bytes(v,s) x[v,s] + sum kept(u,Q) k[u,Q] <= budget, where
                 k[u,Q] >= sum_{t: need(t)=Q} x[c,t] for every op c that keeps value u
      inference: sum param_bytes(v,s) x[v,s] + U m <= budget, and for every op v
                 sum_s working_bytes(v,s) x[v,s] <= U m    (m in [0, 1]: the peak is a max)

With binary x the marginal rows make y the product X(P) * Y(Q,G), so this is Alpa's program;
its LP relaxation is the local-marginal one, tight enough that HiGHS usually finds an
integral LP optimum (``Program.solve`` tries the LP first and accepts it when integral).
The older ``z >= X(P) + Y(Q,G) - 1`` relaxation let HiGHS branch past its time limit on 32
Llama layers. A z variable is shared by every consumer of one producer value that needs the
same (Q, G): the rewrite issues one collective for all of them, and the model charges it once.

Runs of identical layers (solve/runs.py) are solved once per boundary state and joined by a
min-plus product; ``solve`` uses that when the memory bound does not bind and solves the
whole program when it does, so the result is the optimum either way.
``objective="memory"`` is lexicographic: first least parameter (and KV cache) bytes (ties broken
by time at a byte per second, to within the solvers' tolerances), then least time among
plans within MEMORY_SLACK (0.1%) of a rank's even share (total / world size) above that least; both under the
budget. Activations enter only through the budget: when it binds, the solver keeps fewer of
them (a sequence-split norm region keeps 1/n of its outputs), never to save time. ``evaluate`` is
the one definition of a plan's cost; the program is its linearization, and ``brute_force``
(tests) enumerates it directly.
"""
from __future__ import annotations

import logging
import math
import os
import sys
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np
import highspy
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from autotp.cost.model import local_bytes, pad_factor, transition, transition_time
from autotp.cost.devices import DeviceSpec
from autotp.errors import AutoTPError, AutoTPInternalError
from autotp.core.placements import Placement
from autotp.candidates import Candidates, Value, NodeKind
from autotp.cost.evaluate import Choice, _dp_time, _edge_mode, _footprint, keepers, _node_time, _working, held_bytes
log = logging.getLogger(__name__)


class Program:
    """The 0/1 program over some nodes of Candidates, built once and solved with different
    objectives and pins. Variables, in order of creation:

    x[v, s]  binary, one per (node, strategy) of ``names``; one-hot per node.
    e[u, P]  binary, one per placement P of an *external* value (its producer is not in the
             program; a caller pins one): one-hot per value.
    w[b, k]  binary, one per entry k of a block (a run of identical layers solved separately,
             see solve/runs.py); one-hot per block.
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
        self._warm: tuple | None = None  # (weights, HiGHS instance, changed bounds): solve_bounded
        self.peak: int | None = None  # inference peak-activation variable (add_memory_variables)
        self.peak_scale = 0.0
        self.kept: dict[int, float] | None = None  # training: kept-activation variables
        self.foot: dict[int, float] = {}
        self._memory = False  # add_memory_variables has run
        groups: dict[Value, dict[Placement, list[int]]] = defaultdict(lambda: defaultdict(list))
        self._one_hot(groups)
        self.ext_index: dict[tuple[Value, Placement], int] = {}
        self._externals(externals or {}, groups)
        self.block_index: list[list[int]] = []
        self._blocks(blocks, groups)
        self._edges(groups, set(self.names))
        for b, ws in zip(blocks, self.block_index):
            self._shared_reads(b, ws, groups)
        self.n = len(self.time)

    def _one_hot(self, groups: dict) -> None:
        """x[v, s] binary with sum_s x[v, s] = 1 for every node v of the program; its
        coefficients are the strategy's compute (+ data-parallel gradient sync) time and
        parameter bytes. Records X(P) of each output: the x whose strategy outputs P."""
        c, spec, mode = self.c, self.spec, self.mode
        for name in self.names:
            nc = c.nodes[name]
            row = {}
            for s, st in enumerate(nc.strategies):
                i = self._var(_node_time(c, name, s, spec, mode) + _dp_time(c, name, s, spec, mode),
                              held_bytes(c, name, s), 1)
                self.index[(name, s)] = i
                row[i] = 1.0
                for oi, p in enumerate(st.outputs()):
                    groups[(name, oi)][p].append(i)
            self.rows.append((row, 1.0, 1.0))

    def _externals(self, externals: dict[Value, Sequence[Placement]], groups: dict) -> None:
        """e[u, P] binary with sum_P e[u, P] = 1 for a value produced outside the program (a
        caller pins one P); X(P) of u is e[u, P]."""
        for value, places in externals.items():
            row = {}
            for p in dict.fromkeys(places):
                i = self._var(0.0, 0.0, 1)
                self.ext_index[(value, p)] = i
                groups[value][p].append(i)
                row[i] = 1.0
            self.rows.append((row, 1.0, 1.0))

    def _blocks(self, blocks: Sequence, groups: dict) -> None:
        """w[b, k] binary with sum_k w[b, k] = 1 per block (a run of identical layers, one
        entry per (reads, a, b) state, costed by solve/runs.py); X(P) of a carried value out of
        the block is the w of the entries whose state b gives it P; and the block's inputs
        equal their producers' outputs: for every P, sum_{k: a_k = P} w[b, k] = X_in(P)."""
        for b in blocks:
            ws = [self._var(e.time, e.mem, 1) for e in b.entries]
            self.block_index.append(ws)
            self.rows.append(({i: 1.0 for i in ws}, 1.0, 1.0))
            for k, value in enumerate(b.outs):
                for e, i in zip(b.entries, ws):
                    groups[value][e.b[k]].append(i)
        for b, ws in zip(blocks, self.block_index):
            for k, value in enumerate(b.ins):
                by_p: dict[Placement, dict[int, float]] = defaultdict(dict)
                for e, i in zip(b.entries, ws):
                    by_p[e.a[k]][i] = 1.0
                for p, xs in groups[value].items():
                    for i in xs:
                        by_p[p][i] = by_p[p].get(i, 0.0) - 1.0
                for row in by_p.values():
                    self.rows.append((row, 0.0, 0.0))

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

    def add_memory_variables(self) -> dict[int, float]:
        """Adds, once, what memory per rank needs beyond the x variables (training: the
        kept-activation variables of ``_kept_vars``; inference: the peak variable ``m`` and its
        rows, sum_s working(v, s) x[v, s] <= U m, with U an upper bound of any op's working set
        so that m is in [0, 1]) and sets ``foot``: memory per rank in KB (SCALE_M) per variable,
        state included. Returns ``foot``. Changes the program: call before ``solve``."""
        c, mode = self.c, self.mode
        foot = {i: _footprint(c, n, s, mode) * SCALE_M for (n, s), i in self.index.items()}
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
        self.foot = foot
        self._memory = True
        return foot

    def memory_rows(self, budget: float | None) -> list[tuple[dict[int, float], float, float]]:
        """The row sum foot[i] * v[i] <= budget (KB), for ``solve``'s ``extra``; none for a
        None budget. Pure: the variables must exist (``add_memory_variables``)."""
        if not self._memory:
            raise AutoTPInternalError("Program.memory_rows before add_memory_variables")
        if budget is None:
            return []
        return [({i: v for i, v in self.foot.items() if v}, -np.inf, bytes_bound(budget))]

    def _kept_vars(self) -> dict[int, float]:
        """Training activations: KB (SCALE_M) per variable. A value one op keeps puts its bytes
        (at the placement that op needs) on the op's strategies; a value several ops keep gets a
        variable k[u, Q] >= each keeper's indicator of needing Q, so it is counted once per
        placement however many ops keep it."""
        c = self.c
        out: dict[int, float] = defaultdict(float)
        for value, keep in keepers(c, self.mode).items():
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
        shape = c.nodes[value[0]].metas[value[1]].shape
        t = transition(p, q, g, c.nodes[value[0]].kind is NodeKind.PARAM,
                       c.nodes[value[0]].kind is NodeKind.STATE, shape, c.world_size)
        if t is None:
            return None
        pad = pad_factor((p, q, g), shape, c.world_size)
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
                    by_t[c.need(name, st, slot)].append(self.index[(name, s)])
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
        if lp.x is not None and lp.status == 0 and self._integral(lp.x):
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

    def solve_bounded(self, weights: Sequence[float], fixed: dict[int, tuple[float, float]],
                      time_limit: float) -> np.ndarray | None:
        """``solve`` with some variables' bounds changed (``fixed``: index -> (lower, upper)),
        for many solves of one program that differ only there (the layer tables of runs.py:
        a pinned external is lower 1, a banned read or a strategy with another output upper 0).
        The LP relaxation stays loaded in one HiGHS instance and is re-solved from the last
        basis (warm start: a cell costs a few simplex iterations instead of a fresh solve);
        when its optimum is not integral, ``_rounded`` or else the MILP of ``solve`` decides.
        New weights load a new instance (keeping the basis across prices measured no faster)."""
        w = np.asarray(weights, dtype=float)
        if self._warm is None or self._warm[0] is not weights:
            self._warm = (weights, _lp_instance(self, w), {})
        _, h, changed = self._warm
        reset = [i for i in changed if i not in fixed]
        if reset:
            h.changeColsBounds(len(reset), np.asarray(reset, dtype=np.int32),
                               np.zeros(len(reset)), np.ones(len(reset)))
        if fixed:
            idx = np.fromiter(fixed, dtype=np.int32, count=len(fixed))
            lo = np.fromiter((fixed[i][0] for i in fixed), dtype=float, count=len(fixed))
            hi = np.fromiter((fixed[i][1] for i in fixed), dtype=float, count=len(fixed))
            h.changeColsBounds(len(fixed), idx, lo, hi)
        self._warm = (weights, h, dict(fixed))
        h.setOptionValue("time_limit", float(time_limit))
        h.run()
        status = h.getModelStatus()
        if status == highspy.HighsModelStatus.kInfeasible:
            return None
        if status == highspy.HighsModelStatus.kOptimal:
            x = np.asarray(h.getSolution().col_value)
            if self._integral(x):
                return x
            x = self._rounded(h, x, fixed, h.getInfo().objective_function_value)
            if x is not None:
                return x
        rows = [({i: 1.0}, lo, hi) for i, (lo, hi) in fixed.items()]
        return self.solve(weights, rows, time_limit)

    def _rounded(self, h: "highspy.Highs", x: np.ndarray, fixed: dict[int, tuple[float, float]],
                 bound: float) -> np.ndarray | None:
        """A fractional LP optimum rounded (each node's largest x, ties to the first strategy)
        and checked: the LP with those x fixed, when it costs no more than the relaxation's
        optimum ``bound`` (a lower bound of the program's), is an optimum of the program. On
        fused devices a chain of free elementwise ops ties Replicate with a split exactly, and
        the relaxation's optimum is then half of each: DeepSeek-V3's layer table had 52 such
        cells, each a MILP. None when the rounding costs more (the MILP decides)."""
        if self.block_index:
            return None
        pick = dict(fixed)
        for name in self.names:
            idx = [self.index[(name, s)] for s in range(len(self.c.nodes[name].strategies))]
            best = max(idx, key=lambda i: (x[i], -i))
            pick.update({i: ((1.0, 1.0) if i == best else (0.0, 0.0)) for i in idx})
        ids = np.fromiter(pick, dtype=np.int32, count=len(pick))
        h.changeColsBounds(len(pick), ids, np.fromiter((v[0] for v in pick.values()), dtype=float),
                           np.fromiter((v[1] for v in pick.values()), dtype=float))
        self._warm = (self._warm[0], h, pick)  # the next solve resets what ``fixed`` lacks
        h.run()
        if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
            return None
        if h.getInfo().objective_function_value > bound + 1e-9 * max(1.0, abs(bound)):
            return None
        x = np.asarray(h.getSolution().col_value)
        return x if self._integral(x) else None

    def _integral(self, x: np.ndarray) -> bool:
        """Whether every binary of ``x`` is 0 or 1 (within 1e-9)."""
        xi = x[np.asarray(self.integral, dtype=bool)]
        return bool(np.all(np.minimum(xi, 1.0 - xi) < 1e-9))

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


def _lp_instance(prog: Program, w: np.ndarray) -> "highspy.Highs":
    """A HiGHS instance holding the LP relaxation of ``prog`` (its rows, bounds [0, 1],
    objective ``w``), quiet."""
    if prog._base is None:  # the rows in COO form, as Program.solve caches them
        prog._base = prog._coo(prog.rows)
    r, cidx, vals, lb, ub = prog._base
    a = coo_matrix((vals, (r, cidx)), shape=(len(prog.rows), prog.n)).tocsc()
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = prog.n, len(prog.rows)
    lp.col_cost_ = w
    lp.col_lower_, lp.col_upper_ = np.zeros(prog.n), np.ones(prog.n)
    lp.row_lower_, lp.row_upper_ = np.asarray(lb, dtype=float), np.asarray(ub, dtype=float)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = a.indptr, a.indices, a.data
    h = _highs()
    h.setOptionValue("output_flag", False)
    h.passModel(lp)
    return h


_BANNER_SHOWN = False


def _highs() -> "highspy.Highs":
    """A HiGHS instance. The first one a process makes prints HiGHS' banner to the C-level
    stdout before any option can turn output off: that one is made with file descriptor 1
    pointed at /dev/null, so that every rank of a job does not print two lines of licence text."""
    global _BANNER_SHOWN
    if _BANNER_SHOWN:
        return highspy.Highs()
    _BANNER_SHOWN = True
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
        saved = os.dup(1)
    except OSError:  # no fd 1 to point elsewhere: the banner cannot reach anyone either
        return highspy.Highs()
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            h = highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    return h
