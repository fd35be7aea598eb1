"""Property sample: random architectures (tests/random_models.py) with dropout p drawn from
{0, 0.1, 0.5} on the attention probabilities, the MLP hidden activation and the residual
branches, trained in train mode on real gloo processes, equal one device.

The thread simulator's ranks share one generator, so this runs on real processes: the cases
are drawn in the parent (hypothesis, derandomized) and all of them run in one spawned group
per world size. Masks bit for bit: at p = 0.5 a single differing mask element changes an
output by the size of an activation (orders above the 1e-5 tolerance), every rank's generator
must end every step in the single device's state (so each draw consumed exactly one device's
numbers), and the zero pattern of the output gradient chain is compared through the gradients
of every shard."""
from __future__ import annotations

import copy
import dataclasses
import warnings

import torch
from hypothesis import HealthCheck, Phase, given, settings

import autotp
from autotp.core.placements import shard_tensor
from dist_utils import run_ranks
from random_models import RandomLM, dropout_archs

CASES = 6
TOL = dict(rtol=1e-5, atol=1e-5)


def _draw_cases() -> list:
    drawn: list = []

    @settings(max_examples=CASES, deadline=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(dropout_archs())
    def collect(arch) -> None:
        drawn.append(arch)
    collect()
    # a derandomized sample starts from the simplest examples (p = 0): p cycles through
    # {0.5, 0.1, 0} over the drawn architectures so the sample covers each
    return [dataclasses.replace(a, dropout=(0.5, 0.1, 0.0)[i % 3]) for i, a in enumerate(drawn)]


def _one(rank: int, world: int, arch, seed: int) -> dict:
    torch.manual_seed(seed)
    model = RandomLM(arch).train()
    ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tp = autotp.parallelize(model, (torch.randint(0, arch.vocab, (2, 5)),), objective="memory")
    opt, ref_opt = torch.optim.SGD(tp.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    ref_params = dict(ref.named_parameters())
    worst = {"out": 0.0, "grad": 0.0, "weight": 0.0}
    rng_equal = True
    for step in range(3):
        ids = torch.randint(0, arch.vocab, (3, 7), generator=torch.Generator().manual_seed(step))
        torch.manual_seed(100 + step)
        out = tp(ids)
        tp_state = torch.get_rng_state()
        torch.manual_seed(100 + step)
        want = ref(ids)
        rng_equal &= torch.equal(tp_state, torch.get_rng_state())
        worst["out"] = max(worst["out"], float((out - want).detach().abs().max()))
        opt.zero_grad()
        ref_opt.zero_grad()
        out.square().mean().backward()
        want.square().mean().backward()
        for n, p in tp.named_parameters():
            if p.grad is not None:
                g = shard_tensor(ref_params[n].grad, tp.placements[n], rank, world)
                worst["grad"] = max(worst["grad"], float((p.grad - g).abs().max()))
        opt.step()
        ref_opt.step()
        for n, p in tp.named_parameters():
            w = shard_tensor(ref_params[n].detach(), tp.placements[n], rank, world)
            worst["weight"] = max(worst["weight"], float((p.detach() - w).abs().max()))
    tp.eval()
    ref.eval()
    with torch.no_grad():
        worst["eval"] = float((tp(ids) - ref(ids)).abs().max())
    split_draws = sum(1 for m in tp.module.modules() if type(m).__name__ == "SplitRandom")
    return {"arch": arch, "worst": worst, "rng_equal": rng_equal, "split_draws": split_draws}


def _all(rank: int, world: int, archs: list) -> list[dict]:
    return [_one(rank, world, a, seed=i) for i, a in enumerate(archs)]


def test_random_architectures_with_dropout_equal_one_device() -> None:
    archs = _draw_cases()
    assert any(a.dropout == 0.5 for a in archs) and any(a.dropout == 0.0 for a in archs), archs
    split = {}
    for world in (2, 3):
        reports = run_ranks(_all, world, archs)
        for rep in (r for rank_reports in reports for r in rank_reports):
            w = rep["worst"]
            assert rep["rng_equal"], rep
            assert max(w.values()) < 1e-5, rep
        split[world] = sum(r["split_draws"] for r in reports[0])
    # the sample must exercise the split path (a draw whose output is split), not only
    # replicated random ops
    assert split[2] > 0, split
