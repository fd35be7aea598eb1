"""Elementwise ops with broadcasting: every output dim is a label shared with the inputs'
aligned dims. Linearity (which inputs may be Partial) is per op."""
from __future__ import annotations

import torch

from . import DimMap, OpCall, broadcast_labels, register

aten = torch.ops.aten


def _elementwise(call: OpCall, partial_any: tuple[int, ...] = (), partial_all: bool = False) -> DimMap:
    ins, out = broadcast_labels(call.inputs, call.outputs[0])
    return DimMap(ins, (out,), partial_any=partial_any, partial_all=partial_all, dynamic_ok=True)


# Linear in each input alone (other inputs fixed): scaling and copies.
@register(aten.mul.Tensor, aten.mul.Scalar)
def _mul(call: OpCall) -> DimMap:
    return _elementwise(call, partial_any=tuple(range(len(call.inputs))))


@register(aten.div.Tensor, aten.div.Scalar)
def _div(call: OpCall) -> DimMap:
    # linear in the numerator only; a tensor numerator is slot 0 when it is a tensor
    num_is_tensor = isinstance(call.node.args[0], torch.fx.Node)
    return _elementwise(call, partial_any=(0,) if num_is_tensor else ())


@register(aten.neg.default, aten.clone.default, aten.alias.default, aten.detach.default,
          aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.contiguous.default,
          aten.type_as.default, aten.lift_fresh_copy.default, aten.to.device)
def _unary_linear(call: OpCall) -> DimMap:
    return _elementwise(call, partial_any=(0,))


# Linear in all inputs together: sums (only when every operand is a tensor; adding a Python
# scalar to a Partial tensor would add it world_size times).
@register(aten.add.Tensor, aten.sub.Tensor)
def _add(call: OpCall) -> DimMap:
    all_tensors = len(call.inputs) == 2
    return _elementwise(call, partial_all=all_tensors)


@register(aten.dropout.default)
def _dropout(call: OpCall) -> DimMap:
    p, train = call.arg(1, "p", 0.5), call.arg(2, "train", True)
    identity = (not train) or p == 0
    return _elementwise(call, partial_any=(0,) if identity else ())


# Nonlinear elementwise ops: any shard passes through, Partial never.
@register(aten.gelu.default, aten.silu.default, aten.relu.default, aten.tanh.default,
          aten.sigmoid.default, aten.exp.default, aten.log.default, aten.rsqrt.default,
          aten.sqrt.default, aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.abs.default,
          aten.sin.default, aten.cos.default, aten.erf.default, aten.softplus.default,
          aten.add.Scalar, aten.sub.Scalar, aten.rsub.Scalar, aten.rsub.Tensor,
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
