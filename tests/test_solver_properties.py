"""Property tests of the solver on graphs small enough to enumerate: hypothesis draws small
models (1-3 linears with or without bias, activations, LayerNorm, a residual, a second input
branch, or a stack of 3 identical layers that the solver solves once per boundary state),
batch and sequence sizes, world sizes 2-4, device specs over orders of magnitude, modes and
objectives. Every assignment is enumerated and costed with ``evaluate`` (the one
definition of a plan's cost), and:

1. ``solve`` attains the brute-force minimum time (objective="memory": among the plans within
   MEMORY_SLACK of the least parameter bytes), and is infeasible exactly when brute force
   finds nothing;
2. under a memory budget between the least and the most memory of any plan, the plan fits
   the budget and attains the brute-force minimum under it; below the least it raises
   InfeasiblePlanError whose ``least_bytes`` is the brute-force least memory;
3. more link bandwidth, more memory bandwidth or more device memory never makes the
   optimal predicted time worse.

The enumeration skips assignments with an impossible transition as soon as one appears
(``evaluate`` returns None for those); test_enumeration_is_brute_force checks it against
``solver.brute_force`` itself on graphs small enough for the plain product.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st
from torch import nn

from autotp import InfeasiblePlanError
from autotp.capture import capture
from autotp.cost.model import transition
from autotp.solve.runs import find_runs
from autotp.cost.devices import DeviceSpec
from autotp.core.placements import Shard
from autotp.solve.solve import MEMORY_SLACK, brute_force, solve
from autotp.cost.evaluate import Evaluation, evaluate, time_lower_bound
from autotp.candidates import Candidates, build

ACTS = {"none": lambda x: x, "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
ENUM_LIMIT = 2500  # assignments with possible transitions; more is assume()d away
REL = 1e-6
# HYPOTHESIS_PROFILE=long (as in test_properties.py): 10x the examples, fresh random ones
LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
SETTINGS = dict(deadline=None, derandomize=not LONG, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------
# random small models

@dataclass(frozen=True)
class Net:
    d_in: int
    widths: tuple[int, ...]  # output size of each linear of the chain (empty for a stack)
    bias: tuple[bool, ...]
    acts: tuple[str, ...]
    norm: str  # "none" | "pre" (LayerNorm on the input) | "mid" (after the first linear)
    residual: bool  # chain: add the input to the output; stack: x + lin(x) per layer
    branch: bool  # a second input through its own linear, added after the first linear
    stack: int  # layers of identical Linear(d_in, d_in) blocks (0: a chain)
    batch: int
    seq: int
    dtype: str
    input_grad: bool


class Layer(nn.Module):
    def __init__(self, h: int, bias: bool, act: str, residual: bool):
        super().__init__()
        self.lin = nn.Linear(h, h, bias=bias)
        self.act, self.residual = act, residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ACTS[self.act](self.lin(x))
        return x + y if self.residual else y


class Small(nn.Module):
    def __init__(self, net: Net):
        super().__init__()
        self.net = net
        dims = (net.d_in, *net.widths)
        self.norm = None if net.norm == "none" else nn.LayerNorm(dims[0] if net.norm == "pre" else dims[1])
        self.lins = nn.ModuleList(nn.Linear(a, b, bias=bb) for a, b, bb in zip(dims, dims[1:], net.bias))
        self.side = nn.Linear(net.d_in, dims[1], bias=False) if net.branch else None
        self.layers = nn.ModuleList(Layer(net.d_in, net.bias[0], net.acts[0], net.residual)
                                    for _ in range(net.stack))

    def forward(self, x: torch.Tensor, *ys: torch.Tensor) -> torch.Tensor:
        net = self.net
        if net.stack:
            for layer in self.layers:
                x = layer(x)
            return x
        h = self.norm(x) if net.norm == "pre" else x
        for i, lin in enumerate(self.lins):
            h = lin(h)
            if i == 0 and self.side is not None:
                h = h + self.side(ys[0])
            h = ACTS[net.acts[i]](h)
            if i == 0 and net.norm == "mid":
                h = self.norm(h)
        return h + x if net.residual else h


@st.composite
def nets(draw: st.DrawFn) -> Net:
    d_in = draw(st.sampled_from([2, 3, 4, 6, 8]))
    shape = dict(batch=draw(st.integers(2, 4)), seq=draw(st.sampled_from([2, 3, 4, 6])),
                 dtype=draw(st.sampled_from(["float32", "float32", "bfloat16"])),
                 input_grad=draw(st.booleans()))
    if draw(st.integers(0, 4)) == 0:  # 3 identical layers: solved once per boundary state
        residual = draw(st.booleans())
        return Net(d_in, (), (False,), ("none" if residual else draw(st.sampled_from(["relu", "tanh"])),),
                   "none", residual, False, 3, **shape)
    n = draw(st.sampled_from([1, 1, 2, 2, 3]))
    widths = [draw(st.sampled_from([2, 3, 4, 5, 6, 8, 12])) for _ in range(n)]
    residual = draw(st.booleans())
    if residual:
        widths[-1] = d_in
    # extras multiply the number of plans: fewer of them on longer chains
    extra = st.sampled_from([True, False, False, False] if n == 3 else [True, False, False])
    return Net(d_in, tuple(widths), tuple(draw(extra) for _ in range(n)),
               tuple(draw(st.sampled_from(sorted(ACTS))) if draw(extra) else "none" for _ in range(n)),
               draw(st.sampled_from(["pre", "mid"])) if draw(extra) else "none", residual,
               draw(extra), 0, **shape)


@functools.lru_cache(maxsize=64)
def _captured(net: Net):
    torch.manual_seed(0)
    dtype = getattr(torch, net.dtype)
    model = Small(net).to(dtype)
    x = torch.randn(net.batch, net.seq, net.d_in, dtype=dtype).requires_grad_(net.input_grad)
    ys = (torch.randn(net.batch, net.seq, net.d_in, dtype=dtype),) if net.branch else ()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return capture(model, (x, *ys))


def _candidates(net: Net, world: int, dp: int = 1) -> Candidates:
    return build(_captured(net), world, dp_size=dp)


# ---------------------------------------------------------------------------------------------
# random device specs

def _log_uniform(draw: st.DrawFn, lo: float, hi: float) -> float:
    return 10.0 ** draw(st.floats(math.log10(lo), math.log10(hi)))


@st.composite
def specs(draw: st.DrawFn, dp: int = 1) -> DeviceSpec:
    fp32 = _log_uniform(draw, 1e9, 1e15)
    link = _log_uniform(draw, 1e5, 1e12)
    latency = draw(st.sampled_from([0.0, None, None, None]))
    latency = _log_uniform(draw, 1e-7, 1e-2) if latency is None else latency
    collectives = {}
    if draw(st.booleans()):  # a measured, slower reduce_scatter (as gloo's)
        collectives["reduce_scatter"] = (latency * draw(st.sampled_from([1, 4])),
                                         link / draw(st.sampled_from([1, 3, 10])))
    inter = dict(inter_link_bandwidth=_log_uniform(draw, 1e5, 1e11),
                 inter_latency=_log_uniform(draw, 1e-6, 1e-2)) if dp > 1 else {}
    return DeviceSpec("random", {"float32": fp32, "bfloat16": fp32 * draw(st.sampled_from([1, 2, 8]))},
                      1e15, _log_uniform(draw, 1e9, 1e13), link, latency, collectives=collectives,
                      **inter)


@st.composite
def cases(draw: st.DrawFn) -> dict:
    dp = draw(st.sampled_from([1, 1, 1, 2]))
    return dict(net=draw(nets()), world=draw(st.sampled_from([2, 3, 4])), dp=dp,
                spec=draw(specs(dp)), mode=draw(st.sampled_from(["training", "inference"])),
                objective=draw(st.sampled_from(["time", "memory"])))


# ---------------------------------------------------------------------------------------------
# the reference: every assignment, costed by evaluate

def _assignments(c: Candidates, limit: int = ENUM_LIMIT) -> list[dict[str, int]] | None:
    """Every assignment in which no transition is impossible (the others ``evaluate`` rejects),
    depth first in graph order (producers before consumers); None when there are more than
    ``limit``."""
    names = list(c.nodes)
    checks = [[(slot, v[0], v[1], c.nodes[v[0]].kind == "param") for slot, v in enumerate(c.nodes[n].slots)]
              for n in names]
    out: list[dict[str, int]] = []
    choice: dict[str, int] = {}

    def visit(i: int) -> bool:
        if i == len(names):
            out.append(dict(choice))
            return len(out) <= limit
        for s, st_ in enumerate(c.nodes[names[i]].strategies):
            if all(transition(c.nodes[u].strategies[choice[u]].outputs()[oi], st_.inputs[slot],
                              st_.grad_placement(slot), is_param) is not None
                   for slot, u, oi, is_param in checks[i]):
                choice[names[i]] = s
                if not visit(i + 1):
                    return False
        return True

    return out if visit(0) else None


Costed = list[tuple[dict[str, int], Evaluation]]


def _costed(c: Candidates, spec: DeviceSpec, mode: str) -> Costed:
    choices = _assignments(c)
    assume(choices is not None)  # too many plans to enumerate (rare, see test_most_cases_enumerate)
    out = [(ch, evaluate(c, ch, spec, mode)) for ch in choices]
    assert all(ev is not None for _, ev in out)
    return out


def _reference(c: Candidates, costed: Costed, objective: str, budget: float):
    """``brute_force``'s choice among the enumerated assignments."""
    feasible = [(ch, ev) for ch, ev in costed if ev.memory_bytes <= budget]
    if objective == "memory" and feasible:
        least = min(ev.param_bytes for _, ev in feasible)
        bound = least + MEMORY_SLACK * _param_total(c) + 1
        feasible = [(ch, ev) for ch, ev in feasible if ev.param_bytes <= bound]
    return min(feasible, key=lambda f: f[1].time_s) if feasible else None


