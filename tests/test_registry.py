"""The op registry: one ``register`` call in one place gives a new op its sharding rule, its
compute cost and its row in the plan table (docs/adding_an_op_rule.md)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from rich.console import Console
from torch import nn

from autotp import rules
from autotp.cost import model as cost
from autotp.runtime.api import plan_details
from autotp.core.meta import TensorMeta
from autotp.tools.report import print_table
from autotp.cost.devices import get_device
from autotp.core.placements import Replicate, Shard
from autotp.rules import (UNKNOWN, DimMap, Display, OpCall, Strategy, column_row, matmul_flops, op_info, register)

aten = torch.ops.aten


# A matmul-like op autotp has never heard of: y[..., n] = sum_k x[..., k] w[k, n].
@torch.library.custom_op("autotp_test::wmm", mutates_args=())
def wmm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w


@wmm.register_fake
def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[-1]))


WMM = torch.ops.autotp_test.wmm.default


def _wmm_dims(call: OpCall) -> DimMap:
    x = call.inputs[0]
    batch = tuple(("b", j) for j in range(len(x.shape) - 1))
    return DimMap(inputs=(batch + ("k",), ("k", "n")), outputs=(batch + ("n",),),
                  contract=frozenset({"k"}), partial_any=(0, 1))


@contextmanager
def _wmm_registered() -> Iterator[None]:
    """Register wmm as a family file would, and undo it afterwards."""
    saved = dict(rules.OPS)
    try:
        register(WMM, flops=matmul_flops, display=Display(column_row(out_dim=1)))(_wmm_dims)
        yield
    finally:
        rules.OPS.clear()
        rules.OPS.update(saved)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32, bias=False)  # a static feature dim for wmm to contract
        self.w = nn.Parameter(torch.randn(32, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(wmm(self.up(x), self.w)).sum(-1)


def _meta(*shape: int) -> TensorMeta:
    return TensorMeta(shape, (False,) * len(shape), torch.float32)


def test_a_new_op_registered_in_one_place_is_split_costed_and_shown() -> None:
    with _wmm_registered():
        # (a) candidates split its weight by columns and by rows
        pd = plan_details(_Net(), (torch.randn(8, 16),), world_size=2, device="h100",
                          objective="memory", mode="inference")
        (nc,) = [nc for nc in pd.candidates.nodes.values() if nc.target is WMM]
        words = op_info(WMM).display.words
        splits = {words(st.inputs[1]) for st in nc.strategies if isinstance(st.inputs[1], Shard)}
        assert {"column", "row"} <= splits

        # (b) its compute is its FLOPs over the peak at a compute-bound shape
        m = k = n = 4096
        ins, outs = (_meta(m, k), _meta(k, n)), (_meta(m, n),)
        spec = get_device("h100")
        rep = Strategy((Replicate(), Replicate()), Replicate())
        t = cost.compute_time(WMM, ins, outs, rep, 1, spec, "inference")
        flops = 2.0 * m * n * k
        assert t > 0 and cost.op_flops(WMM, ins, outs) == flops
        nbytes = 4.0 * (m * k + k * n + m * n)
        assert flops / spec.peak_flops(torch.float32) > nbytes / spec.memory_bandwidth
        assert t == flops / spec.peak_flops(torch.float32)
        split = Strategy((Replicate(), Shard(1)), Shard(1))
        assert cost.compute_time(WMM, ins, outs, split, 2, spec, "inference") == t / 2

        # (c) the plan table shows it with a split word
        console = Console(record=True, width=200)
        print_table(pd, out=console)
        table = console.export_text()
        row = next(line for line in table.splitlines() if "wmm" in line)
        assert "column" in row or "row" in row
    assert op_info(WMM) is UNKNOWN  # the registration is undone


def test_facts_of_builtin_ops() -> None:
    linear = op_info(aten.linear.default)
    assert linear.rule is not None and linear.flops is not None and linear.display is not None
    assert linear.unbias is not None and linear.saves_inputs(2)
    assert op_info(aten.view.default).view and not op_info(aten.view.default).saves_inputs(1)
    assert not op_info(aten.gelu.default).view and op_info(aten.gelu.default).flops is None
    assert op_info(aten.mul.Tensor).saves_inputs(2) and not op_info(aten.mul.Tensor).saves_inputs(1)
    assert op_info(aten.batch_norm.default).rule is None
    assert op_info(aten.scaled_dot_product_attention.default).display.by == "output"
    assert op_info(aten.addmm.default).rule is None and op_info(aten.addmm.default).unbias
    assert cost.compute_time(aten.gelu.default, (_meta(4, 4),), (_meta(4, 4),),
                             Strategy((Replicate(),), Replicate()), 1, get_device("h100"),
                             "training") == 0.0


def test_every_random_op_with_a_rule_draws_like_one_device() -> None:
    """A random op that may be split must know how to keep its slice of the full draw (its
    ``draws`` fact); one without a rule runs replicated, which draws the full value anyway."""
    random = [op for op, info in rules.OPS.items() if rules.random_op(op) and info.rule is not None]
    assert aten.dropout.default in random and aten.scaled_dot_product_attention.default in random
    assert [str(op) for op in random if op_info(op).draws is None] == []
    assert rules.random_op(aten.bernoulli.p) and not rules.random_op(aten.mul.Tensor)
