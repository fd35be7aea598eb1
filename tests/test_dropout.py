"""Randomness equal to one device, on real gloo processes: with the same ``torch.manual_seed``,
the parallel model draws exactly the numbers the unmodified model draws on one device. A split
dropout (a column-split activation, attention dropout with split heads) draws the full-size
mask and keeps its slice (rewrite.py, edit 4), so training with dropout is compared with one
device step by step: losses, gradients, weights after AdamW and the generator state itself.
Then ``eval()`` (a program of its own, derived from the train program at its first call over
the same Parameter objects: capture/modes.py) equals the single device's eval, and ``train()``
again gives one more equal step. In-process: the derivation refuses every model whose code
branches on the mode in another way, and what it derives computes what eval mode does.

AdamW turns a one-ulp difference in a gradient element that is nearly zero into an update
difference of up to ``lr``; the weights are compared at lr 1e-3, where that stays < 1e-5."""
from __future__ import annotations

import copy

import torch
from torch import nn

import autotp
from autotp.core.placements import shard_tensor
from autotp.rewrite.rewrite import SplitRandom
from dist_utils import run_ranks

P = 0.1
TOL = 1e-5


class _DropMLP(nn.Module):
    """Dropout between a column-split and a row-split linear: the dropout's input is split."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.drop, self.down = nn.Linear(16, 64), nn.Dropout(0.5), nn.Linear(64, 16)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (self.down(self.drop(torch.relu(self.up(x)))) - labels).pow(2).mean()


def _model(name: str) -> tuple[nn.Module, dict]:
    """Each model with dropout p=0.1 everywhere it has one, and inputs with ``labels`` (the
    model's own loss)."""
    import transformers as T
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 8))
    if name == "mlp":
        return _DropMLP(), {"x": torch.randn(2, 5, 16), "labels": torch.randn(2, 5, 16)}
    if name == "gpt2":
        cfg = T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32,
                           resid_pdrop=P, embd_pdrop=P, attn_pdrop=P, bos_token_id=0, eos_token_id=0)
        return T.GPT2LMHeadModel(cfg), {"input_ids": ids, "labels": ids, "use_cache": False}
    if name == "bert":
        cfg = T.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                           intermediate_size=64, vocab_size=64, max_position_embeddings=32,
                           hidden_dropout_prob=P, attention_probs_dropout_prob=P)
        return T.BertForMaskedLM(cfg), {"input_ids": ids, "labels": ids}
    cfg = T.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=64, vocab_size=64,
                        max_position_embeddings=32, attention_dropout=P, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0)
    return T.LlamaForCausalLM(cfg), {"input_ids": ids, "labels": ids, "use_cache": False}