def _check_optimal(c: Candidates, spec: DeviceSpec, case: dict, costed: Costed,
                   budget: float | None, **kw) -> Evaluation | None:
    """solve(...) against the reference under ``budget`` (None: the spec's memory)."""
    mode, objective = case["mode"], case["objective"]
    limit = spec.memory_bytes if budget is None else budget
    ref = _reference(c, costed, objective, limit)
    if ref is None:
        with pytest.raises(InfeasiblePlanError):
            solve(c, spec, mode, objective, budget, **kw)
        return None
    ev = evaluate(c, solve(c, spec, mode, objective, budget, **kw), spec, mode)
    assert ev is not None
    note(f"budget {budget}: solve {ev.time_s!r} s, {ev.memory_bytes} B, {ev.param_bytes} B of "
         f"parameters; brute force {ref[1].time_s!r} s, {ref[1].memory_bytes} B, "
         f"{ref[1].param_bytes} B")
    assert ev.memory_bytes <= limit
    assert ev.time_s == pytest.approx(ref[1].time_s, rel=REL, abs=0.0)
    if objective == "memory":  # plans tied in time may differ in bytes within the slack
        least = min(e.param_bytes for _, e in costed if e.memory_bytes <= limit)
        assert least <= ev.param_bytes <= least + MEMORY_SLACK * _param_total(c) + 1
    return ev


