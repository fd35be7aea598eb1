"""Serving on real gloo processes: ``ParallelModule.generate`` against the unmodified model's
``model.generate`` on one device (transformers' own loop with its dynamic cache), token for
token, with the logits of every step within 1e-5 (fp32). GPT-2, Llama with GQA (8 heads, 2 kv
heads), Mistral with a sliding window shorter than the text, and a Qwen3 mixture of experts,
at world 2 and 3 (uneven heads), batch 1 and a left-padded batch of 3, 32 new tokens; sampling
with the same seed; the KV cache's bytes per rank measured from its tensors against the plan.
One spawned process group per world size serves every check."""
from __future__ import annotations

import pytest
import torch

import autotp
from autotp.errors import AutoTPError
from dist_utils import run_ranks

NEW = 32
TOL = 1e-5
MODELS = ("gpt2", "llama", "mistral", "moe")


def make(name: str, window: int | None = 6) -> torch.nn.Module:
    import transformers as T
    torch.manual_seed(0)
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=None)
    if name == "gpt2":
        cfg = T.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=128, **ids)
        return T.GPT2LMHeadModel(cfg).eval()
    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=128, **ids)
    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(intermediate_size=128, **common)).eval()
    if name == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(intermediate_size=128, sliding_window=window,
                                                    **common)).eval()
    cfg = T.Qwen3MoeConfig(**{**common, "num_attention_heads": 4, "head_dim": 16}, intermediate_size=128,
                           moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2)
    return T.Qwen3MoeForCausalLM(cfg).eval()


def prompts() -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Batch 1 without a mask, and a batch of 3 left-padded to 7 tokens (0, 2 and 4 pads)."""
    g = torch.Generator().manual_seed(1)
    one = torch.randint(2, 128, (1, 7), generator=g)
    ids = torch.randint(2, 128, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    return [(one, None), (ids.masked_fill(mask == 0, 0), mask)]


def _compare(ref, out) -> float:
    assert torch.equal(ref.sequences, out.sequences), (ref.sequences, out.sequences)
    assert len(ref.logits) == len(out.logits) == NEW
    return max((a - b).abs().max().item() for a, b in zip(ref.logits, out.logits))


def _job(rank: int, world: int) -> dict:
    report: dict = {}
    for name in MODELS:
        m = make(name)
        ids0, mask0 = prompts()[1]
        tp = autotp.parallelize(m, (ids0,), {"attention_mask": mask0, "use_cache": False},
                                mode="inference", objective="memory")
        for ids, mask in prompts():
            kw = dict(max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True)
            ref = m.generate(ids, attention_mask=mask, **kw)
            out = tp.generate(ids, attention_mask=mask, **kw)
            err = _compare(ref, out)
            assert err < TOL, (name, ids.shape, err)
            sv = tp._serving[(ids.shape[0], 64, False)]
            # no rank keeps the whole cache besides its pieces once both programs exist
            assert all(b.device.type == "meta" for n, b in sv.wrapper.named_buffers() if "autotp_cache_" in n)
            report[(name, ids.shape[0])] = dict(
                err=err, tokens=out.sequences, cache=sv.cache_bytes, total=sv.plans["decode"].state_bytes_total,
                plan=[sv.plans[w].state_bytes_per_rank for w in ("prefill", "decode")],
                placements={k: str(v) for k, v in sv.placements.items()})
        if name == "llama":  # sampling: the same seed here and on one device draws the same tokens
            ids, mask = prompts()[1]
            kw = dict(max_new_tokens=NEW, do_sample=True, top_k=10, temperature=0.8, top_p=0.9)
            torch.manual_seed(7)
            ref = m.generate(ids, attention_mask=mask, **kw)
            torch.manual_seed(7)
            out = tp.generate(ids, attention_mask=mask, **kw)
            assert torch.equal(ref, out), (ref, out)
            report["sampled"] = out
            report["errors"] = _errors(tp)
    if world == 2:
        report["compiled"] = _compiled_generate()
    return report


def _compiled_generate() -> dict:
    """parallelize(compile=...): generate's prefill and decode programs are compiled as they
    are made (fullgraph, through a backend that counts the graphs Dynamo hands it and runs them
    as traced), and generate token for token as on one device."""
    graphs = []

    def counting(gm, _example_inputs):
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    m = make("llama")
    ids0, mask0 = prompts()[1]
    tp = autotp.parallelize(m, (ids0,), {"attention_mask": mask0, "use_cache": False}, mode="inference",
                            objective="memory", compile={"backend": counting})
    out = {}
    for ids, mask in prompts():
        kw = dict(max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True)
        ref = m.generate(ids, attention_mask=mask, **kw)
        got = tp.generate(ids, attention_mask=mask, **kw)
        out[ids.shape[0]] = (_compare(ref, got), torch.equal(ref.sequences, got.sequences))
    out["graphs"] = len(graphs)
    return out


def _errors(tp) -> list[str]:
    """Options autotp does not implement, and a text longer than the model's positions."""
    ids = torch.randint(2, 128, (1, 7))
    msgs = []
    for kw in (dict(num_beams=2), dict(repetition_penalty=1.3), dict(max_new_tokens=200), dict(streamer=1)):
        with pytest.raises(AutoTPError) as e:
            tp.generate(ids, **kw)
        msgs.append(str(e.value))
    return msgs


