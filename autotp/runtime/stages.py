"""Pipeline parallelism at run time: this rank's stage of the program, run over microbatches by
``torch.distributed.pipelining`` (``PipelineStage`` and its ``Schedule1F1B`` / ``ScheduleGPipe`` /
``ScheduleInterleaved1F1B``).

A mesh ``("pp", "dp", "tp")`` (any dim may be 1; "dp" may be absent) puts stage ``s`` on the
ranks ``mesh[s, :, :]``; interleaved, stages ``s``, ``s + pp``, ... (``Pipeline.on_rank``). Each rank rewrites the program for its tensor-parallel rank as
``parallelize`` always does, cuts out its stage (rewrite/stages.py) and keeps only what the
stage reads. ``PipelinedModule.step`` runs one training step's forward and backward:

- the schedule splits the batch into microbatches (dim 0 of every tensor argument), stage 0
  runs the model's call on each, every stage sends the values the next one reads, and the
  last stage computes ``loss_fn(output, target)`` per microbatch, where ``output`` is the
  model's own output structure (e.g. a ``CausalLMOutputWithPast``) for that microbatch;
- gradients accumulate over the microbatches and are divided by their number once, after
  the schedule (not by the schedule's ``scale_grads``, which divides per stage module): with a mean loss over equal microbatches this is the gradient
  of the mean loss over the batch, what one device computes;
- a parameter two stages read (tied input and output embeddings) is held by both, and its
  gradient is summed across them (one process group per such set);
- data-parallel replicas ("dp") average every gradient across the replicas, as DDP does;
- the loss returned on every rank is the mean of the microbatches' losses (the last stage's,
  broadcast over the pipeline).

``autotp.gather_state_dict`` and ``autotp.save_pretrained`` collect every stage's layers (each
stage gathers its tensor-parallel pieces, then the stages exchange them); ``save_checkpoint``
/ ``load_checkpoint`` write and read each rank's stages' shards (DCP).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from autotp._compat import out_spec, pytree
from autotp.core.attrs import attach, fetch_attr, has_attr
from autotp.errors import AutoTPError
from autotp.rewrite.stages import cut, stage_module
from autotp.runtime.pipeline import ParallelModule, call_structure, check_args, describe_call

log = logging.getLogger(__name__)


def microbatch_of(args: tuple, kwargs: dict, microbatches: int) -> tuple[tuple, dict]:
    """The first of ``microbatches`` equal microbatches of a batch (dim 0 of every tensor
    argument): what a pipelined program is captured and planned for. AutoTPError when a
    tensor's dim 0 is not divisible."""
    check_batch(args, kwargs, microbatches)
    from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks
    a, k = split_args_kwargs_into_chunks(args, kwargs, microbatches)
    return tuple(a[0]), dict(k[0])


def check_batch(args: tuple, kwargs: dict, microbatches: int) -> int:
    """The batch size (dim 0, alike for every tensor argument), divisible by ``microbatches``."""
    leaves = [(name, t) for name, t in [*[(f"positional argument {i}", a) for i, a in enumerate(args)],
                                         *sorted(kwargs.items())]
              for t in pytree.tree_leaves(t) if isinstance(t, torch.Tensor)]
    sizes = {t.shape[0] if t.dim() else None for _, t in leaves}
    if not leaves or None in sizes or len(sizes) != 1:
        raise AutoTPError(
            "a pipelined model's tensor arguments must all have the batch as dim 0 (the schedule "
            "splits them into microbatches there); got "
            + ", ".join(f"{n}: {tuple(t.shape)}" for n, t in leaves))
    batch = sizes.pop()
    if batch % microbatches:
        raise AutoTPError(f"the batch of {batch} rows does not split into {microbatches} equal "
                          f"microbatches: use a microbatch count dividing {batch}, or a batch "
                          f"that {microbatches} divides")
    return batch


def _schedule(name: str):
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
    return {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe, "interleaved": ScheduleInterleaved1F1B}[name]


