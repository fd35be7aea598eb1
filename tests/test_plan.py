"""Plans without processes: Megatron's plan found from the algebra and costs, names don't
matter, JSON round-trips, the solver is exact."""
from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autotp
from autotp.capture import capture
from autotp.cost.devices import PRESETS, DeviceSpec
from autotp.solve.solve import brute_force, solve
from autotp.cost.evaluate import evaluate
from autotp.candidates import build
from examples import hf_models
from models import MLP, SortedExperts, saved_activation_bytes
from models import build as build_model


def _layer_collectives(plan: autotp.Plan, layer: str) -> list[tuple[str, str, str]]:
    return [(c.kind, c.phase, c.module) for c in plan.collectives
            if c.module.startswith(layer + ".") or c.module == layer]


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_megatron_plan_from_costs_llama_7b_width(mode: str) -> None:
    """Default objective at sizes where splitting pays: one all-reduce after attention and one
    after the MLP in forward, and (training) their conjugates at the column-split inputs."""
    m, a, k = hf_models.llama(n_layer=2, hidden=4096, heads=32, kv_heads=8, intermediate=11008,
                              vocab=32000, batch=1, seq=2048, meta=True, dtype=torch.bfloat16)
    plan = autotp.plan(m, a, k, world_size=8, device="h100", mode=mode)
    for layer in ("model.layers.0", "model.layers.1"):
        got = _layer_collectives(plan, layer)
        fwd = [c for c in got if c[1] == "forward"]
        assert fwd == [("all_reduce", "forward", f"{layer}.self_attn.o_proj"),
                       ("all_reduce", "forward", f"{layer}.mlp.down_proj")], got
        bwd = sorted(c for c in got if c[1] == "backward")
        if mode == "training":
            assert bwd == [("all_reduce", "backward", f"{layer}.input_layernorm"),
                           ("all_reduce", "backward", f"{layer}.post_attention_layernorm")], got
        else:
            assert bwd == []
    # bytes: 2 all-reduces of b*s*h bf16 per layer
    per_layer = [c.bytes for c in plan.collectives if c.module.startswith("model.layers.0.")
                 and c.phase == "forward"]
    assert per_layer == [1 * 2048 * 4096 * 2] * 2
    linear = {d.module.rsplit(".", 1)[-1]: (d.inputs, d.output) for d in plan.decisions
              if d.op == "aten.linear.default" and d.module.startswith("model.layers.0.")}
    for col in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        assert linear[col] == (("R", "S(0)"), "S(2)"), (col, linear[col])
    for row in ("o_proj", "down_proj"):
        assert linear[row] == (("S(2)", "S(1)"), "P"), (row, linear[row])


def test_megatron_plan_memory_objective_small_llama() -> None:
    m, a, k = hf_models.llama(n_layer=2)
    plan = autotp.plan(m, a, k, world_size=2, objective="memory")
    for layer in ("model.layers.0", "model.layers.1"):
        fwd = [(kind, mod) for kind, ph, mod in _layer_collectives(plan, layer)
               if ph == "forward" and kind in ("all_reduce", "reduce_scatter")]
        assert fwd == [("all_reduce", f"{layer}.self_attn.o_proj"),
                       ("all_reduce", f"{layer}.mlp.down_proj")], fwd


