"""A Hugging Face causal LM with a static KV cache that torch.export can capture: ``CachedLM``.

The cache is the module's own buffers (``autotp_cache_k{i}``, ``autotp_cache_v{i}``: one key and
one value tensor of shape (batch, kv heads, max_len, head dim) per attention layer, and a
position counter ``autotp_cache_n{i}``), written in place by transformers' ``StaticLayer``
(``index_copy_`` along the sequence dim). In the captured graph those buffers are the targets
of in-place ops, so candidates.py makes them program state (``NodeKind.STATE``): the solver
places each like a parameter (the heads split, as the k/v projections that write it), the
rewrite gives each rank its piece, and the prefill and decode programs share the pieces.

The wrapper has the model's own submodules and parameters under their own names (not under a
prefix), so both programs read the parameters the first program holds (the family's pins).
Its forward takes only tensors:
``(input_ids, attention_mask, position_ids, start) -> logits of the last position``, where
``attention_mask`` is (batch, max_len) over the whole cache (1: a real token written there),
``position_ids`` the tokens' positions (left padding shifts them) and ``start`` (0-d) the cache
index the first of ``input_ids`` is written at.

Sliding-window layers keep a full-length cache (transformers' own export recipe does the same:
its rolling layer has data-dependent control flow); the model's mask still applies the
window, so attention is the model's, at the memory of a full cache."""
from __future__ import annotations

import inspect

import torch
from torch import nn

from autotp.errors import AutoTPError


def _head_shapes(config) -> tuple[int, int]:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv, head_dim


class CachedLM(nn.Module):
    """``model`` (a causal LM) with a static KV cache of ``batch`` x ``max_len`` positions."""

    def __init__(self, model: nn.Module, batch: int, max_len: int):
        super().__init__()
        try:
            from transformers import StaticCache
            from transformers.cache_utils import StaticLayer
        except ImportError as e:  # pragma: no cover - generate() is for transformers models
            raise AutoTPError("generate needs transformers (pip install transformers)") from e
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in model.named_buffers(recurse=False):
            self.register_buffer(name, b)
        object.__setattr__(self, "lm", model)  # called in forward, not a second module tree
        config = model.config.get_text_config(decoder=True)
        cache = StaticCache(config=config, max_cache_len=max_len)
        for i, layer in enumerate(cache.layers):
            if type(layer) is not StaticLayer:  # sliding window: a full-length layer (see above)
                if not isinstance(layer, StaticLayer):
                    raise AutoTPError(f"layer {i} of {type(model).__name__}'s cache is a "
                                      f"{type(layer).__name__}, which generate does not support")
                cache.layers[i] = StaticLayer(max_len)
        kv, head_dim = _head_shapes(config)
        param = next(model.parameters())
        cache.early_initialization(batch, kv, head_dim, param.dtype, param.device)
        object.__setattr__(self, "cache", cache)
        for i, layer in enumerate(cache.layers):
            self.register_buffer(f"autotp_cache_k{i}", layer.keys, persistent=False)
            self.register_buffer(f"autotp_cache_v{i}", layer.values, persistent=False)
            self.register_buffer(f"autotp_cache_n{i}", layer.cumulative_length.to(param.device),
                                 persistent=False)
        params = inspect.signature(model.forward).parameters
        self._keep_one = "logits_to_keep" in params
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in 5.x
        self.batch, self.max_len = batch, max_len

    def cache_buffers(self) -> list[str]:
        return [n for n, _ in self.named_buffers() if n.startswith("autotp_cache_")]

    def release(self) -> None:
        """Drop the full-size cache tensors once every program is captured: each rank's
        programs hold their own pieces (rewrite edit 1b), so keeping these would cost every
        rank a whole cache. Meta tensors of the same shapes stay for the record."""
        for name in self.cache_buffers():
            self.register_buffer(name, torch.empty_like(getattr(self, name), device="meta"), persistent=False)
        self._bind_layers()

    def _bind_layers(self) -> None:
        """Point transformers' cache layers at this module's buffers as they are now."""
        for i, layer in enumerate(self.cache.layers):
            layer.keys = getattr(self, f"autotp_cache_k{i}")
            layer.values = getattr(self, f"autotp_cache_v{i}")
            layer.cumulative_length = getattr(self, f"autotp_cache_n{i}")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        self._bind_layers()  # torch.export swaps fakes in for the buffers
        for layer in self.cache.layers:
            layer.cumulative_length.copy_(start)
        extra = {"logits_to_keep": 1} if self._keep_one else {}
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=True, **{self._cache_kw: self.cache}, **extra)
        return out.logits[:, -1, :]
