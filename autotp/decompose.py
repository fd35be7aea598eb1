"""Repeated layers in the solver: a run of identical layers is solved once per boundary state.

A *run* is a maximal sequence of consecutive layers of a stack (``Candidates.layers``, from
the module tree, see layers.py) whose candidates are identical relative to their neighbours
(``_shape``): the same ops, strategies, shapes and gradient flags node by node, reading their
own nodes, the previous layer's nodes at the same offsets, or the same outside values. The
values a layer passes to the next are its *carried* values (the residual stream).

Exactness. The cost of the whole graph splits along a run without approximation when:

- a carried value is read only by the next layer (the last layer's only outside the run),
  every other value of a layer only inside it, and the run's inputs only by its first layer:
  then every (producer, placement, consumer's need) group, which the cost model charges once,
  lies inside one layer (``_run``);
- every transition from a *shared* value (an outside value every layer reads: rotary
  tables, a mask) into the layers costs nothing or is impossible, whatever the shared
  value's placement: a paid transition there is charged once for all layers, which would
  couple them (``_shared_free``; if it fails the run is not used);
- no memory budget binds: the layers' memory adds up across the run, a knapsack
  constraint a boundary DP can't carry. ``solver.solve`` solves without the budget, and
  when the result breaks it (or the least-memory bound of objective="memory"), solves the
  whole graph instead when it is small enough to be solved exactly in reasonable time;
  on deeper models it prices memory instead (``lam``: time + lam * memory, a Lagrangian
  relaxation, searched over lam until the plan fits; see solver.py). That result fits the
  budget but is not proven optimal.

Method. For the first layer of a run, a small program (solver._Program over that layer, the
values it reads from outside as *external* values whose placement is pinned) gives
``T[s][a][b]``: the least cost of one layer given the shared values' placements s, the
incoming carried values' placements a and its own carried values' placements b
(``_table``; one HiGHS solve per (s, a, b), a few dozen per class, cached on the
Candidates). A min-plus product along the run (``_chain``) gives for every (s, a, b) the
least cost of the whole run and the layer-by-layer states that reach it (a run can
alternate layouts; the DP allows that). The rest of the graph is then one program in which
each run is a *block*: one binary per (s, a, b) entry, tied to the placements of its
inputs and feeding its carried values to the nodes after it.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .placements import Placement
from .strategies import Candidates, Value

log = logging.getLogger(__name__)
Weight = Callable[[float, float], float]  # (seconds, parameter bytes) -> objective units


@dataclass(frozen=True)
class Run:
    units: tuple[tuple[str, ...], ...]  # the layers' decision nodes, aligned by offset
    carried: tuple[tuple[int, int], ...]  # (offset, output index) the next layer reads
    ins: tuple[Value, ...]  # the values of the layer before the run its first layer reads
    shared: tuple[Value, ...]  # outside values every layer reads
    key: tuple  # identifies the class for the table cache

    @property
    def nodes(self) -> set[str]:
        return {n for u in self.units for n in u}

    @property
    def outs(self) -> tuple[Value, ...]:
        return tuple((self.units[-1][o], oi) for o, oi in self.carried)


@dataclass(frozen=True)
class Cell:
    cost: float
    time: float
    mem: float
    choice: tuple[int, ...]  # strategy index per node of the layer
    foot: float = 0.0  # memory per rank in solver.SCALE_M units (state + kept activations), priced by lam


@dataclass(frozen=True)
class Entry:
    sigma: tuple[Placement, ...]
    paid: frozenset[tuple]  # transitions from shared values the layers use, paid once
    a: tuple[Placement, ...]
    b: tuple[Placement, ...]
    time: float
    mem: float
    cells: tuple[Cell, ...]  # per layer of the run
    foot: float = 0.0


@dataclass
class Block:
    ins: tuple[Value, ...]
    shared: tuple[Value, ...]
    outs: tuple[Value, ...]
    entries: list[Entry]


# ---------------------------------------------------------------------------------------------
# runs

def _shape(c: Candidates, unit: tuple[str, ...], prev: tuple[str, ...] | None) -> tuple:
    pos = {n: i for i, n in enumerate(unit)}
    ppos = {n: i for i, n in enumerate(prev or ())}
    out = []
    for name in unit:
        nc = c.nodes[name]
        refs = tuple(("self", pos[p], oi) if p in pos else ("prev", ppos[p], oi) if p in ppos
                     else ("out", p, oi) for p, oi in nc.slots)
        out.append((nc.kind, nc.op, nc.target if nc.kind == "op" else None, tuple(nc.strategies),
                    nc.metas, name in c.needs_grad, nc.fallback, refs))
    return tuple(out)


def _placements(c: Candidates, v: Value) -> tuple[Placement, ...]:
    return tuple(dict.fromkeys(st.outputs()[v[1]] for st in c.nodes[v[0]].strategies))


def _run(c: Candidates, units: list[tuple[str, ...]], s: int, e: int, shape: tuple) -> Run | None:
    """The run of layers s..e, or None when a value crosses layers other than as carried."""
    if s == 0:
        return None
    refs = [r for node in shape for r in node[-1]]
    carried = tuple(sorted({(r[1], r[2]) for r in refs if r[0] == "prev"}))
    shared = tuple(dict.fromkeys((r[1], r[2]) for r in refs if r[0] == "out"))
    ins = tuple((units[s - 1][o], oi) for o, oi in carried)
    kset = set(carried)
    for i in range(s, e + 1):
        here = set(units[i])
        nxt = set(units[i + 1]) if i < e else set()
        for off, name in enumerate(units[i]):
            for oi in range(len(c.nodes[name].metas)):
                cons = [n for n, _ in c.consumers.get((name, oi), ())]
                if (off, oi) in kset:
                    ok = all(n in nxt for n in cons) if i < e else not any(n in here for n in cons)
                else:
                    ok = all(n in here for n in cons)
                if not ok:
                    return None
    first = set(units[s])
    for k, v in enumerate(ins):
        if not all(n in first for n, _ in c.consumers.get(v, ())):
            return None
        o, oi = carried[k]
        inner = units[s][o]
        if (c.nodes[v[0]].metas[oi], c.nodes[v[0]].kind, v[0] in c.needs_grad) != \
                (c.nodes[inner].metas[oi], c.nodes[inner].kind, inner in c.needs_grad):
            return None
    key = (shape, tuple(_placements(c, v) for v in ins), shared)
    return Run(tuple(units[s:e + 1]), carried, ins, shared, key)


def find_runs(c: Candidates, pinned: set[str] | frozenset[str] = frozenset()) -> list[Run]:
    """Runs of two or more identical consecutive layers; layers with pinned nodes are left out."""
    runs: list[Run] = []
    for units in c.layers:
        shapes = [None if not u or pinned & set(u) else _shape(c, u, units[i - 1] if i else None)
                  for i, u in enumerate(units)]
        i = 0
        while i < len(units):
            j = i
            while shapes[i] is not None and j + 1 < len(units) and shapes[j + 1] == shapes[i]:
                j += 1
            for start in (i, i + 1):  # the first layer may read a different producer
                run = _run(c, list(units), start, j, shapes[i]) if j - start >= 1 else None
                if run is not None:
                    runs.append(run)
                    break
            i = j + 1
    # a run's inputs must come from outside every run or from another run's carried values;
    # shared values from outside every run
    while True:
        inside = {n: r for r in runs for n in r.nodes}
        outs = {v for r in runs for v in r.outs}
        bad = [r for r in runs if any(v[0] in inside and v not in outs for v in r.ins) or
               any(v[0] in inside for v in r.shared)]
        if not bad:
            return runs
        runs = [r for r in runs if r not in bad]


# ---------------------------------------------------------------------------------------------
# one layer: the table of least costs per boundary state

MAX_PAID_SETS = 16  # per shared placement: subsets of paid shared transitions tabled


def _table(c: Candidates, spec, mode: str, run: Run, kind: str, weight: Weight,
           time_limit: float, lam: float = 0.0) -> dict[tuple, Cell] | None:
    """Least cost of the run's first layer per (sigma, paid, a, b); None when the shared
    values have too many paid transitions to table. ``lam``: objective units per MB of memory
    (state + kept activations, in solver.SCALE_M units) added to the weight."""
    from .solver import _Program
    key = ("table", run.key, spec.to_json(), mode, kind, lam)
    if key in c.cache:
        return c.cache[key]
    unit = run.units[0]
    inner = [(unit[o], oi) for o, oi in run.carried]
    a_dom = [tuple(dict.fromkeys(_placements(c, v) + _placements(c, w))) for v, w in zip(run.ins, inner)]
    b_dom = [_placements(c, w) for w in inner]
    s_dom = [_placements(c, v) for v in run.shared]
    prog = _Program(c, spec, mode, unit, externals={**dict(zip(run.ins, a_dom)),
                                                    **dict(zip(run.shared, s_dom))})
    foot = np.zeros(0)
    if lam:
        prog.budget_rows(None)  # adds the kept-activation variables: their MB in prog.foot
        foot = np.array([prog.foot.get(i, 0.0) for i in range(prog.n)])
    base = [weight(t, m) + (lam * foot[i] if lam else 0.0)
            for i, (t, m) in enumerate(zip(prog.time, prog.mem))]
    pick: dict[tuple[int, Placement], dict[int, float]] = {}
    for k, (name, oi) in enumerate(inner):
        for p in b_dom[k]:
            pick[(k, p)] = {prog.index[(name, s)]: 1.0 for s, st in enumerate(c.nodes[name].strategies)
                            if st.outputs()[oi] == p}
    table: dict[tuple, Cell] = {}
    shared_at = {v: k for k, v in enumerate(run.shared)}
    for sigma in itertools.product(*s_dom):
        # transitions from shared values that cost something: paid once for the whole run,
        # so the table is made per set of them allowed (and paid by the block, not per layer)
        keys = [k for k in prog.zkey if k[0] in shared_at and k[1] == sigma[shared_at[k[0]]]]
        if 2 ** len(keys) > MAX_PAID_SETS:
            log.info("not solving layers once: %d paid transitions from shared values", len(keys))
            c.cache[key] = None
            return None
        for paid in itertools.chain.from_iterable(itertools.combinations(keys, r)
                                                  for r in range(len(keys) + 1)):
            weights = list(base)
            for k in paid:
                weights[prog.zkey[k]] = 0.0
            banned = [({prog.zkey[k]: 1.0}, 0.0, 0.0) for k in keys if k not in paid]
            for a in itertools.product(*a_dom):
                pins = banned + [({prog.ext_index[(v, p)]: 1.0}, 1.0, 1.0)
                                 for v, p in zip(run.shared + run.ins, sigma + a)]
                for b in itertools.product(*b_dom):
                    x = prog.solve(weights, pins + [(pick[(k, p)], 1.0, 1.0) for k, p in enumerate(b)],
                                   time_limit)
                    if x is None:
                        continue
                    ch = prog.choice(x)
                    free = sum(x[prog.zkey[k]] * prog.time[prog.zkey[k]] for k in paid)
                    table[(sigma, frozenset(paid), a, b)] = Cell(
                        float(np.dot(weights, x)), float(np.dot(prog.time, x)) - free,
                        float(np.dot(prog.mem, x)), tuple(ch[n] for n in unit),
                        float(np.dot(foot, x)) if lam else 0.0)
    c.cache[key] = table
    log.debug("layer table: %d nodes, %d cells", len(unit), len(table))
    return table


def _chain(run: Run, table: dict[tuple, Cell], lean: dict[tuple, Cell] | None = None) -> Block:
    """Min-plus product of the layer table along the run: the least cost from each incoming
    state a to each outgoing state b, through any sequence of states in between. With a
    ``lean`` table (memory priced higher), one entry per k = 0..L more: the first k layers
    from ``lean``, the others from ``table`` (so that a budget can be met by some layers)."""
    if lean is not None:
        blocks = [_chain_k(run, table, lean, k) for k in range(len(run.units) + 1)]
        return Block(run.ins, run.shared, run.outs, [e for b in blocks for e in b.entries])
    return _chain_k(run, table, table, 0)


def _chain_k(run: Run, table: dict[tuple, Cell], lean: dict[tuple, Cell], k: int) -> Block:
    entries = []
    by_sa: dict[tuple, dict] = {}
    lean_sa: dict[tuple, dict] = {}
    for (sigma, paid, a, b), cell in table.items():
        by_sa.setdefault((sigma, paid, a), {})[b] = cell
    for (sigma, paid, a, b), cell in lean.items():
        lean_sa.setdefault((sigma, paid, a), {})[b] = cell
    for (sigma, paid, a0), first in (lean_sa if k > 0 else by_sa).items():
        # best[b] = (cost, cells) over the layers so far
        best = {b: (cell.cost, (cell,)) for b, cell in first.items()}
        for layer in range(1, len(run.units)):
            nxt: dict = {}
            src = lean_sa if layer < k else by_sa
            for b, (cost, cells) in best.items():
                for b2, cell in src.get((sigma, paid, b), {}).items():
                    total = cost + cell.cost
                    if b2 not in nxt or total < nxt[b2][0]:
                        nxt[b2] = (total, cells + (cell,))
            best = nxt
        for b, (cost, cells) in best.items():
            entries.append(Entry(sigma, paid, a0, b, sum(x.time for x in cells),
                                 sum(x.mem for x in cells), cells, sum(x.foot for x in cells)))
    return Block(run.ins, run.shared, run.outs, entries)


def solve_runs(c: Candidates, spec, mode: str, runs: list[Run], kind: str, weight: Weight,
               pinned: dict[str, int], time_limit: float, lam: float = 0.0,
               lean: tuple[float, float] | None = None) -> dict[str, int] | None:
    """The optimal Choice without a memory bound, each run solved as a block; None when no
    plan satisfies the pins. ``lam`` > 0 adds lam * (memory per rank in solver.SCALE_M units) to the objective.
    ``lean`` = (lam_lean, budget bytes): each run may take its first k layers from the table
    priced at lam_lean and the rest from the one at lam, and the rest of the graph is solved
    for least time under the budget (memory per layer as the tables count it)."""
    from .solver import _Program, bytes_bound
    tables = [_table(c, spec, mode, r, kind, weight, time_limit, lam) for r in runs]
    leans = [_table(c, spec, mode, r, kind, weight, time_limit, lean[0]) if lean else None
             for r in runs]
    keep = [i for i, t in enumerate(tables) if t is not None and (lean is None or leans[i] is not None)]
    runs = [runs[i] for i in keep]
    blocks = [_chain(runs[j], tables[i], leans[i]) for j, i in enumerate(keep)]
    inside = set().union(*(r.nodes for r in runs))
    prog = _Program(c, spec, mode, [n for n in c.nodes if n not in inside], blocks=blocks)
    extra: list = []
    if lam:
        prog.budget_rows(None)  # memory of the nodes outside the runs (and kept-value variables)
        for block, ws in zip(blocks, prog.block_index):
            for e, i in zip(block.entries, ws):
                prog.foot[i] = prog.foot.get(i, 0.0) + e.foot
        if lean is not None:  # the budget is a row; the objective is time alone
            extra.append(({i: v for i, v in prog.foot.items() if v}, -np.inf, bytes_bound(lean[1])))
    price = lam if lean is None else 0.0
    weights = [weight(t, m) + price * prog.foot.get(i, 0.0)
               for i, (t, m) in enumerate(zip(prog.time, prog.mem))]
    pins = [({prog.index[(n, s)]: 1.0}, 1.0, 1.0) for n, s in pinned.items()]
    x = prog.solve(weights, pins + extra, time_limit)
    if x is None:
        return None
    choice = prog.choice(x)
    for run, block, ws in zip(runs, blocks, prog.block_index):
        entry = block.entries[int(np.argmax(x[ws]))]
        for unit, cell in zip(run.units, entry.cells):
            choice.update(zip(unit, cell.choice))
    return {n: choice[n] for n in c.nodes}