class NamedBlock(nn.Module):
    """A pre-norm transformer block whose submodule names are chosen by the caller."""

    def __init__(self, names: dict[str, str], h: int = 64, heads: int = 4):
        super().__init__()
        self.names, self.heads = names, heads
        for role, shape in {"q": (h, h), "k": (h, h), "v": (h, h), "o": (h, h),
                            "up": (h, 4 * h), "down": (4 * h, h)}.items():
            setattr(self, names[role], nn.Linear(*shape, bias=False))
        setattr(self, names["ln1"], nn.LayerNorm(h))
        setattr(self, names["ln2"], nn.LayerNorm(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = lambda role: getattr(self, self.names[role])  # noqa: E731
        b, t, h = x.shape
        y = g("ln1")(x)
        q, k, v = (g(r)(y).view(b, t, self.heads, -1).transpose(1, 2) for r in "qkv")
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, h)
        x = x + g("o")(att)
        return x + g("down")(F.silu(g("up")(g("ln2")(x))))


def test_meaningless_names_get_the_same_plan() -> None:
    usual = dict(q="q_proj", k="k_proj", v="v_proj", o="o_proj", up="up_proj", down="down_proj",
                 ln1="input_layernorm", ln2="post_attention_layernorm")
    odd = dict(q="zz", k="a1", v="foo", o="b", up="m0", down="x9", ln1="p", ln2="w")
    x = torch.randn(2, 16, 64)
    plans = []
    for names in (usual, odd):
        torch.manual_seed(0)
        plans.append(autotp.plan(NamedBlock(names), (x,), world_size=4, objective="memory"))
    strip = lambda p: [(d.op, d.inputs, d.output) for d in p.decisions]  # noqa: E731
    assert strip(plans[0]) == strip(plans[1])
    assert [(c.kind, c.phase, c.bytes) for c in plans[0].collectives] == \
        [(c.kind, c.phase, c.bytes) for c in plans[1].collectives]
    assert plans[0].param_bytes_per_rank < plans[0].param_bytes_total / 3


def test_plan_json_round_trip() -> None:
    m, a, k = hf_models.gpt2()
    p = autotp.plan(m, a, k, world_size=2, objective="memory")
    q = autotp.Plan.from_json(p.to_json())
    assert q == p
    import json
    d = json.loads(p.to_json())
    for key in ("world_size", "device", "param_bytes_per_rank", "param_bytes_total",
                "predicted_time_s", "decisions", "collectives"):
        assert key in d
    assert set(d["decisions"][0]) >= {"node", "module", "op", "inputs", "output"}
    assert set(d["collectives"][0]) >= {"kind", "phase", "bytes", "module"}
    assert {c["kind"] for c in d["collectives"]} <= {"all_reduce", "all_gather", "reduce_scatter",
                                                     "all_to_all"}


SPECS = [PRESETS["h100"], PRESETS["cpu-gloo"],
         DeviceSpec("slow-link", {"float32": 1e15}, 1e12, 1e12, 1e6, 1e-3)]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("objective", ["time", "memory"])
def test_solver_matches_brute_force(world: int, spec: DeviceSpec, objective: str) -> None:
    torch.manual_seed(0)
    c = build(capture(MLP(8, 32), (torch.randn(4, 64, 8),)), world)
    choice = solve(c, spec, "training", objective)
    ev = evaluate(c, choice, spec)
    best_choice, best = brute_force(c, spec, "training", objective)
    assert ev is not None
    assert ev.time_s == pytest.approx(best.time_s, rel=1e-6, abs=1e-12)
    if objective == "memory":
        assert ev.param_bytes == pytest.approx(best.param_bytes)


def test_memory_budget_and_infeasible() -> None:
    m, a, k = hf_models.llama(n_layer=2, hidden=4096, heads=32, kv_heads=8, intermediate=11008,
                              vocab=32000, batch=1, seq=2048, meta=True, dtype=torch.bfloat16)
    tiny = DeviceSpec("tiny", dict(PRESETS["h100"].flops), 0.5e9, 3e12, 450e9, 1e-5)
    with pytest.raises(autotp.InfeasiblePlanError, match="least any plan needs") as info:
        autotp.plan(m, a, k, world_size=2, device=tiny)
    assert info.value.least_bytes > tiny.memory_bytes and info.value.min_world_size > 2
    p = autotp.plan(m, a, k, world_size=8, device="h100", objective="memory")
    assert p.param_bytes_per_rank <= 1.01 * p.param_bytes_total / 8


def test_world_size_one_replicates() -> None:
    p = autotp.plan(MLP(), (torch.randn(2, 3, 16),), world_size=1, objective="memory")
    assert p.collectives == () and p.param_bytes_per_rank == p.param_bytes_total
    assert collections.Counter(d.output for d in p.decisions if d.op != "output") == \
        collections.Counter({"R": len(p.decisions) - 1})


def test_tied_embedding_and_head_split_by_vocab() -> None:
    """nanoGPT ties wte to lm_head: splitting the weight's rows serves both uses locally
    (vocab-parallel lookup, vocab-column head); the gloo tests run this plan."""
    from examples.nanogpt import gpt
    model, args = gpt()
    p = autotp.plan(model, args, world_size=2, objective="memory")
    emb = next(d for d in p.decisions if d.module == "wte" and d.op == "aten.embedding.default")
    assert (emb.inputs, emb.output) == (("S(0)", "R"), "P")
    assert next(s for s in p.params if s.name in ("wte.weight", "lm_head.weight")).placement == "S(0)"


def test_repeat_interleave_gqa_keeps_megatron_plan() -> None:
    """Found by benchmarks/runtime.py: GQA written with repeat_interleave had no rule, so k/v
    were gathered (16 collectives instead of 8). With the rule: Megatron's 8, and equal outputs."""
    import os
    import sys
    import warnings
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "benchmarks"))
    from runtime import Model
    torch.manual_seed(0)
    model = Model(64, 2)
    x = torch.randn(2, 8, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "has no sharding rule" warning
        outs = autotp.simulate(model, (x,), world_size=2, objective="memory")
        p = autotp.plan(model, (x,), world_size=2, objective="memory")
    for out in outs:
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    assert p.count("all_reduce", "forward") == 4 and p.count("all_reduce", "backward") == 4
    assert p.count() == 8


def test_data_parallel_gradient_sync_makes_sharding_pay() -> None:
    """With a slow link across data-parallel replicas, a replicated weight's gradient
    all-reduce costs more than tensor parallelism's collectives: the same model and inputs
    get replicated weights at data_parallel=1 and split weights at data_parallel=8."""
    model = MLP(d=1024, h=4096)
    x = torch.randn(1, 1, 1024)
    spec = DeviceSpec("slow-dp", {"float32": 1e14}, 80e9, 1e12, 1e9, 1e-3,
                      inter_link_bandwidth=1e8, inter_latency=1e-3)
    alone = autotp.plan(model, (x,), world_size=2, device=spec)
    replicas = autotp.plan(model, (x,), world_size=2, device=spec, data_parallel=8)
    assert alone.param_bytes_per_rank == alone.param_bytes_total
    assert replicas.param_bytes_per_rank <= 0.51 * replicas.param_bytes_total
    # predicted: each weight's local gradient all-reduced once over 8 replicas (ring model)
    from autotp.cost.model import dp_grad_sync_time
    local = [torch.Size(p.shape).numel() * 4 / (2 if p.placement.startswith("S") else 1)
             for p in replicas.params]
    sync = sum(dp_grad_sync_time(b, 8, spec) for b in local)
    assert replicas.comm_time_s >= sync > 0.1


def test_llama_7b_shape_at_world_6_splits_heads_unevenly() -> None:
    """32 heads on 6 ranks: torch.chunk's 6, 6, 6, 6, 6, 2 heads (grain 128 = head_dim),
    the MLP's 11008 in 1835-row pieces: still Megatron's plan, not replication."""
    from autotp.core.placements import local_sizes, parse
    m, a, k = hf_models.llama(n_layer=2, hidden=4096, heads=32, kv_heads=32, intermediate=11008,
                              vocab=32000, batch=1, seq=2048, meta=True, dtype=torch.bfloat16)
    plan = autotp.plan(m, a, k, world_size=6, device="h100")
    params = {p.name: parse(p.placement) for p in plan.params}
    for layer in ("model.layers.0", "model.layers.1"):
        for proj in ("q_proj", "k_proj", "v_proj"):
            place = params[f"{layer}.self_attn.{proj}.weight"]
            assert place.dim == 0 and local_sizes(place, 4096, 6) == [768] * 5 + [256], place
        o = params[f"{layer}.self_attn.o_proj.weight"]
        assert o.dim == 1 and local_sizes(o, 4096, 6) == [768] * 5 + [256], o
        for proj, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            place = params[f"{layer}.mlp.{proj}.weight"]
            assert place.dim == dim and local_sizes(place, 11008, 6) == [1835] * 5 + [1833], place
        fwd = [c for c in _layer_collectives(plan, layer) if c[1] == "forward"]
        assert fwd == [("all_reduce", "forward", f"{layer}.self_attn.o_proj"),
                       ("all_reduce", "forward", f"{layer}.mlp.down_proj")], fwd
    # the largest rank's share: 6 of 32 heads, 1835 of 11008 MLP rows
    assert plan.param_bytes_per_rank < 0.2 * plan.param_bytes_total


def test_index_and_chunk_have_rules() -> None:
    """Advanced indexing passes the dims it does not index; chunk is a split into equal blocks,
    so the fused projection it cuts is split per block. Before these rules both ran replicated
    with a warning, and the fused weight stayed whole."""
    import warnings
    torch.manual_seed(0)
    model, x = SortedExperts(), torch.randn(2, 5, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "has no sharding rule"
        plan = autotp.plan(model, (x,), world_size=2, objective="memory")
        outs = autotp.simulate(model, (x,), world_size=2, objective="memory")
    assert {p.name: p.placement for p in plan.params} == {"w1.weight": "S(0,blocks=32+32)", "w2.weight": "S(1)"}
    assert plan.count(phase="forward") == plan.count("all_reduce", "forward") == 1  # Megatron's
    for out in outs:
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)


def test_strided_halves_of_a_fused_projection_split() -> None:
    """h[..., ::2] and h[..., 1::2] of a fused projection: its rows split on pair boundaries,
    each rank's k::2 is its piece of the gate (or up), and the MLP pays one all-reduce, as
    with separate projections (before, h was gathered for the slices)."""
    from models import StridedMLP
    torch.manual_seed(0)
    model, x = StridedMLP(), torch.randn(2, 5, 32)
    plan = autotp.plan(model, (x,), world_size=2, objective="memory")
    assert {p.name: p.placement for p in plan.params} == {"w1.weight": "S(0)", "w2.weight": "S(1)"}
    assert plan.count(phase="forward") == plan.count("all_reduce", "forward") == 1
    for out in autotp.simulate(model, (x,), world_size=2, objective="memory"):
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)


