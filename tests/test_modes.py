"""One model, every call: a call whose structure the example did not have gets its own
program, captured at that call with every parameter pinned to the placement it already has,
over the same Parameter objects (train/eval switching with dropout: test_dropout.py)."""
from __future__ import annotations


import torch

import autotp
from dist_utils import run_ranks


def _new_arguments(rank: int, world: int) -> dict:
    from examples import hf_models
    model, _, kwargs = hf_models.llama(n_layer=2, hidden=64, heads=8, kv_heads=4, intermediate=128,
                                       vocab=256, batch=2, seq=8)
    model.eval()
    ids = kwargs["input_ids"]
    tp = autotp.parallelize(model, (), {"input_ids": ids, "use_cache": False}, objective="memory")
    errs = []
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in the first sequence
    with torch.no_grad():
        for i, m in enumerate((mask, torch.ones_like(ids))):
            got = tp(input_ids=ids, attention_mask=m, use_cache=False).logits
            want = model(input_ids=ids, attention_mask=m, use_cache=False).logits
            errs.append(float((got - want).abs().max()))
        ids2 = torch.randint(0, 256, (3, 12))  # other sizes: the same program
        m2 = torch.ones_like(ids2)
        m2[1, :5] = 0
        errs.append(float((tp(input_ids=ids2, attention_mask=m2, use_cache=False).logits
                           - model(input_ids=ids2, attention_mask=m2, use_cache=False).logits).abs().max()))
        errs.append(float((tp(use_cache=False, input_ids=ids).logits  # keyword order is free
                           - model(input_ids=ids, use_cache=False).logits).abs().max()))
    return {"errs": errs, "programs": tp.programs}


def test_arguments_the_example_did_not_have() -> None:
    """Llama captured with input_ids only, called with an attention_mask (left padding, then
    at other batch and sequence sizes): one more program, equal to the model."""
    for rep in run_ranks(_new_arguments, 2):
        assert rep["programs"] == 2, rep
        assert max(rep["errs"]) < 1e-5, rep
