"""choose_layout: the TP degree, the data-parallel kind and degree for nodes x gpus_per_node,
from the cost model's step time under memory; and `autotp layout`, its table."""
from __future__ import annotations

import math

import pytest

import autotp
from autotp.errors import InfeasiblePlanError
from models import build
from test_cli import autotp as run_cli


def _llama():
    model, args, kwargs, _ = build("llama")
    return model, args, kwargs


def test_layouts_cover_every_degree_and_best_is_the_fastest_that_fits() -> None:
    model, args, kwargs = _llama()
    lay = autotp.choose_layout(model, args, kwargs, nodes=2, gpus_per_node=4, device="h100",
                               global_batch=8)
    seen = {(x.tp, x.dp, x.dp_mode) for x in lay.alternatives}
    assert seen == {(t, 8 // t, k) for t in (1, 2, 4) for k in ("ddp", "fsdp")}
    for x in lay.alternatives:
        assert x.fits and x.plan is not None
        assert (x.plan.world_size, x.plan.dp_size, x.plan.dp_mode) == (x.tp, x.dp, x.dp_mode)
        assert x.predicted_time_s == x.plan.predicted_time_s
    assert lay.best.predicted_time_s == min(x.predicted_time_s for x in lay.alternatives)
    assert lay.best is lay.alternatives[0]


def test_memory_decides_when_it_binds() -> None:
    """Under a budget the replicated layouts exceed, only TP or FSDP layouts fit, the best is
    one of them, and every layout marked as fitting does fit; a budget nothing fits is an
    InfeasiblePlanError naming the least memory."""
    model, args, kwargs = _llama()
    free = autotp.choose_layout(model, args, kwargs, nodes=1, gpus_per_node=4, device="h100",
                                global_batch=4)
    by = {(x.tp, x.dp_mode): x for x in free.alternatives}
    replicated = by[(1, "ddp")].memory_bytes_per_rank
    least = min(x.memory_bytes_per_rank for x in free.alternatives)
    assert least < replicated
    budget = (least + replicated) / 2
    tight = autotp.choose_layout(model, args, kwargs, nodes=1, gpus_per_node=4, device="h100",
                                 global_batch=4, memory_budget=budget)
    assert not {x.fits for x in tight.alternatives if (x.tp, x.dp_mode) == (1, "ddp")} - {False}
    assert tight.best.fits and tight.best.memory_bytes_per_rank <= budget
    assert (tight.best.tp, tight.best.dp_mode) != (1, "ddp")
    for x in tight.alternatives:
        assert x.fits == (x.plan is not None)
        if x.fits:
            assert x.memory_bytes_per_rank <= budget
    with pytest.raises(InfeasiblePlanError, match="least memory"):
        autotp.choose_layout(model, args, kwargs, nodes=1, gpus_per_node=2, device="h100",
                             global_batch=4, memory_budget=least / 100)


def test_one_node_prices_replicas_on_the_node_link() -> None:
    """On one node the data-parallel replicas talk over the intra-node link (NVLink), not the
    inter-node one a 2-D mesh across nodes uses."""
    import dataclasses

    from autotp.cost.devices import get_device
    model, args, kwargs = _llama()
    lay = autotp.choose_layout(model, args, kwargs, nodes=1, gpus_per_node=2, device="h100", global_batch=4)
    ddp = next(x for x in lay.alternatives if (x.tp, x.dp_mode) == (1, "ddp"))
    half = tuple(a[:2] for a in args)
    h100 = get_device("h100")
    assert h100.inter_link_bandwidth < h100.link_bandwidth
    node = dataclasses.replace(h100, inter_link_bandwidth=0.0, inter_latency=0.0)
    want = autotp.plan(model, half, kwargs, world_size=1, device=node, data_parallel=2, dp_mode="ddp")
    across = autotp.plan(model, half, kwargs, world_size=1, device="h100", data_parallel=2, dp_mode="ddp")
    assert ddp.plan.dp_time_s == pytest.approx(want.dp_time_s)
    assert 0 < ddp.plan.dp_time_s < across.dp_time_s


def test_a_batch_the_replicas_cannot_share_is_listed_with_why() -> None:
    model, args, kwargs = _llama()
    lay = autotp.choose_layout(model, args, kwargs, nodes=1, gpus_per_node=4, device="h100",
                               global_batch=2)
    tp1 = [x for x in lay.alternatives if x.tp == 1]
    assert len(tp1) == 1 and not tp1[0].fits and "does not divide into 4 replicas" in tp1[0].why
    assert math.isinf(tp1[0].predicted_time_s) and lay.best.tp in (2, 4)


def test_cli_layout_prints_the_table() -> None:
    r = run_cli("layout", "examples/hf_models.py:llama", "--nodes", "2", "--gpus-per-node", "2",
                "--global-batch", "4")
    assert r.returncode == 0, r.stderr
    assert "layouts of 2 x 2 h100" in r.stdout and "best: tp " in r.stdout, r.stdout
    assert "fsdp" in r.stdout and "ddp" in r.stdout
    r = run_cli("layout", "examples/hf_models.py:llama", "--nodes", "0", "--gpus-per-node", "2")
    assert r.returncode == 1 and "nodes must be a positive int" in r.stderr, r.stderr
    # the example batch (2) divides into no replica count of 4 x 2: say so, plan nothing
    r = run_cli("layout", "examples/hf_models.py:llama", "--nodes", "4", "--gpus-per-node", "2")
    assert r.returncode == 1 and "divides into none of the replica counts" in r.stderr, r.stderr


def test_cli_plan_shows_the_data_parallel_axis() -> None:
    r = run_cli("plan", "examples/hf_models.py:llama", "--world-size", "2", "--data-parallel", "4",
                "--dp-mode", "fsdp")
    assert r.returncode == 0, r.stderr
    assert "data parallel: 4 replicas of this group (FSDP" in r.stdout, r.stdout
    r = run_cli("plan", "examples/hf_models.py:llama", "--world-size", "2", "--data-parallel", "4",
                "--dp-mode", "zero3")
    assert r.returncode == 2 and "invalid choice" in r.stderr, r.stderr
