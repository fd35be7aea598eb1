"""Every use of a private torch API in autotp, in one place to check on a torch upgrade.

Each entry names what it replaces and the torch versions checked. Where a public API exists
in the running torch, it is used instead.

- ``pytree``: torch >= 2.14 sources have the public ``torch.utils.pytree``; the pinned
  2.13.0 wheel has none (ModuleNotFoundError), so ``torch.utils._pytree`` there. The four
  functions autotp uses (tree_flatten, tree_unflatten, tree_leaves, tree_map) and
  ``TreeSpec`` are the same objects in both (checked: 2.13.0).
- ``FakeTensorMode``: no public constructor (checked: 2.13.0); layers' shapes are traced
  on fake tensors when a stack's layers are checked for identical behaviour.
- ``set_children``: replaces a module's child dict without nn.Module.__setattr__'s
  registration (so a container can expose only some of its layers for a cut capture);
  ``_modules`` is private but stable since torch 1.0 (checked: 2.13.0).
- ``swap_class``: ``__class__`` assignment on a module, to watch attribute reads during a
  trace and restore the class after (Python, but it relies on nn.Module keeping no
  per-class state; checked: 2.13.0).
- ``copy_codegen``: ``fx.Graph._codegen`` carries the pytree in/out handling of an exported
  graph; a copied graph must keep it (no public setter; checked: 2.13.0).
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn

try:  # public from torch 2.14 on
    from torch.utils import pytree  # type: ignore[attr-defined]
except ImportError:  # torch <= 2.13
    from torch.utils import _pytree as pytree  # noqa: F401

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402,F401


def set_children(module: nn.Module, children: dict[str, nn.Module]) -> None:
    """Replace ``module``'s children by ``children`` (no registration hooks run)."""
    object.__setattr__(module, "_modules", children)


def swap_class(module: nn.Module, cls: type) -> None:
    """Give ``module`` the class ``cls`` (a subclass of its own, or its own back)."""
    module.__class__ = cls


def copy_codegen(new: fx.Graph, old: fx.Graph) -> Any:
    """Give ``new`` the in/out handling (pytree codegen) of ``old``."""
    new._codegen = old._codegen
    return new


def call_codegen(new: fx.Graph, old: fx.Graph) -> fx.Graph:
    """Give ``new`` the input handling of ``old`` (its call's arguments flattened by the same
    spec) and no output handling: ``new`` returns what its output node holds."""
    cg = old._codegen
    info = getattr(cg, "pytree_info", None)
    if info is not None:
        new._codegen = type(cg)(info._replace(out_spec=None))
    return new


def out_spec(gm: fx.GraphModule) -> Any:
    """The pytree spec ``gm``'s flat outputs are rebuilt with (None: returned flat)."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    return None if info is None else info.out_spec
