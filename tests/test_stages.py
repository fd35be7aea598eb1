"""Pipeline stages (a mesh with a "pp" dim): the layers cut into stages balanced by the cost
model, each stage tensor-parallel inside its "tp" dim, run over microbatches by
torch.distributed.pipelining's 1F1B, GPipe and interleaved 1F1B schedules. Real gloo processes train 3 AdamW
steps and must end with the weights of one process training on the global batch (within
1e-5), the loss returned on every rank equal to one process's:

- 4 processes (one spawned group): a 4-layer Llama with grouped-query attention at pp 2 x tp 2
  under 1F1B, under GPipe and interleaved (4 stages, 2 on each pipeline rank); GPT-2, whose input and output embeddings are one tensor held by
  the first and the last stage, its DCP checkpoint after the first step resumed at pp 2 x tp 2
  and at tp 4; a 5-layer Llama at pp 2 x dp 2 (uneven stages, replicas averaging their
  gradients); the errors a user meets, the same on every rank;
- 3 processes: a 5-layer Llama at pp 3 x tp 1.

Without processes: a plan's stages, bubble and memory, and the errors of impossible cuts."""
from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

import autotp
from autotp.cost.pipeline import bubble_fraction, in_flight, interleaved_warmup
from autotp.errors import AutoTPError, PlanError
from autotp.plans import with_pipeline
from autotp.runtime.api import plan_details
from dist_utils import raised, run_ranks
from examples import hf_models

STEPS, BATCH, SEQ, MICRO = 3, 8, 12, 4


def _model(name: str, layers: int):
    if name == "llama":  # 4 heads, 2 kv heads: grouped-query attention
        return hf_models.llama(n_layer=layers, hidden=64, heads=4, kv_heads=2, seed=0)[0]
    return hf_models.gpt2(n_layer=layers, seed=0)[0]


def _batches() -> list[torch.Tensor]:
    torch.manual_seed(5)
    return [torch.randint(0, 256, (BATCH, SEQ)) for _ in range(STEPS)]


def _optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, eps=1e-6)  # eps: see test_mesh


def _call(ids: torch.Tensor, labels: bool = True) -> dict:
    return {"input_ids": ids, "use_cache": False} | ({"labels": ids} if labels else {})


def _reference(name: str, layers: int) -> tuple[dict, list[float]]:
    model = _model(name, layers)
    opt = _optimizer(model.parameters())
    losses = []
    for ids in _batches():
        opt.zero_grad()
        out = model(**_call(ids))
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses


def _train(mesh, name: str, layers: int, schedule: str, target: bool = False, root: str | None = None) -> dict:
    dims = mesh.mesh_dim_names
    dp = mesh.size(dims.index("dp")) if "dp" in dims else 1
    dp_rank = mesh.get_local_rank("dp") if "dp" in dims else 0
    mine = lambda ids: ids.chunk(dp)[dp_rank]  # noqa: E731  (a replica's rows)
    model = _model(name, layers)
    tp = autotp.parallelize(model, (), _call(mine(_batches()[0]), not target), mesh=mesh,
                            microbatches=MICRO, schedule=schedule, device="cpu-gloo")
    opt = _optimizer(tp.parameters())
    losses = []
    ce = torch.nn.functional.cross_entropy
    for i, ids in enumerate(_batches()):
        if i == 1 and root is not None:  # a sharded checkpoint after the first step, resumed below
            autotp.save_checkpoint(tp, f"{root}/dcp", opt)
        opt.zero_grad()
        if target:  # the loss computed from the logits and a target, not by the model
            loss = tp.step((), _call(mine(ids), False), target=mine(ids), loss_fn=lambda out, t: ce(
                out.logits[:, :-1].flatten(0, 1), t[:, 1:].flatten()))
        else:
            loss = tp.step((), _call(mine(ids)), loss_fn=lambda out: out.loss)
        opt.step()
        losses.append(loss.item())
    saved = None
    if root is not None:  # collective: every rank gathers, global rank 0 writes
        saved = autotp.save_pretrained(tp, f"{root}/{name}", config=model.config)
    return {"state": autotp.gather_state_dict(tp), "losses": losses, "stage": tp.stage, "saved": saved,
            "local": list(tp.local_stages),
            "layers": [st.layers for st in tp.plan.pipeline.stages],
            "params": sorted(n for n, _ in tp.named_parameters()),
            "forward": raised(lambda: tp(**_call(ids))),
            "other_call": raised(lambda: tp.step((), _call(ids, target), loss_fn=lambda out: out.loss))}


