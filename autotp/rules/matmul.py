"""Matmul-like ops as einsum: a free dim split gives a split output (column split: Y = X[A1..An]);
the contracted dim split gives a Partial output (row split: Y = sum_r X_r A_r). Column, row,
head and vocab splits are all this one rule applied to different labels.

Biases are separate adds by the time rules run (capture.py splits linear/addmm), so a Partial
output never has a bias added on every rank."""
from __future__ import annotations

import torch

from . import DimMap, OpCall, register

aten = torch.ops.aten


@register(aten.linear.default)
def _linear(call: OpCall) -> DimMap | None:
    # y[..., n] = sum_k x[..., k] W[n, k]
    if len(call.inputs) != 2:
        return None  # a bias left in place (capture normally removes it): no rule
    x = call.inputs[0]
    batch = tuple(("b", j) for j in range(len(x.shape) - 1))
    return DimMap(inputs=(batch + ("k",), ("n", "k")), outputs=(batch + ("n",),),
                  contract=frozenset({"k"}), partial_any=(0, 1))


@register(aten.mm.default)
def _mm(call: OpCall) -> DimMap:
    return DimMap(inputs=(("m", "k"), ("k", "n")), outputs=(("m", "n"),),
                  contract=frozenset({"k"}), partial_any=(0, 1))


@register(aten.bmm.default)
def _bmm(call: OpCall) -> DimMap:
    return DimMap(inputs=(("b", "m", "k"), ("b", "k", "n")), outputs=(("b", "m", "n"),),
                  contract=frozenset({"k"}), partial_any=(0, 1))


@register(aten.matmul.default)
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
