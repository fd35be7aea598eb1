"""Pipeline parallelism's cost: a program's layers cut into ``pp`` stages, each on its own
group of ranks, run over ``M`` microbatches by a schedule (GPipe or 1F1B,
``torch.distributed.pipelining``).

Segments. A program is  pre | layer 0 | ... | layer L-1 | post  in graph order (the layers
are the stacks' layers, capture/stacks.py, in graph order). ``segment_of`` assigns every node:
an op to the latest layer that started at or before it (-1, "pre", before the first layer; L,
"post", after the last layer's last node); a parameter, buffer or input to the segment of its
first user. Stage ``s`` runs layers ``bounds[s]`` to ``bounds[s+1] - 1``; the first stage also
pre, the last also post. The same rule cuts the rank's rewritten graph (rewrite/stages.py), so
the stages priced are the stages run.

Time. A stage's time per microbatch ``t_s`` is the sum of its nodes' (compute, collectives,
data-parallel sync: ``evaluate.breakdown``) plus the point-to-point send of the values that
cross its boundary to the next stage, forward and (training) back, ``alpha + bytes / beta``
over the inter-node link. Both schedules run ``M + pp - 1`` slots of the slowest stage:

    step = (M + pp - 1) * max_s t_s,        bubble = (pp - 1) / (M + pp - 1)

(GPipe: all forwards, then all backwards; 1F1B interleaves them after a warm-up, the same
bubble with fewer microbatches in flight; Narayanan et al., SC'21, section 2.2).

Memory. A stage holds its nodes' state (parameters, gradients, optimizer state) and the
activations of the microbatches in flight: GPipe keeps all ``M``; 1F1B keeps ``pp - s`` at
stage ``s`` (at most ``M``). Inference keeps one microbatch's working set.

Interleaved 1F1B (``v`` stages per rank, Narayanan et al. section 2.2.2). The layers are cut
into ``v pp`` stages, stage ``s`` on rank ``s mod pp``: each rank runs ``v`` smaller stages
per microbatch, and the pipeline fills and drains in ``1/v`` of the time:

    step = (M + (pp - 1) / v) * max_r T_r,      bubble = (pp - 1) / (v M + pp - 1)

``T_r`` the sum of rank r's stages' times per microbatch (each with its sends: ``v`` times
as many). Rank r runs ``w_r = min((v - 1) m + 2 (pp - 1 - r), v M)`` forwards before its
first backward (``m``: microbatches per round, ``M // max(1, M // pp)``; torch's
``ScheduleInterleaved1F1B``), then one forward per backward, so it keeps at most ``w_r + 1``
stage-microbatches of activations: its memory is bounded by its stages' state plus ``(w_r +
1)`` times its largest stage's activations per microbatch.

Balance. ``balance`` chooses the bounds minimizing the slowest stage's time, among cuts whose
every stage fits the memory budget (a dynamic program over layer boundaries, exact for the
time with one stage per rank). Interleaved, a stage's memory in the search is its share: its
state plus ``(w_r + 1) / v`` of the rank's in-flight activations at its own size. A rank's
bound above is at least each of its stages' shares, so a stage whose share exceeds the budget
rules its cut out; the cut found is kept only when each rank's bound fits the budget (else the
cut of least largest share is tried).
The search minimizes the slowest stage, not the slowest rank's sum; the cut it finds is then
improved by moving one boundary by one layer at a time while the step drops and every rank
fits (a local search: a cut with a faster step can still exist, and a cut whose stages share a
rank's memory unevenly may be missed). ``least_memory`` interleaved is the memory of the cut of least share,
not a bound on every cut's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from autotp.candidates import Candidates, NodeKind
from autotp.cost.devices import DeviceSpec
from autotp.cost.evaluate import breakdown, floor_items
from autotp.cost.model import inter_link, local_bytes


def bubble_fraction(pp: int, microbatches: int, v: int = 1) -> float:
    """The idle fraction of a GPipe or 1F1B step, ``(pp - 1) / (M + pp - 1)``; interleaved
    with ``v`` stages per rank, ``(pp - 1) / (v M + pp - 1)``."""
    return (pp - 1) / (v * microbatches + pp - 1)


def interleaved_warmup(rank: int, pp: int, v: int, microbatches: int) -> int:
    """Forwards (of one stage and one microbatch each) rank ``rank`` runs before its first
    backward under interleaved 1F1B with ``v`` stages per rank (module docstring)."""
    per_round = microbatches // max(1, microbatches // pp)
    return min((v - 1) * per_round + 2 * (pp - 1 - rank), v * microbatches)


def in_flight(stage: int, pp: int, microbatches: int, schedule: str, v: int = 1) -> int:
    """Microbatches whose activations stage ``stage`` keeps at once in training; interleaved
    (``v`` stages per rank), the stage-microbatches its rank keeps (``w_r + 1``)."""
    if schedule == "gpipe":
        return microbatches
    if schedule == "interleaved":
        return interleaved_warmup(stage % pp, pp, v, microbatches) + 1
    return min(pp - stage, microbatches)


def send_time(nbytes: float, spec: DeviceSpec, mode: str) -> float:
    """A boundary's point-to-point activations (and in training their gradients back)."""
    if nbytes <= 0:
        return 0.0
    alpha, beta = inter_link(spec)
    return (alpha + nbytes / beta) * (2.0 if mode == "training" else 1.0)


