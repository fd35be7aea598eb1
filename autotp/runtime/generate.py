"""``ParallelModule.generate``: text generation on the parallel module of a Hugging Face causal
LM, with the KV cache split across the ranks, token for token what ``model.generate`` gives
on one device.

autotp runs its own generation loop rather than transformers' (``GenerationMixin``): that
loop hands the model a Python cache object and updates it in Python between calls, which no
exported program can take as an input. The loop here keeps transformers' semantics for what
it supports (checked against ``model.generate`` in tests/test_generate.py):

- greedy (argmax) and sampling (``do_sample``: temperature, top-k, top-p, in transformers'
  order, with its own warper classes, defaults from ``model.generation_config``; the same
  ``torch.manual_seed`` on every rank and on one device draws the same tokens);
- ``max_new_tokens`` / ``max_length``, ``eos_token_id`` (one or several; finished rows are
  filled with ``pad_token_id``, and generation stops when every row has finished);
- ``attention_mask`` with left padding: positions are ``cumsum(mask) - 1`` (0 on padding),
  as transformers computes them;
- ``return_dict_in_generate`` with ``output_scores`` / ``output_logits``.
Anything else (beam search, repetition penalties, stopping strings, streamers, ...) is an
AutoTPError naming the option.

Two programs per (batch, cache length), each captured and planned at its own shapes with
every parameter pinned to the placement it already has (the family's pins): **prefill** (the
prompt, any length; it also chooses the cache's placement) and **decode** (one token per
row; the cache pinned to prefill's placement). Both are ``CachedLM`` (capture/kv_cache.py)
programs: the cache is the module's buffers, split by the plan (kv heads), shared by the
two programs. The cache length is the prompt plus ``max_new_tokens`` rounded up to
``CACHE_ROUND`` positions, so calls of similar lengths reuse the programs."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from autotp.capture.kv_cache import CachedLM
from autotp.core.placements import Placement
from autotp.errors import AutoTPError, AutoTPInternalError
from autotp.plans import Plan

if TYPE_CHECKING:
    from autotp.runtime.pipeline import ParallelModule

log = logging.getLogger(__name__)

CACHE_ROUND = 32

# generation options the loop implements; others must keep transformers' defaults
SUPPORTED = {"max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p",
             "eos_token_id", "pad_token_id", "return_dict_in_generate", "output_scores",
             "output_logits", "use_cache"}
# fields that describe the model or the config, not how to generate
IGNORED = {"bos_token_id", "decoder_start_token_id", "transformers_version", "_from_model_config",
           "cache_implementation", "cache_config", "_commit_hash", "_original_object_hash",
           "generation_kwargs", "is_assistant", "compile_config", "num_return_sequences",
           "min_length", "min_new_tokens"}


@dataclass
class Serving:
    """The prefill and decode programs of one (batch, cache length) and the cache they share."""
    wrapper: CachedLM
    prefill: Any = None
    decode: Any = None
    cache: dict[str, torch.Tensor] = field(default_factory=dict)  # buffer path -> this rank's piece
    placements: dict[str, Placement] = field(default_factory=dict)  # the cache's placements
    plans: dict[str, Plan] = field(default_factory=dict)  # "prefill" / "decode"

    @property
    def cache_bytes(self) -> int:
        """Bytes of this rank's pieces of the KV cache (keys and values)."""
        return sum(t.numel() * t.element_size() for t in self.cache.values())


def _config(model: Any, generation_config: Any, kwargs: dict) -> tuple[Any, dict]:
    from transformers import GenerationConfig
    gc = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    rest = gc.update(**kwargs)
    default = GenerationConfig()
    odd = [k for k, v in gc.to_dict().items() if k not in SUPPORTED and k not in IGNORED
           and hasattr(default, k) and v != getattr(default, k) and (v or getattr(default, k))]
    if gc.num_return_sequences not in (None, 1):
        odd.append("num_return_sequences")
    if (gc.min_length or 0) > 0 or (gc.min_new_tokens or 0) > 0:
        odd.append("min_length / min_new_tokens")
    if odd:
        raise AutoTPError(f"generate does not support {', '.join(sorted(odd))} (set to a value other "
                          f"than transformers' default); supported: {', '.join(sorted(SUPPORTED))}. "
                          "Unset them, or run model.generate on one device")
    return gc, rest


