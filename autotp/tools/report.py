"""How plans are shown: the plan table (one row per weight-bearing op, layers folded), sizes
and times in human units, each rank's local weight shape, and the Graphviz export. The words
for a split come from the op registry's ``display`` fact."""
from __future__ import annotations

import sys
from collections import defaultdict
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

from autotp.candidates import NodeKind
from autotp.core.placements import OutPlacement, Shard, local_sizes
from autotp.rules import Display, op_info


_WIDTH = None if sys.stdout.isatty() else 160  # pipes and files: wide enough for the tables


out = Console(highlight=False, width=_WIDTH)


def _shown(target: object) -> bool:
    """Whether plan tables show the op as a matmul-like row (its registry ``display`` fact)."""
    return op_info(target).display is not None


def _split_words(display: Display, p: OutPlacement) -> str:
    """The practitioner's word for a split ``p`` of the tensor the op is shown by (column,
    row, vocab, hidden, heads: the registry's ``display.words``), "replicated" when unsplit."""
    if not isinstance(p, Shard):
        return "replicated"
    if display.by == "output":
        return display.words(p)
    fused = f" (fused, {len(p.blocks)} blocks)" if p.blocks else ""
    return display.words(p) + fused


def _fold(path: str) -> tuple[str, int | None]:
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i] + ["*"] + parts[i + 1:]), int(part)
    return path, None


def _unfold(folded: str, ix: list[int]) -> str:
    if not ix or ix[0] is None:
        return folded
    uniq = sorted(set(ix))
    span = f"{uniq[0]}–{uniq[-1]}" if uniq == list(range(uniq[0], uniq[-1] + 1)) and len(uniq) > 1 \
        else ",".join(map(str, uniq))
    return folded.replace("*", span) + (f" ×{len(uniq)}" if len(uniq) > 1 else "")


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n}"


