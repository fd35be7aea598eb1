"""Solve: the optimal Choice of one strategy per node for a Candidates, by the program of
program.py over the whole graph, by runs of identical layers (runs.py) when no memory bound
binds, or by pricing memory per layer on deep models whose budget binds; the
InfeasiblePlanError that says what would fit; ``brute_force`` for the tests.
The formulation and its exactness are stated in program.py."""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from autotp.cost.model import MODES
from autotp.cost.devices import DeviceSpec
from autotp.errors import AutoTPError, AutoTPInternalError, InfeasiblePlanError
from autotp.candidates import Candidates, NodeKind
from autotp.solve.runs import find_runs, solve_runs, solve_runs_mixed
from autotp.cost.evaluate import Choice, Evaluation, evaluate, held_bytes, memory_bytes, memory_floor
from autotp.solve.program import SCALE_M, SCALE_MB, SCALE_T, Program, bytes_bound


log = logging.getLogger(__name__)


# objective="memory" accepts plans within this fraction of a rank's even share of the
# parameters (total / world size) above the least-memory plan: it keeps a norm's few weights
# whole rather than gather activations for them. (It was a fraction of the total, which let a
# plan at world 16 hold 1.6% more than its share for a little time.)
MEMORY_SLACK = 1e-3
TIE_BREAK_US_PER_MB = 1e-4
TIE_BREAK_KB_PER_S = 1e-3


# graphs larger than this whose memory budget binds are planned by pricing memory per layer
# (a Lagrangian search, not proven optimal) instead of one exact program over the whole graph,
# which HiGHS does not finish in minutes beyond a few thousand nodes with a binding budget
WHOLE_GRAPH_NODES = 1500
LAGRANGE_STEPS = 16
LEAN_FACTOR = 4.0
# the Lagrangian search of a memory budget (_priced_search) stops bisecting its price when the
# two corners are this close, and a mixed program between them (some layers priced as at
# either corner) does the rest: at 1.3 Llama-405B pp 16 x tp 8 gets the plan of a 1.02
# bracket (4.181 s) in fewer table solves (benchmarks/pipeline.py)
PRICE_RATIO = 1.3
# _priced_bound does not bisect at all (a ratio above the price ladder's x8 step): the
# mixed program between the two corners found the same plans as a 1.3 bracket on the
# frontier shapes (DeepSeek-V3 61.068 ms, Qwen3-235B 41.663 ms; the bisected corners' own
# plans were 61.52 and 43.05 ms, never the winners) in 3 fewer table solves each
BOUND_RATIO = 9.0
# and mixes its corners on a grid of 16 lean-layer counts per run (runs.LEAN_STEPS, 32, for
# _priced_search): the same plans on DeepSeek-V3 and Qwen3-235B, the mixed program (one
# knapsack row, a MILP) 1.7 s instead of 2.7 s and 0.3 s instead of 0.9 s. (At 16 the budget
# search's Llama-405B pp 16 x tp 8 plan is worse: 4.367 s against 4.181 s.)
BOUND_LEAN_STEPS = 16


def _weight(kind: str) -> Callable[[float, float], float]:
    """Objective units of (seconds, parameter bytes): "memory" minimizes parameter KB, ties
    going to less time at a byte per second (without it, a layer's table cells tie and their
    LP relaxations are fractional: 45 MILPs of Qwen3-235B's 637 cells, 1.4 s);
    "time" minimizes microseconds, ties (a weight stored whole and sliced for use vs stored
    split) going to less parameter memory at 0.1 us per GB, far below any collective."""
    if kind == "memory":
        return lambda t, m: m * SCALE_M + TIE_BREAK_KB_PER_S * t
    return lambda t, m: t * SCALE_T + TIE_BREAK_US_PER_MB * m * SCALE_MB


def _mem(c: Candidates, choice: Choice) -> float:
    return sum(held_bytes(c, n, s) for n, s in choice.items())


@dataclass
class _Problem:
    """One solve's inputs, shared by the steps below; ``program`` is the whole-graph Program,
    built the first time a step needs it (its memory variables are added once)."""
    c: Candidates
    spec: DeviceSpec
    mode: str
    pinned: dict[str, int]
    runs: list
    time_limit: float
    budget: float
    program: Program | None = None


