"""Repeated layers in the solver: a run of identical layers is solved once per boundary state.

A *run* is a maximal sequence of consecutive layers of a stack (``Candidates.layers``, from
the module tree, see capture/stacks.py) whose candidates are identical relative to their neighbours
(``_shape``): the same ops, strategies, shapes and gradient flags node by node, reading their
own nodes, the previous layer's nodes at the same offsets, or the same outside values. The
values a layer passes to the next are its *carried* values (the residual stream).

Exactness. The cost of the whole graph splits along a run without approximation when:

- a carried value is read only by the next layer (the last layer's only outside the run),
  every other value of a layer only inside it, and the run's inputs only by its first layer:
  then every (producer, placement, consumer's need) group, which the cost model charges once,
  lies inside one layer (``_run``);
- a *shared* value (an outside value every layer reads: rotary tables, a mask) enters a
  layer only through the placements its consumers read it in. The outer program pays each
  such read's transition once for all layers (``Program._shared_reads``), and the table
  is made per set of reads available (``_table``), so the layers stay uncoupled whatever
  the shared value's own placement;
- no memory budget binds: the layers' memory adds up across the run, a knapsack
  constraint a boundary DP can't carry. ``solve.solve`` solves without the budget, and
  when the result breaks it (or the least-memory bound of objective="memory"), solves the
  whole graph instead when it is small enough to be solved exactly in reasonable time;
  on deeper models it prices memory instead (``lam``: time + lam * memory, a Lagrangian
  relaxation, searched over lam until the plan fits; see solve/solve.py). That result fits the
  budget but is not proven optimal.

Method. For the first layer of a run, a small program (program.Program over that layer, the
values it reads from the layer before as *external* values whose placement is pinned) gives
``T[A][a][b]``: the least cost of one layer given the set A of shared-value reads it may use,
the incoming carried values' placements a and its own carried values' placements b
(``_table``; HiGHS solves only the cells that monotonicity does not settle, a few hundred
per class, cached on the Candidates). A min-plus product along the run (``_chain``) gives for
every (A, a, b) the least cost of the whole run and the layer-by-layer states that reach it (a
run can alternate layouts; the DP allows that); entries dominated by one with fewer reads are
dropped. The rest of the graph is then one program in which each run is a *block*: one binary
per entry, tied to the placements of its inputs, paying for the reads it uses and feeding its
carried values to the nodes after it.

Before transformers 5.24 the rotary tables came out of an op without a rule (Replicate
only); since, they are ordinary pointwise ops with four placements each, and tabling per
shared *placement* and per subset of paid transitions (as this module once did) gave up on
Llama and solved the whole graph: 28.7 s for the 70B plan instead of 5 s.
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from autotp.core.placements import Placement
from autotp.candidates import Candidates, Value, NodeKind
from autotp.solve.program import SCALE_M, Program, bytes_bound

log = logging.getLogger(__name__)
Weight = Callable[[float, float], float]  # (seconds, parameter bytes) -> objective units

# a mixed run takes k of its L layers from the lean table for k on a grid of at most this
# many steps (solve_runs' lean, solve_runs_mixed): one outer-program entry per k and (a, b)
LEAN_STEPS = 32


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


Read = tuple[int, Placement, "Placement | None"]  # (index into Run.shared, need Q, gradient G; None: none)


@dataclass(frozen=True)
class Cell:
    cost: float
    time: float
    mem: float
    choice: tuple[int, ...]  # strategy index per node of the layer
    foot: float = 0.0  # memory per rank in program.SCALE_M units (state + kept activations), priced by lam
    reads: frozenset[Read] = frozenset()  # the placements in which this layer reads shared values


@dataclass(frozen=True)
class Entry:
    reads: frozenset[Read]  # the placements in which the run's layers read the shared values
    a: tuple[Placement, ...]
    b: tuple[Placement, ...]
    cost: float  # objective units, the sum of the cells'
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
        out.append((nc.kind, nc.op, nc.target if nc.kind is NodeKind.OP else None, tuple(nc.strategies),
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

MAX_READ_SETS = 1024  # sets of available shared-value reads tabled per run (else: whole graph)


def _reads(c: Candidates, prog, run: Run) -> dict[Read, dict[int, float]]:
    """Per way a layer can read a shared value ((index, Q, G): the placement its consumer
    needs and the gradient it sends back), the indicator of that read in the layer program."""
    unit = set(run.units[0])
    out: dict[Read, dict[int, float]] = {}
    for k, v in enumerate(run.shared):
        for name, slot in c.consumers.get(v, ()):
            if name not in unit:
                continue
            for s, st in enumerate(c.nodes[name].strategies):
                out.setdefault((k, *c.need(name, st, slot)), {})[prog.index[(name, s)]] = 1.0
    return out


def _read_sets(reads: list[Read], n_shared: int) -> list[frozenset[Read]] | None:
    """Every set of available reads with at least one read of each shared value (a layer must
    read every shared value somehow), largest first; None when there are too many."""
    per = [[r for r in reads if r[0] == k] for k in range(n_shared)]
    if math.prod(2 ** len(p) - 1 for p in per) > MAX_READ_SETS:
        return None
    choices = [[frozenset(comb) for n in range(1, len(p) + 1) for comb in itertools.combinations(p, n)]
               for p in per]
    sets = [frozenset().union(*combo) for combo in itertools.product(*choices)]
    return sorted(sets, key=len, reverse=True)


def _table(c: Candidates, spec, mode: str, run: Run, kind: str, weight: Weight,
           time_limit: float, lam: float = 0.0) -> dict[tuple, Cell] | None:
    """Least cost of the run's first layer per (avail, a, b): ``avail`` the set of reads of the
    shared values the layer may use (a read the outer program pays for once, however many
    layers use it), a and b the carried values' placements in and out; None when there are
    too many sets of reads to table. ``lam``: objective units per KB of memory (state + kept
    activations, in program.SCALE_M units) added to the weight.

    The shared values' own placement does not enter the table: a layer only sees the
    placement each consumer reads. Monotone: more available reads never cost more, so a cell
    whose optimum at a larger set only uses reads of a smaller one is that set's optimum too
    (and an infeasible cell stays infeasible with fewer reads): most cells are not solved."""
    key = ("table", run.key, spec.to_json(), mode, kind, lam)
    if key in c.cache:
        return c.cache[key]
    unit = run.units[0]
    inner = [(unit[o], oi) for o, oi in run.carried]
    a_dom = [tuple(dict.fromkeys(_placements(c, v) + _placements(c, w))) for v, w in zip(run.ins, inner)]
    b_dom = [_placements(c, w) for w in inner]
    # the layer's program is the same at every price (the Lagrangian searches table a class
    # once per price): built once per run (its variables are named by the run's own nodes:
    # another run of the class, e.g. after a pin, gets its own)
    pkey = ("layer program", unit, run.ins, spec.to_json(), mode, bool(lam))
    if pkey not in c.cache:
        c.cache[pkey] = Program(c, spec, mode, unit, externals=dict(zip(run.ins, a_dom)))
    prog = c.cache[pkey]
    reads = _reads(c, prog, run)
    sets = _read_sets(list(reads), len(run.shared))
    if sets is None:
        log.info("not solving layers once: %d ways to read %d shared values", len(reads), len(run.shared))
        c.cache[key] = None
        return None
    foot = np.zeros(0)
    if lam:
        prog.add_memory_variables()  # kept-activation variables; their KB in prog.foot
        foot = np.array([prog.foot.get(i, 0.0) for i in range(prog.n)])
    weights = [weight(t, m) + (lam * foot[i] if lam else 0.0)
               for i, (t, m) in enumerate(zip(prog.time, prog.mem))]
    # a cell is the layer program with bounds changed (Program.solve_bounded): the carried
    # values in pinned to a (lower 1), out placed b (the strategies with another output:
    # upper 0), the reads outside avail banned (upper 0)
    other: dict[tuple[int, Placement], list[int]] = {}
    for k, (name, oi) in enumerate(inner):
        for p in b_dom[k]:
            other[(k, p)] = [prog.index[(name, s)] for s, st in enumerate(c.nodes[name].strategies)
                             if st.outputs()[oi] != p]
    table: dict[tuple, Cell] = {}
    solved: dict[tuple, list[tuple[frozenset, Cell | None]]] = {}
    for a in itertools.product(*a_dom):
        pins = {prog.ext_index[(v, p)]: (1.0, 1.0) for v, p in zip(run.ins, a)}
        for b in itertools.product(*b_dom):
            done = solved.setdefault((a, b), [])
            out = {i: (0.0, 0.0) for k, p in enumerate(b) for i in other[(k, p)]}
            for avail in sets:
                known = next((cell for big, cell in done if avail <= big and
                              (cell is None or cell.reads <= avail)), False)
                if known is False:
                    banned = {i: (0.0, 0.0) for r in reads if r not in avail for i in reads[r]}
                    x = prog.solve_bounded(weights, {**banned, **out, **pins}, time_limit)
                    known = None
                    if x is not None:
                        ch = prog.choice(x)
                        known = Cell(float(np.dot(weights, x)), float(np.dot(prog.time, x)),
                                     float(np.dot(prog.mem, x)), tuple(ch[n] for n in unit),
                                     float(np.dot(foot, x)) if lam else 0.0,
                                     frozenset(r for r, ind in reads.items()
                                               if any(x[i] > 0.5 for i in ind)))
                    done.append((avail, known))
                if known is not None:
                    table[(avail, a, b)] = known
    c.cache[key] = table
    log.debug("layer table: %d nodes, %d read sets, %d cells, %d solved", len(unit), len(sets),
              len(table), sum(len(v) for v in solved.values()))
    return table


def _chain(run: Run, table: dict[tuple, Cell], lean: dict[tuple, Cell] | None = None,
           steps: int = LEAN_STEPS) -> Block:
    """Min-plus product of the layer table along the run: the least cost from each incoming
    state a to each outgoing state b, through any sequence of states in between, per set of
    available reads. With a ``lean`` table (memory priced higher), one entry per k = 0..L
    more: the first k layers from ``lean``, the others from ``table`` (so that a budget can be
    met by some layers). Entries are kept only when no entry with a subset of their reads
    costs as little (a read costs the outer program something or nothing, never less)."""
    length = len(run.units)
    ks = _lean_counts(length, steps) if lean is not None else (0,)
    by, lean_by = _by_reads(table), (_by_reads(lean) if lean is not None else {})
    seen: set[tuple] = set()
    best: dict[tuple, list[_Path]] = {}
    for avail in by:
        sig = (frozenset((a, b, id(cl)) for a, row in by[avail].items() for b, cl in row.items()),
               frozenset((a, b, id(cl)) for a, row in lean_by.get(avail, {}).items()
                         for b, cl in row.items()))
        if sig in seen:  # the same cells as a larger set of reads: the same entries
            continue
        seen.add(sig)
        for e in _chain_all(by[avail], lean_by.get(avail, {}), length, ks):
            group = best.setdefault((e.a, e.b), [])
            if any(_dominates(o, e) for o in group):
                continue
            group[:] = [o for o in group if not _dominates(e, o)]
            group.append(e)
    entries = [Entry(e.reads, e.a, e.b, e.cost, e.time, e.mem, e.cells(), e.foot)
               for g in best.values() for e in g]
    return Block(run.ins, run.shared, run.outs, entries)


def _lean_counts(length: int, steps: int = LEAN_STEPS) -> list[int]:
    """The numbers k of lean layers a mixed run may take: every k up to ``steps`` layers,
    else ``steps`` + 1 evenly spaced ones (0 and all included): the budget is then met to
    within length / steps layers' difference, and the outer program keeps one entry per
    k instead of one per layer count."""
    if length <= steps:
        return list(range(length + 1))
    return sorted({round(i * length / steps) for i in range(steps + 1)})


def _by_reads(table: dict[tuple, Cell]) -> dict[frozenset, dict[tuple, dict[tuple, Cell]]]:
    """``table`` as avail -> a -> b -> Cell."""
    out: dict[frozenset, dict[tuple, dict[tuple, Cell]]] = {}
    for (avail, a, b), cell in table.items():
        out.setdefault(avail, {}).setdefault(a, {})[b] = cell
    return out


def _dominates(o, e) -> bool:
    """``o`` is as good as ``e`` for any outer program: no more reads to pay, no more cost,
    time, parameter memory or footprint."""
    return (o.reads <= e.reads and o.cost <= e.cost and o.time <= e.time and o.mem <= e.mem
            and o.foot <= e.foot)


@dataclass(frozen=True)
class _Path:
    """A least-cost sequence of layer cells between two boundary states, its sums, and its
    cells as a tree of (left, right) pairs, flattened (``cells``) only for the entries kept."""
    a: tuple
    b: tuple
    cost: float
    time: float
    mem: float
    foot: float
    reads: frozenset
    tree: object  # a Cell, a (left, right) pair of trees, or () for no layers (skipped)

    def cells(self) -> tuple[Cell, ...]:
        out, stack = [], [self.tree]
        while stack:
            t = stack.pop()
            if isinstance(t, Cell):
                out.append(t)
            elif t:
                stack.extend((t[1], t[0]))
        return tuple(out)


def _join(p: _Path, q: _Path) -> _Path:
    """``p`` then ``q`` (``q.a`` is ``p.b``; either may be the empty path)."""
    return _Path(p.a, q.b, p.cost + q.cost, p.time + q.time, p.mem + q.mem, p.foot + q.foot,
                 p.reads | q.reads, (p.tree, q.tree))


def _one(a: tuple, b: tuple, cell: Cell) -> _Path:
    return _Path(a, b, cell.cost, cell.time, cell.mem, cell.foot, cell.reads, cell)


def _powers(step: dict[tuple, dict[tuple, Cell]], starts, length: int) -> list[dict]:
    """``out[m][a][b]``: the least-cost path of m layers of ``step`` from a to b, for every a
    in ``starts`` (the layer tables are the same for every layer of a run, so the m-layer
    paths extend the (m - 1)-layer ones by one cell: O(length x states^2) per start)."""
    out: list[dict] = [{a: {a: _Path(a, a, 0.0, 0.0, 0.0, 0.0, frozenset(), ())} for a in starts}]
    for _ in range(length):
        nxt: dict = {}
        for a, row in out[-1].items():
            reach: dict = {}
            for b, path in row.items():
                for b2, cell in step.get(b, {}).items():
                    cand = path.cost + cell.cost
                    if b2 not in reach or cand < reach[b2][0]:
                        reach[b2] = (cand, path, b, cell)
            nxt[a] = {b2: _join(path, _one(b, b2, cell)) for b2, (_, path, b, cell) in reach.items()}
        out.append(nxt)
    return out


def _chain_all(by_a: dict[tuple, dict[tuple, Cell]], lean_a: dict[tuple, dict[tuple, Cell]],
               length: int, ks) -> list[_Path]:
    """The least-cost path from each a to each b over ``length`` layers, the first k from
    ``lean_a`` and the rest from ``by_a``, for every k in ``ks``: the k-layer lean prefixes
    and the (length - k)-layer suffixes are each computed once (a min-plus power), and joined
    at the boundary state of least total cost."""
    states = set(by_a) | {b for row in by_a.values() for b in row} | set(lean_a) | \
        {b for row in lean_a.values() for b in row}
    suffix = _powers(by_a, states, length)  # suffix[m][s][b]
    prefix = _powers(lean_a, set(lean_a), max(ks)) if max(ks) > 0 else None
    entries: list[_Path] = []
    for k in ks:
        if k == 0:
            entries.extend(p for a in by_a for p in suffix[length][a].values())
            continue
        rest = suffix[length - k]
        for a0, row in prefix[k].items():
            ends: dict = {}
            for s, pre in row.items():
                for b, post in rest.get(s, {}).items():
                    cand = pre.cost + post.cost
                    if b not in ends or cand < ends[b][0]:
                        ends[b] = (cand, pre, post)
            entries.extend(_join(pre, post) for _, pre, post in ends.values())
    return entries


def solve_runs(c: Candidates, spec, mode: str, runs: list[Run], kind: str, weight: Weight,
               pinned: dict[str, int], time_limit: float, lam: float = 0.0,
               lean: tuple[float, float] | None = None) -> dict[str, int] | None:
    """The optimal Choice without a memory bound, each run solved as a block; None when no
    plan satisfies the pins. ``lam`` > 0 adds lam * (memory per rank in program.SCALE_M units) to the objective.
    ``lean`` = (lam_lean, budget bytes): each run may take its first k layers from the table
    priced at lam_lean and the rest from the one at lam, and the rest of the graph is solved
    for least time under the budget (memory per layer as the tables count it)."""
    tables = [_table(c, spec, mode, r, kind, weight, time_limit, lam) for r in runs]
    leans = [_table(c, spec, mode, r, kind, weight, time_limit, lean[0]) if lean else None
             for r in runs]
    keep = [i for i, t in enumerate(tables) if t is not None and (lean is None or leans[i] is not None)]
    runs = [runs[i] for i in keep]
    blocks = [_chain(runs[j], tables[i], leans[i]) for j, i in enumerate(keep)]
    inside = set().union(*(r.nodes for r in runs))
    prog = Program(c, spec, mode, [n for n in c.nodes if n not in inside], blocks=blocks)
    extra: list = []
    if lam:
        prog.add_memory_variables()  # memory of the nodes outside the runs (and kept-value variables)
        for block, ws in zip(blocks, prog.block_index):
            for e, i in zip(block.entries, ws):
                prog.foot[i] = prog.foot.get(i, 0.0) + e.foot
        if lean is not None:  # the budget is a row; the objective is time alone
            extra.append(({i: v for i, v in prog.foot.items() if v}, -np.inf, bytes_bound(lean[1])))
    price = lam if lean is None else 0.0
    weights = [weight(t, m) + price * prog.foot.get(i, 0.0)
               for i, (t, m) in enumerate(zip(prog.time, prog.mem))]
    return _solve_blocks(c, prog, runs, blocks, weights, extra, pinned, time_limit)


def solve_runs_mixed(c: Candidates, spec, mode: str, runs: list[Run], low: tuple[str, Weight],
                     high: tuple[str, Weight], objective: Weight, bound: float,
                     pinned: dict[str, int], time_limit: float, steps: int = LEAN_STEPS
                     ) -> dict[str, int] | None:
    """Parameter bytes <= ``bound`` by layers, between two Lagrangian corners: each run may take
    its first k layers (k on a grid of ``steps``) from the table of ``high`` (parameter bytes
    priced so that the plan keeps the bound) and the rest from that of ``low`` (priced so
    that it does not), and the rest of the graph is solved for least ``objective`` with the
    bound as a row. ``low`` and ``high`` are (table kind, weight) pairs; None when a run has
    no table or nothing fits."""
    tables = [_table(c, spec, mode, r, low[0], low[1], time_limit) for r in runs]
    leans = [_table(c, spec, mode, r, high[0], high[1], time_limit) for r in runs]
    if any(t is None for t in tables + leans):
        return None
    blocks = [_chain(r, t, lt, steps) for r, t, lt in zip(runs, tables, leans)]
    inside = set().union(*(r.nodes for r in runs))
    prog = Program(c, spec, mode, [n for n in c.nodes if n not in inside], blocks=blocks)
    row = ({i: m * SCALE_M for i, m in enumerate(prog.mem) if m}, -np.inf, bytes_bound(bound))
    weights = [objective(t, m) for t, m in zip(prog.time, prog.mem)]
    return _solve_blocks(c, prog, runs, blocks, weights, [row], pinned, time_limit)


def _solve_blocks(c: Candidates, prog: Program, runs: list[Run], blocks: list, weights: list[float],
                  extra: list, pinned: dict[str, int], time_limit: float) -> dict[str, int] | None:
    """Solve ``prog`` (the graph outside the runs, one block per run) and read every node's
    strategy back, the runs' from their chosen entries' cells."""
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