CASES4 = {"llama_1f1b": ("llama", 4, "1f1b", (2, 2), ("pp", "tp"), False),
          "llama_gpipe": ("llama", 4, "gpipe", (2, 2), ("pp", "tp"), False),
          "llama_interleaved": ("llama", 4, "interleaved", (2, 2), ("pp", "tp"), False),
          "gpt2_tied": ("gpt2", 4, "1f1b", (2, 2), ("pp", "tp"), True),
          "llama5_dp": ("llama", 5, "1f1b", (2, 2, 1), ("pp", "dp", "tp"), False)}


def _four(rank: int, world: int, root: str) -> dict:
    out = {}
    for key, (name, layers, schedule, shape, dims, target) in CASES4.items():
        out[key] = _train(init_device_mesh("cpu", shape, mesh_dim_names=dims), name, layers, schedule, target,
                          root if key == SAVED else None)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
    with autotp.empty_weights():  # the checkpoint saved above, each rank reading its stage's slices
        empty = _model("gpt2", 4)
    loaded = autotp.parallelize(empty, (), _call(_batches()[0], False), mesh=mesh, microbatches=MICRO,
                                weights=f"{root}/gpt2")
    out["loaded"] = {"state": autotp.gather_state_dict(loaded),
                     "on_meta": [n for n, p in loaded.named_parameters() if p.device.type == "meta"],
                     "unloaded": loaded.unloaded}
    out["resumed"] = _resume(root)
    model = _model("llama", 4)
    ids = _batches()[0]
    out["errors"] = {
        "microbatches": raised(lambda: autotp.parallelize(model, (), _call(ids[:6]), mesh=mesh, microbatches=4)),
        "schedule": raised(lambda: autotp.parallelize(model, (), _call(ids), mesh=mesh, microbatches=4,
                                                       schedule="zigzag")),
        "dims": raised(lambda: autotp.parallelize(model, (), _call(ids), microbatches=4, mesh=init_device_mesh(
            "cpu", (2, 2), mesh_dim_names=("pp", "x")))),
    }
    return out


def _logits_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _resume(root: str) -> dict:
    """The DCP checkpoint the pipelined GPT-2 wrote after its first step, loaded (weights and
    AdamW state) into a GPT-2 of other initial weights, pipelined again (pp 2 x tp 2) and
    unpipelined (tp 4), each trained the remaining steps."""
    out = {}
    for how in ("pp2_tp2", "tp4"):
        model = hf_models.gpt2(n_layer=4, seed=1)[0]
        call = _call(_batches()[0], False)
        if how == "pp2_tp2":
            tp = autotp.parallelize(model, (), call, mesh=init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp")),
                                    microbatches=MICRO, device="cpu-gloo")
        else:
            tp = autotp.parallelize(model, (), call, device="cpu-gloo")
        opt = _optimizer(tp.parameters())
        autotp.load_checkpoint(tp, f"{root}/dcp", opt)
        for ids in _batches()[1:]:
            opt.zero_grad()
            if how == "pp2_tp2":
                tp.step((), _call(ids, False), target=ids, loss_fn=lambda o, t: _logits_loss(o.logits, t))
            else:
                _logits_loss(tp(**_call(ids, False)).logits, ids).backward()
            opt.step()
        out[how] = autotp.gather_state_dict(tp)
    return out


def _three(rank: int, world: int) -> dict:
    return _train(init_device_mesh("cpu", (3, 1), mesh_dim_names=("pp", "tp")), "llama", 5, "1f1b")


SAVED = "gpt2_tied"  # written with save_pretrained after training


@pytest.fixture(scope="module")
def saved_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pipelined"))


@pytest.fixture(scope="module")
def four(saved_root):
    return run_ranks(_four, 4, saved_root)


def _close(got: dict, want: dict) -> float:
    assert set(got) == set(want)
    return max((got[k] - want[k]).abs().max().item() for k in want)