def test_einsum_splits_on_its_letters() -> None:
    """torch.einsum's equation is the labelling: attention with (hidden, heads, head_dim)
    weights splits on heads as Megatron's (one all-reduce), the einsum MLP column then row
    (one more); FLOPs come from the equation (2 x the product of the letters' sizes)."""
    from models import EinsumAttention
    from autotp.runtime.api import plan_details
    torch.manual_seed(0)
    model, x = EinsumAttention(), torch.randn(2, 3, 32)
    pd = plan_details(model, (x,), world_size=2, objective="memory")
    assert {p.name: p.placement for p in pd.plan.params} == {
        "wq": "S(1)", "wk": "S(1)", "wv": "S(1)", "wo": "S(0)", "w1": "S(1)", "w2": "S(0)"}
    assert pd.plan.count(phase="forward") == pd.plan.count("all_reduce", "forward") == 2
    flops = sorted(nc.flops for nc in pd.candidates.nodes.values() if nc.op == "aten.einsum.default")
    assert flops[-1] == 2 * 2 * 3 * 3 * 4 * 8 * 32  # b s t h d m of the three-operand einsum
    for out in autotp.simulate(model, (x,), world_size=2, objective="memory"):
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


def test_shared_pieces_layout_and_conversions() -> None:
    """``Shard(rep=k)``: n / k pieces, each held by k consecutive ranks; a split inside a
    shared piece is a local slice, anything else a gather (core/placements.py)."""
    from autotp.core.placements import Replicate, Shard, local_slices, make_shard, parse, shard_ranges, unshard
    from autotp.cost.model import convert_ops
    p = make_shard(1, 2, 1, 4, rep=2)  # 2 kv heads on 4 ranks
    assert p == Shard(1, rep=2) and parse(str(p)) == p and str(p) == "S(1,rep=2)"
    assert [shard_ranges(p, 2, r, 4) for r in range(4)] == [[(0, 1)], [(0, 1)], [(1, 2)], [(1, 2)]]
    assert make_shard(0, 8, 1, 4, rep=1) == Shard(0)
    q = Shard(1)  # the query heads: 8 on 4 ranks; rank 3's heads 6, 7 are the 2nd and 3rd of
    # its piece (heads 4-7) of the repeated kv heads
    assert local_slices(Shard(1, rep=2), q, 8, 3, 4) == [(2, 2)]
    assert convert_ops(Shard(1, rep=2), q, 8, 4) == ("slice",)
    assert convert_ops(Shard(1, rep=2), q) == ("all_gather", "slice")  # size unknown
    # 28 query heads (Qwen2-7B) on 8 ranks against 4 shared kv pieces of 7: not nested
    assert convert_ops(Shard(1, grain=1, rep=2), Shard(1), 28, 8) == ("all_gather", "slice")
    assert convert_ops(q, Shard(1, rep=2), 8, 4) == ("all_gather", "slice")
    assert convert_ops(Shard(1, rep=2), Replicate()) == ("all_gather",)
    from autotp.core.placements import Partial
    assert convert_ops(Partial(), Shard(1, rep=2)) == ("all_reduce", "slice")
    full = torch.arange(16.).view(2, 8)
    pieces = [full[:, 4 * (r // 2): 4 * (r // 2) + 4] for r in range(4)]
    assert torch.equal(unshard(pieces, Shard(1, rep=2)), full)


def test_decode_shares_kv_heads_when_ranks_outnumber_them() -> None:
    """32 query heads and 4 kv heads (Qwen2-7B's ratio) on 8 ranks, decode at 7B width:
    Megatron's plan for the query heads, and each kv head's projection rows and cache held by
    the 2 ranks whose query heads read it, 1/4 of the cache per rank (it was all of it)."""
    from autotp.runtime.api import plan_decode
    m, a, k = hf_models.llama(n_layer=2, hidden=4096, heads=32, kv_heads=4, intermediate=11008,
                              vocab=32000, batch=1, seq=512, meta=True, dtype=torch.bfloat16)
    plan = plan_decode(m, k["input_ids"], 32, world_size=8, device="h100").plan
    params = {p.name: p.placement for p in plan.params}
    assert params["model.layers.0.self_attn.k_proj.weight"] == "S(0,rep=2)", params
    assert params["model.layers.0.self_attn.q_proj.weight"] == "S(0)"
    caches = {s.name: s.placement for s in plan.state if "cache_k" in s.name or "cache_v" in s.name}
    assert set(caches.values()) == {"S(1,rep=2)"}, caches
    assert plan.state_bytes_per_rank * 4 <= plan.state_bytes_total + 4 * 8 * 2  # + the 0-d counters
    assert plan.count("all_reduce", "forward") == 4  # two per layer, as Megatron's
    train = autotp.plan(m, a, k, world_size=8, device="h100", mode="training")
    assert "rep=" not in " ".join(p.placement for p in train.params)  # no exact gradient


@pytest.mark.parametrize("name", ["mlp", "nanogpt", "gpt2", "llama", "bert"])
def test_activation_memory_model_matches_autograd(name: str) -> None:
    """Training activation memory as the cost model counts it (each op on the gradient path
    keeps its inputs, views/sums/casts keep nothing) against the bytes autograd really keeps
    in one forward of the unmodified model (measured with saved_tensors_hooks)."""
    model, args, kwargs, _ = build_model(name)
    predicted = autotp.plan(model, args, kwargs, world_size=1, device="cpu-gloo").activation_bytes_per_rank
    measured = saved_activation_bytes(model, args, kwargs)
    print(name, "predicted", predicted, "measured", measured, f"{predicted / measured:.2f}x")
    assert 0.8 * measured <= predicted <= 1.3 * measured


def test_elementwise_passes_cost_memory_bandwidth_unless_fused() -> None:
    """An elementwise op costs a pass over its inputs and output at memory bandwidth on a
    device that runs it unfused (cpu-gloo, calibrated specs): whole on every rank when
    replicated, 1/n when split, twice in training; nothing where elementwise ops are fused
    (the GPU presets); a view costs nothing either way."""
    import dataclasses
    from autotp.core.meta import TensorMeta
    from autotp.core.placements import Replicate, Shard
    from autotp.cost.model import compute_time
    from autotp.rules import Strategy
    aten = torch.ops.aten
    m = TensorMeta((64, 32), (False, False), torch.float32)  # 8 KiB
    eager = PRESETS["cpu-gloo"]
    assert not eager.fused_elementwise and PRESETS["h100"].fused_elementwise
    whole = Strategy((Replicate(), Replicate()), Replicate())
    split = Strategy((Shard(0), Shard(0)), Shard(0))
    t = compute_time(aten.add.Tensor, (m, m), (m,), whole, 2, eager, "inference")
    assert t == pytest.approx(3 * m.nbytes / eager.memory_bandwidth)
    assert compute_time(aten.add.Tensor, (m, m), (m,), split, 2, eager, "inference") == pytest.approx(t / 2)
    assert compute_time(aten.add.Tensor, (m, m), (m,), whole, 2, eager, "training") == pytest.approx(2 * t)
    fused = dataclasses.replace(eager, fused_elementwise=True)
    assert compute_time(aten.add.Tensor, (m, m), (m,), whole, 2, fused, "training") == 0.0
    view = Strategy((Replicate(),), Replicate())
    assert compute_time(aten.view.default, (m,), (m,), view, 2, eager, "training") == 0.0
    # a whole plan: the unfused device prices the same plan's elementwise work on top
    model = MLP()
    x = torch.randn(4, 16)
    plans = [autotp.plan(model, (x,), world_size=2, device=d) for d in (fused, eager)]
    assert plans[1].compute_time_s > plans[0].compute_time_s