# ---------------------------------------------------------------------------------------------

def _param_total(c: Candidates) -> int:
    return sum(nc.metas[0].nbytes for nc in c.nodes.values() if nc.kind == "param")


@settings(max_examples=100 * (10 if LONG else 1), **SETTINGS)
@given(case=cases(), data=st.data())
def test_plan_is_the_brute_force_optimum(case: dict, data: st.DataObject) -> None:
    """Property 1 (memory that does not bind) and property 2 (a budget between the least and
    the most memory of any plan; one below the least)."""
    c = _candidates(case["net"], case["world"], case["dp"])
    spec, mode, objective = case["spec"], case["mode"], case["objective"]
    costed = _costed(c, spec, mode)
    runs = find_runs(c)
    note(f"{len(costed)} plans, {len(runs)} runs of identical layers")
    free = _check_optimal(c, spec, case, costed, None)
    # the bound that lets a pinned solve skip its free one is below every plan's time
    assert time_lower_bound(c, spec, mode) <= min(ev.time_s for _, ev in costed) * (1 + 1e-12)
    if runs:  # solved without the layer decomposition: the same optimum
        _check_optimal(c, spec, case, costed, None, layers=False)

    mems = sorted({ev.memory_bytes for _, ev in costed})
    least, most = mems[0], mems[-1]
    budget = data.draw(st.one_of(st.sampled_from(mems), st.floats(least, most)), label="budget")
    tight = _check_optimal(c, spec, case, costed, budget)
    # the same bound as the device's memory
    _check_optimal(c, dataclasses.replace(spec, memory_bytes=budget), case, costed, None)
    event(f"optimum splits a weight: {free.param_bytes < _param_total(c)}")
    event(f"budget binds: {tight.time_s > free.time_s * (1 + REL)}")

    below = least * data.draw(st.sampled_from([0.5, 0.999]), label="below the least")
    assert _reference(c, costed, objective, below) is None
    with pytest.raises(InfeasiblePlanError) as err:
        solve(c, spec, mode, objective, below)
    if "more than" in str(err.value):  # the parameters' state alone exceeds it: a lower bound
        assert below < err.value.least_bytes <= least * (1 + 1e-9)
    else:
        assert err.value.least_bytes == pytest.approx(least, rel=1e-9)
    assert err.value.min_world_size > case["world"]
    assert _least(c, spec, mode, objective) == pytest.approx(least, rel=1e-9)


