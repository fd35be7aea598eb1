"""Equivalence check on local ranks (``autotp run``): N processes (gloo on CPU, NCCL when
there is a GPU per rank) build the target, parallelize it, run forward, backward and one SGD
step, and compare with the same model on one device: outputs, this rank's gradient slices,
weights after the step (gathered), the collectives issued against the plan's, and step time."""
from __future__ import annotations

import copy
import os
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from autotp._compat import pytree

from autotp.tools.launch import spawn


def _loss(out: Any) -> torch.Tensor:
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return sum(t.float().square().mean() for t in leaves)


def _max_err(a: Any, b: Any, rtol: float, atol: float) -> tuple[float, bool]:
    la = [t for t in pytree.tree_leaves(a) if isinstance(t, torch.Tensor)]
    lb = [t for t in pytree.tree_leaves(b) if isinstance(t, torch.Tensor)]
    if len(la) != len(lb):
        return float("inf"), False
    worst, ok = 0.0, True
    for x, y in zip(la, lb):
        if x.shape != y.shape:
            return float("inf"), False
        if x.is_floating_point():
            x, y = x.detach().float().cpu(), y.detach().float().cpu()
            worst = max(worst, (x - y).abs().max().item() if x.numel() else 0.0)
            ok = ok and torch.allclose(x, y, rtol=rtol, atol=atol)
        else:
            ok = ok and torch.equal(x.cpu(), y.cpu())
    return worst, ok


def _to(x: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, x)


def _worker(rank: int, world: int, target: str, opts: dict, outdir: str) -> None:
    from autotp.runtime.api import parallelize
    from autotp.runtime.checkpoint import gather_state_dict
    from autotp.tools.targets import load_target
    from autotp.core.placements import shard_tensor
    torch.set_num_threads(1)
    use_cuda = opts["backend"] == "nccl"
    dev = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group(opts["backend"], rank=rank, world_size=world)
    result: dict = {}
    try:
        model, args, kwargs = load_target(target)
        model = model.to(dev)
        for t in model.state_dict().values():  # identical weights on every rank, whatever the factory
            dist.broadcast(t, src=0)
        args, kwargs = _to(args, dev), _to(kwargs, dev)
        ref = copy.deepcopy(model)
        tp = parallelize(model, args, kwargs, objective=opts["objective"], device=opts["device"])
        out, want = tp(*args, **kwargs), ref(*args, **kwargs)
        fwd_err, fwd_ok = _max_err(out, want, opts["rtol"], opts["atol"])
        _loss(out).backward()
        _loss(want).backward()
        ref_params = dict(ref.named_parameters(remove_duplicate=False))
        grad_err, grad_ok = 0.0, True
        for name, p in tp.module.named_parameters():
            g_ref = ref_params[name].grad
            if g_ref is None:
                continue
            e, o = _max_err(p.grad, shard_tensor(g_ref, tp.placements[name], rank, world),
                            opts["rtol"], opts["atol"])
            grad_err, grad_ok = max(grad_err, e), grad_ok and o
        issued = {f"{k[0]}/{k[1]}": v for k, v in tp.collective_counts.items()}
        planned: dict[str, int] = {}
        for c in tp.plan.collectives:
            planned[f"{c.kind}/{c.phase}"] = planned.get(f"{c.kind}/{c.phase}", 0) + 1
        torch.optim.SGD(tp.parameters(), lr=0.1).step()
        torch.optim.SGD(ref.parameters(), lr=0.1).step()
        state = gather_state_dict(tp)
        step_err, step_ok = _max_err([state[k] for k in ref.state_dict()], list(ref.state_dict().values()),
                                     opts["rtol"], opts["atol"])
        times = {}
        for label, mod in (("tp", tp), ("ref", ref)):
            opt = torch.optim.SGD(mod.parameters(), lr=0.0)
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(opts["steps"]):
                opt.zero_grad()
                _loss(mod(*args, **kwargs)).backward()
                opt.step()
            if use_cuda:
                torch.cuda.synchronize()
            times[label] = (time.perf_counter() - t0) / max(opts["steps"], 1) * 1e3
        result = dict(ok=True, fwd_err=fwd_err, fwd_ok=fwd_ok, grad_err=grad_err, grad_ok=grad_ok,
                      step_err=step_err, step_ok=step_ok, issued=issued, planned=planned,
                      local=sum(p.numel() for p in tp.parameters()),
                      full=sum(p.numel() for p in ref.parameters()), tp_ms=times["tp"],
                      ref_ms=times["ref"], backend=opts["backend"])
        if opts.get("generate"):
            result.update(_generation(tp, ref, args, kwargs, opts["generate"], opts["atol"]))
        oks = [torch.tensor([int(fwd_ok and grad_ok and step_ok and result.get("gen_ok", True))])]
        dist.all_reduce(oks[0], op=dist.ReduceOp.MIN)
        result["all_ranks_ok"] = bool(oks[0].item())
    except Exception as e:  # noqa: BLE001 - reported by the parent
        import traceback
        result = dict(ok=False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc())
    finally:
        torch.save(result, os.path.join(outdir, f"{rank}.pt"))
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def _generation(tp: Any, ref: Any, args: tuple, kwargs: dict, new: int, atol: float) -> dict:
    """Greedy generation of ``new`` tokens from the example call's ``input_ids`` in eval mode,
    N ranks (``tp.generate``) against one device (``model.generate``): token for token, and
    the largest logit difference over the steps."""
    from autotp.errors import AutoTPError
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or not hasattr(ref, "generate"):
        raise AutoTPError("--generate needs a Hugging Face causal LM target whose example call "
                          "passes input_ids")
    tp.eval()
    ref.eval()
    kw = dict(max_new_tokens=new, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=kwargs.get("attention_mask"), **kw)
    got = tp.generate(ids, attention_mask=kwargs.get("attention_mask"), **kw)
    same = torch.equal(want.sequences.cpu(), got.sequences.cpu())
    err = max((a.float().cpu() - b.float().cpu()).abs().max().item() for a, b in zip(want.logits, got.logits)) \
        if len(want.logits) == len(got.logits) else float("inf")
    sv = next(iter(tp._serving.values()))
    return dict(gen_same=same, gen_err=err, gen_ok=same and err <= max(atol, 1e-5) * 10,
                gen_tokens=int(got.sequences.shape[1] - ids.shape[1]), gen_cache=sv.cache_bytes,
                gen_cache_total=sv.plans["decode"].state_bytes_total)


