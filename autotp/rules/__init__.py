"""Sharding rules: for each ATen op, which placements of its inputs give which output.

Most rules are written as a ``DimMap``: a label per dimension of every tensor input and
output, in the style of einsum. One generic enumerator (``strategies_from_dims``) turns a
DimMap into candidate strategies:

- all inputs and outputs Replicate;
- for every label L: each tensor dim labelled L is Shard on it, tensors without L stay
  Replicate; an output without L is Partial when L is a contracted label (matmul's inner
  dim, a sum), else the label is not offered;
- the same with ``Shard(dim, blocks)`` when a consumer splits that dim into blocks
  (fused QKV): the blocks come from ``block hints`` found by candidates.py;
- Partial inputs only where the op is linear in them (``partial_any``: one input Partial,
  the others Replicate, e.g. ``x * w`` or a view; ``partial_all``: every input Partial,
  e.g. ``a + b``). A Partial plus a Replicate (a bias, a residual) is never offered.

A dim labelled None can't be split (a normalized dim, a softmax dim, a broadcast size-1
dim). A label on dynamic dims (batch, sequence: symbolic in the captured graph) is offered only
by rules that set ``dynamic_ok`` (elementwise ops, norms, reductions: Megatron's sequence-
parallel regions), only evenly (``Shard(d)``, when the world size divides the example size),
and only the largest such dim of the op (the sequence rather than the batch, at the example
sizes; the last on a tie), so that one region splits one dim. The rewritten module checks at
run time that the world size still divides it (rewrite/collectives.py). Views,
matmuls and attention never split a dynamic dim: their shape arguments and causal masks
would have to follow it.

Uneven splits: the dims carrying one label may differ in size (a view's hidden H*d and heads
H, a repeat's kv heads and q heads); they are split together in ``units`` (by default the gcd
of their sizes: H heads), each dim in ``grain = size / units`` elements. When the world size
divides ``units`` this is the even split (``Shard(d)``); otherwise each rank gets torch.chunk's
share of the units (``Shard(d, grain=g)``, see core/placements.py). Other unit counts come from
*grain hints* (``unit_hints``, found by candidates.py): a matmul whose output a view splits into
heads is offered the split on head boundaries as well as the element-wise one.

Files: registry.py (the registry and the rule vocabulary), enumerate.py (the standard
rule above), one file per op family (matmul, pointwise, norms, views, attention, embedding,
state: in-place writes of a KV cache).

Everything autotp knows about an op lives in one registry entry (``OpInfo``), written in the
op's family file next to its sharding rule: the rule, its FLOPs, which of its inputs autograd
keeps, whether it is a view, whether it depends on train/eval mode, how plan tables show it,
and whether capture splits a bias off it. ``register(op, ..., **facts)`` writes a rule and its
facts, ``declare(op, **facts)`` facts alone (an op with no sharding rule). cost/model.py, capture/__init__.py
and tools/cli.py ask ``op_info(target)``. See docs/adding_an_op_rule.md.
"""
from autotp.rules.registry import (Label, Strategy, OpCall, DimMap, Rule, Metas, Flops, Keeps,  # noqa: F401
    ModeCheck, Unbias, Words, keeps_inputs, keeps_nothing, keeps_tensor_operands,  # noqa: F401
    never_mode_sensitive, always_mode_sensitive, elementwise_flops, matmul_flops, column_row,  # noqa: F401
    Display, OpInfo, UNKNOWN, OPS, declare, register, op_info, op_info_named, rule_for,  # noqa: F401
    Draw, SplitDraw, random_op, set_arg)  # noqa: F401
from autotp.rules.enumerate import (label_units, strategies_from_dims, replicate_only,  # noqa: F401
    broadcast_labels, norm_dims, scale_shape_arg)  # noqa: F401

# importing the families registers their rules
from autotp.rules import attention, embedding, matmul, norms, pointwise, state, views  # noqa: E402,F401
