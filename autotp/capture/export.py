"""torch.export of the user's model, with errors that name the module that was running, the
user's own source line and what to do (``_export``)."""
from __future__ import annotations

import inspect

import os

import traceback
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from autotp._compat import pytree

from autotp.errors import CaptureError


@contextmanager
def _module_tracker(model: torch.nn.Module) -> Iterator[list[str]]:
    """Tracks which submodule is executing, so a capture failure can name it."""
    stack: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    handles = []

    def enter(mod: torch.nn.Module, _args: Any) -> None:
        stack.append(names[mod] or "<root>")

    def leave(_mod: torch.nn.Module, _args: Any, _out: Any) -> None:  # must return None
        if stack:
            stack.pop()

    for m in names:
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave))
    failed_at: list[str] = []
    try:
        yield failed_at
    except BaseException:
        failed_at.extend(stack)
        raise
    finally:
        for h in handles:
            h.remove()


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch and autotp: the user's line."""
    skip = (os.path.dirname(torch.__file__), os.path.dirname(__file__))
    best = ""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for fs in traceback.extract_tb(e.__traceback__):
            if not fs.filename.startswith(skip) and "site-packages/torch" not in fs.filename:
                best = f"{fs.filename}:{fs.lineno} ({fs.name}): {fs.line}"
        e = e.__cause__ or e.__context__
    return best


def _advice(msg: str) -> str:
    low = msg.lower()
    tips = []
    if "cache" in low:
        tips.append("pass example_kwargs={'use_cache': False} (a KV-cache object cannot be exported)")
    if "data-dependent" in low or "guardonda" in low or ".item()" in low or "unbacked" in low:
        tips.append("avoid Python control flow on tensor values (.item(), if tensor:) in forward, "
                    "or guard it with torch._check")
    if "argument" in low or "missing" in low or "unexpected keyword" in low:
        tips.append("check example_inputs / example_kwargs match forward's signature")
    tips.append("make sure the model runs eagerly on the example inputs; "
                "see docs/troubleshooting.md")
    return "; ".join(tips)


def _dynamic_shapes(args: tuple, kwargs: dict) -> tuple:
    """Dim.AUTO on every dim of every tensor input: export keeps symbolic what the model
    allows (batch, sequence) and specializes the rest. One spec per positional arg, then one
    per keyword arg, as torch.export matches them."""
    def spec(x: Any) -> Any:  # a size-1 dim would specialize anyway (and warn): left static
        if isinstance(x, torch.Tensor):
            return {d: torch.export.Dim.AUTO for d in range(x.dim()) if x.shape[d] != 1}
        return None
    return tuple(pytree.tree_map(spec, a) for a in (*args, *kwargs.values()))


def _signature_order(model: torch.nn.Module, kwargs: dict) -> dict:
    """``kwargs`` in the order of ``forward``'s parameters (those it doesn't name last, as
    given): torch.export binds the call to the signature and matches a tuple of dynamic
    shapes in that order, so a call written ``use_cache=False, input_ids=ids`` would pair the
    ids' spec with the bool and fall back to static shapes."""
    try:
        names = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return kwargs
    return {k: kwargs[k] for k in names if k in kwargs} | {k: v for k, v in kwargs.items() if k not in names}


def _export(model: torch.nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    kwargs = _signature_order(model, kwargs)
    errors: list[tuple[BaseException, list[str]]] = []
    for dynamic in (True, False):
        ds = _dynamic_shapes(args, kwargs) if dynamic else None
        try:
            with _module_tracker(model) as failed_at:
                ep = torch.export.export(model, args, kwargs, dynamic_shapes=ds, strict=False)
            if not dynamic:
                first = str(errors[0][0]).strip().splitlines()[0] if errors else ""
                warnings.warn(f"autotp: {type(model).__name__} was captured with static shapes "
                              f"(dynamic batch/sequence dims failed: {first}); the parallel "
                              f"module accepts only the example inputs' shapes", stacklevel=4)
            return ep
        except Exception as e:  # noqa: BLE001 - re-raised below as CaptureError with context
            errors.append((e, list(failed_at)))
    exc, stack = errors[-1]
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    where = stack[-1] if stack else "<outside any submodule: inputs or outputs>"
    raise CaptureError(
        f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: {first}\n"
        f"  module: {where}\n  source: {_user_frame(exc) or 'unknown'}\n  try: {_advice(str(exc))}"
    ) from exc
