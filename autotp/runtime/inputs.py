"""Example inputs when the caller gives none: ``autotp.parallelize(model)`` on a Hugging Face
model plans its first program for inputs derived from the model's config, as transformers'
own dummy inputs are (``default_inputs``). Any other model must be given example inputs.

The shapes (docs/troubleshooting.md, "No example inputs"):

- token models (``main_input_name == "input_ids"``): ``input_ids`` of shape
  (2, min(128, the config's maximum positions)) drawn from [0, vocab_size), plus
  ``decoder_input_ids`` of the same shape for encoder-decoder models;
- vision models (``"pixel_values"``): (2, num_channels, image_size, image_size) in the
  model's floating dtype;
- ``use_cache=False`` where the config has ``use_cache`` (a KV cache cannot be a program's
  output; serving with a cache is separate work).

Batch 2, because torch.export specializes a dim of size 1. The values come from a private
generator (seed 0): the caller's random state is not touched. Batch and sequence dims stay
dynamic, so later calls at other sizes run the same program; the cost model, though, plans
for these sizes (activation bytes and collective sizes scale with them), so pass real
example inputs when the plan matters at another size.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autotp.errors import AutoTPError

BATCH = 2
MAX_SEQ = 128
_POSITIONS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")


def _config_value(config: Any, names: tuple[str, ...]) -> Any:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def default_inputs(model: nn.Module) -> tuple[tuple, dict, str]:
    """(args, kwargs, a description of them) for ``model`` from its Hugging Face config;
    AutoTPError when the model has none or its main input is of a kind not derived here."""
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    if config is None or main is None:
        raise AutoTPError(
            f"{type(model).__name__} is not a Hugging Face model (no config and "
            "main_input_name), so autotp cannot derive example inputs: pass example_inputs "
            "(and example_kwargs), e.g. autotp.parallelize(model, (torch.randint(0, vocab, "
            "(2, 128)),)); the plan is made for their sizes")
    gen = torch.Generator().manual_seed(0)
    kwargs: dict[str, Any] = {}
    if main == "input_ids":
        vocab = _config_value(config, ("vocab_size",))
        if vocab is None:
            raise AutoTPError(f"{type(model).__name__}'s config has no vocab_size: pass example_inputs")
        seq = min(MAX_SEQ, _config_value(config, _POSITIONS) or MAX_SEQ)
        kwargs["input_ids"] = torch.randint(0, vocab, (BATCH, seq), generator=gen)
        if getattr(config, "is_encoder_decoder", False):
            kwargs["decoder_input_ids"] = torch.randint(0, vocab, (BATCH, seq), generator=gen)
    elif main == "pixel_values":
        size = getattr(config, "image_size", None)
        size = size[0] if isinstance(size, (tuple, list)) else size
        channels = getattr(config, "num_channels", 3)
        if not isinstance(size, int):
            raise AutoTPError(f"{type(model).__name__}'s config has no image_size: pass example_inputs")
        kwargs["pixel_values"] = torch.randn(BATCH, channels, size, size, generator=gen).to(_float_dtype(model))
    else:
        raise AutoTPError(
            f"{type(model).__name__} takes {main!r} as its main input, for which autotp derives "
            "no example (it does for input_ids and pixel_values): pass example_inputs / "
            "example_kwargs of the shape you will call it with")
    if hasattr(config, "use_cache"):
        kwargs["use_cache"] = False
    described = ", ".join(f"{k}={tuple(v.shape)}" if isinstance(v, torch.Tensor) else f"{k}={v!r}"
                          for k, v in kwargs.items())
    return (), kwargs, described
