"""Repeated layers: the cut capture gives the graph of a full capture (node names included),
and solving runs of identical layers once gives plans as good as solving the whole graph."""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from random_models import RandomLM, archs
from torch import nn

import autotp
from autotp.capture import capture, module_path
from autotp.solve.runs import find_runs, solve_runs
from autotp.cost.devices import PRESETS, DeviceSpec
from autotp.core.options import PlanOptions
from autotp.runtime.pipeline import candidates, solve_plan
from autotp.solve.solve import _weight, solve
from autotp.cost.evaluate import evaluate
from autotp.candidates import build
from examples import hf_models, nanogpt


def _describe(cap) -> list[tuple]:
    return [(n.name, n.op, str(n.target), str(n.args), str(n.kwargs), module_path(n),
             cap.metas.get(n.name)) for n in cap.gm.graph.nodes]


def _both(model: nn.Module, args: tuple, kwargs: dict | None = None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return capture(model, args, kwargs), capture(model, args, kwargs, cut=False)


def _same_graph(cut, full) -> None:
    assert _describe(cut) == _describe(full)
    assert [(n, tuple(p.shape)) for n, p in cut.gm.named_parameters()] == \
        [(n, tuple(p.shape)) for n, p in full.gm.named_parameters()]
    for (n, p), (_, q) in zip(cut.gm.named_parameters(), full.gm.named_parameters()):
        assert p is q, n  # the model's own tensors, under their own names
    assert cut.stacks == full.stacks


def _qwen3_moe(n_layer: int = 6):
    """A small Qwen3-MoE in bf16: its experts run ``aten._grouped_mm`` (whose fake kernel takes
    bf16 only), and export computes the experts' token-count size once, in layer 0, for
    every later layer to read."""
    import transformers as T
    torch.manual_seed(0)
    cfg = T.Qwen3MoeConfig(num_hidden_layers=n_layer, hidden_size=64, intermediate_size=128,
                           moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256)
    m = T.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    return m, (), {"input_ids": torch.randint(0, 256, (2, 16)), "use_cache": False}


def _deepseek_v3(n_layer: int = 7):
    """A small DeepSeek-V3 in bf16: MLA attention, its first 2 layers dense and the other 5
    mixture-of-experts, so the layer container is a stack only from layer 2 on."""
    import transformers as T
    torch.manual_seed(0)
    cfg = T.DeepseekV3Config(num_hidden_layers=n_layer, first_k_dense_replace=2, hidden_size=64,
                             intermediate_size=128, moe_intermediate_size=32, n_routed_experts=4,
                             num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
                             q_lora_rank=32, kv_lora_rank=16, num_attention_heads=4, num_key_value_heads=4,
                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, vocab_size=256)
    m = T.DeepseekV3ForCausalLM(cfg).to(torch.bfloat16)
    return m, (), {"input_ids": torch.randint(0, 256, (2, 16)), "use_cache": False}


@pytest.mark.parametrize("name", ["llama", "gpt2", "nanogpt", "qwen3_moe", "deepseek_v3"])
def test_cut_capture_is_the_full_graph(name: str) -> None:
    if name == "deepseek_v3":
        m, a, k = _deepseek_v3()
        from autotp.capture.stacks import Stack, find_stacks
        assert find_stacks(m) == (Stack("model.layers", 7, start=2),)
    elif name == "qwen3_moe":
        m, a, k = _qwen3_moe()
    elif name == "llama":
        m, a, k = hf_models.llama(n_layer=6)
    elif name == "gpt2":
        m, a, k = hf_models.gpt2(n_layer=6)
    else:
        (m, a), k = nanogpt.gpt(n_layer=6), {}
    cut, full = _both(m, a, k)
    assert cut.cut and not full.cut
    _same_graph(cut, full)
    for objective in ("time", "memory"):  # the same Plan, node names included
        options = PlanOptions(world_size=2, device=PRESETS["h100"], objective=objective)
        plans = [solve_plan(candidates(x, options), options)[0] for x in (cut, full)]
        assert plans[0] == plans[1]


def test_cut_capture_runs_like_the_model() -> None:
    m, a, k = hf_models.llama(n_layer=5)
    m.eval()
    cap = capture(m, a, k)
    assert cap.cut
    with torch.no_grad():
        torch.testing.assert_close(cap.gm(*a, **k)[0], m(*a, **k).logits)


class Layer(nn.Module):
    def __init__(self, h: int, index: int = 0, act: str = "gelu"):
        super().__init__()
        self.up = nn.Linear(h, 4 * h)
        self.down = nn.Linear(4 * h, h)
        self.index, self.act, self.special = index, act, 4  # layer 4 is special

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(getattr(F, self.act)(self.up(x)))
        return x + (2.0 * y if self.index == self.special else y)


class Stacked(nn.Module):
    """Layers with meaningless names, some of which behave differently by index or by an
    attribute no parameter shows."""

    def __init__(self, n: int = 7, h: int = 16, acts: list[str] | None = None, by_count: bool = False):
        super().__init__()
        self.zq = nn.ModuleList(Layer(h, i, (acts or ["gelu"] * n)[i]) for i in range(n))
        self.n, self.by_count = n, by_count
        self.p9 = nn.Linear(h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.by_count:
            for i in range(self.n):
                x = self.zq[i](x)
        else:
            for layer in self.zq:
                x = layer(x)
        return self.p9(x)


@pytest.mark.parametrize("case", ["index", "attribute", "by_count", "uniform", "index_read_same"])
def test_cut_capture_falls_back_when_layers_differ(case: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16)
    if case == "index":  # layer 4's forward branches on its index
        m = Stacked()
    elif case == "attribute":  # layer 5 uses another activation: same parameters, other ops
        m = Stacked(acts=["gelu"] * 5 + ["silu", "gelu"])
        for layer in m.zq:
            layer.index = 0
    elif case == "by_count":  # the model indexes its list up to a count: cutting it breaks it
        m = Stacked(by_count=True)
        for layer in m.zq:
            layer.index = 0
    elif case == "index_read_same":  # each layer reads its own index, to the same effect
        m = Stacked()
        for layer in m.zq:
            layer.special = -1
    else:
        m = Stacked()
        for layer in m.zq:
            layer.index = 0
    cut, full = _both(m, (x,))
    assert cut.cut == (case in ("uniform", "index_read_same"))
    _same_graph(cut, full)


# ---------------------------------------------------------------------------------------------
# the solver: runs of identical layers solved once are exact

SPECS = [PRESETS["h100"], PRESETS["cpu-gloo"],
         DeviceSpec("slow-link", {"float32": 1e15, "bfloat16": 1e15}, 1e12, 1e12, 1e6, 1e-3)]


def _compare(c, spec: DeviceSpec, mode: str, objective: str, budget: float | None = None) -> None:
    fast = solve(c, spec, mode, objective, budget)
    whole = solve(c, spec, mode, objective, budget, layers=False)
    ef, ew = evaluate(c, fast, spec, mode), evaluate(c, whole, spec, mode)
    assert ef is not None and ew is not None
    assert ef.time_s == pytest.approx(ew.time_s, rel=1e-6, abs=1e-12)
    if objective == "memory":
        assert ef.param_bytes == pytest.approx(ew.param_bytes, rel=1e-9)


@pytest.fixture(scope="module")
def llama_4() -> object:
    m, a, k = hf_models.llama(n_layer=4, hidden=4096, heads=32, kv_heads=8, intermediate=11008,
                              vocab=32000, batch=1, seq=2048, meta=True, dtype=torch.bfloat16)
    return capture(m, a, k)


@pytest.mark.parametrize("mode", ["training", "inference"])
@pytest.mark.parametrize("objective", ["time", "memory"])
@pytest.mark.parametrize("world", [2, 8])
def test_layers_solved_once_match_the_whole_graph_llama(llama_4, mode: str, objective: str,
                                                        world: int) -> None:
    c = build(llama_4, world)
    runs = find_runs(c)
    assert [len(r.units) for r in runs] == [3]  # layers 1-3: layer 0 reads the embedding
    spec = PRESETS["h100"]
    # the decomposition alone (no memory bound) is the optimum
    kind = "memory" if objective == "memory" else "time"
    by_layers = solve_runs(c, spec, mode, runs, kind, _weight(kind), {}, 60.0)
    assert by_layers is not None
    _compare(c, spec, mode, objective)


@functools.cache
def _small(name: str):
    m, a, k = (hf_models.gpt2 if name == "gpt2" else hf_models.llama)(n_layer=4)
    return build(capture(m, a, k), 2)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("objective", ["time", "memory"])
@pytest.mark.parametrize("mode", ["training", "inference"])
def test_layers_solved_once_match_small_models(spec: DeviceSpec, name: str, objective: str,
                                               mode: str) -> None:
    c = _small(name)
    assert find_runs(c)
    _compare(c, spec, mode, objective)


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.text = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.text += record.getMessage() + "\n"


def test_binding_memory_budget_solves_the_whole_graph(llama_4) -> None:
    c = build(llama_4, 8)
    spec = PRESETS["h100"]
    free = evaluate(c, solve(c, spec, "training"), spec).memory_bytes
    with pytest.raises(autotp.InfeasiblePlanError) as info:
        solve(c, spec, "training", memory_budget=1.0)
    least = info.value.least_bytes
    assert least < free
    budget = (least + free) / 2  # state and activations per rank
    logger = logging.getLogger("autotp.solve.solve")
    seen, level = _Messages(), logger.level
    logger.addHandler(seen)
    logger.setLevel(logging.INFO)
    try:
        _compare(c, spec, "training", "time", budget)
    finally:
        logger.removeHandler(seen)
        logger.setLevel(level)
    assert "binds" in seen.text


def test_memory_objective_prices_parameter_bytes_by_layers_on_deep_models(monkeypatch) -> None:
    """objective="memory"'s second step (least time within the least parameter bytes plus the
    slack) on a graph too big for the whole program (WHOLE_GRAPH_NODES, lowered here so that
    a small DeepSeek-V3 counts as big) prices parameter bytes per layer and mixes the two
    Lagrangian corners (solve._priced_bound) instead of solving the whole graph: the same
    predicted time (within the MIP gap) and parameter bytes as the whole graph's optimum."""
    import autotp.solve.solve as S
    m, a, k = _deepseek_v3()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = build(capture(m, a, k), 4, shared_pieces=True)
    spec = PRESETS["h100"]
    whole = solve(c, spec, "inference", "memory")
    used = []
    real = S._priced_bound
    monkeypatch.setattr(S, "WHOLE_GRAPH_NODES", 0)
    monkeypatch.setattr(S, "_priced_bound", lambda *x, **y: used.append(1) or real(*x, **y))
    monkeypatch.setattr(S, "_whole", lambda *x, **y: pytest.fail("the whole graph was solved"))
    c.cache.clear()
    priced = solve(c, spec, "inference", "memory")
    assert used, "the priced search was not used"
    t_whole = evaluate(c, whole, spec, "inference").time_s
    t_priced = evaluate(c, priced, spec, "inference").time_s
    assert t_priced == pytest.approx(t_whole, rel=1e-4), (t_priced, t_whole)  # HiGHS' MIP gap
    assert S._mem(c, priced) <= S._mem(c, whole) * (1 + 1e-9)


class SharedBlock(nn.Module):
    def __init__(self, h: int):
        super().__init__()
        self.a = nn.Linear(h, 4 * h)
        self.b = nn.Linear(4 * h, h)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return x + self.b(F.gelu(self.a(x) * s))


class SharedInput(nn.Module):
    """Every layer reads a value computed once before the layers (split or not): a paid
    transition from it is paid once for all layers, which the tables must account for."""

    def __init__(self, n: int = 5, h: int = 16):
        super().__init__()
        self.pre = nn.Linear(h, 4 * h)
        self.blocks = nn.ModuleList(SharedBlock(h) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.pre(x))
        for blk in self.blocks:
            x = blk(x, s)
        return x


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("objective", ["time", "memory"])
def test_shared_value_transitions_paid_once(spec: DeviceSpec, objective: str) -> None:
    torch.manual_seed(0)
    m = SharedInput()
    c = build(capture(m, (torch.randn(4, 64, 16),)), 2)
    runs = find_runs(c)
    assert runs and runs[0].shared
    _compare(c, spec, "training", objective)


def test_explain_pins_break_runs(llama_4) -> None:
    c = build(llama_4, 8)
    spec = PRESETS["h100"]
    name = next(n for n, nc in c.nodes.items()
                if nc.module == "model.layers.2.mlp.down_proj" and nc.kind == "op")
    for s in range(len(c.nodes[name].strategies)):
        try:
            fast = solve(c, spec, pinned={name: s})
        except autotp.InfeasiblePlanError:
            with pytest.raises(autotp.InfeasiblePlanError):
                solve(c, spec, pinned={name: s}, layers=False)
            continue
        whole = solve(c, spec, pinned={name: s}, layers=False)
        assert fast[name] == s
        assert evaluate(c, fast, spec).time_s == pytest.approx(evaluate(c, whole, spec).time_s, rel=1e-6)


@settings(max_examples=int(os.environ.get("LAYER_EXAMPLES", "8")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(archs(), st.sampled_from([2, 4]), st.sampled_from(["time", "memory"]),
       st.sampled_from(["training", "inference"]), st.sampled_from(SPECS))
def test_layers_solved_once_match_random_architectures(arch, world: int, objective: str, mode: str,
                                                       spec: DeviceSpec) -> None:
    torch.manual_seed(0)
    arch = dataclasses.replace(arch, layers=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = build(capture(RandomLM(arch), (torch.randint(0, arch.vocab, (2, 5)),)), world)
    assert find_runs(c), arch
    _compare(c, spec, mode, objective)


def test_parallel_model_from_cut_capture_equals_original() -> None:
    """The whole pipeline on a cut capture: each layer's replicated nodes read that layer's
    own weights (a mix-up of layers would change the output)."""
    torch.manual_seed(0)
    model, (idx,) = nanogpt.gpt(n_layer=6, n_embd=32, n_head=4)
    model.eval()
    cap = capture(model, (idx,))
    assert cap.cut
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = autotp.simulate(model, (idx,), world_size=2, objective="memory")
    with torch.no_grad():
        want = model(idx)
    for out in outs:
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


class ScaledBlock(nn.Module):
    """A block with a plain tensor attribute (not a buffer) that its forward reads."""

    def __init__(self, h: int, scale: float):
        super().__init__()
        self.lin = nn.Linear(h, h)
        self.scale = torch.full((h,), scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lin(x) * self.scale


def test_cut_capture_of_a_sequential_root_with_tensor_attributes() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(*(ScaledBlock(8, 1.0 + i) for i in range(6)))
    x = torch.randn(2, 3, 8)
    cut, full = _both(m, (x,))
    assert not cut.cut or _describe(cut) == _describe(full)
    with torch.no_grad():
        torch.testing.assert_close(cut.gm(x), m(x))
        torch.testing.assert_close(full.gm(x), m(x))


def test_cut_capture_of_a_sequential_root() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(*(Layer(8) for _ in range(6)))
    for layer in m:
        layer.special = -1
    x = torch.randn(2, 3, 8)
    cut, full = _both(m, (x,))
    assert cut.cut and cut.stacks[0].path == ""
    _same_graph(cut, full)
    with torch.no_grad():
        torch.testing.assert_close(cut.gm(x), m(x))


@settings(max_examples=int(os.environ.get("LAYER_EXAMPLES", "8")) // 2, deadline=None,
          derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(archs())
def test_cut_capture_of_random_architectures(arch) -> None:
    torch.manual_seed(0)
    arch = dataclasses.replace(arch, layers=6)
    model = RandomLM(arch)
    cut, full = _both(model, (torch.randint(0, arch.vocab, (2, 5)),))
    assert cut.cut, arch
    _same_graph(cut, full)