def _time(s: float) -> str:
    return f"{s * 1e6:.1f} µs" if s < 1e-3 else (f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s")


def local_shape(p: Any, shape: Sequence[int], n: int) -> str:
    """A weight's local shape as the table shows it: ``768×4096``. A dim split unevenly shows
    its distinct per-rank sizes in rank order, rank 0's first: ``25129/25128×768`` (rank 0
    holds 25129 rows, some later rank 25128); ``768/256×4096`` (32 heads of 128 on 6 ranks:
    6, 6, 6, 6, 6 and 2 heads)."""
    dims = [str(s) for s in shape]
    if isinstance(p, Shard):
        d = p.dim % len(shape)
        dims[d] = "/".join(map(str, dict.fromkeys(local_sizes(p, shape[d], n))))
    return "×".join(dims)


def matmul_rows(pd) -> list[tuple[str, str, str, str, str]]:
    """(module, op, split words, local weight shape, placements) per matmul, layers folded."""
    c, choice = pd.candidates, pd.choice
    n = c.world_size
    rows: dict[tuple, list[int]] = defaultdict(list)
    for name, nc in c.nodes.items():
        display = op_info(nc.target).display
        if display is None:
            continue
        st = nc.strategies[choice[name]]
        wslot = next((i for i, v in enumerate(nc.slots) if c.nodes[v[0]].kind is NodeKind.PARAM), None)
        if display.by == "output":
            words = _split_words(display, st.output)
            shape = ""
        elif wslot is None:
            continue
        else:
            words = _split_words(display, st.inputs[wslot])
            shape = local_shape(st.inputs[wslot], c.nodes[nc.slots[wslot][0]].metas[0].shape, n)
        folded, idx = _fold(nc.module)
        key = (folded, nc.op.split(".")[1], words, shape,
               f"{', '.join(map(str, st.inputs))} → {st.output}")
        rows[key].append(idx)
    return [(_unfold(k[0], ix), k[1], k[2], k[3], k[4]) for k, ix in rows.items()]


def _replicated_time(pd) -> float:
    # strategy 0 of every node is all-Replicate (rules.strategies_from_dims, strategies.build)
    from autotp.cost.evaluate import evaluate
    ev = evaluate(pd.candidates, {n: 0 for n in pd.candidates.nodes}, pd.spec, pd.plan.mode)
    return ev.time_s if ev is not None else float("nan")


def print_table(pd, out: Console = out) -> None:
    p = pd.plan
    out.print(f"[bold]autotp plan[/bold]: world size {p.world_size}, device {p.device}, "
              f"mode {p.mode}, objective {p.objective}")
    t = Table(title="matmuls and attention", title_justify="left")
    for col in ("module", "op", "split", "local weight", "placements (inputs → output)"):
        t.add_column(col)
    for row in matmul_rows(pd):
        t.add_row(*row)
    out.print(t)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for col in p.collectives:
        folded, idx = _fold(col.module or "<input>")
        groups[(folded, col.kind, col.phase, col.bytes)].append(idx)
    t = Table(title="collectives per step", title_justify="left")
    for col in ("after module", "kind", "phase", "bytes each", "count"):
        t.add_column(col)
    for (folded, kind, phase, nbytes), ix in groups.items():
        t.add_row(_unfold(folded, ix), kind, phase, _bytes(nbytes), str(len(ix)))
    out.print(t)
    fwd = sum(x.bytes for x in p.collectives if x.phase == "forward")
    bwd = sum(x.bytes for x in p.collectives if x.phase == "backward")
    rep = _replicated_time(pd)
    ideal = p.param_bytes_total / p.world_size
    if p.pipeline is not None:
        out.print(f"the whole model's tensor-parallel shard at one microbatch (before the cut into "
                  f"{p.pipeline.size} stages; each stage holds its own layers, see below):")
    out.print(f"parameters per rank: {_bytes(p.param_bytes_per_rank)} "
              f"(total/N = {_bytes(ideal)}, {p.param_bytes_per_rank / max(ideal, 1):.3f}× of it; "
              f"total {_bytes(p.param_bytes_total)})")
    act = ("kept for the backward" if p.mode == "training" else "peak of one op's inputs and output")
    state = p.memory_bytes_per_rank - p.activation_bytes_per_rank
    if p.pipeline is None:
        out.print(f"memory per rank: {_bytes(p.memory_bytes_per_rank)} = state {_bytes(state)} "
                  f"({'parameters, gradients, optimizer' if p.mode == 'training' else 'parameters'}"
                  f"{f', KV cache {_bytes(p.state_bytes_per_rank)}' if p.state_bytes_per_rank else ''}) "
                  f"+ activations {_bytes(p.activation_bytes_per_rank)} ({act}); budget "
                  f"{_bytes(pd.budget or pd.spec.memory_bytes)}")
    seq = len(p.sequence_split)
    if seq:
        out.print(f"sequence parallel: {seq} ops run on a split batch/sequence dim (the memory budget "
                  f"binds); inputs must keep that dim divisible by {p.world_size}")
    out.print(f"communication per step: forward {_bytes(fwd)}, backward {_bytes(bwd)} "
              f"({len(p.collectives)} collectives)")
    if p.dp_size > 1:
        kind = {"ddp": "DDP: gradients all-reduced", "fsdp": "FSDP: state divided across them, "
                "gathered layer by layer"}.get(p.dp_mode, p.dp_mode)
        out.print(f"data parallel: {p.dp_size} replicas of this group ({kind}), "
                  f"{_time(p.dp_time_s)} of the communication time per step")
    if p.pipeline is not None:
        print_stages(p)
        return
    out.print(f"predicted step time: {_time(p.predicted_time_s)} (compute {_time(p.compute_time_s)}, "
              f"communication {_time(p.comm_time_s)}); replicated plan {_time(rep)} "
              f"→ {rep / p.predicted_time_s if p.predicted_time_s else float('nan'):.2f}× speed-up")


def print_stages(p) -> None:
    """The pipeline's stages: layers, time per microbatch, memory per rank, bytes sent on
    (interleaved: the pipeline rank running each stage, and each rank's memory)."""
    pipe = p.pipeline
    v = pipe.stages_per_rank
    t = Table(title=f"pipeline: {pipe.size} stages"
                    + (f" on {pipe.ranks} ranks ({v} each, interleaved)" if v > 1 else "")
                    + f" x {p.world_size} tensor-parallel ranks, {pipe.schedule}, "
                    f"{pipe.microbatches} microbatches", box=None)
    cols = ("stage",) + (("rank",) if v > 1 else ()) + ("layers", "time / microbatch",
                                                          "memory / rank", "sends / microbatch")
    for col in cols:
        t.add_column(col)
    rank_time = [sum(pipe.stages[s].time_s for s in pipe.on_rank(r)) for r in range(pipe.ranks)]
    slowest = max(rank_time) if v > 1 else max(st.time_s for st in pipe.stages)
    for i, st in enumerate(pipe.stages):
        first, last = st.layers[0], st.layers[-1]
        extra = " + embeddings" if i == 0 else " + head" if i == pipe.size - 1 else ""
        mark = " *" if (rank_time[i % pipe.ranks] if v > 1 else st.time_s) == slowest else ""
        t.add_row(str(i), *((str(i % pipe.ranks),) if v > 1 else ()),
                  f"{first} .. {last.rsplit('.', 1)[-1]} ({len(st.layers)}){extra}",
                  _time(st.time_s) + mark, _bytes(st.memory_bytes),
                  _bytes(st.send_bytes) if st.send_bytes else "-")
    out.print(t)
    how = (f"({pipe.microbatches} + ({pipe.ranks} - 1) / {v}) x the slowest rank's stages (*)" if v > 1
           else f"({pipe.microbatches} + {pipe.size} - 1) x the slowest stage (*)")
    out.print(f"predicted step time: {_time(pipe.step_time_s)} = {how}; bubble {pipe.bubble:.1%} of the "
              f"step; largest memory {_bytes(max(st.memory_bytes for st in pipe.stages))} per rank "
              f"(state and the activations in flight)")


def to_dot(pd) -> str:
    colors = {"R": "lightgrey", "P": "orange"}
    c, choice = pd.candidates, pd.choice
    lines = ["digraph autotp {", "  rankdir=TB; node [shape=box, style=filled, fontsize=10];"]
    for name, nc in c.nodes.items():
        outp = str(nc.strategies[choice[name]].output)
        color = colors.get(outp, "lightblue" if outp.startswith("S") else "white")
        label = f"{name}\\n{nc.op.replace('aten.', '')}\\n{nc.module}\\n{outp}"
        lines.append(f'  "{name}" [label="{label}", fillcolor="{color}"];')
    marked = {(e.value[0], cons): e for e in _edges(pd) for cons, _ in e.consumers}
    for name, nc in c.nodes.items():
        for v in nc.slots:
            e = marked.get((v[0], name))
            if e is None:
                lines.append(f'  "{v[0]}" -> "{name}";')
            else:
                ops = "+".join(x for x in e.transition.forward + tuple("bwd:" + y for y in e.transition.backward) if x != "slice")
                lines.append(f'  "{v[0]}" -> "{name}" [color=red, penwidth=2, label="{ops or "slice"}"];')
    lines.append("}")
    return "\n".join(lines)


def _edges(pd):
    from autotp.cost.evaluate import evaluate
    ev = evaluate(pd.candidates, pd.choice, pd.spec, pd.plan.mode)
    return ev.edges if ev else ()


def in_module(path: str, module: str) -> bool:
    """Whether module path ``path`` is ``module`` or inside it."""
    return path == module or path.startswith(module + ".")


def why_whole(pd, modules: Sequence[str] = (), resolve_limit: int = 20) -> list[tuple[str, str, str]]:
    """For every weight the plan keeps whole (Replicate) in ``modules`` (all when empty): its
    name, bytes, and why, so that a missing rule reads differently from a choice:

    - "no rule": every op that reads it has no sharding rule (it runs replicated);
    - "no split": no dim of it can be split at this world size;
    - "consumers": the ops that read it take it only whole (their rules offer no split of it);
    - "cost" / "memory": a split exists; the best whole plan that splits it is slower by the
      amount shown (objective "time"), or (objective "memory") keeping it whole is within the
      memory objective's slack. Re-solved per weight, for at most ``resolve_limit`` weights."""
    from autotp.cost.evaluate import evaluate
    from autotp.errors import AutoTPError
    from autotp.solve.solve import solve
    c, choice = pd.candidates, pd.choice
    base = evaluate(c, choice, pd.spec, pd.plan.mode)
    rows, resolved = [], 0
    for name, nc in c.nodes.items():
        if nc.kind is not NodeKind.PARAM or isinstance(nc.strategies[choice[name]].output, Shard):
            continue
        if modules and not any(in_module(nc.module, m) for m in modules):
            continue
        users = [(c.nodes[u], slot) for u, slot in c.consumers.get((name, 0), ())]
        size = _bytes(nc.metas[0].nbytes)
        if users and all(u.fallback for u, _ in users):
            ops = ", ".join(sorted({u.op for u, _ in users}))
            rows.append((str(nc.target), size, f"no rule: {ops} has no sharding rule and runs "
                         "replicated (docs/adding_an_op_rule.md)"))
        elif len(nc.strategies) == 1:
            rows.append((str(nc.target), size, f"no split: no dim of {tuple(nc.metas[0].shape)} "
                         f"splits at world size {c.world_size}"))
        elif not any(isinstance(st.inputs[slot], Shard) for u, slot in users for st in u.strategies):
            rows.append((str(nc.target), size, "consumers: the ops that read it take it only whole"))
        elif pd.plan.objective == "memory":
            rows.append((str(nc.target), size, "memory: kept whole within the memory objective's "
                         "slack (0.1% of a rank's even share of the parameters), which spares gathering activations for it"))
        else:
            why = "cost: the plan is faster with it whole"
            if resolved < resolve_limit and base is not None:
                resolved += 1
                best = None
                for s, st in enumerate(nc.strategies):
                    if not isinstance(st.output, Shard):
                        continue
                    try:
                        alt = solve(c, pd.spec, pd.plan.mode, pd.plan.objective, pd.budget,
                                    pinned={name: s})
                    except AutoTPError:
                        continue
                    ev = evaluate(c, alt, pd.spec, pd.plan.mode)
                    if ev is not None and (best is None or ev.time_s < best):
                        best = ev.time_s
                why += (f" (the best plan that splits it: {(best - base.time_s) * 1e6:+.2f} µs)"
                        if best is not None else " (no plan that splits it fits)")
            rows.append((str(nc.target), size, why))
    return rows


def print_whole(rows: list[tuple[str, str, str]], out: Console = out) -> None:
    if not rows:
        return
    t = Table(title="weights kept whole, and why", title_justify="left")
    for col in ("weight", "bytes", "why"):
        t.add_column(col)
    for r in rows:
        t.add_row(*r)
    out.print(t)