@pytest.mark.parametrize("key", list(CASES4))
def test_pipeline_trains_like_one_process(four, key: str) -> None:
    name, layers, _, shape, dims, _ = CASES4[key]
    want, losses = _reference(name, layers)
    for r, res in enumerate(four):
        got = res[key]
        assert _close(got["state"], want) < 1e-5, (key, r)
        if "dp" not in dims:  # a replica's loss is its own rows' mean
            assert got["losses"] == pytest.approx(losses, abs=1e-5)
        assert got["stage"] == r // (4 // shape[0])
        assert got["forward"].startswith("a pipelined module")
        assert "differs from the example inputs'" in got["other_call"]
    stages = four[0][key]["layers"]
    per_rank = 2 if CASES4[key][2] == "interleaved" else 1
    assert len(stages) == 2 * per_rank and sum(map(len, stages)) == layers
    # a rank holds only its stages' layers (interleaved: stages s and s + 2 on pipeline rank s)
    for r, res in enumerate(four):
        got = res[key]
        assert got["local"] == list(range(got["stage"], 2 * per_rank, 2))
        held = {n.split(".")[2] for n in got["params"] if ".h." in n or ".layers." in n}
        assert held == {p.split(".")[-1] for s in got["local"] for p in stages[s]}


def test_tied_embedding_is_held_by_first_and_last_stage(four) -> None:
    for res in four:
        got = res["gpt2_tied"]
        assert "transformer.wte.weight" in got["params"], got["stage"]


def test_save_pretrained_from_stages_loads_in_transformers(four, saved_root) -> None:
    """Every stage's layers in one file; the tied embedding once; transformers loads it
    bit-exactly as the trained weights."""
    import transformers
    got = four[0][SAVED]
    assert "lm_head.weight" not in got["saved"] and "transformer.wte.weight" in got["saved"]
    loaded = transformers.GPT2LMHeadModel.from_pretrained(f"{saved_root}/gpt2")
    state = loaded.state_dict()
    for k, v in got["state"].items():
        assert torch.equal(state[k], v), k
    for res in four:  # a model built without weights, loaded from that checkpoint stage by stage
        assert res["loaded"]["on_meta"] == []
        assert res["loaded"]["unloaded"] >= 12  # the other stage's blocks (12 tensors each) never read
        for k, v in got["state"].items():
            assert torch.equal(res["loaded"]["state"][k], v), k


def test_dcp_checkpoint_of_stages_resumes_at_other_layouts(four) -> None:
    """A sharded checkpoint written by 2 stages x 2 tensor-parallel ranks (each stage its
    layers, the tied embedding from both) resumes training, optimizer state included, at
    pp 2 x tp 2 and at tp 4 from other initial weights, to the uninterrupted weights."""
    want, _ = _reference("gpt2", 4)
    for r, res in enumerate(four):
        for how, state in res["resumed"].items():
            assert _close(state, want) < 1e-5, (how, r)


def test_bad_pipeline_input_same_error_on_every_rank(four) -> None:
    errors = [res["errors"] for res in four]
    assert all(e == errors[0] for e in errors)
    e = errors[0]
    assert "does not split into 4 equal microbatches" in e["microbatches"]
    assert "schedule must be one of" in e["schedule"] and "zigzag" in e["schedule"]
    assert "dims named 'pp', 'tp'" in e["dims"]


def test_three_stages() -> None:
    res = run_ranks(_three, 3)
    want, losses = _reference("llama", 5)
    for r, got in enumerate(res):
        assert got["stage"] == r
        assert _close(got["state"], want) < 1e-5
        assert got["losses"] == pytest.approx(losses, abs=1e-5)
    assert sum(map(len, res[0]["layers"])) == 5 and len(res[0]["layers"]) == 3


