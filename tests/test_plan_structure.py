"""Plan time as structure, not seconds: on Llama the layer decomposition (solve/runs.py) is
used and its work stays bounded, whether the rotary tables are computed by ordinary ops in
the graph (transformers >= 5.24) or inside a ``torch.no_grad`` region as 5.23 did (which
export captures as one higher-order op without a rule). transformers 5.24 made the 70B plan
5x slower without any test noticing: the tables per shared placement gave up and the whole
graph was solved. These tests fail on that kind of change without timing anything."""
from __future__ import annotations

import types
import warnings

import pytest
import torch

from autotp.capture import capture
from autotp.solve.runs import find_runs
from autotp.cost.devices import PRESETS
from autotp.solve.program import Program
from autotp.solve.solve import solve
from autotp.candidates import build
from examples import hf_models


def _rotary_523(model: torch.nn.Module) -> None:
    """The rotary embedding's forward as transformers 5.23 wrote it: no_grad, a matmul."""
    rot = model.model.rotary_emb

    @torch.no_grad()
    def forward(self, x, position_ids):
        inv = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return ((emb.cos() * self.attention_scaling).to(x.dtype),
                (emb.sin() * self.attention_scaling).to(x.dtype))

    rot.forward = types.MethodType(forward, rot)


def _solve_counted(n_layer: int, old_rotary: bool) -> tuple[object, list[int]]:
    """Plans the model; returns the Candidates and the size (variables) of every program solved."""
    model, args, kwargs = hf_models.llama(n_layer=n_layer, hidden=1024, heads=16, kv_heads=4,
                                          intermediate=2816, vocab=32000, batch=1, seq=512,
                                          meta=True, dtype=torch.bfloat16)
    if old_rotary:
        _rotary_523(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = build(capture(model, args, kwargs), 8)
    SIZES.clear()
    solve(c, PRESETS["h100"], "inference")
    return c, list(SIZES)


SIZES: list[int] = []


@pytest.mark.parametrize("old_rotary", [False, True], ids=["rotary-in-graph", "rotary-no-grad"])
def test_llama_plan_uses_the_layer_decomposition(old_rotary: bool, monkeypatch) -> None:
    real = Program.solve

    def counted(self, weights, extra, time_limit):
        SIZES.append(self.n)
        return real(self, weights, extra, time_limit)

    monkeypatch.setattr(Program, "solve", counted)
    results = {}
    for n in (4, 8):
        c, sizes = _solve_counted(n, old_rotary)
        runs = find_runs(c)
        assert [len(r.units) for r in runs] == [n - 1]  # layer 0 reads the embedding
        tables = [v for k, v in c.cache.items() if isinstance(k, tuple) and k[0] == "table"]
        assert tables and all(t is not None for t in tables), "a run's table was given up"
        results[n] = (len(c.nodes), sizes)
    (nodes4, sizes4), (nodes8, sizes8) = results[4], results[8]
    assert nodes8 > 1.6 * nodes4
    # the same layer tables at any depth: the number of programs solved does not grow ...
    assert len(sizes8) == len(sizes4)
    assert len(sizes8) <= 400
    # ... and the largest one (the graph outside the runs, one block per run) barely does
    assert max(sizes8) <= 1.1 * max(sizes4)
    assert max(sizes8) < 0.5 * nodes8 * 20  # far below a whole-graph program


def _grains_by_passes(order, calls, dims, metas, value_of, n, passes=None):
    """The grain hints by whole passes over the graph's label groups until nothing changes
    (``passes``: at most that many), the definition ``candidates._grain_hints`` computes by a
    worklist."""
    from collections import defaultdict
    from autotp.candidates import grain_groups, grain_step
    groups = grain_groups(order, calls, dims, metas, value_of)
    grains = defaultdict(lambda: defaultdict(set))
    k = 0
    while passes is None or k < passes:
        k += 1
        changed = False
        for where, sizes in groups:
            changed = bool(grain_step(where, sizes, grains, n)) or changed
        if not changed:
            break
    return {(v, d): s for v, dd in grains.items() for d, s in dd.items() if s}


def test_grain_hints_reach_their_fixpoint(monkeypatch) -> None:
    """Grain hints (whole heads, whole kv groups, for splits the world size doesn't divide)
    are the fixpoint of their propagation, however many steps it takes. On a small Qwen3-MoE
    (16 heads, 4 kv heads, world 8) a cap of 8 passes over the graph (the propagation until
    this change) stopped short of it, as it did on Qwen3-235B, whose q projections then
    missed the kv-group grain."""
    import autotp.candidates as C
    seen = {}
    real = C._grain_hints

    def recorded(*a):
        out = real(*a)
        seen["args"], seen["grains"] = a, {(v, d): s for v, dd in out.items() for d, s in dd.items() if s}
        return out

    monkeypatch.setattr(C, "_grain_hints", recorded)
    import transformers as T
    cfg = T.Qwen3MoeConfig(num_hidden_layers=2, hidden_size=256, intermediate_size=512,
                           moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                           num_attention_heads=16, num_key_value_heads=4, head_dim=16, vocab_size=128)
    with torch.device("meta"):
        model = T.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    ids = torch.zeros(1, 64, dtype=torch.long, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build(capture(model, (), {"input_ids": ids, "use_cache": False}), 8)
    full = _grains_by_passes(*seen["args"])
    assert seen["grains"] == full
    capped = _grains_by_passes(*seen["args"], passes=8)
    assert capped != full, "the 8-pass cap reaches the fixpoint here: the test no longer shows it"