def segment_of(order: Sequence[str], layers: Sequence[set[str]], users: Callable[[str], Iterable[str]],
               is_attr: Callable[[str], bool]) -> dict[str, int]:
    """Each node's segment (module docstring): -1 pre, 0..L-1 a layer, L post. ``order``: the
    node names in graph order; ``layers``: each layer's own node names (its ops and its
    parameters); ``users``: a node's users; ``is_attr``: whether a node is a parameter or
    buffer (placed by its first user, not by its position; inputs come first: pre)."""
    where = {n: i for i, names in enumerate(layers) for n in names}
    last = next((n for n in reversed(order) if n in layers[-1] and not is_attr(n)), None) if layers else None
    seg: dict[str, int] = {}
    cur, done = -1, False
    for n in order:
        if is_attr(n):
            if n in where:
                seg[n] = where[n]
            continue
        if where.get(n, -1) > cur:  # the first node of a later layer: that layer starts
            cur = where[n]
        seg[n] = where.get(n, len(layers) if done else cur)
        done = done or n == last
    for n in order:  # parameters and buffers: with their first user
        if n not in seg:
            firsts = [seg[u] for u in users(n) if u in seg]
            seg[n] = min(firsts) if firsts else -1
    return seg


def stage_of_segment(bounds: Sequence[int], layers: int) -> Callable[[int], int]:
    """segment -> stage for stages starting at layers ``bounds`` (bounds[0] == 0)."""
    def stage(seg: int) -> int:
        if seg < 0:
            return 0
        if seg >= layers:
            return len(bounds) - 1
        return max(s for s, b in enumerate(bounds) if b <= seg)
    return stage


@dataclass(frozen=True)
class SegmentCost:
    """One segment's share: time per microbatch, state bytes, activation bytes per
    microbatch (training: kept for the backward; inference: the largest working set), and
    the bytes of values produced at or before it that later segments read."""
    time_s: float
    state_bytes: float
    activation_bytes: float
    out_bytes: float = 0.0


@dataclass(frozen=True)
class Stages:
    """A balanced cut: the first layer of each stage, and per stage its time per microbatch
    (sends included), memory (state plus activations in flight; interleaved, the memory of
    the rank holding it), and the bytes it sends on."""
    bounds: tuple[int, ...]
    time_s: tuple[float, ...]
    memory_bytes: tuple[float, ...]
    send_bytes: tuple[float, ...]
    step_time_s: float
    bubble: float