def _loss(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.loss


def _train_like_one_device(rank: int, world: int, names: tuple[str, ...]) -> dict:
    report = {}
    for name in names:
        model, kw = _model(name)
        model.train()
        ref = copy.deepcopy(model)
        tp = autotp.parallelize(model, (), kw, objective="memory")
        ids = [id(p) for p in tp.parameters()]
        names = set(tp.state_dict()) == set(ref.state_dict())  # the model's own names
        names = names and {n for n, _ in tp.named_parameters()} <= set(ref.state_dict())
        opt = torch.optim.AdamW(tp.parameters(), lr=1e-3)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
        ref_params = dict(ref.named_parameters())
        torch.manual_seed(11)  # the same seed for both; each keeps its own generator state
        rng_tp, rng_ref = torch.get_rng_state(), torch.get_rng_state()
        steps = []

        def step() -> None:
            nonlocal rng_tp, rng_ref
            torch.set_rng_state(rng_tp)
            loss = _loss(tp(**kw))
            loss.backward()
            rng_tp = torch.get_rng_state()
            torch.set_rng_state(rng_ref)
            want = _loss(ref(**kw))
            want.backward()
            rng_ref = torch.get_rng_state()
            grad = max(float((p.grad - shard_tensor(ref_params[n].grad, tp.placements[n], rank, world)).abs().max())
                       for n, p in tp.named_parameters() if p.grad is not None)
            opt.step()
            ref_opt.step()
            opt.zero_grad()
            ref_opt.zero_grad()
            full = autotp.gather_state_dict(tp)
            weight = max(float((full[k] - v).abs().max()) for k, v in ref.state_dict().items())
            steps.append({"loss": abs(float(loss - want)), "grad": grad, "weight": weight,
                          "rng": bool(torch.equal(rng_tp, rng_ref))})

        for _ in range(5):
            step()
        split_draws = sum(isinstance(m, SplitRandom) for m in tp.module.modules())
        tp.eval()
        ref.eval()
        before = torch.get_rng_state()
        with torch.no_grad():
            got = _loss(tp(**kw))  # captures the eval program: draws nothing
        eval_rng = bool(torch.equal(before, torch.get_rng_state()))
        with torch.no_grad():
            eval_err = abs(float(got - _loss(ref(**kw))))
        tp.train()
        ref.train()
        step()  # back in train mode: the first program, the same parameters
        split = sum(1 for p in tp.placements.values() if not isinstance(p, autotp.Replicate))
        report[name] = {"steps": steps, "eval": eval_err, "eval_rng": eval_rng, "split_draws": split_draws, "split": split,
                        "modes": tp.modes, "made": list(tp._family.made), "names": names, "same_params": ids == [id(p) for p in tp.parameters()]}
    return report


def _check(reports: list[dict], split_draws: tuple[str, ...]) -> None:
    """``split_draws``: the models whose plan at this world size must split a random op's
    output (so the split draw is exercised); the others' plans may or may not (a replicated
    dropout draws the full mask, as one device does), and are exact either way."""
    for rep in reports:
        for name, r in rep.items():
            assert r["split"] > 0 and (r["split_draws"] > 0 or name not in split_draws), (name, r)
            assert r["modes"] == ("train", "eval") and r["same_params"] and r["names"], (name, r)
            assert r["eval"] < TOL and r["eval_rng"], (name, r)
            # their code differs between the modes only in dropout: eval is derived, not exported
            assert r["made"] == ["eval derived"], (name, r)
            for i, s in enumerate(r["steps"]):
                assert s["rng"], (name, i, s)  # the generator advanced as one device's
                assert s["loss"] < TOL and s["grad"] < TOL and s["weight"] < TOL, (name, i, s)


MODELS = ("mlp", "gpt2", "bert", "llama")


def test_dropout_training_equals_one_device_world_2() -> None:
    _check(run_ranks(_train_like_one_device, 2, MODELS), MODELS)


def test_dropout_training_equals_one_device_world_3() -> None:
    """World 3: 4 heads split 2/1/1, so the masks' slices are uneven (the MLP's and BERT's
    plans split a random op; GPT-2's may, Llama's with its 2 kv heads keeps attention whole)."""
    _check(run_ranks(_train_like_one_device, 3, MODELS), ("mlp", "bert"))


# --- the eval program derived from the train capture (capture/modes.py), in-process -------


class _Branchy(nn.Module):
    """Dropout, plus ``how`` the code depends on the mode beyond dropout."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)
        self.drop = nn.Dropout(P)
        self.norm = nn.BatchNorm1d(16)

    def forward(self, x: torch.Tensor):
        h = self.drop(torch.relu(self.up(x)))
        if self.how == "extra op" and self.training:
            h = h * 0.5
        if self.how == "always drops":
            h = torch.nn.functional.dropout(h, P, training=True)
        if self.how == "batch norm":
            h = self.norm(h)
        out = self.down(h)
        if self.how == "outputs" and self.training:
            return out, h
        return out


def _derive(how: str):
    from autotp.capture import capture
    from autotp.capture.modes import derive_eval, keep_source
    torch.manual_seed(0)
    model = _Branchy(how).train()
    x = torch.randn(4, 8)
    source = keep_source(capture(model, (x,), {}))
    derived, why = derive_eval(source, model, (x,), {})
    return model, x, source, derived, why


def test_eval_derived_from_train_computes_eval_mode() -> None:
    model, x, source, derived, why = _derive("plain")
    assert derived is not None, why
    assert model.training and source.training and source.mode_sensitive  # neither is changed
    assert not derived.training and derived.mode_sensitive == ()
    model.eval()
    assert torch.equal(derived.gm(x), model(x))
    # the source graph still draws: calling it in train mode drops out as the model does
    model.train()
    torch.manual_seed(3)
    want = model(x)
    torch.manual_seed(3)
    assert torch.equal(source.gm(x), want)


def test_eval_is_exported_when_the_code_branches_on_the_mode() -> None:
    for how, reason in (("extra op", "torch calls"), ("outputs", "outputs differ"),
                        ("always drops", "draws in both modes"), ("batch norm", "no eval form")):
        _model, _x, _source, derived, why = _derive(how)
        assert derived is None and reason in why, (how, why)
