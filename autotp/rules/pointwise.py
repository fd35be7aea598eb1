"""Elementwise ops with broadcasting: every output dim is a label shared with the inputs'
aligned dims. Linearity (which inputs may be Partial) is per op.

Facts: no FLOPs (fused into their producer); sums, casts, copies and products with a Python
number keep nothing for the backward, a product of two tensors keeps both, nonlinear ops keep
their input; alias/detach/contiguous are views; dropout depends on train/eval mode and, split,
keeps its slice of the full-size draw (``_draw_dropout``)."""
from __future__ import annotations

import torch

import torch.fx as fx

from autotp.rules.registry import (DimMap, OpCall, SplitDraw, always_mode_sensitive, declare, keeps_nothing, set_arg,
                                   keeps_tensor_operands, register)
from autotp.rules.enumerate import broadcast_labels

aten = torch.ops.aten


def _elementwise(call: OpCall, partial_any: tuple[int, ...] = (), partial_all: bool = False) -> DimMap:
    ins, out = broadcast_labels(call.inputs, call.outputs[0])
    return DimMap(ins, (out,), partial_any=partial_any, partial_all=partial_all, dynamic_ok=True)


# Linear in each input alone (other inputs fixed): scaling and copies.
@register(aten.mul.Tensor, keeps=keeps_tensor_operands)
def _mul(call: OpCall) -> DimMap:
    return _elementwise(call, partial_any=tuple(range(len(call.inputs))))


@register(aten.div.Tensor, keeps=keeps_tensor_operands)
def _div(call: OpCall) -> DimMap:
    # linear in the numerator only; a tensor numerator is slot 0 when it is a tensor
    num_is_tensor = isinstance(call.node.args[0], torch.fx.Node)
    return _elementwise(call, partial_any=(0,) if num_is_tensor else ())


# x * 0.5, x / 2: the backward scales the gradient by the number and needs no input
register(aten.mul.Scalar, keeps=keeps_nothing)(_mul)
register(aten.div.Scalar, keeps=keeps_nothing)(_div)


@register(aten.neg.default, aten.clone.default, aten.alias.default, aten.detach.default,
          aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.contiguous.default,
          aten.type_as.default, aten.lift_fresh_copy.default, aten.to.device, keeps=keeps_nothing)
def _unary_linear(call: OpCall) -> DimMap:
    return _elementwise(call, partial_any=(0,))


# these return their input (or an alias of it): no new activation memory
declare(aten.alias.default, aten.detach.default, aten.contiguous.default, view=True)


# Linear in all inputs together: sums (only when every operand is a tensor; adding a Python
# scalar to a Partial tensor would add it world_size times).
@register(aten.add.Tensor, aten.sub.Tensor, keeps=keeps_nothing)
def _add(call: OpCall) -> DimMap:
    all_tensors = len(call.inputs) == 2
    return _elementwise(call, partial_all=all_tensors)


def _dropout_in_training(node: fx.Node) -> bool:
    """dropout(x, p, train) differs between modes unless p == 0 or train is False."""
    return bool(node.args[1]) and bool(node.args[2])


# native_dropout (no rule: it runs replicated) always draws a mask
declare(aten.native_dropout.default, mode_sensitive=always_mode_sensitive)


def _draw_dropout(d: SplitDraw, args: tuple, kwargs: dict) -> torch.Tensor:
    """dropout(x) = x * noise, noise = bernoulli(1 - p) / (1 - p), drawn from x's shape and
    layout only: draw the full-size noise (dropout of ones, exactly the noise) and multiply
    this rank's slice of it; x * noise is then bit for bit the single device's."""
    x, p, train = _bind_dropout(*args, **kwargs)
    if not train or p == 0:
        return aten.dropout.default(x, p, train)
    noise = aten.dropout.default(d.full_like(x).fill_(1), p, train)
    return x * d.keep(noise)


def _bind_dropout(input: torch.Tensor, p: float, train: bool) -> tuple[torch.Tensor, float, bool]:
    return input, p, train


def _dropout_to_eval(node: fx.Node) -> None:
    set_arg(node, 2, "train", False)  # dropout(x, p, False) is x


@register(aten.dropout.default, mode_sensitive=_dropout_in_training, draws=_draw_dropout,
          to_eval=_dropout_to_eval)
def _dropout(call: OpCall) -> DimMap:
    p, train = call.arg(1, "p", 0.5), call.arg(2, "train", True)
    identity = (not train) or p == 0
    return _elementwise(call, partial_any=(0,) if identity else ())


# Nonlinear elementwise ops: any shard passes through, Partial never.
@register(aten.gelu.default, aten.silu.default, aten.relu.default, aten.tanh.default,
          aten.sigmoid.default, aten.exp.default, aten.log.default, aten.rsqrt.default,
          aten.sqrt.default, aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.abs.default,
          aten.sin.default, aten.cos.default, aten.erf.default, aten.softplus.default,
          aten.rsub.Tensor,
          aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
          aten.eq.Tensor, aten.eq.Scalar, aten.ne.Tensor, aten.ne.Scalar, aten.lt.Tensor,
          aten.lt.Scalar, aten.le.Tensor, aten.le.Scalar, aten.gt.Tensor, aten.gt.Scalar,
          aten.ge.Tensor, aten.ge.Scalar, aten.logical_not.default, aten.logical_and.default,
          aten.logical_or.default, aten.__and__.Tensor, aten.__or__.Tensor,
          aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.bitwise_not.default,
          aten.maximum.default, aten.minimum.default, aten.clamp.default, aten.square.default,
          aten.reciprocal.default, aten.sign.default, aten.leaky_relu.default,
          aten.hardtanh.default, aten.elu.default)
def _nonlinear(call: OpCall) -> DimMap:
    return _elementwise(call)


# x + 1, 1 - x: not linear in x (a Partial x would get the 1 on every rank), but the
# backward needs no input
register(aten.add.Scalar, aten.sub.Scalar, aten.rsub.Scalar, keeps=keeps_nothing)(_nonlinear)