def test_plan_reports_stages_bubble_and_memory() -> None:
    model, _, kw = hf_models.llama(n_layer=8, hidden=64, heads=4, kv_heads=2, batch=8, seq=16)
    p = autotp.plan(model, (), kw, world_size=2, device="h100", pipeline_parallel=4,
                    microbatches=4, schedule="1f1b")
    pipe = p.pipeline
    assert pipe.size == 4 and sum(len(s.layers) for s in pipe.stages) == 8
    assert pipe.bubble == pytest.approx(bubble_fraction(4, 4)) == pytest.approx(3 / 7)
    assert pipe.step_time_s == pytest.approx(7 * max(s.time_s for s in pipe.stages))
    assert p.predicted_time_s == pipe.step_time_s
    assert p.memory_bytes_per_rank == max(s.memory_bytes for s in pipe.stages)
    assert all(s.send_bytes > 0 for s in pipe.stages[:-1]) and pipe.stages[-1].send_bytes == 0
    # GPipe keeps every microbatch in flight, 1F1B at most pp - s: never more memory
    g = autotp.plan(model, (), kw, world_size=2, device="h100", pipeline_parallel=4,
                    microbatches=4, schedule="gpipe").pipeline
    assert max(s.memory_bytes for s in g.stages) >= max(s.memory_bytes for s in pipe.stages)
    assert in_flight(0, 4, 8, "1f1b") == 4 and in_flight(3, 4, 8, "1f1b") == 1 and in_flight(0, 4, 8, "gpipe") == 8
    assert autotp.Plan.from_json(p.to_json()) == p


def test_impossible_cuts_say_why() -> None:
    model, _, kw = hf_models.llama(n_layer=4, hidden=64, heads=4, kv_heads=2, batch=8, seq=16)
    with pytest.raises(PlanError, match="at most 4 stages"):
        autotp.plan(model, (), kw, world_size=1, pipeline_parallel=5, microbatches=4)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    with pytest.raises(PlanError, match=r"no stack of identical layers.*could be cut between the children "
                                        r"of the model: 0 \(144 parameters\), 2 \(136 parameters\)"):
        autotp.plan(mlp, (torch.randn(4, 8),), world_size=1, pipeline_parallel=2, microbatches=2)
    with pytest.raises(AutoTPError, match="does not split into 3 equal microbatches"):
        autotp.plan(model, (), kw, world_size=1, pipeline_parallel=2, microbatches=3)
    with pytest.raises(PlanError, match=r"no plan cut into 2 stages fits 0.01 MB per rank at world size 1: "
                                        r"the largest stage of any cut holds more than [0-9.]+ MB"):
        autotp.plan(model, (), kw, world_size=1, pipeline_parallel=2, microbatches=4, memory_budget=1e4)
    planned = plan_details(model, (), kw, world_size=1, device="h100")
    with pytest.raises(PlanError, match=r"no cut of 4 layers into 2 stages fits 0.01 MB .* the best cut needs "
                                        r"[0-9.]+ MB on its largest stage"):
        with_pipeline(planned.plan, planned.candidates, planned.choice, planned.spec, 2, 4, "gpipe", 1e4)


def test_stage_floor_bounds_every_plan() -> None:
    """floor_segments (what solve_stages refuses a stage count with) is below every plan's
    segments, segment by segment, so its least cut bounds every plan's from below."""
    from autotp.cost.pipeline import floor_segments, least_memory, segment_costs
    model, _, kw = hf_models.llama(n_layer=4, hidden=64, heads=4, kv_heads=2, batch=8, seq=16)
    for objective in ("time", "memory"):
        pd = plan_details(model, (), kw, world_size=2, device="h100", objective=objective)
        _, segs = segment_costs(pd.candidates, pd.choice, pd.spec, "training")
        floor = floor_segments(pd.candidates, "training")
        assert len(floor) == len(segs) == 6
        for f, x in zip(floor, segs):
            assert f.state_bytes <= x.state_bytes * (1 + 1e-9) and f.activation_bytes <= x.activation_bytes * (1 + 1e-9)
        assert all(f.state_bytes > 0 and f.activation_bytes > 0 for f in floor[1:-1])  # the layers
        for pp, m in ((2, 4), (4, 8)):
            low = least_memory(floor, pp, m, "1f1b", "training", pd.spec)
            assert 0 < low <= least_memory(segs, pp, m, "1f1b", "training", pd.spec)