def _time(c: Candidates, spec: DeviceSpec, mode: str, objective: str) -> float:
    return evaluate(c, solve(c, spec, mode, objective), spec, mode).time_s


def _faster_link(spec: DeviceSpec) -> DeviceSpec:
    return dataclasses.replace(
        spec, link_bandwidth=2 * spec.link_bandwidth, inter_link_bandwidth=2 * spec.inter_link_bandwidth,
        collectives={k: (a, 2 * b) for k, (a, b) in spec.collectives.items()})


def _least(c, spec: DeviceSpec, mode: str, objective: str) -> float:
    """The least memory any plan needs, from InfeasiblePlanError: a budget of 0 gives the
    parameters' state floor (a lower bound); a budget at that floor gives the exact least, or
    fits (then the floor is the least: no activations)."""
    with pytest.raises(InfeasiblePlanError) as err:
        solve(c, dataclasses.replace(spec, memory_bytes=0.0), mode, objective)
    floor = err.value.least_bytes
    try:
        solve(c, dataclasses.replace(spec, memory_bytes=floor), mode, objective)
    except InfeasiblePlanError as e:
        return e.least_bytes
    return floor


@settings(max_examples=80 * (10 if LONG else 1), **SETTINGS)
@given(case=cases(), data=st.data())
def test_more_bandwidth_or_memory_never_slower(case: dict, data: st.DataObject) -> None:
    """Property 3, on the device memory (the default budget) drawn from just above the least
    any plan needs: doubling the link bandwidth, the memory bandwidth or the memory never
    increases the optimal predicted time (for objective="memory", whose plans are first the
    least-memory ones, more memory may buy a smaller plan rather than a faster one)."""
    c = _candidates(case["net"], case["world"], case["dp"])
    spec, mode, objective = case["spec"], case["mode"], case["objective"]
    least = _least(c, spec, mode, objective)
    spec = dataclasses.replace(spec, memory_bytes=least * data.draw(st.sampled_from([1.0, 1.1, 1.5, 3.0])))
    t = _time(c, spec, mode, objective)
    note(f"time {t!r} s at {spec.memory_bytes} B")
    slack = 1 + 1e-9
    assert _time(c, _faster_link(spec), mode, objective) <= t * slack
    assert _time(c, dataclasses.replace(spec, memory_bandwidth=2 * spec.memory_bandwidth),
                 mode, objective) <= t * slack
    if objective == "time":
        assert _time(c, dataclasses.replace(spec, memory_bytes=2 * spec.memory_bytes),
                     mode, objective) <= t * slack


@settings(max_examples=15 * (10 if LONG else 1), **SETTINGS)
@given(case=cases(), data=st.data())
def test_enumeration_is_brute_force(case: dict, data: st.DataObject) -> None:
    """The reference of the other tests is ``solver.brute_force``: the same assignments
    (those ``evaluate`` accepts), and the same choice with or without a budget."""
    c = _candidates(case["net"], case["world"], case["dp"])
    assume(math.prod(len(nc.strategies) for nc in c.nodes.values()) <= 1500)
    spec, mode = case["spec"], case["mode"]
    costed = _costed(c, spec, mode)
    mems = sorted({ev.memory_bytes for _, ev in costed})
    budget = data.draw(st.sampled_from([None, mems[0] * 0.9, *mems]), label="budget")
    full = budget if budget is not None else spec.memory_bytes
    got = brute_force(c, spec, mode, case["objective"], budget)
    want = _reference(c, costed, case["objective"], full)
    assert (got is None) == (want is None)
    if got is not None:
        assert got[1].time_s == want[1].time_s and got[1].param_bytes == want[1].param_bytes
    names = list(c.nodes)
    every = [dict(zip(names, combo)) for combo in
             itertools.product(*(range(len(c.nodes[n].strategies)) for n in names))]
    accepted = sorted(tuple(ch.values()) for ch in every if evaluate(c, ch, spec, mode) is not None)
    assert accepted == sorted(tuple(ch.values()) for ch, _ in costed)