def _warpers(gc: Any) -> list:
    """transformers' sampling warpers, in its order (GenerationMixin._get_logits_processor)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    out: list = []
    if not gc.do_sample:
        return out
    if gc.temperature is not None and gc.temperature != 1.0:
        out.append(TemperatureLogitsWarper(gc.temperature))
    if gc.top_k is not None and gc.top_k != 0:
        out.append(TopKLogitsWarper(top_k=gc.top_k, min_tokens_to_keep=1))
    if gc.top_p is not None and gc.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=gc.top_p, min_tokens_to_keep=1))
    return out


def _max_positions(config: Any) -> int | None:
    for k in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(config, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def cache_length(prompt: int, new: int, config: Any) -> int:
    """The static cache's length for a prompt and ``new`` tokens: rounded up to CACHE_ROUND,
    capped at the model's positions (AutoTPError when the two do not fit)."""
    need = prompt + new
    top = _max_positions(config)
    if top is not None and need > top:
        raise AutoTPError(f"the prompt ({prompt} tokens) plus max_new_tokens ({new}) is {need} "
                          f"positions, more than the model's {top} (config.max_position_embeddings): "
                          "shorten the prompt or ask for fewer new tokens")
    length = -(-need // CACHE_ROUND) * CACHE_ROUND
    return min(length, top) if top is not None else length


def serving(pm: "ParallelModule", batch: int, length: int) -> Serving:
    """The Serving of (batch, length) in the module's mode (eval, usually: a train-mode model
    draws its dropout while generating, as ``model.generate`` does then), made at its first
    use (every rank makes the same call)."""
    key = (batch, length, pm.training)
    got = pm._serving.get(key)
    if got is None:
        got = Serving(CachedLM(pm._family.model, batch, length))
        pm._serving[key] = got
    return got


def _program(pm: "ParallelModule", sv: Serving, what: str, args: tuple) -> Any:
    """Capture, plan (mode inference, parameters and any cache placement pinned) and rewrite
    one program of ``sv`` over ``pm``'s shards."""
    fam = pm._family
    gm, placements, plan = fam.serving_program(pm, sv.wrapper, args, what, {**pm.placements, **sv.placements},
                                               sv.cache)
    state = {n: p for n, p in placements.items() if n.startswith("autotp_cache_")}
    differ = [n for n in state if n in sv.placements and sv.placements[n] != state[n]]
    if differ:
        raise AutoTPInternalError(f"the {what} program places the KV cache unlike the other: {differ[:3]}")
    if not sv.cache:
        sv.cache = {n: gm.get_buffer(n) for n in state}
        sv.placements = state
    sv.plans[what] = plan
    log.info("autotp: %s program of batch %d, cache %d: %d collectives per call, predicted %.3f ms, "
             "KV cache %d bytes on this rank", what, sv.wrapper.batch, sv.wrapper.max_len,
             len(plan.collectives), plan.predicted_time_s * 1e3, sv.cache_bytes)
    if pm._compile_kwargs is not None:  # parallelize(compile=...): compiled like the module
        return torch.compile(gm, **pm._compile_kwargs)
    return gm


def generate(pm: "ParallelModule", input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             generation_config: Any = None, **kwargs: Any) -> Any:
    """See ``ParallelModule.generate``."""
    fam = pm._family
    model = fam.model if fam is not None else None
    if fam is None:
        raise AutoTPError("generate needs a module made by autotp.parallelize without plan= "
                          "(this one holds a single program: it was made from a given plan or by simulate)")
    if not (hasattr(model, "generation_config") and hasattr(model, "config")
            and callable(getattr(model, "can_generate", None)) and model.can_generate()
            and not getattr(model.config, "is_encoder_decoder", False)):
        raise AutoTPError(f"generate needs a Hugging Face causal language model (one whose "
                          f"can_generate() is true, not encoder-decoder); {type(model).__name__} is not")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise AutoTPError("generate takes input_ids as a 2-D tensor (batch, prompt length)")
    gc, rest = _config(model, generation_config, kwargs)
    if rest:
        raise AutoTPError(f"generate does not take {', '.join(sorted(rest))}: it runs the model "
                          "on input_ids and attention_mask only")
    batch, prompt = input_ids.shape
    new = gc.max_new_tokens if gc.max_new_tokens is not None else (gc.max_length or 20) - prompt
    if new < 1:
        raise AutoTPError(f"nothing to generate: max_length {gc.max_length} <= prompt length {prompt}; "
                          "pass max_new_tokens")
    length = cache_length(prompt, new, model.config)
    eos = gc.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = gc.pad_token_id if gc.pad_token_id is not None else (eos[0] if eos else None)
    device = next(iter(pm.parameters())).device
    ids = input_ids.to(device)
    mask = torch.zeros(batch, length, dtype=torch.long, device=device)
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise AutoTPError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                              f"{tuple(input_ids.shape)}: they must match")
        mask[:, :prompt] = attention_mask.to(device)
        pos = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0).to(device)
    else:
        mask[:, :prompt] = 1
        pos = torch.arange(prompt, device=device).unsqueeze(0).expand(batch, -1)
    sv = serving(pm, batch, length)
    warpers = _warpers(gc)
    scores, raw = [], []
    unfinished = torch.ones(batch, dtype=torch.long, device=device)
    with torch.no_grad():
        if sv.prefill is None:
            sv.prefill = _program(pm, sv, "prefill", (ids, mask, pos.contiguous(), torch.tensor(0)))
        logits = sv.prefill(ids, mask, pos.contiguous(), torch.tensor(0, device=device))
        for step in range(new):
            last = logits.to(copy=True, dtype=torch.float32)
            s = last
            for w in warpers:
                s = w(ids, s)
            if gc.output_scores:
                scores.append(s)
            if gc.output_logits:
                raw.append(last)
            if gc.do_sample:
                nxt = torch.multinomial(torch.softmax(s, dim=-1), num_samples=1).squeeze(1)
            else:
                nxt = torch.argmax(s, dim=-1)
            if eos and pad is not None:
                nxt = nxt * unfinished + pad * (1 - unfinished)
            ids = torch.cat([ids, nxt[:, None]], dim=-1)
            if eos:
                unfinished = unfinished & ~torch.isin(nxt, torch.tensor(eos, device=device))
            if step == new - 1 or unfinished.max() == 0:
                break
            at = prompt + step
            mask[:, at] = 1
            pos = pos[:, -1:] + 1
            args = (nxt[:, None], mask, pos, torch.tensor(at, device=device))
            if sv.decode is None:
                sv.decode = _program(pm, sv, "decode", args)
                sv.wrapper.release()  # both programs hold their pieces: no rank keeps a whole cache
            logits = sv.decode(*args)
    if not gc.return_dict_in_generate:
        return ids
    from transformers.generation.utils import GenerateDecoderOnlyOutput
    return GenerateDecoderOnlyOutput(sequences=ids, scores=tuple(scores) if gc.output_scores else None,
                                     logits=tuple(raw) if gc.output_logits else None)


def decode_call(model: Any, input_ids: torch.Tensor, new: int) -> tuple[CachedLM, tuple]:
    """The decode program's module and call for ``model`` after a prompt like ``input_ids``
    and ``new`` tokens (the last of them being fed): batch and cache length as generate makes
    them, on the device of the model's parameters (meta for a plan without weights)."""
    batch, prompt = input_ids.shape
    length = cache_length(prompt, new, model.config)
    device = next(model.parameters()).device
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    at = prompt + new - 1
    pos = torch.full((batch, 1), at, dtype=torch.long, device=device)
    ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
    return CachedLM(model, batch, length), (ids, mask, pos, torch.tensor(at, device=device))