def test_layout_with_pipeline_stages() -> None:
    """choose_layout(pipeline=True) on 2 nodes x 2: 2 stages beside the 2-D layouts,
    each pipelined layout's plan cut into its stages over one row per microbatch; under a budget
    that only the leanest layouts fit, a pipelined one among them, the fastest that fits is chosen."""
    model, _, kw = hf_models.llama(n_layer=4, hidden=64, heads=4, kv_heads=2, batch=8, seq=16)
    lay = autotp.choose_layout(model, (), kw, nodes=2, gpus_per_node=2, device="h100", global_batch=8,
                               pipeline=True)
    piped = [x for x in lay.alternatives if x.pp > 1]
    assert {(x.pp, x.tp) for x in piped} == {(2, 1), (2, 2)}
    for x in piped:
        assert x.fits and x.plan.pipeline.size == x.pp and x.dp == 4 // (x.pp * x.tp)
        assert x.microbatches == x.batch_per_replica == 8 // x.dp  # one row each
        assert x.predicted_time_s == x.plan.pipeline.step_time_s
    staged = min(x.memory_bytes_per_rank for x in piped)
    budget = staged * 1.001  # the least a pipelined layout holds: the faster ones no longer fit
    tight = autotp.choose_layout(model, (), kw, nodes=2, gpus_per_node=2, device="h100", global_batch=8,
                                 pipeline=True, memory_budget=budget)
    fitting = [x for x in tight.alternatives if x.fits]
    assert tight.best.fits and all(x.memory_bytes_per_rank <= budget for x in fitting)
    assert tight.best.predicted_time_s == min(x.predicted_time_s for x in fitting)
    assert any(x.pp > 1 for x in fitting) and len(fitting) < len([x for x in lay.alternatives if x.fits])


def test_interleaved_plan_cuts_stages_per_rank() -> None:
    """Interleaved 1F1B: v x pp stages, stage s on pipeline rank s mod pp, the bubble
    (pp - 1) / (v M + pp - 1), the step (M + (pp - 1) / v) x the slowest rank's stages, and
    each rank's memory its stages' state plus its in-flight bound (cost/pipeline.py)."""
    model, _, kw = hf_models.llama(n_layer=8, hidden=64, heads=4, kv_heads=2, batch=8, seq=16)
    common = dict(world_size=2, device="h100", pipeline_parallel=2, microbatches=4)
    p = autotp.plan(model, (), kw, schedule="interleaved", **common)
    pipe = p.pipeline
    assert (pipe.size, pipe.ranks, pipe.stages_per_rank) == (4, 2, 2)
    assert pipe.on_rank(0) == (0, 2) and pipe.on_rank(1) == (1, 3)
    assert sum(len(s.layers) for s in pipe.stages) == 8
    assert pipe.bubble == pytest.approx(bubble_fraction(2, 4, 2)) == pytest.approx(1 / 9)
    slowest = max(sum(pipe.stages[s].time_s for s in pipe.on_rank(r)) for r in range(2))
    assert pipe.step_time_s == pytest.approx((4 + 1 / 2) * slowest)
    assert p.memory_bytes_per_rank == max(s.memory_bytes for s in pipe.stages)
    # rank 0 runs (v - 1) rounds of 2 microbatches plus 2 per hop before its first backward
    assert interleaved_warmup(0, 2, 2, 4) == 4 and interleaved_warmup(1, 2, 2, 4) == 2
    assert interleaved_warmup(0, 4, 2, 2) == 4  # capped at all v M of its forwards
    assert autotp.Plan.from_json(p.to_json()) == p
    v4 = autotp.plan(model, (), kw, schedule="interleaved", stages_per_rank=4, **common).pipeline
    assert (v4.size, v4.ranks) == (8, 2) and v4.bubble == pytest.approx(1 / 17)
    with pytest.raises(PlanError, match="16 pipeline stages .2 ranks x 8 stages each.*at most 8"):
        autotp.plan(model, (), kw, schedule="interleaved", stages_per_rank=8, **common)
    with pytest.raises(AutoTPError, match="stages_per_rank=2 needs schedule='interleaved'"):
        autotp.plan(model, (), kw, schedule="1f1b", stages_per_rank=2, **common)
    with pytest.raises(AutoTPError, match="not a multiple of"):
        autotp.plan(model, (), kw, schedule="interleaved", **(common | {"microbatches": 7, "pipeline_parallel": 3}))


