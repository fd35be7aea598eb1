"""Matmul-like ops as einsum: a free dim split gives a split output (column split: Y = X[A1..An]);
the contracted dim split gives a Partial output (row split: Y = sum_r X_r A_r). Column, row,
head and vocab splits are all this one rule applied to different labels.

Biases are separate adds by the time rules run (capture/__init__.py splits off every op registered with
``unbias``: linear, addmm), so a Partial output never has a bias added on every rank.

einsum is the same rule read off its equation (each letter a label).

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


# einsum: the equation is the labelling. Each letter is a label; letters missing from the
# output are contracted (split: Partial output); "..." dims align from the right; a dim of size
# 1 against a larger one broadcasts (None). A letter repeated inside one operand (a diagonal)
# gets no rule. FLOPs: 2 x the product of every letter's size (one multiply-add per term) for
# two or more operands, one per input element for one.
def _einsum_terms(call: OpCall) -> tuple[list[list], list] | None:
    eq = call.arg(0, "equation").replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(call.inputs):
        return None
    if not arrow:  # implicit output: the letters used once, in alphabetical order
        letters = [ch for t in terms for ch in t if ch.isalpha()]
        out = ("..." if "..." in lhs else "") + "".join(sorted(ch for ch in set(letters) if letters.count(ch) == 1))
    ell = [len(m.shape) - len(t.replace("...", "")) if "..." in t else 0 for t, m in zip(terms, call.inputs)]
    n_ell = max(ell, default=0)

    def expand(t: str, k: int) -> list:
        head, dots, tail = t.partition("...")
        return list(head) + ([("...", j) for j in range(n_ell - k, n_ell)] if dots else []) + list(tail)
    ins = [expand(t, k) for t, k in zip(terms, ell)]
    outl = expand(out, n_ell)
    if any(len(set(t)) != len(t) for t in (*ins, outl)) or \
            any(len(t) != len(m.shape) for t, m in zip(ins, call.inputs)):
        return None
    return ins, outl


def _einsum_sizes(call: OpCall, ins: list[list]) -> dict:
    sizes: dict = {}
    for t, m in zip(ins, call.inputs):
        for lab, s in zip(t, m.shape):
            if not isinstance(s, int) or s != 1:
                sizes[lab] = s
            else:
                sizes.setdefault(lab, 1)
    return sizes


def einsum_flops(call: OpCall) -> float:
    got = _einsum_terms(call)
    if got is None or len(call.inputs) < 2:
        return float(sum(m.numel for m in call.inputs))
    total = 1.0
    for s in _einsum_sizes(call, got[0]).values():
        total *= float(s)
    return 2.0 * total


@register(aten.einsum.default, call_flops=einsum_flops)
def _einsum(call: OpCall) -> DimMap | None:
    got = _einsum_terms(call)
    if got is None:
        return None
    ins, outl = got
    sizes = _einsum_sizes(call, ins)
    labelled = tuple(tuple(None if (s == 1 and sizes[lab] != 1) else lab for lab, s in zip(t, m.shape))
                     for t, m in zip(ins, call.inputs))
    contract = frozenset(lab for t in ins for lab in t if lab not in outl)
    return DimMap(inputs=labelled, outputs=(tuple(outl),), contract=contract,
                  partial_any=tuple(range(len(ins))))
