"""The `tensor_parallel` package (BlackSamorez, PyPI `tensor_parallel`, 2.0.0, 2023-08) as a
peer on the benchmark model, or the exact reason it cannot be one here.

What it offers, read from its source (tensor_parallel/factory.py, shard.py, config.py,
communications.py):

- On a model class it has no hand-written config for (the benchmark's Llama-style
  ``nn.Module``; its Megatron-like configs exist only for some Hugging Face classes), it uses
  ``get_default_config``: every ``nn.Linear`` split by output features and its output
  all-gathered ("gather -1"), every embedding split by columns and gathered. That is 7
  all-gathers per Llama block in forward instead of Megatron's 2 all-reduces.
- ``distributed=True`` (the default when torch.distributed is initialized) returns
  ``make_distributed_shard``'s tuple ``(module, names)`` rather than a module (a bug: the
  factory passes it through), and its collectives call raw ``torch.distributed.all_gather`` /
  ``all_reduce``, which autograd does not see: the gathered output has no ``grad_fn``, so
  ``loss.backward()`` raises "element 0 of tensors does not require grad". On a process group
  it is forward-only.
- ``distributed=False`` with ``device_ids=["cpu", "cpu"]`` runs the shards as threads of one
  process; collectives are ``torch.cat`` / sums in shared memory, differentiable. That mode
  trains, but it is not torch.distributed and moves no bytes over a link.
- ``import tensor_parallel`` needs ``pkg_resources``, which setuptools >= 81 no longer ships;
  ``load()`` installs a two-line stand-in (``get_distribution(name).version`` from
  ``importlib.metadata``) before importing.
"""
from __future__ import annotations

import importlib.metadata
import sys
import types
from typing import Any


def load() -> tuple[Any, str]:
    """(the tensor_parallel module or None, a sentence on what happened)."""
    try:
        version = importlib.metadata.version("tensor_parallel")
    except importlib.metadata.PackageNotFoundError:
        return None, ("not installed (pip install tensor_parallel, or the `bench` extra: "
                      "pip install -e '.[bench]')")
    note = f"tensor_parallel {version}"
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pkg_resources")
        shim.get_distribution = lambda name: types.SimpleNamespace(  # type: ignore[attr-defined]
            version=importlib.metadata.version(name))
        sys.modules["pkg_resources"] = shim
        note += (" (its `import pkg_resources` fails with this setuptools; a stand-in module "
                 "was installed)")
    try:
        import tensor_parallel
    except Exception as e:  # noqa: BLE001 -- any import failure is the finding to report
        return None, f"{note}: import failed: {type(e).__name__}: {e}"
    return tensor_parallel, note


def distributed_shard(model, tp) -> Any:
    """This rank's shard on the default process group (forward-only, see module docstring)."""
    out = tp.tensor_parallel(model, ["cpu"], distributed=True)
    return out[0] if isinstance(out, tuple) else out


def threaded(model, tp, world_size: int) -> Any:
    """One process, ``world_size`` thread-shards on the CPU (trains; no torch.distributed)."""
    import logging
    for mod in ("tensor_parallel.tensor_parallel", "tensor_parallel.shard"):
        if mod in sys.modules:  # it logs to logging.getLogger(__file__)
            logging.getLogger(sys.modules[mod].__file__).setLevel(logging.ERROR)
    return tp.tensor_parallel(model, ["cpu"] * world_size, distributed=False)
