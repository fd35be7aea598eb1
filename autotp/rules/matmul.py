"""Matmul-like ops as einsum: a free dim split gives a split output (column split: Y = X[A1..An]);
the contracted dim split gives a Partial output (row split: Y = sum_r X_r A_r). Column, row,
head and vocab splits are all this one rule applied to different labels.

Biases are separate adds by the time rules run (capture/__init__.py splits off every op registered with
``unbias``: linear, addmm), so a Partial output never has a bias added on every rank.

Facts: FLOPs are ``matmul_flops`` (2 K per output element); linear and mm are shown in plan
tables, their weight split worded column/row (bmm and matmul rarely take a parameter and are
not shown)."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from autotp.rules.registry import DimMap, Display, OpCall, column_row, declare, matmul_flops, register

aten = torch.ops.aten


def _linear_unbias(node: fx.Node) -> tuple[Any, tuple[Any, ...], Any] | None:
    """linear(x, W, b) = linear(x, W) + b."""
    if len(node.args) > 2 and node.args[2] is not None:
        x, w, b = node.args[:3]
        return aten.linear.default, (x, w), b
    return None


def _addmm_unbias(node: fx.Node) -> tuple[Any, tuple[Any, ...], Any] | None:
    """addmm(b, x, W) = mm(x, W) + b (only with the default beta = alpha = 1)."""
    if node.kwargs:
        return None
    b, x, w = node.args[:3]
    return aten.mm.default, (x, w), b


# addmm has no rule of its own: capture always turns it into mm + add
declare(aten.addmm.default, unbias=_addmm_unbias)


@register(aten.linear.default, flops=matmul_flops, display=Display(column_row(out_dim=0)),
          unbias=_linear_unbias)
def _linear(call: OpCall) -> DimMap | None:
    # y[..., n] = sum_k x[..., k] W[n, k]
    if len(call.inputs) != 2:
        return None  # a bias left in place (capture normally removes it): no rule
    x = call.inputs[0]
    batch = tuple(("b", j) for j in range(len(x.shape) - 1))
    return DimMap(inputs=(batch + ("k",), ("n", "k")), outputs=(batch + ("n",),),
                  contract=frozenset({"k"}), partial_any=(0, 1))


@register(aten.mm.default, flops=matmul_flops, display=Display(column_row(out_dim=1)))
def _mm(call: OpCall) -> DimMap:
    return DimMap(inputs=(("m", "k"), ("k", "n")), outputs=(("m", "n"),),
                  contract=frozenset({"k"}), partial_any=(0, 1))


@register(aten.bmm.default, flops=matmul_flops)
def _bmm(call: OpCall) -> DimMap:
    return DimMap(inputs=(("b", "m", "k"), ("b", "k", "n")), outputs=(("b", "m", "n"),),
                  contract=frozenset({"k"}), partial_any=(0, 1))


@register(aten.matmul.default, flops=matmul_flops)
def _matmul(call: OpCall) -> DimMap | None:
    a, b = call.inputs
    if len(a.shape) < 2 or len(b.shape) < 2:
        return None
    out = call.outputs[0]
    r = len(out.shape)
    batch = tuple(("b", j) for j in range(r - 2))

    def lab(m: tuple[int, ...], last2: tuple) -> tuple:
        off = r - len(m)
        return tuple(None if m[j] == 1 and out.shape[off + j] != 1 else batch[off + j]
                     for j in range(len(m) - 2)) + last2
    return DimMap(inputs=(lab(a.shape, ("m", "k")), lab(b.shape, ("k", "n"))),
                  outputs=(batch + ("m", "n"),), contract=frozenset({"k"}), partial_any=(0, 1))


@register(aten._grouped_mm.default, flops=matmul_flops)
def _grouped_mm(call: OpCall) -> DimMap | None:
    # y[t, n] = sum_k x[t, k] W[e(t), k, n]: tokens grouped by expert, offs[e] the end of
    # expert e's group (transformers' MoE experts). Only k (row: Partial) and n (column) split;
    # splitting tokens or experts would move the groups' boundaries, so both stay whole.
    if len(call.inputs) not in (2, 3):
        return None  # a bias (not linear in a Partial input) or an unknown form: no rule
    x, w = call.inputs[:2]
    if len(x.shape) != 2 or len(w.shape) != 3:
        return None
    offs = tuple((None,) * len(m.shape) for m in call.inputs[2:])
    return DimMap(inputs=((None, "k"), (None, "k", "n")) + offs, outputs=((None, "n"),),
                  contract=frozenset({"k"}), partial_any=(0, 1))
