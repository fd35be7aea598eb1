"""The main job: parallelize a nanoGPT-style GPT on 2 local CPU ranks (gloo), check it against
the same model on one device (outputs, gradients, weights after an optimizer step), and
print the plan.  Run:  python examples/demo.py [--world-size N]"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import autotp  # noqa: E402
from autotp.tools.launch import spawn  # noqa: E402
from autotp.core.placements import shard_tensor  # noqa: E402
from examples.nanogpt import gpt  # noqa: E402


def worker(rank: int, world: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, (idx,) = gpt(n_layer=2, n_embd=64, n_head=4, vocab_size=256, batch=2, seq=16)
    reference = copy.deepcopy(model)
    tp = autotp.parallelize(model, (idx,), objective="memory")

    x = torch.randint(0, 256, (4, 24))  # other batch size and sequence length
    y, y_ref = tp(x), reference(x)
    y.square().mean().backward()
    y_ref.square().mean().backward()
    ref_params = dict(reference.named_parameters(remove_duplicate=False))
    g_err = max((p.grad - shard_tensor(ref_params[n].grad, tp.placements[n], rank, world)).abs().max().item()
                for n, p in tp.module.named_parameters() if p.grad is not None)
    torch.optim.AdamW(tp.parameters(), lr=1e-3).step()
    torch.optim.AdamW(reference.parameters(), lr=1e-3).step()
    state = autotp.gather_state_dict(tp)
    w_err = max((state[k] - v).abs().max().item() for k, v in reference.state_dict().items())
    f_err = (y - y_ref).abs().max().item()
    local = sum(p.numel() for p in tp.parameters())
    full = sum(p.numel() for p in reference.parameters())
    if rank == 0:
        p = tp.plan
        print(f"autotp demo: nanoGPT on {world} gloo ranks (objective='memory')")
        print(f"  forward max |error| vs one device:             {f_err:.2e}")
        print(f"  gradients, max |error|:                         {g_err:.2e}")
        print(f"  weights after AdamW step, max |error|:          {w_err:.2e}")
        print(f"  parameters on this rank: {local} of {full} ({local / full:.1%})")
        print(f"  collectives per step: planned {p.count()}, issued "
              f"{sum(tp.collective_counts.values())}")
        print("  matmul splits:")
        for d in p.decisions:
            if d.op in ("aten.linear.default", "aten.mm.default", "aten.embedding.default"):
                print(f"    {d.module:<22} {d.op.split('.')[1]:<10} inputs {', '.join(d.inputs):<14}"
                      f" -> {d.output}")
        print("  collectives:")
        for c in p.collectives:
            print(f"    {c.phase:<8} {c.kind:<14} {c.bytes:>8} B  after {c.module or '<input>'}")
    # Adam's first step moves each weight by lr * g / (|g| + eps): for a gradient near zero a
    # float32 rounding difference of 1e-10 in g moves the weight by up to lr * 1e-10 / eps = 1e-5,
    # so the weights get a looser bound than the gradients they come from
    ok = f_err < 1e-5 and g_err < 1e-5 and w_err < 1e-4 and \
        p.count() == sum(tp.collective_counts.values()) if rank == 0 else True
    dist.barrier()  # nobody tears down gloo's sockets while a peer still uses them
    dist.destroy_process_group()
    if not ok:
        raise SystemExit("autotp demo: MISMATCH against the single-device model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--world-size", type=int, default=2)
    spawn(worker, ap.parse_args().world_size)


if __name__ == "__main__":
    main()
