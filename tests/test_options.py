"""One PlanOptions and one pipeline: the simulator plans from the same options as plan() and
parallelize(), and options are fixed when the Candidates are built."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import autotp
from autotp.capture import capture
from autotp.core.options import PlanOptions
from autotp.runtime.pipeline import candidates, plan_model
from autotp.tools.simulate import simulated_modules
from models import MLP


@pytest.mark.parametrize("bad, match", [
    (dict(world_size=0), "world_size"), (dict(world_size=2.0), "world_size"),
    (dict(world_size=2, mode="train"), "mode"), (dict(world_size=2, objective="fast"), "objective"),
    (dict(world_size=2, dp_size=0), "data_parallel"), (dict(world_size=2, memory_budget=0), "memory_budget"),
    (dict(world_size=2, optimizer_bytes=-1), "optimizer_bytes"),
])
def test_bad_options_are_refused(bad: dict, match: str) -> None:
    with pytest.raises(autotp.AutoTPError, match=match):
        PlanOptions(**bad)


def test_options_are_set_once_on_the_candidates() -> None:
    x = torch.randn(2, 3, 16)
    o = PlanOptions(world_size=2, optimizer_bytes=0.0, dp_size=4)
    c = candidates(capture(MLP(), (x,)), o)
    assert (c.dp_size, c.optimizer_bytes) == (4, 0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.dp_size = 2  # type: ignore[misc]


def test_simulator_plans_what_plan_plans() -> None:
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(2, 3, 16)
    kw = dict(world_size=2, device="cpu-gloo", memory_budget=1e9, optimizer_bytes=4.0, data_parallel=2)
    want = autotp.plan(model, (x,), **kw)
    mods = simulated_modules(model, (x,), **kw)
    assert all(m.plan == want for m in mods)
    planned = plan_model(model, (x,), None, PlanOptions(world_size=2, device="cpu-gloo", memory_budget=1e9,
                                                         optimizer_bytes=4.0, dp_size=2))
    assert planned.plan == want and planned.budget == 1e9
    with torch.no_grad():
        for y in autotp.simulate(model, (x,), **kw):
            torch.testing.assert_close(y, model(x))


def test_simulator_loads_a_model_on_meta_from_weights() -> None:
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(2, 3, 16)
    with autotp.empty_weights():
        empty = MLP()
    with pytest.raises(autotp.AutoTPError, match="meta device"):
        autotp.simulate(empty, (x,), world_size=2)
    with torch.no_grad():
        for y in autotp.simulate(empty, (x,), world_size=2, weights=model.state_dict()):
            torch.testing.assert_close(y, model(x))


def test_modes_are_the_cost_models() -> None:
    from autotp.core import options
    from autotp.cost import model as cost
    assert options.MODES == cost.MODES