class PipelinedModule(ParallelModule):
    """This rank's pipeline stage (interleaved: stages, ``local_stages``) of the
    tensor-parallel program (module docstring). Train it with ``step``; ``parameters()`` are
    its stages' shards (build the optimizer from them), ``gather_state_dict`` collects the
    whole model. ``stage``: this rank's place in the pipeline, ``stages``: the pipeline's
    ranks (the mesh's "pp" size; interleaved, ``plan.pipeline.size`` stages run on them)."""

    def __init__(self, full: ParallelModule, *, stage: int, pp_group: dist.ProcessGroup,
                 dp_group: dist.ProcessGroup | None, here: torch.device, example: tuple[tuple, dict]):
        plan = full.plan
        pipe = plan.pipeline
        gm = full.module
        sc = cut(gm, [(p, set(n)) for p, n in full._layer_nodes], pipe.first_layers())
        local = pipe.on_rank(stage)  # interleaved: several stages, stage s on rank s mod ranks
        sgms = [stage_module(gm, sc, s) for s in local]
        # this module's tree: every local stage's tensors under the model's names. Not a stage's
        # own module, since a schedule treats a stage module's parameters as that stage's (it
        # divides their gradients by the microbatch count once per stage)
        held = nn.Module()
        keys = _stage_keys(gm, held, sc, local, full.state_keys)
        super().__init__(held, plan, full.comm, {k: v for k, v in full.placements.items() if has_attr(held, k)},
                         _Cap(full), ())
        self.model_state_keys = full.state_keys
        # parameters of other stages this rank never read from the checkpoint (weights=...)
        self.unloaded = sum(p.device.type == "meta" for p in gm.parameters())
        groups: dict[int, list[str]] = {}  # the model's keys by tensor: tied ones share a group
        for k in full.state_keys:
            if has_attr(gm, k):
                groups.setdefault(id(fetch_attr(gm, k)), []).append(k)
        self.tied_keys = tuple(tuple(g) for g in groups.values())
        self.state_keys = keys
        self.stage = stage  # this rank's place in the pipeline ("pp" dim)
        self.stages = pipe.ranks  # the pipeline's ranks
        self.local_stages = local  # the stages of the cut this rank runs
        self.pp_group = pp_group
        self.dp_group = dp_group
        self.microbatches = pipe.microbatches
        self.schedule_name = pipe.schedule
        object.__setattr__(self, "_out_spec", out_spec(gm))
        object.__setattr__(self, "_user_loss", None)
        object.__setattr__(self, "_tied", _tied_groups(gm, sc, pp_group, pipe.ranks))
        from torch.distributed.pipelining import PipelineStage
        object.__setattr__(self, "_structure", call_structure(*example))
        object.__setattr__(self, "_described", describe_call(*example))
        io = _example_io(dict(zip(local, sgms)), pipe.size, pipe.ranks, pp_group, here, *example)
        # per local stage: its module and one example microbatch's inputs (and stage 0's
        # keywords), what it was shaped by and what benchmarks time it alone on
        object.__setattr__(self, "example_stage_calls", tuple(
            (m, io[s][0], example[1] if s == 0 else {}) for s, m in zip(local, sgms)))
        object.__setattr__(self, "example_stage_call", self.example_stage_calls[0][1:])
        object.__setattr__(self, "_stage", [PipelineStage(m if s == 0 else _Received(m), s, pipe.size, here,
                                                          input_args=io[s][0], output_args=io[s][1],
                                                          group=pp_group)
                                            for s, m in zip(local, sgms)])
        run = self._stage if pipe.schedule == "interleaved" else self._stage[0]
        # scale_grads=False: _sync_grads divides every gradient by the microbatch count once. The
        # schedule would divide each stage module's parameters once per stage, twice a tensor
        # two stages of this rank read
        object.__setattr__(self, "_sched", _schedule(pipe.schedule)(run, self.microbatches, loss_fn=self._loss,
                                                                    scale_grads=False))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise AutoTPError(
            "a pipelined module (a mesh with a 'pp' dim) runs whole steps over its microbatches: "
            "call tp.step(args, kwargs, target=..., loss_fn=...) on every rank instead of tp(...)")

    def _loss(self, out: Any, target: Any) -> torch.Tensor:
        out = pytree.tree_unflatten(list(out), self._out_spec) if self._out_spec is not None else out
        fn, with_target = self._user_loss
        return fn(out, target) if with_target else fn(out)

    def step(self, args: Any = (), kwargs: dict | None = None, *, target: Any = None,
             loss_fn: Callable[..., torch.Tensor]) -> torch.Tensor:
        """One forward and backward of the batch ``(args, kwargs)`` (the same on every rank of
        this data-parallel replica) over the microbatches; gradients accumulate into
        ``parameters()`` as one backward of the batch's mean loss would leave them. ``loss_fn
        (output, target)`` (or ``loss_fn(output)`` without ``target``) gets one microbatch's
        model output and target rows and returns its mean loss. Returns the mean loss over
        the microbatches, on every rank."""
        args, kwargs = check_args(args, kwargs)
        if call_structure(args, kwargs) != self._structure:
            raise AutoTPError(
                f"this step's call ({describe_call(args, kwargs)}) differs from the example inputs' "
                f"({self._described}): a pipelined module runs the one program it was made for; "
                "call step with arguments like those (sizes may differ)")
        batch = check_batch(args, kwargs, self.microbatches)
        if target is not None and (not isinstance(target, torch.Tensor) or target.shape[0] != batch):
            raise AutoTPError(f"target must be a tensor with the batch ({batch} rows) as dim 0, got "
                              + (str(tuple(target.shape)) if isinstance(target, torch.Tensor) else type(target).__name__))
        object.__setattr__(self, "_user_loss", (loss_fn, target is not None))
        first, last = 0 in self.local_stages, self.plan.pipeline.size - 1 in self.local_stages
        losses: list[torch.Tensor] = []
        step_kw: dict[str, Any] = {"return_outputs": False}
        if last:
            step_kw |= {"target": target if target is not None else torch.zeros(batch), "losses": losses}
        if first:
            self._sched.step(*args, **kwargs, **step_kw)
        else:
            self._sched.step(**step_kw)
        self._sync_grads()
        loss = torch.stack([x.detach() for x in losses]).mean() if last else torch.zeros(())
        loss = loss.to(torch.float32)
        dist.broadcast(loss, group_src=(self.plan.pipeline.size - 1) % self.stages, group=self.pp_group)
        return loss

    def _sync_grads(self) -> None:
        for p in self.parameters():  # the mean over the microbatches (each loss is a mean)
            if p.grad is not None:
                p.grad.div_(self.microbatches)
        for group, names in self._tied:  # tied weights: the sum of every stage's gradient
            for n in names:
                p = fetch_attr(self.module, n)
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, group=group)
        if self.dp_group is not None and dist.get_world_size(self.dp_group) > 1:
            n = dist.get_world_size(self.dp_group)
            for p in self.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, group=self.dp_group)
                p.grad.div_(n)