class _SharedScale(torch.nn.Module):
    """Four identical blocks and one parameter every block's output is scaled by: under the
    interleaved schedule on 2 ranks each rank's two stages both read it."""

    def __init__(self, h: int = 16):
        super().__init__()
        torch.manual_seed(3)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(h, 2 * h), torch.nn.Tanh(),
                                                              torch.nn.Linear(2 * h, h)) for _ in range(4))
        self.scale = torch.nn.Parameter(torch.full((h,), 0.9))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x) * self.scale
        return x


def _shared_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(7)
    return [(torch.randn(8, 16), torch.randn(8, 16)) for _ in range(STEPS)]


def _shared_interleaved(rank: int, world: int) -> dict:
    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("pp", "tp"))
    x0 = _shared_batches()[0][0]
    tp = autotp.parallelize(_SharedScale(), (x0,), mesh=mesh, microbatches=4, schedule="interleaved",
                            device="cpu-gloo")
    opt = _optimizer(tp.parameters())
    mse = torch.nn.functional.mse_loss
    for x, y in _shared_batches():
        opt.zero_grad()
        tp.step((x,), target=y, loss_fn=mse)
        opt.step()
    return {"state": autotp.gather_state_dict(tp), "local": list(tp.local_stages)}


def test_interleaved_parameter_read_by_two_stages_of_one_rank() -> None:
    """A parameter every stage reads (stages 0 and 2 on rank 0, 1 and 3 on rank 1): its
    gradient sums every stage's, across ranks and within one, and is divided by the
    microbatch count once; 3 AdamW steps equal one process on the whole batch."""
    model = _SharedScale()
    opt = _optimizer(model.parameters())
    for x, y in _shared_batches():
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    want = {k: v.detach() for k, v in model.state_dict().items()}
    for r, got in enumerate(run_ranks(_shared_interleaved, 2)):
        assert got["local"] == [r, r + 2]
        assert _close(got["state"], want) < 1e-5, r


def test_interleaved_cut_is_judged_by_its_ranks() -> None:
    """Interleaved, a cut fits when each rank's stages do (their state plus the rank's
    in-flight bound), not when each stage fits an even 1/v of the budget: here the fastest cut
    puts 4 of state in one stage, more than half the 11 bytes, and its ranks need 9 and 8."""
    from autotp.cost.devices import get_device
    from autotp.cost.pipeline import SegmentCost, balance
    layers = [(3, 0, 1), (1, 1, 1), (2, 4, 1), (1, 0, 1), (1, 1, 1)]  # (ms, state, activations)
    segs = [SegmentCost(0.0, 0.0, 0.0)] + [SegmentCost(t * 1e-3, s, a) for t, s, a in layers] + \
        [SegmentCost(0.0, 0.0, 0.0)]
    got = balance(segs, 2, 2, "interleaved", "training", get_device("h100"), 11.0, v=2)
    assert got is not None and got.bounds == (0, 1, 2, 3)
    assert got.memory_bytes == (9.0, 8.0, 9.0, 8.0)  # per stage, its rank's
    assert balance(segs, 2, 2, "interleaved", "training", get_device("h100"), 8.5, v=2) is None


def test_interleaved_cut_balances_ranks_not_stages() -> None:
    """The step is set by the slowest rank's stages together: a slow last layer is balanced
    by giving the other rank more layers (the least slowest stage alone gives 36 ms here)."""
    from autotp.cost.devices import get_device
    from autotp.cost.pipeline import SegmentCost, balance
    segs = [SegmentCost(0.0, 0.0, 0.0)] + [SegmentCost(t * 1e-3, 1.0, 1.0) for t in (1, 1, 1, 1, 1, 1, 1, 5)] + \
        [SegmentCost(0.0, 0.0, 0.0)]
    got = balance(segs, 2, 4, "interleaved", "training", get_device("h100"), 1e9, v=2)
    assert got.step_time_s == pytest.approx((4 + 1 / 2) * 6e-3)  # each rank 6 ms per microbatch
    assert sum(got.time_s[0::2]) == pytest.approx(sum(got.time_s[1::2]))