def solve(c: Candidates, spec: DeviceSpec, mode: str = "training", objective: str = "time",
          memory_budget: float | None = None, time_limit: float = 120.0,
          pinned: dict[str, int] | None = None, layers: bool = True) -> Choice:
    """The optimal Choice; ``pinned`` fixes some nodes' strategies (``autotp explain`` asks
    for the best plan given each candidate of a node). ``layers``: solve runs of identical
    layers once (solve/runs.py); the result is optimal either way.

    Steps: a quick infeasibility bound from the parameters' state alone; then ``_best`` (by
    layers, or the whole graph when a bound binds, or ``_priced_search`` on deep models);
    objective="memory" runs it twice (least parameter bytes, then least time within
    MEMORY_SLACK of them); ``_infeasible_error`` when nothing fits."""
    if mode not in MODES:
        raise AutoTPError(f"mode must be one of {MODES}, got {mode!r}")
    if objective not in ("time", "memory"):
        raise AutoTPError(f"objective must be 'time' or 'memory', got {objective!r}")
    pinned = dict(pinned or {})
    budget = spec.memory_bytes if memory_budget is None else memory_budget
    p = _Problem(c, spec, mode, pinned, find_runs(c, set(pinned)) if layers else [], time_limit,
                 budget)
    # a quick bound first: every parameter split as far as it goes, no activations
    floor, kept = memory_floor(c, mode)
    if floor > budget:
        raise _infeasible_error(p, floor, floor_only=True)
    if mode == "training" and len(c.nodes) > WHOLE_GRAPH_NODES:
        # a large graph: its exact least memory is a whole-graph solve (minutes at 405B); first
        # the state and every activation the backward keeps, split as far as n ranks can
        low = floor + kept
        if low > budget:
            raise _infeasible_error(p, low, floor_only=False, lower=True)
    if objective == "memory":
        choice = _best(p, "memory", None, budget)
        if choice is not None:
            total = sum(max(held_bytes(c, v, s) for s in range(len(nc.strategies)))
                        for v, nc in c.nodes.items())
            share = total / c.world_size
            choice = _best(p, "time", _mem(c, choice) + MEMORY_SLACK * share + 1, budget)
            if choice is None:
                raise AutoTPInternalError("no plan within the least-memory plan's own memory "
                                          "bound (the least-memory plan itself should be one)")
    else:
        choice = _best(p, "time", None, budget)
    if choice is None:
        if pinned and _best(p, "time") is None:
            raise InfeasiblePlanError("no plan satisfies the pinned strategies")
        least_choice = _whole(p, "footprint", None, None)
        least = memory_bytes(c, least_choice, mode)[1] if least_choice is not None else math.inf
        raise _infeasible_error(p, least, floor_only=False)
    return choice


def _whole(p: _Problem, kind: str, bound: float | None, limit: float | None) -> Choice | None:
    """The whole graph as one program. kind "time" / "memory" (parameter bytes) / "footprint"
    (memory per rank); parameter bytes <= ``bound``, memory per rank <= ``limit``."""
    if p.program is None:
        p.program = Program(p.c, p.spec, p.mode)
    prog = p.program
    prog.add_memory_variables()
    extra = prog.memory_rows(limit)
    extra += [({prog.index[(n, s)]: 1.0}, 1.0, 1.0) for n, s in p.pinned.items()]
    if bound is not None:
        extra.append(({i: m * SCALE_M for i, m in enumerate(prog.mem) if m}, -np.inf,
                      bytes_bound(bound)))
    if kind == "footprint":
        w = [prog.foot.get(i, 0.0) for i in range(prog.n)]
    else:
        wf = _weight(kind)
        w = [wf(t, m) for t, m in zip(prog.time, prog.mem)]
    x = prog.solve(w, extra, p.time_limit)
    return None if x is None else prog.choice(x)


