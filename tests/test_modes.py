"""One model, every call: a call whose structure the example did not have gets its own
program, captured at that call with every parameter pinned to the placement it already has,
over the same Parameter objects (train/eval switching with dropout: test_dropout.py).

The real-process checks share one spawned group (``reports``): Llama and BERT called in
turn with and without attention_mask, labels, position_ids / token_type_ids, training steps
in between; the errors of calls no program can serve; ``parallelize(model)`` without
example inputs; and the guard that two programs never place a parameter differently."""
from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch

import autotp
from autotp.candidates import NodeKind
from autotp.core.options import PlanOptions
from autotp.core.placements import Replicate, parse_out, shard_tensor
from autotp.runtime import pipeline
from dist_utils import run_ranks
from models import build


def _counted(tp: autotp.ParallelModule) -> list[int]:
    """Count the programs ``tp`` captures from now on (every capture goes through the family)."""
    count = [0]
    family, program = tp._family, tp._family.program

    def counting(*a, **k):
        count[0] += 1
        return program(*a, **k)
    object.__setattr__(family, "program", counting)
    return count


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _calls(rank: int, world: int, tp, ref, calls: list[dict], steps: set[int]) -> dict:
    """Each call in turn on tp and on the single-device ref (twice: the second round at other
    sizes must capture nothing); an AdamW step on both after the calls in ``steps``. Returns the
    largest output and weight differences, captures per round, and whether every program
    reads the module's own Parameter objects."""
    count = _counted(tp)
    opt = torch.optim.AdamW(tp.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    out_err, w_err, captures = 0.0, 0.0, []
    for round_ in range(2):
        before = count[0]
        for i, make in enumerate(calls):
            kw = make(3 + round_, 7 + 2 * round_)
            got, want = tp(**kw), ref(**kw)
            for field in ("logits", "loss"):
                if getattr(want, field, None) is not None:
                    out_err = max(out_err, _max_diff(getattr(got, field), getattr(want, field)))
            if round_ == 0 and i in steps:
                opt.zero_grad()
                ref_opt.zero_grad()
                got.loss.backward()
                want.loss.backward()
                opt.step()
                ref_opt.step()
                params = dict(ref.named_parameters())
                for n, p in tp.named_parameters():
                    w_err = max(w_err, _max_diff(p.detach(), shard_tensor(params[n].detach(), tp.placements[n], rank, world)))
        captures.append(count[0] - before)
    own = {n: p for n, p in tp.named_parameters(remove_duplicate=False)}
    same = all(dict(gm.named_parameters(remove_duplicate=False)).get(n, p) is p
               for gm in tp._programs.values() for n, p in own.items())
    return {"out": out_err, "weights": w_err, "captures": captures, "programs": tp.programs,
            "same_parameters": same}


def _llama(rank: int, world: int) -> dict:
    import transformers as T
    torch.manual_seed(0)
    cfg = T.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, num_key_value_heads=4,
                        intermediate_size=128, vocab_size=256, max_position_embeddings=64,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = T.LlamaForCausalLM(cfg)
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 256, (2, 8))
    tp = autotp.parallelize(model, (), {"input_ids": ids, "use_cache": False}, objective="memory")

    def ids_(b, s):
        return torch.randint(0, 256, (b, s))

    def padded(b, s):
        m = torch.ones(b, s, dtype=torch.long)
        m[0, : s // 2] = 0  # left padding
        return m
    calls = [
        lambda b, s: {"input_ids": ids_(b, s), "use_cache": False},
        lambda b, s: {"input_ids": ids_(b, s), "attention_mask": padded(b, s), "use_cache": False},
        lambda b, s: {"input_ids": (x := ids_(b, s)), "labels": x, "use_cache": False},
        lambda b, s: {"input_ids": ids_(b, s), "position_ids": torch.arange(2, s + 2).expand(b, s),
                      "use_cache": False},
        lambda b, s: {"input_ids": (x := ids_(b, s)), "attention_mask": padded(b, s), "labels": x,
                      "use_cache": False},
    ]
    rep = _calls(rank, world, tp, ref, calls, steps={2, 4})
    # calls no program can serve: an object torch.export cannot take, and a call whose output
    # would carry a KV cache (use_cache left to the config's True)
    errors = {}
    for name, kw in (("cache_object", {"input_ids": ids, "past_key_values": T.DynamicCache()}),
                     ("cache_output", {"input_ids": ids})):
        try:
            tp(**kw)
            errors[name] = None
        except autotp.AutoTPError as e:
            errors[name] = (type(e).__name__, str(e))
    rep["errors"] = errors
    rep["programs_after_errors"] = tp.programs
    return rep


def _bert(rank: int, world: int) -> dict:
    import transformers as T
    torch.manual_seed(0)
    cfg = T.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                       vocab_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    model = T.BertForMaskedLM(cfg)
    ref = copy.deepcopy(model)
    tp = autotp.parallelize(model, (), {"input_ids": torch.randint(0, 128, (2, 8))}, objective="memory")

    def ids_(b, s):
        return torch.randint(0, 128, (b, s))

    def types(b, s):
        t = torch.zeros(b, s, dtype=torch.long)
        t[:, s // 2:] = 1
        return t
    calls = [
        lambda b, s: {"input_ids": ids_(b, s)},
        lambda b, s: {"input_ids": ids_(b, s), "attention_mask": (types(b, s) == 0).long()},
        lambda b, s: {"input_ids": ids_(b, s), "token_type_ids": types(b, s)},
        lambda b, s: {"input_ids": (x := ids_(b, s)), "attention_mask": torch.ones_like(x),
                      "token_type_ids": types(b, s), "labels": x},
    ]
    return _calls(rank, world, tp, ref, calls, steps={3})


def _no_example_inputs(rank: int, world: int) -> dict:
    import transformers as T
    torch.manual_seed(0)
    cfg = T.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=32,
                       bos_token_id=0, eos_token_id=0)
    model = T.GPT2LMHeadModel(cfg).eval()
    state = torch.get_rng_state()
    tp = autotp.parallelize(model, objective="memory")  # split, so the check means something
    rng_kept = torch.equal(state, torch.get_rng_state())
    ids = torch.randint(0, 256, (3, 11))
    with torch.no_grad():
        err = _max_diff(tp(input_ids=ids, use_cache=False).logits, model(input_ids=ids, use_cache=False).logits)
    return {"err": err, "programs": tp.programs, "rng_kept": rng_kept,
            "split": sum(1 for p in tp.placements.values() if not isinstance(p, Replicate))}


def _broken_pins(rank: int, world: int) -> str:
    """With the pins taken away (the later program solved freely, objective time on a model
    whose first program was split for memory), the guard must refuse to run it."""
    model, args, _, _ = build("mlp")
    tp = autotp.parallelize(model, args, objective="memory")
    free = lambda c, options, spec, placements: pipeline.solve_plan(  # noqa: E731
        c, dataclasses.replace(options, objective="time"), spec)
    pipeline.solve_pinned, kept = free, pipeline.solve_pinned
    try:
        tp(torch.randn(5, 16))  # 2-D: a new call structure (the example was 3-D)
        return "ran"
    except autotp.AutoTPInternalError as e:
        return str(e)
    finally:
        pipeline.solve_pinned = kept


def _every_call(rank: int, world: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"llama": _llama(rank, world), "bert": _bert(rank, world),
                "no_inputs": _no_example_inputs(rank, world), "broken_pins": _broken_pins(rank, world)}


@pytest.fixture(scope="module")
def reports() -> list[dict]:
    return run_ranks(_every_call, 2)


@pytest.mark.parametrize("name,programs", [("llama", 5), ("bert", 4)])
def test_calls_the_example_did_not_have(reports: list[dict], name: str, programs: int) -> None:
    """Each new structure captures one program; the same structures again, at other sizes,
    capture nothing; outputs, losses and weights after AdamW steps equal one device; every
    program reads the same Parameter objects."""
    for r in reports:
        rep = r[name]
        assert rep["captures"] == [programs - 1, 0], rep
        assert rep["programs"] == programs, rep
        assert rep["out"] < 1e-5 and rep["weights"] < 1e-5, rep
        assert rep["same_parameters"], rep


def test_calls_no_program_can_serve(reports: list[dict]) -> None:
    for r in reports:
        errors = r["llama"]["errors"]
        kind, msg = errors["cache_object"]
        assert kind == "AutoTPError" and "past_key_values is a DynamicCache" in msg, msg
        assert "captured with (input_ids: Tensor(2-D int64), use_cache: False)" in msg, msg
        kind, msg = errors["cache_output"]
        assert kind == "CaptureError" and "this call (input_ids: Tensor(2-D int64))" in msg, msg
        assert "use_cache': False" in msg, msg  # what to do
        assert r["llama"]["programs_after_errors"] == r["llama"]["programs"]


def test_parallelize_without_example_inputs(reports: list[dict]) -> None:
    for r in reports:
        rep = r["no_inputs"]
        assert rep["err"] < 1e-5 and rep["programs"] == 1 and rep["rng_kept"] and rep["split"] > 0, rep


def test_two_programs_cannot_place_a_parameter_differently(reports: list[dict]) -> None:
    for r in reports:
        assert "places parameters unlike the first program's: up.weight" in r["broken_pins"], r["broken_pins"]


def test_pins_hold_and_warn_when_much_slower() -> None:
    """A later program keeps every parameter's placement even when its own optimum differs
    (here: the first program was split for memory, the optimum of this tiny model at time is
    to replicate), and says so with both predicted times."""
    model, args, kwargs, _ = build("mlp")
    first = pipeline.plan_model(model, args, kwargs, PlanOptions(world_size=2, device="cpu-gloo", objective="memory"))
    c = first.candidates
    held = {str(nc.target): nc.strategies[first.choice[n]].output
            for n, nc in c.nodes.items() if nc.kind is NodeKind.PARAM}
    assert any(not isinstance(p, Replicate) for p in held.values())
    options = PlanOptions(world_size=2, device="cpu-gloo", objective="time")
    free = pipeline.plan_model(model, args, kwargs, options)
    with pytest.warns(UserWarning, match=r"predicted .* ms per training step against .* ms for its own best plan"):
        pinned = pipeline.plan_model(model, args, kwargs, options, pinned_params=held)
    got = {d.node: d.output for d in pinned.plan.decisions}
    for n, nc in pinned.candidates.nodes.items():
        if nc.kind is NodeKind.PARAM:
            assert nc.strategies[pinned.choice[n]].output == held[str(nc.target)], n
            assert parse_out(got[n]) == held[str(nc.target)], n  # and the Plan records it
    assert pinned.plan.predicted_time_s > 1.2 * free.plan.predicted_time_s


def test_no_example_inputs_from_the_config() -> None:
    import transformers as T
    vit = T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=64, image_size=16, patch_size=8))
    from autotp.runtime.inputs import default_inputs
    args, kwargs, described = default_inputs(vit)
    assert args == () and tuple(kwargs["pixel_values"].shape) == (2, 3, 16, 16), described
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # conv2d has no rule
        assert autotp.plan(vit, world_size=2).world_size == 2
    with pytest.raises(autotp.AutoTPError, match="not a Hugging Face model .* pass example_inputs"):
        autotp.plan(torch.nn.Linear(4, 4), world_size=2)