@pytest.mark.parametrize("world", [2, 3])
def test_generate_equals_one_device(world: int) -> None:
    results = run_ranks(_job, world)
    first = results[0]
    for r in results[1:]:  # every rank produced the same tokens
        for k, v in first.items():
            if isinstance(v, dict) and "tokens" in v:
                assert torch.equal(v["tokens"], r[k]["tokens"])
    for name in MODELS:
        for batch in (1, 3):
            got = first[(name, batch)]
            assert got["err"] < TOL
            # the plan's cache figure (the largest rank's) is what the tensors hold
            held = max(r[(name, batch)]["cache"] for r in results)
            assert got["plan"] == [held] * 2, (name, batch, got["plan"], held, got["placements"])
    assert "num_beams" in first["errors"][0] and "repetition_penalty" in first["errors"][1]
    assert "positions" in first["errors"][2] and "streamer" in first["errors"][3]
    if world == 2:  # compiled generation: token for token, every program traced by Dynamo
        comp = first["compiled"]
        assert all(comp[b][1] and comp[b][0] < TOL for b in (1, 3)), comp
        # prefill and decode for two batch sizes; a decode step's shapes don't change
        assert 4 <= comp["graphs"] <= 8, comp["graphs"]
    if world == 2:  # kv heads (2) divide the world: each rank keeps half of the cache (+ counters)
        llama = first[("llama", 3)]
        assert llama["placements"]["autotp_cache_k0"] == "S(1)"
        assert llama["cache"] < 0.51 * llama["total"]


def _weight_bound():
    """A device whose memory is slow and links fast, so that even this small model's decode
    plan splits its projections and attention (as a 7B-width one does on an h100)."""
    from autotp.cost.devices import DeviceSpec
    return DeviceSpec("weight-bound", {"float32": 1e12}, 1e12, 1e6, 1e9, 1e-6)


def _job_shared_kv(rank: int, world: int) -> dict:
    """Llama with 2 kv heads on 4 ranks: each kv head lives on the two ranks whose query
    heads read it (``S(1,rep=2)``), generation token for token as on one device."""
    m = make("llama")
    ids0, mask0 = prompts()[1]
    tp = autotp.parallelize(m, (ids0,), {"attention_mask": mask0, "use_cache": False},
                            mode="inference", device=_weight_bound())
    report: dict = {}
    for ids, mask in prompts():
        kw = dict(max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True)
        ref = m.generate(ids, attention_mask=mask, **kw)
        out = tp.generate(ids, attention_mask=mask, **kw)
        sv = tp._serving[(ids.shape[0], 64, False)]
        report[ids.shape[0]] = dict(
            err=_compare(ref, out), tokens=out.sequences, cache=sv.cache_bytes,
            plan=[sv.plans[w].state_bytes_per_rank for w in ("prefill", "decode")],
            total=sv.plans["decode"].state_bytes_total,
            placements={k: str(v) for k, v in sv.placements.items()})
    return report


def test_generate_shares_kv_heads_across_ranks() -> None:
    """More ranks than kv heads: the least replication that stays exact. Before it the cache
    (and k, v) stayed whole on every rank; now each rank holds the half its query heads use."""
    results = run_ranks(_job_shared_kv, 4)
    for batch in (1, 3):
        got = results[0][batch]
        assert got["err"] < TOL, got["err"]
        assert all(torch.equal(got["tokens"], r[batch]["tokens"]) for r in results[1:])
        assert got["placements"]["autotp_cache_k0"] == "S(1,rep=2)", got["placements"]
        assert got["plan"] == [max(r[batch]["cache"] for r in results)] * 2  # what the tensors hold
        assert got["cache"] < 0.51 * got["total"], (got["cache"], got["total"])


def test_shared_pieces_refuse_a_backward() -> None:
    """A value whose pieces several ranks share has no exact gradient: a grad-enabled call
    through one is an AutoTPError, never a wrong gradient."""
    from autotp.core.placements import Shard
    from autotp.rewrite.collectives import Comm, Redistribute
    comm = Comm()
    comm.rank, comm.world_size = 0, 4
    r = Redistribute(comm, Shard(1, rep=2), Shard(1), Shard(1), (1, 8, 3), where="k in layer 0")
    with pytest.raises(AutoTPError, match="k in layer 0.*no exact gradient.*no_grad"):
        r(torch.zeros(1, 4, 3, requires_grad=True))
    with torch.no_grad():  # forward only: the local slice of the shared piece
        assert torch.equal(r(torch.arange(12.).view(1, 4, 3)), torch.arange(6.).view(1, 2, 3))


def test_sliding_window_matters() -> None:
    """The Mistral check is not vacuous: its window changes the tokens one device generates."""
    ids, _ = prompts()[0]
    kw = dict(max_new_tokens=NEW, do_sample=False)
    assert not torch.equal(make("mistral").generate(ids, **kw), make("mistral", window=None).generate(ids, **kw))


def test_generate_refuses_what_is_not_a_causal_lm() -> None:
    """In-process: the checks before any program is made name what is wrong."""
    import types

    import transformers as T
    from autotp.runtime.generate import cache_length, generate
    bert = T.BertForMaskedLM(T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=64, vocab_size=64))
    pm = types.SimpleNamespace(_family=types.SimpleNamespace(model=bert))
    with pytest.raises(AutoTPError, match="causal language model.*BertForMaskedLM"):
        generate(pm, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(AutoTPError, match="single program"):
        generate(types.SimpleNamespace(_family=None), torch.zeros(1, 4, dtype=torch.long))
    pm = types.SimpleNamespace(_family=types.SimpleNamespace(model=make("llama")))
    with pytest.raises(AutoTPError, match="2-D tensor"):
        generate(pm, torch.zeros(4, dtype=torch.long))
    with pytest.raises(AutoTPError, match="num_beams"):
        generate(pm, torch.zeros(1, 4, dtype=torch.long), num_beams=3)
    assert cache_length(7, 32, make("llama").config) == 64  # rounded up to 32 positions
    with pytest.raises(AutoTPError, match="128"):
        cache_length(100, 29, make("llama").config)
