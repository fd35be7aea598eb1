"""Train a GPT-2-style model with tensor parallelism inside each node and data parallelism
across nodes, launched by torchrun. One process per GPU (or per CPU rank with gloo).

    # one machine, 2 ranks (this project's test runs exactly this, on CPU/gloo):
    torchrun --standalone --nproc-per-node 2 examples/train_torchrun.py --steps 3 --check

    # one machine standing in for 2 nodes of 2 ranks (tested too): TP inside a "node",
    # FSDP across the two
    torchrun --standalone --nproc-per-node 4 examples/train_torchrun.py --nodes 2 --dp-mode fsdp --check

    # pipeline stages: the layers cut into 2 stages (each a TP group of the rest), 2 microbatches
    # per step under 1F1B, from a checkpoint (tested too, on 2 CPU ranks)
    torchrun --standalone --nproc-per-node 2 examples/train_torchrun.py --pp 2 --microbatches 2 --weights ckpt

    # 2 machines x 8 GPUs: TP over the 8 GPUs of a node, DP across the nodes
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint node0.example:29500 --rdzv-id gpt-tp \\
        examples/train_torchrun.py --nodes 2 --weights /ckpt/gpt2 --save /ckpt/gpt2-tuned

``--weights`` loads a safetensors checkpoint (file or Hugging Face folder) slice by slice into
a model built without weights; ``--save`` writes the trained model back as a normal
checkpoint; ``--check`` compares the weights after training with one process training on the
global batch (small models only: every rank builds the whole model for that).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import autotp  # noqa: E402
from examples import hf_models  # noqa: E402


def batches(steps: int, batch: int, seq: int, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(steps)]


def shifted_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, the mean over every predicted token."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def loss_fn(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return shifted_ce(model(input_ids=ids, use_cache=False).logits, ids)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=1,
                    help="data-parallel replicas (the mesh's 'dp' dim); tensor parallelism over the "
                         "world size / nodes ranks of each")
    ap.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks per replica "
                    "(instead of --nodes; default: world size / nodes)")
    ap.add_argument("--pp", type=int, default=1, help="pipeline stages (the mesh's 'pp' dim): the "
                    "layers cut into that many stages, each a ('dp', 'tp') group of the rest")
    ap.add_argument("--microbatches", type=int, default=1, help="--pp: microbatches per step (1F1B)")
    ap.add_argument("--dp-mode", choices=["auto", "ddp", "fsdp"], default="auto",
                    help="how the replicas hold the shards: DDP copies, FSDP divides them")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4, help="global batch (split across replicas)")
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--weights", help="safetensors file or checkpoint folder to start from")
    ap.add_argument("--save", help="write the trained model here (safetensors + config)")
    ap.add_argument("--check", action="store_true", help="compare with one process")
    ap.add_argument("--objective", choices=["time", "memory"], default="memory",
                    help="memory: least parameter bytes per rank first (default here: the demo "
                         "model is so small that on CPU the fastest plan is not to split at all)")
    a = ap.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    tp = a.tp or world // (a.nodes * a.pp)
    dp = world // (tp * a.pp) if tp >= 1 else 0
    if tp < 1 or dp < 1 or world != a.pp * dp * tp or a.batch % dp:
        raise SystemExit(f"world size {world} must be --pp {a.pp} x replicas x --tp {tp}, and --batch "
                         f"{a.batch} a multiple of the replicas")
    device = "cuda" if cuda else "cpu"
    mesh = (init_device_mesh(device, (a.pp, dp, tp), mesh_dim_names=("pp", "dp", "tp")) if a.pp > 1 else
            init_device_mesh(device, (dp, tp), mesh_dim_names=("dp", "tp")))
    dp_rank = mesh.get_local_rank("dp")
    here = torch.device("cuda") if cuda else torch.device("cpu")

    model, _, kwargs = hf_models.gpt2(seed=0)  # same init on every rank (seeded)
    if a.weights:
        with autotp.empty_weights():
            model = type(model)(model.config)
    data = batches(a.steps, a.batch, a.seq, model.config.vocab_size)
    local = lambda ids: ids.chunk(dp)[dp_rank].to(here)  # noqa: E731 - this replica's slice
    reference = None
    if a.check and not a.weights:
        import copy
        reference = copy.deepcopy(model)
    pipelined = {"microbatches": a.microbatches} if a.pp > 1 else {}
    tpm = autotp.parallelize(model, (), {"input_ids": local(data[0]), "use_cache": False},
                             mesh=mesh, weights=a.weights, objective=a.objective,
                             dp_mode="ddp" if a.pp > 1 and a.dp_mode == "auto" else a.dp_mode, **pipelined)
    if rank == 0:
        p = tpm.plan
        stages = (f"pp {a.pp} ({', '.join(str(len(st.layers)) for st in p.pipeline.stages)} layers) x "
                  if p.pipeline else "")
        print(f"plan: {stages}tp {tp} x dp {dp} ({p.dp_mode}), {p.param_bytes_per_rank / 2**20:.1f} MiB of "
              f"{p.param_bytes_total / 2**20:.1f} MiB parameters per tensor-parallel rank, "
              f"{len(p.collectives)} collectives per step", flush=True)
    opt = torch.optim.AdamW(tpm.parameters(), lr=1e-3)
    for step, ids in enumerate(data):
        opt.zero_grad()
        if a.pp > 1:  # every stage gets the batch; the last computes the loss per microbatch
            loss = tpm.step((), {"input_ids": local(ids), "use_cache": False}, target=local(ids),
                            loss_fn=lambda out, t: shifted_ce(out.logits, t))
        else:
            loss = loss_fn(tpm, local(ids))
            loss.backward()
        opt.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    ok = True
    if reference is not None:
        ropt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
        for ids in data:
            ropt.zero_grad()
            loss_fn(reference, ids).backward()
            ropt.step()
        state = autotp.gather_state_dict(tpm)
        err = max((state[k].cpu() - v).abs().max().item() for k, v in reference.state_dict().items())
        ok = err <= 1e-4
        if rank == 0:
            print(f"check: max weight difference vs one process {err:.2e} -> "
                  f"{'match' if ok else 'MISMATCH'}", flush=True)
    if a.save:
        autotp.save_pretrained(tpm, a.save, config=model.config)
        if rank == 0:
            print(f"saved to {a.save}", flush=True)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