def _example_io(local: dict[int, torch.fx.GraphModule], stages: int, ranks: int, group: dist.ProcessGroup,
                here: torch.device, args: tuple, kwargs: dict) -> dict[int, tuple[tuple, tuple]]:
    """Every local stage's inputs and outputs for one example microbatch, run through the
    pipeline once in stage order (each stage receives what the previous one sends; stage s
    runs on pipeline rank s mod ``ranks``): the shapes, dtypes and gradient flags
    ``PipelineStage`` is given, so that it never runs a stage on uninitialized tensors to
    infer them (token ids and labels must be real indices). The random generator and the
    stages' buffers are left as they were."""
    saved = {s: {n: b.detach().clone() for n, b in m.named_buffers()} for s, m in local.items()}
    io: dict[int, tuple[tuple, tuple]] = {}
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        for s, sgm in sorted(local.items()):
            if s == 0:
                inputs = tuple(args)
                outs = sgm(*args, **kwargs)
            else:
                box = [None]
                dist.recv_object_list(box, group=group, group_src=(s - 1) % ranks)
                got = []
                for shape, dtype, grad in box[0]:
                    t = torch.empty(shape, dtype=dtype, device=here)
                    dist.recv(t, group=group, group_src=(s - 1) % ranks)
                    got.append(t.requires_grad_(grad))
                inputs = tuple(got)
                outs = sgm(*inputs)
            outs = tuple(outs)
            if s < stages - 1:
                dist.send_object_list([[(tuple(t.shape), t.dtype, t.requires_grad) for t in outs]],
                                      group=group, group_dst=(s + 1) % ranks)
                for t in outs:
                    dist.send(t.detach().contiguous(), group=group, group_dst=(s + 1) % ranks)
            io[s] = (tuple(t.detach().requires_grad_(t.requires_grad) for t in inputs),
                     tuple(t.detach().requires_grad_(t.requires_grad) for t in outs))
    with torch.no_grad():
        for s, m in local.items():
            for n, b in m.named_buffers():
                b.copy_(saved[s][n])
    return io