def _best(p: _Problem, kind: str, bound: float | None = None, limit: float | None = None
          ) -> Choice | None:
    """The optimum with parameter bytes <= bound and memory per rank <= limit bytes: by
    layers when neither binds, else the whole graph (or, training on more than
    WHOLE_GRAPH_NODES nodes with a binding budget, the priced search)."""
    c = p.c
    if p.runs:
        choice = solve_runs(c, p.spec, p.mode, p.runs, kind, _weight(kind), p.pinned, p.time_limit)
        if choice is None:  # infeasible without the bounds: infeasible with them
            return None
        if (bound is None or _mem(c, choice) <= bound) and \
                (limit is None or memory_bytes(c, choice, p.mode)[1] <= limit):
            return choice
        if len(c.nodes) > WHOLE_GRAPH_NODES and kind == "time" and bound is None \
                and limit is not None and p.mode == "training":
            log.info("the memory budget binds on %d nodes: pricing memory per layer instead "
                     "of solving the whole graph (fits, not proven optimal)", len(c.nodes))
            return _priced_search(p, limit)
        if len(c.nodes) > WHOLE_GRAPH_NODES and kind == "time" and bound is not None:
            log.info("the parameter-bytes bound binds on %d nodes: pricing parameter bytes per "
                     "layer instead of solving the whole graph", len(c.nodes))
            found = _priced_bound(p, bound, limit)
            if found is not None:
                return found
        log.info("the memory bound binds: solving the whole graph instead of one layer per class")
    return _whole(p, kind, bound, limit)


def _bracket(fits_at: Callable[[float], bool], ratio: float) -> tuple[float, float | None]:
    """A Lagrangian search's bracket: the price (from 1e-3, in objective units per KB) raised x8
    until ``fits_at(price)`` holds, then bisected geometrically until hi / lo < ``ratio``.
    Returns (lo, hi): lo the last price that did not fit (0 when the first did), hi the first
    that did (None when none did)."""
    lo, hi, lam = 0.0, None, 1e-3
    for _ in range(LAGRANGE_STEPS):
        if fits_at(lam):
            hi = lam
        else:
            lo = lam
        if hi is None:
            if lam > 1e9:
                break
            lam *= 8.0
        else:
            if lo and hi / lo < ratio:
                break
            lam = math.sqrt(lo * hi) if lo else hi / 8.0
    return lo, hi


def _priced_search(p: _Problem, limit: float) -> Choice | None:
    """Lagrangian search: minimize time + lam * memory by layers (solve/runs.py), lam in
    microseconds per KB (SCALE_M) raised until the plan fits, then bisected (geometrically)
    between the last lam that did not fit and the first that did; the fastest fitting plan
    wins. Falls back to the whole graph when no lam makes it fit. Fits; not proven optimal."""
    c, w = p.c, _weight("time")
    fits: list[tuple[float, Choice]] = []

    def fit(choice: Choice | None) -> bool:
        """Keep ``choice`` (with its predicted time) when it fits the budget."""
        if choice is None or memory_bytes(c, choice, p.mode)[1] > limit:
            return False
        ev = evaluate(c, choice, p.spec, p.mode)
        fits.append((ev.time_s if ev is not None else math.inf, choice))
        return True

    def by_layers(lam: float, lean: tuple[float, float] | None = None) -> Choice | None:
        return solve_runs(c, p.spec, p.mode, p.runs, "time", w, p.pinned, p.time_limit, lam, lean)

    lo, hi = _bracket(lambda lam: fit(by_layers(lam)), PRICE_RATIO)
    if not fits:
        return _whole(p, "time", None, limit)
    if lo:  # mix: some layers as priced at the last lam that fit, the rest at the one before
        # (lean layers priced well above the flip point and the others well below it, so
        # that a short run of either keeps its cells despite the cost of changing layout)
        fit(by_layers(lo / LEAN_FACTOR, (hi * LEAN_FACTOR, limit)))
    log.info("priced memory: %d plans fit, the fastest predicted %.3g s", len(fits),
             min(f[0] for f in fits))
    return min(fits, key=lambda f: f[0])[1]