def run_check(target: str, world_size: int, *, objective: str = "memory", device: str | None = None,
              rtol: float = 1e-5, atol: float = 1e-5, steps: int = 3, generate: int = 0) -> dict:
    from autotp.errors import AutoTPError, RankError
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"
    opts = dict(backend=backend, objective=objective, device=device, rtol=rtol, atol=atol, steps=steps,
                generate=generate)
    with tempfile.TemporaryDirectory() as d:
        ctx = spawn(_worker, world_size, target, opts, d, join=False)
        try:
            while not ctx.join():
                pass
        except mp.ProcessExitedException:
            pass  # the saved results below say what happened
        results = {k: torch.load(os.path.join(d, f"{k}.pt"), weights_only=False)
                   for k in range(world_size) if os.path.exists(os.path.join(d, f"{k}.pt"))}
    # the first rank that failed says why, with its own traceback (printed by --debug)
    for k, res in sorted(results.items()):
        if not res["ok"]:
            raise RankError(f"rank {k} failed: {res['error']}", k, res.get("trace", ""))
    if 0 not in results:
        raise AutoTPError("rank 0 died before reporting (its output above may say why)")
    return results[0]


def _calibrate_worker(rank: int, world: int, repeats: int, outdir: str) -> None:
    from autotp.runtime.calibrate import calibrate
    torch.set_num_threads(1)
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        spec, points = calibrate(repeats=repeats)
        if rank == 0:
            torch.save({"spec": spec.to_json(), "points": [p.__dict__ for p in points]},
                       os.path.join(outdir, "cal.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run_calibration(world_size: int, repeats: int = 15):
    """``autotp calibrate``: measure ``world_size`` local ranks; returns (DeviceSpec, points)."""
    from autotp.runtime.calibrate import Measurement
    from autotp.cost.devices import DeviceSpec
    from autotp.errors import AutoTPError
    with tempfile.TemporaryDirectory() as d:
        spawn(_calibrate_worker, world_size, repeats, d)
        path = os.path.join(d, "cal.pt")
        if not os.path.exists(path):
            raise AutoTPError("calibration produced no result")
        r = torch.load(path, weights_only=False)
    return DeviceSpec.from_json(r["spec"]), [Measurement(**p) for p in r["points"]]