class _Sums:
    """Prefix sums over the segments, so that a stage's cost is O(1) (``balance`` prices
    O(pp L^2) candidate stages)."""

    def __init__(self, segs: Sequence[SegmentCost]):
        self.segs = segs
        self.time, self.state, self.act = [0.0], [0.0], [0.0]
        for x in segs:
            self.time.append(self.time[-1] + x.time_s)
            self.state.append(self.state[-1] + x.state_bytes)
            self.act.append(self.act[-1] + x.activation_bytes)

    def parts(self, lo: int, hi: int, s: int, stages: int, mode: str, spec: DeviceSpec
              ) -> tuple[float, float, float, float]:
        """(time per microbatch, state, activations of one microbatch, bytes sent) of stage
        ``s`` of ``stages`` holding layers lo..hi-1 (the segment list is pre, layers, post:
        layer i is segs[i + 1]). Activations: training, what one microbatch keeps; inference,
        the largest working set."""
        a = 0 if s == 0 else lo + 1
        b = len(self.segs) if s == stages - 1 else hi + 1
        sent = 0.0 if s == stages - 1 else self.segs[hi].out_bytes  # what crosses after its last layer
        time = self.time[b] - self.time[a] + send_time(sent, spec, mode)
        state = self.state[b] - self.state[a]
        if mode == "training":
            act = self.act[b] - self.act[a]
        else:
            act = max(x.activation_bytes for x in self.segs[a:b])
        return time, state, act, sent

    def stage(self, lo: int, hi: int, s: int, stages: int, microbatches: int, schedule: str, mode: str,
              spec: DeviceSpec, v: int = 1) -> tuple[float, float, float]:
        """(time per microbatch, memory, bytes sent) of stage ``s``: with ``v`` > 1 (interleaved)
        its memory is its share of its rank's (module docstring), for the cut's search."""
        time, state, act, sent = self.parts(lo, hi, s, stages, mode, spec)
        if mode == "training":
            act *= in_flight(s, stages // v, microbatches, schedule, v) / v
        return time, state + act, sent


def balance(segs: Sequence[SegmentCost], pp: int, microbatches: int, schedule: str, mode: str,
            spec: DeviceSpec, budget: float, by: str = "time", v: int = 1) -> Stages | None:
    """The cut of ``segs`` (pre, L layers, post) into ``pp`` stages of at least one layer
    each minimizing the slowest stage's time per microbatch, every stage within ``budget``
    bytes (among cuts as fast, it prefers the less largest memory); None when no cut fits.
    ``by="memory"``: the least largest stage memory instead (then the least time). ``v`` >
    1: interleaved, ``v pp`` stages on ``pp`` ranks (module docstring)."""
    first = 0 if by == "time" else 1
    layers = len(segs) - 2
    sums = _Sums(segs)
    stages = pp * v  # (interleaved, a stage's memory is its share; each is at most its rank's)
    # best[s][i]: (slowest time, largest memory, bounds) of stages 0..s-1 covering layers 0..i-1
    best: list[dict[int, tuple[float, float, tuple[int, ...]]]] = [{0: (0.0, 0.0, ())}]
    for s in range(stages):
        row: dict[int, tuple[float, float, tuple[int, ...]]] = {}
        for lo, (t0, m0, bounds) in best[s].items():
            his = [layers] if s == stages - 1 else range(lo + 1, layers - (stages - s - 1) + 1)
            for hi in his:
                if hi <= lo:
                    continue
                t, m, _ = sums.stage(lo, hi, s, stages, microbatches, schedule, mode, spec, v)
                if m > budget:
                    continue
                cand = (max(t0, t), max(m0, m), bounds + (lo,))
                have = row.get(hi)
                if have is None or (cand[first], cand[1 - first]) < (have[first], have[1 - first]):
                    row[hi] = cand
        best.append(row)
    if layers not in best[stages]:
        return None
    _, _, bounds = best[stages][layers]
    ends = bounds[1:] + (layers,)
    if v == 1:
        costs = [sums.stage(lo, hi, s, pp, microbatches, schedule, mode, spec)
                 for s, (lo, hi) in enumerate(zip(bounds, ends))]
        slowest = max(t for t, _, _ in costs)
        return Stages(bounds, tuple(t for t, _, _ in costs), tuple(m for _, m, _ in costs),
                      tuple(x for _, _, x in costs), (microbatches + pp - 1) * slowest,
                      bubble_fraction(pp, microbatches))
    # interleaved: each rank's stages priced together (module docstring), then the cut improved
    # by moving one boundary a layer at a time while the step (the slowest rank's sum) drops and
    # every rank fits
    cut = _ranked(sums, list(bounds), layers, pp, v, microbatches, mode, spec)
    if by == "time":
        while True:
            moves = [_ranked(sums, cut[0][:i] + [cut[0][i] + d] + cut[0][i + 1:], layers, pp, v,
                             microbatches, mode, spec)
                     for i in range(1, stages) for d in (-1, 1)
                     if cut[0][i - 1] < cut[0][i] + d < (cut[0][i + 1] if i + 1 < stages else layers)]
            better = min((m for m in moves if max(m[2]) <= budget), key=lambda m: (max(m[1]), max(m[2])),
                         default=None)
            if better is None or max(better[1]) >= max(cut[1]) * (1 - 1e-12) or max(cut[2]) > budget:
                break
            cut = better
    bounds, rank_time, rank_mem, parts = cut
    if max(rank_mem) > budget:
        # the fastest cut of the stage shares overfills a rank: the cut of least share may not
        return balance(segs, pp, microbatches, schedule, mode, spec, budget, "memory", v) if by == "time" else None
    return Stages(tuple(bounds), tuple(x[0] for x in parts), tuple(rank_mem[s % pp] for s in range(stages)),
                  tuple(x[3] for x in parts), (microbatches + (pp - 1) / v) * max(rank_time),
                  bubble_fraction(pp, microbatches, v))


def _ranked(sums: _Sums, bounds: list[int], layers: int, pp: int, v: int, microbatches: int, mode: str,
            spec: DeviceSpec) -> tuple[list[int], list[float], list[float], list]:
    """An interleaved cut priced per rank: (bounds, each rank's time per microbatch, each
    rank's memory bound, each stage's parts)."""
    stages = pp * v
    ends = bounds[1:] + [layers]
    parts = [sums.parts(lo, hi, s, stages, mode, spec) for s, (lo, hi) in enumerate(zip(bounds, ends))]
    rank_time, rank_mem = [], []
    for r in range(pp):
        mine = parts[r::pp]
        held = in_flight(r, pp, microbatches, "interleaved", v) if mode == "training" else 1
        rank_time.append(sum(x[0] for x in mine))
        rank_mem.append(sum(x[1] for x in mine) + held * max(x[2] for x in mine))
    return bounds, rank_time, rank_mem, parts


def least_memory(segs: Sequence[SegmentCost], pp: int, microbatches: int, schedule: str, mode: str,
                 spec: DeviceSpec, v: int = 1) -> float:
    """The least largest stage memory of any cut (for the error when none fits); interleaved
    (``v`` > 1), the largest rank memory of the cut of least stage share (module docstring)."""
    found = balance(segs, pp, microbatches, schedule, mode, spec, float("inf"), by="memory", v=v)
    return float("inf") if found is None else max(found.memory_bytes)


def program_segments(c: Candidates) -> tuple[list[str], dict[str, int]]:
    """The layer module paths of ``c``'s program in graph order, and each decision node's
    segment (``segment_of``)."""
    paths = [st.layer(i) for st, per in zip(c.captured.stacks, c.layers) for i in range(len(per))]
    sets = [set(names) for per in c.layers for names in per]
    users: dict[str, list[str]] = {}
    for (v, _), cons in c.consumers.items():
        users.setdefault(v, []).extend(n for n, _ in cons)
    # what the rewritten graph reads with get_attr: inputs and outputs are placed by position,
    # as rewrite/stages.py places placeholders and the output
    attr = {n for n, nc in c.nodes.items() if nc.kind in (NodeKind.PARAM, NodeKind.BUFFER, NodeKind.STATE)}
    return paths, segment_of(list(c.nodes), sets, lambda n: users.get(n, ()), attr.__contains__)


def floor_segments(c: Candidates, mode: str) -> list[SegmentCost]:
    """Per segment, what no plan's ``segment_costs`` goes below: ``evaluate.floor_items``
    summed by the segment of the node each is charged at. Every
    stage's memory grows with its segments', so ``least_memory`` of these bounds every plan's
    cut from below (``solve_stages`` refuses a stage count with it before solving)."""
    paths, seg = program_segments(c)
    n = len(paths) + 2
    state, act = [0.0] * n, [0.0] * n
    for name, s, k in floor_items(c, mode):
        state[seg[name] + 1] += s
        act[seg[name] + 1] += k
    return [SegmentCost(0.0, state[i], act[i]) for i in range(n)]


def segment_costs(c: Candidates, choice: dict[str, int], spec: DeviceSpec, mode: str
                  ) -> tuple[list[str], list[SegmentCost]]:
    """The layer paths and the cost of each segment (pre, layers, post) of plan ``choice``."""
    paths, seg = program_segments(c)
    costs = breakdown(c, choice, spec, mode)
    n = len(paths) + 2
    time, state, act = [0.0] * n, [0.0] * n, [0.0] * n
    for name, k in seg.items():
        x = costs[name]
        time[k + 1] += x.time_s
        state[k + 1] += x.state_bytes
        act[k + 1] = act[k + 1] + x.activation_bytes if mode == "training" else max(act[k + 1], x.activation_bytes)
    cross = [0.0] * (n + 1)  # difference array: bytes crossing after segment index i
    for (v, oi), cons in c.consumers.items():
        if c.nodes[v].kind in (NodeKind.PARAM, NodeKind.BUFFER, NodeKind.STATE):
            continue  # each stage holds its own copy of a tensor it reads
        p = seg[v] + 1
        q = max(seg[u] for u, _ in cons) + 1
        if q > p:
            place = c.nodes[v].strategies[choice[v]].outputs()[oi]
            b = local_bytes(c.nodes[v].metas[oi], place, c.world_size)
            cross[p] += b
            cross[q] -= b
    out, run = [], 0.0
    for i in range(n):
        run += cross[i]
        out.append(run)
    return paths, [SegmentCost(time[i], state[i], act[i], out[i]) for i in range(n)]
