"""Repeated layers: capture a stack of identical layers once for a few layers, then replicate.

A *stack* is a module whose children are named 0, 1, ..., L-1 (``nn.ModuleList``,
``nn.Sequential``) and are structurally identical: same class, same submodules, same
parameter and buffer names, shapes, dtypes and ``requires_grad``, none shared with another
module. Names mean nothing here; the test is the module tree. A container whose first
``start`` children differ from a long identical run after them (DeepSeek-V3: 3 dense layers,
then 58 MoE) is a stack from ``start`` on: its first layers are exported as they are, as if
they were code before the stack, and every "layer 0, 1, 2" below reads "layer start, start +
1, start + 2".

torch.export costs about 0.15 s per Llama-70B layer on a 2-core machine (fake tensors,
symbolic shapes, fx bookkeeping), so capture exports the model with every stack of more than
KEEP + 1 = 4 layers cut to layers 0, 1, 2 and L-1 (the container's children are swapped for
the export and put back in a ``finally``), then rebuilds the full-depth graph:

1. ``_verify`` (before the export): the model's Python code must do at full depth what it
   does cut. One forward of the cut model on fake tensors records every torch call outside
   the layers and each layer call as one event (where each argument came from: the previous
   layer's output, the n-th call before the layers, a parameter; other values by value), and
   which attributes each kept layer's modules read (``_watch``). One forward of the full model
   with every layer stubbed (it returns fresh tensors shaped like its representative's
   output) must record the same, layer for layer (layers 3..L-2 against layer 2): the code
   around the layers and what each layer is given. A layer runs its representative's code
   (same class) on the same arguments; if no attribute in which it differs from its
   representative (HF's ``layer_idx``) was read by the representative, it runs the same
   calls; else it runs alone on meta tensors and its calls are compared (``_layer_events``).
   Assumed: a layer's forward depends on its class, its own attributes and parameters and its
   arguments, not on mutable global state or ``vars(self)``.
2. ``_segments``: the cut graph is  pre | layer 0 | layer 1 | layer 2 | layer L-1 | post  in
   node order (a layer's segment also holds the nodes between it and the next layer, as the
   parent's loop emits them). Layer 2's segment must be a copy of layer 1's (``_shape_of``):
   the same ops, arguments, shapes and module paths, with references to its own parameters by
   relative name, to the previous layer at the same offsets and to anything else identical.
3. ``_expand``: layer 2's segment is copied for layers 3..L-2 (its references to the
   previous layer moved to the previous copy), the last layer's nodes are renamed L-1 and
   the parameters of layers 3..L-1 are attached under their own names.

Anything unexpected raises ``Unsupported`` and capture falls back to the full export, so the
fast path changes time, never the graph. ``canonical_names`` renames every node in fx's own
scheme (op, op_1, op_2 ... in graph order) after either path: a full export and a cut one
give the same graph, node names included (tests/test_layers.py compares them).
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from torch import nn
from autotp._compat import set_children


log = logging.getLogger(__name__)


KEEP = 3  # layers 0..KEEP-1 and the last are exported; layer KEEP-1 is the template


class Unsupported(Exception):
    """The cut capture can't be used for this model; capture exports the whole model."""


@dataclass(frozen=True)
class Stack:
    path: str  # module path of the container, e.g. "model.layers"
    size: int  # number of layers
    # layers 0..start-1 differ from the rest (DeepSeek-V3's first 3 dense layers before its
    # 58 MoE ones): a cut capture exports them as they are, and layers start.. are the stack
    start: int = 0

    def layer(self, i: int) -> str:
        return f"{self.path}.{i}" if self.path else str(i)

    @property
    def keep(self) -> int:
        """Layers exported before the last one; layer keep - 1 is the template."""
        return self.start + KEEP


def _signature(m: nn.Module) -> tuple:
    sig: list[tuple] = [(name, type(sub), sub.training) for name, sub in m.named_modules()]
    sig += [("p", n, tuple(p.shape), p.dtype, p.requires_grad)
            for n, p in m.named_parameters(remove_duplicate=False)]
    sig += [("b", n, tuple(b.shape), b.dtype) for n, b in m.named_buffers(remove_duplicate=False)]
    return tuple(sig)


def find_stacks(model: nn.Module, min_size: int = 2) -> tuple[Stack, ...]:
    """The outermost containers of ``min_size`` or more structurally identical layers."""
    mods = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    tensors = Counter(id(t) for _, t in model.named_parameters(remove_duplicate=False))
    tensors.update(id(t) for _, t in model.named_buffers(remove_duplicate=False))
    stacks: list[Stack] = []
    for path, mod in model.named_modules():
        if any(path.startswith(s.path + ".") for s in stacks):
            continue
        keys = list(mod._modules)
        if len(keys) < min_size or keys != [str(i) for i in range(len(keys))]:
            continue
        kids = list(mod._modules.values())
        if any(k is None for k in kids):
            continue
        if any(mods[id(sub)] != 1 for k in kids for sub in k.modules()) or \
                any(tensors[id(t)] != 1 for k in kids for t in (*k.parameters(), *k.buffers())):
            continue  # a layer shares a module or tensor with another: not replicable
        sigs = [_signature(k) for k in kids]
        start = len(kids) - 1  # the longest run of identical layers that ends the container
        while start > 0 and sigs[start - 1] == sigs[-1]:
            start -= 1
        if start == 0:
            stacks.append(Stack(path, len(kids)))
        elif len(kids) - start > KEEP + 1:  # a different prefix: worth it only for a long run
            stacks.append(Stack(path, len(kids), start))
    return tuple(stacks)


def kept(stack: Stack) -> list[int]:
    """Original layer index of each layer in the cut model."""
    return list(range(stack.keep)) + [stack.size - 1]


@contextmanager
def _cut(model: nn.Module, stacks: tuple[Stack, ...]) -> Iterator[None]:
    saved = []
    try:
        for s in stacks:
            mod = model.get_submodule(s.path)
            kids = list(mod._modules.values())
            saved.append((mod, mod._modules))
            set_children(mod, {str(j): kids[i] for j, i in enumerate(kept(s))})
        yield
    finally:
        for mod, modules in saved:
            set_children(mod, modules)


def _prefix(stack: Stack) -> str:
    return stack.path + "." if stack.path else ""


def _layer_re(stack: Stack) -> re.Pattern:
    return re.compile(re.escape(_prefix(stack)) + r"(\d+)(?:\.|$)")


__all__ = ["Stack", "Unsupported", "find_stacks", "kept"]