class _Received(nn.Module):
    """A later stage as ``PipelineStage`` runs it: the values received from the stage before,
    and the step's keyword arguments, which the interleaved schedule passes to every stage a
    rank runs, not only to the first; only stage 0 reads them."""

    def __init__(self, stage: torch.fx.GraphModule):
        super().__init__()
        self.stage = stage

    def forward(self, *received: torch.Tensor, **_step_kwargs: Any) -> Any:
        return self.stage(*received)


class _Cap:
    """What ParallelModule reads of a capture, taken from the full module."""

    def __init__(self, full: ParallelModule):
        self.state_keys = full.state_keys
        self.state_meta = full.state_meta
        self.mode_sensitive = full._mode_sensitive
        self.training = full._captured_training
        self.stacks = ()


def _stage_keys(gm: torch.fx.GraphModule, held: nn.Module, sc: Any, local: tuple[int, ...],
                keys: tuple[str, ...]) -> tuple[str, ...]:
    """The model's state keys this rank's stages (``local``) hold, each made an attribute path
    of ``held`` (the tensors they read under every name the model gives them, and with stage
    0 the tensors no stage reads)."""
    targets = {n.name: n.target for n in gm.graph.nodes if n.op == "get_attr"}
    read_by: dict[int, set[int]] = {}
    for node, stages in sc.attrs.items():
        t = fetch_attr(gm, targets[node])
        read_by.setdefault(id(t), set()).update(stages)
    mine = []
    for k in keys:
        if not has_attr(gm, k):
            continue
        t = fetch_attr(gm, k)
        holders = read_by.get(id(t))
        if (holders and holders & set(local)) or (not holders and 0 in local):
            attach(held, k, t)
            mine.append(k)
    return tuple(mine)


def _tied_groups(gm: torch.fx.GraphModule, sc: Any, pp_group: dist.ProcessGroup, pp: int
                 ) -> list[tuple[dist.ProcessGroup, list[str]]]:
    """Per set of pipeline ranks (of ``pp``) whose stages read the same parameter (tied
    embeddings): a process group of those ranks in this pipeline, and the parameter paths;
    this rank's sets only (stages on one rank share the tensor, whose gradient sums itself).
    Every rank creates every group (``new_group`` is collective over the world), in one
    order, reading only the plan and the mesh, which every rank holds alike."""
    targets = {n.name: n.target for n in gm.graph.nodes if n.op == "get_attr"}
    sets: dict[tuple[int, ...], list[str]] = {}
    for node, stages in sorted(sc.attrs.items()):
        held = tuple(sorted({st % pp for st in stages}))  # the pipeline ranks running them
        if len(held) > 1 and isinstance(fetch_attr(gm, targets[node]), nn.Parameter) \
                and fetch_attr(gm, targets[node]).requires_grad:
            sets.setdefault(held, []).append(targets[node])
    if not sets:
        return []
    mine = dist.get_process_group_ranks(pp_group)  # this pipeline's ranks, by stage
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)  # every pipeline's ranks (one per tp, dp index)
    pipelines = sorted({tuple(r) for r in everyone})
    out = []
    for held, names in sorted(sets.items()):
        for ranks in pipelines:
            g = dist.new_group([ranks[s] for s in held])
            if tuple(mine) == ranks:
                out.append((g, names))
    return out