def _priced_bound(p: _Problem, bound: float, limit: float | None) -> Choice | None:
    """objective="memory"'s second step on deep models: the least time with parameter bytes
    <= ``bound``, by layers, as a Lagrangian search: minimize time + mu * parameter bytes
    (solve/runs.py tables for each mu, mu in microseconds per KB), mu raised x8 until the
    plan keeps the bound (not bisected further: BOUND_RATIO), then the mixed program between
    the last mu that did not and the first that did (some layers priced as at either, the
    bound a row); the fastest plan that keeps the bound (and fits ``limit``) wins. None
    when no mu keeps it (the caller solves the whole graph). Keeps the bound; not proven
    optimal (a plan between two Lagrangian corners can be missed)."""
    c = p.c
    fits: list[tuple[float, Choice]] = []

    def priced(mu: float) -> tuple[str, Callable[[float, float], float]]:
        return f"time+{mu:.9g}/KB", (lambda t, m: t * SCALE_T + mu * m * SCALE_M)

    def keep(choice: Choice | None) -> bool:
        if choice is None or _mem(c, choice) > bound or \
                (limit is not None and memory_bytes(c, choice, p.mode)[1] > limit):
            return False
        ev = evaluate(c, choice, p.spec, p.mode)
        fits.append((ev.time_s if ev is not None else math.inf, choice))
        return True

    lo, hi = _bracket(lambda mu: keep(solve_runs(c, p.spec, p.mode, p.runs, *priced(mu), p.pinned,
                                                 p.time_limit)), BOUND_RATIO)
    if not fits:
        return None
    if lo:  # between the corners: some layers as priced at the first mu that kept the bound,
        # the rest at the last one that did not, the bound a row (solve/runs.py)
        keep(solve_runs_mixed(c, p.spec, p.mode, p.runs, priced(lo), priced(hi), _weight("time"),
                              bound, p.pinned, p.time_limit, BOUND_LEAN_STEPS))
    log.info("priced parameter bytes: %d plans keep the bound, the fastest predicted %.3g s",
             len(fits), min(f[0] for f in fits))
    return min(fits, key=lambda f: f[0])[1]


def _infeasible_error(p: _Problem, least: float, floor_only: bool, lower: bool = False) -> InfeasiblePlanError:
    """``least``: the least memory any plan needs, or (``floor_only``) the parameters' state
    split as far as it goes, a lower bound found before planning activations, or (``lower``)
    that plus every activation the backward keeps split n ways, a lower bound found before
    solving. Suggests only
    what could help: inference only to a training plan, a smaller batch only when activations
    were counted, less optimizer state only when the optimizer's state counts."""
    n, budget, training = p.c.world_size, p.budget, p.mode == "training"
    need_n = max(n + 1, math.ceil(n * least / max(budget, 1)))
    what = (f"more than {least / 1e9:.2f} GB per rank, what parameters"
            f"{', gradients and optimizer state' if training else ''} alone take when split as "
            f"far as they go, before activations" if floor_only else
            f"more than {least / 1e9:.2f} GB per rank, the state and the activations kept for "
            f"the backward split as far as they go" if lower else
            f"{least / 1e9:.2f} GB per rank (state and activations)")
    fixes = [f"a world size of at least {need_n}", "a device with more memory"]
    if floor_only and training:
        fixes.append("an optimizer with less state (optimizer_bytes)")
    if not floor_only:
        fixes.append("a smaller batch or sequence")
    if training and p.c.dp_size > 1 and p.c.dp_mode == "ddp":
        fixes.insert(0, f"dp_mode='fsdp' (state divided across the {p.c.dp_size} data-parallel replicas)")
    if training:
        fixes.append("mode='inference'")
    return InfeasiblePlanError(
        f"no plan fits {budget / 1e9:.2f} GB per rank at world size {n} ({p.mode}): the least "
        f"any plan needs is {what}. Use {', '.join(fixes[:-1])} or {fixes[-1]}.", least, need_n)


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
        total = sum(c.nodes[v].metas[0].nbytes for v in names if c.nodes[v].kind is NodeKind.PARAM)
        share = total / c.world_size
        feasible = [(ch, ev) for ch, ev in feasible if ev.param_bytes <= least + MEMORY_SLACK * share + 1]
    return min(feasible, key=lambda f: f[1].time_s) if feasible else None
