"""Bad input gets a clear answer, never a wrong result."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import autotp
from models import MLP


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), Branchy())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class Branchy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # control flow on a tensor value: export can't capture it
            return x * 2
        return x


def test_parallelize_without_process_group_explains_torchrun() -> None:
    with pytest.raises(autotp.ProcessGroupError, match="torchrun"):
        autotp.parallelize(MLP(), (torch.randn(2, 3, 16),))


def test_capture_failure_names_module_and_line() -> None:
    with pytest.raises(autotp.CaptureError) as info:
        autotp.plan(DataDependent(), (torch.randn(2, 4),), world_size=2)
    msg = str(info.value)
    assert "inner.1" in msg  # the module that failed
    assert "test_errors.py" in msg and "if x.sum() > 0" in msg  # the user's source line
    assert "try:" in msg
    assert isinstance(info.value, autotp.AutoTPError)


def test_bad_arguments() -> None:
    with pytest.raises(autotp.AutoTPError, match="tuple"):
        autotp.plan(MLP(), [1, 2, 3].__iter__(), world_size=2)
    with pytest.raises(autotp.AutoTPError, match="world_size"):
        autotp.plan(MLP(), (torch.randn(2, 3, 16),), world_size=0)
    with pytest.raises(autotp.AutoTPError, match="objective"):
        autotp.plan(MLP(), (torch.randn(2, 3, 16),), world_size=2, objective="fast")
    with pytest.raises(autotp.AutoTPError, match="unknown device"):
        autotp.plan(MLP(), (torch.randn(2, 3, 16),), world_size=2, device="tpu-v9")


def test_plan_for_other_world_size_is_refused() -> None:
    from autotp.runtime.api import choice_from_plan
    from autotp.capture import capture
    from autotp.candidates import build
    p = autotp.plan(MLP(), (torch.randn(2, 3, 16),), world_size=2, objective="memory")
    with pytest.raises(autotp.PlanError, match="world size 2"):
        choice_from_plan(build(capture(MLP(), (torch.randn(2, 3, 16),)), 4), p)


def test_dims_that_do_not_divide_split_unevenly() -> None:
    """Issue 3: 6 and 10 don't divide 4, yet the weights split, in torch.chunk pieces
    (10 -> 3, 3, 3, 1), and the result is exact."""
    from autotp.core.placements import local_sizes, parse
    from autotp.tools.simulate import simulate

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 10), nn.Linear(10, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))
    m, x = M(), torch.randn(2, 3, 6)
    p = autotp.plan(m, (x,), world_size=4, objective="memory")
    split = {s.name: parse(s.placement) for s in p.params if s.placement != "R"}
    assert "a.weight" in split and "b.weight" in split, p.params
    assert local_sizes(split["a.weight"], 10, 4) == [3, 3, 3, 1]
    for out in simulate(m, (x,), world_size=4, objective="memory"):
        torch.testing.assert_close(out, m(x), rtol=1e-5, atol=1e-5)


class _Attention(nn.Module):
    """Heads by a view: the view rule is what splits them."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, s, d))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _Attention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(x)


def test_a_rule_that_raises_falls_back_to_replicated(monkeypatch) -> None:
    """A bug inside a sharding rule (here: the view rule's view_groups raising ValueError)
    must not stop planning: the node gets the Replicate-only strategy, a warning names the
    op, the module and the user's source line, and the plan is still exact."""
    from autotp.rules import views
    from autotp.tools.simulate import simulate

    def broken(src, dst):
        raise ValueError(f"injected failure for {src} -> {dst}")
    monkeypatch.setattr(views, "view_groups", broken)
    torch.manual_seed(0)
    m, x = _Block(), torch.randn(2, 5, 16)
    with pytest.warns(UserWarning, match="sharding rule of aten.view.default raised ValueError") as rec:
        outs = simulate(m, (x,), world_size=2, objective="memory")
    msg = next(str(w.message) for w in rec if "sharding rule of" in str(w.message))
    assert "injected failure" in msg and "module 'attn'" in msg, msg
    assert "test_errors.py" in msg and "t.view(b, s, self.heads" in msg, msg  # the user's line
    assert "please report it" in msg
    for out in outs:
        torch.testing.assert_close(out, m(x), rtol=1e-5, atol=1e-5)


def test_internal_error_asks_for_a_report() -> None:
    """A broken invariant inside autotp is an AutoTPInternalError (not an AssertionError that
    ``python -O`` removes), and its message asks for a bug report."""
    from autotp.tools.targets import UsageError
    from autotp.rewrite.collectives import Comm, convert
    from autotp.core.placements import Partial, Shard
    with pytest.raises(autotp.AutoTPInternalError, match="S\\(0\\) -> P.*please report it"):
        convert(torch.zeros(2), Shard(0), Partial(), Comm(), "forward")
    assert issubclass(autotp.AutoTPInternalError, autotp.AutoTPError)
    assert issubclass(UsageError, autotp.AutoTPError)


def test_no_bare_asserts_in_autotp() -> None:
    """Invariants raise AutoTPInternalError; ``assert`` would vanish under ``python -O``."""
    import ast
    import pathlib
    root = pathlib.Path(autotp.__file__).parent
    found = [f"{path.relative_to(root)}:{node.lineno}" for path in sorted(root.rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Assert)]
    assert not found, found


@pytest.mark.parametrize("mode", ["training", "inference"])
def test_infeasible_plan_suggests_only_what_helps(mode: str) -> None:
    x = torch.randn(4, 16)
    with pytest.raises(autotp.InfeasiblePlanError) as info:
        autotp.plan(MLP(16, 64), (x,), world_size=2, mode=mode, memory_budget=64.0)
    msg = str(info.value)
    assert "world size of at least" in msg and info.value.min_world_size > 2
    # switching to inference helps a training plan only; a plan in inference mode already is
    assert ("mode='inference'" in msg) == (mode == "training")
    assert ("optimizer" in msg) == (mode == "training")
