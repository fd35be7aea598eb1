"""One model, every call (first slice): a model with dropout, parallelized in train mode,
switches to eval for validation and back, on real gloo processes. The eval program is captured
at its first call with every parameter pinned to the placement it already has, over the same
Parameter objects: the optimizer keeps working, and eval outputs equal the unmodified model's
in eval mode with the weights the parallel training reached (gathered). Dropout itself draws
per rank, so train steps are not compared with one device here."""
from __future__ import annotations

import copy

import torch
from torch import nn

import autotp
from dist_utils import run_ranks


class _DropMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.drop, self.down = nn.Linear(16, 64), nn.Dropout(0.5), nn.Linear(64, 16)

    def forward(self, x):
        return self.down(self.drop(torch.relu(self.up(x))))


def _model(name: str):
    torch.manual_seed(0)
    if name == "mlp":
        return _DropMLP(), (torch.randn(2, 5, 16),), {}, lambda out: out
    import transformers as T
    cfg = T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32,
                       resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 64, (2, 8))
    return T.GPT2LMHeadModel(cfg), (), {"input_ids": ids, "use_cache": False}, lambda out: out.logits


def _train_eval_train(rank: int, world: int, name: str) -> dict:
    model, args, kwargs, out_of = _model(name)
    model.train()
    ref = copy.deepcopy(model)
    tp = autotp.parallelize(model, args, kwargs, objective="memory")
    ids = [id(p) for p in tp.parameters()]
    opt = torch.optim.AdamW(tp.parameters(), lr=1e-2)

    def step() -> None:
        out_of(tp(*args, **kwargs)).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    def eval_error() -> float:
        tp.eval()
        with torch.no_grad():
            got = out_of(tp(*args, **kwargs))
        ref.load_state_dict(autotp.gather_state_dict(tp))
        ref.eval()
        with torch.no_grad():
            want = out_of(ref(*args, **kwargs))
        tp.train()
        return float((got - want).abs().max())

    step()
    with torch.no_grad():  # dropout is on in the first program: train differs from eval
        train_out = out_of(tp(*args, **kwargs))
        tp.eval()
        eval_out = out_of(tp(*args, **kwargs))
        tp.train()
    first = eval_error()
    step()  # back in train mode: the first program, the same parameters
    second = eval_error()
    split = sum(1 for p in tp.placements.values() if not isinstance(p, autotp.Replicate))
    return {"first": first, "second": second, "same_params": ids == [id(p) for p in tp.parameters()],
            "modes": tp.modes, "split": split, "training": tp.training,
            "train_differs": float((train_out - eval_out).abs().max()) > 1e-3}


def test_train_eval_switch_matches_one_device_in_eval() -> None:
    for name in ("mlp", "gpt2"):
        for rep in run_ranks(_train_eval_train, 2, name):
            assert rep["split"] > 0, name  # the shards matter: weights are split
            assert rep["modes"] == ("train", "eval") and rep["training"], name
            assert rep["same_params"] and rep["train_differs"], name
            assert rep["first"] < 1e-5 and rep["second"] < 1e-5, (name, rep)


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