def test_most_cases_enumerate() -> None:
    """The generator stays small enough that few cases are assumed away, and it reaches
    stacks of layers (solved by runs) and sequence-split candidates."""
    total = enumerable = runs = seq_split = 0

    @settings(max_examples=40, **SETTINGS)
    @given(net=nets(), world=st.sampled_from([2, 3, 4]))
    def count(net: Net, world: int) -> None:
        nonlocal total, enumerable, runs, seq_split
        c = _candidates(net, world)
        total += 1
        enumerable += _assignments(c) is not None
        runs += bool(find_runs(c))
        seq_split += any(isinstance(p, Shard) and nc.metas[0] is not None and
                         nc.metas[0].dynamic[p.dim % len(nc.metas[0].shape)]
                         for nc in c.nodes.values() if nc.kind == "op"
                         for st_ in nc.strategies for p in st_.outputs()[:1])

    count()
    assert total == 40
    assert enumerable >= 0.8 * total, (enumerable, total)
    assert runs >= 2 and seq_split >= 5, (runs, seq_split)


@pytest.mark.parametrize("mode", ["training", "inference"])
@pytest.mark.parametrize("objective", ["time", "memory"])
def test_budget_a_fraction_of_a_byte_below_the_least(mode: str, objective: str) -> None:
    """Found by test_plan_is_the_brute_force_optimum: with the budget row at budget * 1e-6 MB,
    HiGHS' feasibility tolerance (1e-7 MB) let a plan 0.05 byte over the budget through; for
    objective="memory" the second stage then found nothing and solve failed its own assertion
    instead of raising InfeasiblePlanError."""
    torch.manual_seed(0)
    c = build(capture(nn.Linear(2, 2, bias=False), (torch.randn(2, 2, 2),)), 2)
    spec = DeviceSpec("random", {"float32": 1e9}, 1e15, 1e9, 1e5, 0.0)
    least = min(evaluate(c, ch, spec, mode).memory_bytes for ch in _assignments(c))
    assert least == 64
    assert evaluate(c, solve(c, spec, mode, objective, least), spec, mode).memory_bytes == least
    for budget in (least - 0.05, least - 0.5):
        assert brute_force(c, spec, mode, objective, budget) is None
        with pytest.raises(InfeasiblePlanError) as err:
            solve(c, spec, mode, objective, budget)
        assert err.value.least_bytes == least


def test_memory_objective_least_bytes_at_byte_scale() -> None:
    """Found by test_plan_is_the_brute_force_optimum: with memory rows in MB, HiGHS' MIP
    feasibility tolerance (1e-6 of a row's unit: a byte) let the second stage of
    objective="memory" take a plan with 16 parameter bytes under the bound 15.02 (least 14 plus
    the slack); brute force keeps 14."""
    net = Net(d_in=2, widths=(2,), bias=(True,), acts=("gelu",), norm="pre", residual=False,
              branch=False, stack=0, batch=2, seq=2, dtype="bfloat16", input_grad=False)
    c = _candidates(net, 2)
    spec = DeviceSpec("random", {"float32": 1e9, "bfloat16": 1e9}, 1e15, 1e9, 1e5, 0.0)
    costed = [(ch, evaluate(c, ch, spec, "training")) for ch in _assignments(c)]
    ref = _reference(c, costed, "memory", spec.memory_bytes)
    ev = evaluate(c, solve(c, spec, "training", "memory"), spec, "training")
    assert ref[1].param_bytes == 14
    assert (ev.param_bytes, ev.time_s) == (ref[1].param_bytes, ref[1].time_s)
