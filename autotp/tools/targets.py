"""TARGET = ``path/to/file.py:factory`` or ``package.module:factory``: the factory returns
``(model, example_inputs)`` or ``(model, example_inputs, example_kwargs)``. ``load_target`` is
shared by the CLI and the process checks; a bad target is a UsageError (exit code 2)."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any


from autotp.errors import AutoTPError


class UsageError(AutoTPError):
    """Bad command line or target: exit code 2 (other AutoTPErrors exit with 1)."""


def load_target(spec: str) -> tuple[Any, tuple, dict]:
    if ":" not in spec:
        raise UsageError(f"TARGET {spec!r} must be 'path/to/file.py:factory' or 'package.module:factory'")
    where, _, name = spec.rpartition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if where.endswith(".py") or os.sep in where:
        path = Path(where)
        if not path.is_file():
            raise UsageError(f"no such file: {where}")
        mod_name = "autotp_target_" + path.stem
        loader = importlib.util.spec_from_file_location(mod_name, path)
        if loader is None or loader.loader is None:
            raise UsageError(f"cannot import {where}: not a Python file")
        module = importlib.util.module_from_spec(loader)
        sys.modules[mod_name] = module
        try:
            loader.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"importing {where} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"cannot import module {where!r}: {type(e).__name__}: {e}") from e
    factory = getattr(module, name, None)
    if not callable(factory):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise UsageError(f"{where} has no function {name!r}; it has: {', '.join(names[:12])}")
    try:
        result = factory()
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"the factory {spec} raised {type(e).__name__}: {e}") from e
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise UsageError(f"the factory {spec} must return (model, example_inputs) or "
                         f"(model, example_inputs, example_kwargs); got {type(result).__name__}")
    model, args = result[0], result[1]
    kwargs = result[2] if len(result) == 3 else {}
    return model, tuple(args) if isinstance(args, (list, tuple)) else (args,), dict(kwargs or {})
