"""Dotted attribute paths on modules ("model.layers.0.mlp.weight"): the one place that walks
them (capture, rewrite, checkpoints and the layer expansion all use these)."""
from __future__ import annotations

from typing import Any

import torch


def fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr(gm: torch.nn.Module, target: str, value: Any) -> None:
    *path, name = target.split(".")
    obj: Any = gm
    for p in path:
        obj = getattr(obj, p)
    setattr(obj, name, value)


def has_attr(gm: torch.nn.Module, target: str) -> bool:
    try:
        fetch_attr(gm, target)
        return True
    except AttributeError:
        return False


def attach(root: torch.nn.Module, target: str, value: Any) -> None:
    """Set ``value`` at the dotted path ``target`` under ``root``, creating empty modules for
    missing parents; a tensor that is not a Parameter becomes a buffer (``set_attr`` needs the
    parents to exist and registers nothing)."""
    *path, name = target.split(".")
    obj: Any = root
    for p in path:
        if not hasattr(obj, p):
            obj.add_module(p, torch.nn.Module())
        obj = getattr(obj, p)
    if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
        obj.register_buffer(name, value)
    else:
        setattr(obj, name, value)
