"""Public entry points: plan, plan_details, parallelize. Each turns its keywords into one
``PlanOptions`` and runs ``pipeline.plan_model`` (and ``pipeline.rank_module``)."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from autotp.rewrite.collectives import DistComm
from autotp.core.options import ADAM_FP32_BYTES
from autotp.cost.devices import DeviceSpec, get_device
from autotp.errors import AutoTPError, ProcessGroupError
from autotp.core.options import DpMode, Mode, Objective, PlanOptions, Schedule
from autotp.runtime.pipeline import (  # noqa: F401  (re-exported)
    ModeFamily, ParallelModule, Planned, buffers_on_meta, check_args, choice_from_plan, missing_weights_error,
    on_meta, plan_model, rank0_plan, rank_module, retarget_device)
from autotp.plans import Plan
from autotp.runtime.generate import decode_call
from autotp.runtime.inputs import default_inputs
from autotp.runtime.stages import PipelinedModule, microbatch_of
from autotp.runtime.weights import open_weights

log = logging.getLogger(__name__)

_check_args = check_args  # the old private name, kept for callers outside the package


def resolve_inputs(model: nn.Module, example_inputs: Any, example_kwargs: Any) -> tuple[tuple, dict]:
    """The example inputs as (args, kwargs); none given: derived from a Hugging Face model's
    config (runtime/inputs.py says which shapes), else an AutoTPError asking for them."""
    if example_inputs is None and example_kwargs is None:
        args, kwargs, described = default_inputs(model)
        log.info("autotp: no example inputs given; planning %s for %s (from its config)",
                 type(model).__name__, described)
        return args, kwargs
    return check_args(() if example_inputs is None else example_inputs, example_kwargs)


def plan_details(model: nn.Module, example_inputs: Any = None, example_kwargs: dict | None = None, *,
                 world_size: int, device: "str | DeviceSpec" = "h100", objective: Objective = "time",
                 mode: Mode = "training", memory_budget: float | None = None,
                 progress: Callable[[str], Any] | None = None, data_parallel: int = 1,
                 optimizer_bytes: float = ADAM_FP32_BYTES, dp_mode: DpMode = "auto",
                 pipeline_parallel: int = 1, microbatches: int = 1,
                 schedule: Schedule = "1f1b", stages_per_rank: int | None = None) -> Planned:
    """``plan`` plus the candidates and choice behind it. ``progress(stage)`` is called as
    each stage starts (capture, strategies, solve)."""
    args, kwargs = resolve_inputs(model, example_inputs, example_kwargs)
    options = PlanOptions(world_size=world_size, device=device, mode=mode, objective=objective,
                          memory_budget=memory_budget, optimizer_bytes=optimizer_bytes,
                          dp_size=data_parallel, dp_mode=dp_mode, pp_size=pipeline_parallel,
                          microbatches=microbatches, schedule=schedule, stages_per_rank=stages_per_rank)
    if pipeline_parallel > 1:
        args, kwargs = microbatch_of(args, kwargs, microbatches)
    return plan_model(model, args, kwargs, options, progress=progress)


def plan_decode(model: nn.Module, input_ids: torch.Tensor, new: int, **plan_kwargs: Any) -> Planned:
    """``plan_details`` of a causal LM's decode program (one token per row, the KV cache of a
    prompt like ``input_ids`` plus ``new`` tokens: runtime/generate.py) at its own shapes,
    parameters free: what ``autotp plan --mode decode`` shows. Its predicted time is the time
    per token, its ``state_bytes_per_rank`` the KV cache per rank."""
    wrapper, args = decode_call(model, input_ids, new)
    with torch.no_grad():
        return plan_details(wrapper, args, mode="inference", **plan_kwargs)


def plan(model: nn.Module, example_inputs: Any = None, example_kwargs: dict | None = None, *,
         world_size: int, device: "str | DeviceSpec" = "h100", objective: Objective = "time",
         mode: Mode = "training", memory_budget: float | None = None,
         data_parallel: int = 1, optimizer_bytes: float = ADAM_FP32_BYTES,
         dp_mode: DpMode = "auto", pipeline_parallel: int = 1, microbatches: int = 1,
         schedule: Schedule = "1f1b", stages_per_rank: int | None = None) -> Plan:
    """Plan tensor parallelism for ``model`` at ``world_size`` without a process group.
    The model may live on the meta device (example inputs are moved there too).
    ``data_parallel``: replicas of the tensor-parallel group (a 2-D mesh); their traffic over
    the inter-node link counts in training. ``dp_mode``: how the replicas hold the group's
    shards, "ddp" (full copies, gradients all-reduced), "fsdp" (FSDP2: state divided across
    the replicas) or "auto" (the faster that fits; ``Plan.dp_mode`` says which).
    ``optimizer_bytes``: optimizer
    state per trained parameter element in training (8: Adam's two fp32 moments; 4 for SGD
    with momentum in fp32, 0 without state); ``memory_budget`` bounds parameters, gradients,
    optimizer state and activations per rank (default: the device's memory).
    ``pipeline_parallel``: pipeline stages the layers are cut into (``Plan.pipeline``: each
    stage's layers, time and memory, the step and its bubble), run over ``microbatches``
    microbatches of the example batch by ``schedule`` ("1f1b", "gpipe", or "interleaved":
    interleaved 1F1B with ``stages_per_rank`` stages per rank, default 2)."""
    return plan_details(model, example_inputs, example_kwargs, world_size=world_size,
                        device=device, objective=objective, mode=mode,
                        memory_budget=memory_budget, data_parallel=data_parallel,
                        optimizer_bytes=optimizer_bytes, dp_mode=dp_mode,
                        pipeline_parallel=pipeline_parallel, microbatches=microbatches,
                        schedule=schedule, stages_per_rank=stages_per_rank).plan


def parallelize(model: nn.Module, example_inputs: Any = None, example_kwargs: dict | None = None, *,
                device: "str | DeviceSpec | None" = None, objective: Objective = "time",
                plan: Plan | None = None, group: dist.ProcessGroup | None = None,
                mode: Mode = "training", weights: Any = None,
                mesh: DeviceMesh | None = None,
                memory_budget: float | None = None,
                optimizer_bytes: float = ADAM_FP32_BYTES,
                dp_mode: DpMode = "auto", compile: bool | dict = False,
                microbatches: int = 1, schedule: Schedule = "1f1b",
                stages_per_rank: int | None = None) -> ParallelModule:
    """Return this rank's tensor-parallel version of ``model``. Call on every rank of
    ``group`` (default: the default process group) after ``init_process_group``.

    ``example_inputs`` / ``example_kwargs``: a call of the model the first program is
    captured and planned for (later calls with other arguments or in another mode capture
    their own programs). Omitted for a Hugging Face model: inputs derived from its config
    (token ids of shape (2, min(128, max positions)), or pixel values; see
    autotp/runtime/inputs.py), and the plan is made for those sizes.

    ``weights`` (a state dict, a ``.safetensors`` file or a Hugging Face-style checkpoint
    folder) supplies the parameters: each rank reads only its slices. It is required when the
    model's parameters are on the meta device (see ``autotp.empty_weights``).

    ``mesh`` (instead of ``group``): a DeviceMesh with a dim named ``"tp"`` and optionally one
    more (e.g. ``init_device_mesh("cuda", (nodes, 8), mesh_dim_names=("dp", "tp"))``): tensor
    parallelism inside "tp", data parallelism across the other dim, by DDP or by FSDP2
    (``fully_shard``: parameters, gradients and optimizer state divided across the replicas)
    as ``dp_mode`` says ("ddp", "fsdp", or "auto": the faster that fits, by the cost model).
    Each data-parallel replica is given its own slice of the global batch; ``example_inputs``
    is such a slice. Build the optimizer after this call, from ``parameters()``.

    ``compile``: True compiles the module in place with ``torch.compile(fullgraph=True)``
    (``nn.Module.compile``: it stays a ParallelModule); a dict gives ``torch.compile``'s
    keywords instead (e.g. ``{"backend": "aot_eager"}``). Every program runs compiled, the
    collectives as functional collectives in the graph (rewrite/collectives.py), ``generate``'s prefill and
    decode programs included (compiled as they are made); a program needed by a later
    call (another mode, other keywords) must be made by one call without compiling first
    (``with torch.compiler.set_stance("force_eager"): tp(...)``). Not on a mesh yet.

    ``memory_budget``: bytes per rank the plan must fit (state + activations at the example
    inputs' sizes; default: the device's memory). When it binds the solver splits more,
    e.g. norm regions on the sequence dim (then the sequence length must stay divisible by
    the world size).

    A ``mesh`` with a ``"pp"`` dim (``("pp", "tp")`` or ``("pp", "dp", "tp")``, any of them
    of size 1) cuts the layers into that many pipeline stages, balanced by the cost model, and
    returns this rank's stage, a ``PipelinedModule`` trained with ``tp.step(args, kwargs,
    target=..., loss_fn=...)`` over ``microbatches`` microbatches under ``schedule`` ("1f1b",
    "gpipe", or "interleaved": ``stages_per_rank`` stages on each rank, default 2;
    ``torch.distributed.pipelining``); ``example_inputs`` is then the batch
    ``step`` gets (one data-parallel replica's), planned for one microbatch of it
    (runtime/stages.py)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ProcessGroupError(
            "autotp.parallelize needs an initialized torch.distributed process group: launch "
            "with `torchrun --nproc-per-node N script.py` and call "
            "torch.distributed.init_process_group('gloo' on CPU or 'nccl' on GPUs) first; "
            "use autotp.plan(...) to plan without processes")
    args, kwargs = resolve_inputs(model, example_inputs, example_kwargs)
    if mesh is not None and "pp" in (mesh.mesh_dim_names or ()):
        if compile:
            raise AutoTPError("compile=True with pipeline stages is not supported yet")
        return _pipelined(model, args, kwargs, mesh, group=group, device=device, objective=objective,
                          plan=plan, mode=mode, weights=weights, memory_budget=memory_budget,
                          optimizer_bytes=optimizer_bytes, dp_mode=dp_mode,
                          microbatches=microbatches, schedule=schedule, stages_per_rank=stages_per_rank)
    if microbatches != 1 or schedule != "1f1b" or stages_per_rank is not None:
        given = [f"{k}={v!r}" for k, v, d in (("microbatches", microbatches, 1), ("schedule", schedule, "1f1b"),
                                               ("stages_per_rank", stages_per_rank, None)) if v != d]
        raise AutoTPError(f"{', '.join(given)} applies to pipeline stages: give a mesh with a 'pp' dim, "
                          "e.g. init_device_mesh(..., (2, 2), mesh_dim_names=('pp', 'tp'))")
    if compile and mesh is not None:
        raise AutoTPError("compile=True on a data-parallel mesh is not supported yet: compile a "
                          "tensor-parallel module (no mesh=), or leave compile off")
    dp_group = dp_mesh = None
    if mesh is not None:
        group, dp_mesh = _mesh_groups(mesh, group)
        dp_group = dp_mesh.get_group() if dp_mesh is not None else None
    comm = DistComm(group)
    backend = dist.get_backend(group)
    if on_meta(model) and weights is None:
        raise missing_weights_error()
    source = open_weights(weights) if weights is not None else None
    here = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    options = PlanOptions(world_size=comm.world_size, device=get_device(device, backend), mode=mode,
                          objective=objective, memory_budget=memory_budget,
                          optimizer_bytes=optimizer_bytes, dp_mode=dp_mode,
                          dp_size=1 if dp_group is None else dist.get_world_size(dp_group))
    planned = plan_model(model, args, kwargs, options, plan=plan)
    if plan is None:
        # every rank solves the same program; rank 0's plan is authoritative all the same
        # (on a mesh: global rank 0's, so that data-parallel replicas hold the same shards)
        bgroup = None if dp_group is not None else group
        planned = rank0_plan(planned, bgroup)
    family = None
    if plan is None:  # other modes and call structures are planned like this one
        family = ModeFamily(model, options, bgroup, here)
        family.keep(args, kwargs, planned)  # before the rewrite edits the capture
    pm = rank_module(planned, comm, weights=source, here=here)
    if family is not None:
        pm.adopt(family, args, kwargs)
    if dp_mesh is not None and dp_mesh.size() > 1:
        if pm.plan.dp_mode == "fsdp":
            pm.fully_shard(dp_mesh)
        else:
            pm.data_parallel(dp_group, here)
    if compile:
        kw = {"fullgraph": True} | (compile if isinstance(compile, dict) else {})
        pm.compile(**kw)
        object.__setattr__(pm, "_compile_kwargs", kw)  # generate's prefill and decode programs too
    return pm


def _check_mesh(mesh: DeviceMesh, group: dist.ProcessGroup | None) -> None:
    """What every mesh must be, read from the mesh alone (every rank raises alike)."""
    if group is not None:
        raise AutoTPError("pass either group= or mesh=, not both")
    if mesh.size() != dist.get_world_size():
        raise AutoTPError(
            f"the mesh holds {mesh.size()} ranks (shape {tuple(mesh.shape)}) but the process "
            f"group has {dist.get_world_size()}: give init_device_mesh a shape whose product is "
            "the world size")


def _mesh_groups(mesh: DeviceMesh, group: dist.ProcessGroup | None
                 ) -> tuple[dist.ProcessGroup, DeviceMesh | None]:
    """The tensor-parallel group and the data-parallel 1-D mesh (None without a second dim).
    Every check here reads only the mesh, which every rank holds alike, so every rank raises
    the same error before any collective."""
    names = mesh.mesh_dim_names or ()
    _check_mesh(mesh, group)
    if "tp" not in names or mesh.ndim > 2:
        raise AutoTPError(
            f"mesh must have 1 or 2 named dims, one of them 'tp' (got {mesh.ndim} dims named "
            f"{names}): e.g. init_device_mesh('cuda', (nodes, gpus_per_node), "
            f"mesh_dim_names=('dp', 'tp'))")
    dp = [n for n in names if n != "tp"]
    return mesh.get_group("tp"), (mesh[dp[0]] if dp else None)


def _pipelined(model: nn.Module, args: tuple, kwargs: dict, mesh: DeviceMesh, *, group: Any,
               device: Any, objective: Objective, plan: Plan | None, mode: Mode, weights: Any,
               memory_budget: float | None, optimizer_bytes: float, dp_mode: DpMode,
               microbatches: int, schedule: Schedule, stages_per_rank: int | None) -> PipelinedModule:
    """``parallelize`` on a mesh with a "pp" dim (runtime/stages.py). Every check before the
    plan's broadcast reads only the arguments and the mesh, alike on every rank."""
    names = tuple(mesh.mesh_dim_names or ())
    _check_mesh(mesh, group)
    if set(names) - {"pp", "dp", "tp"} or "tp" not in names or len(set(names)) != len(names):
        raise AutoTPError(f"a pipelined mesh has dims named 'pp', 'tp' and optionally 'dp' (any of "
                          f"size 1), got {names}: e.g. init_device_mesh('cuda', (stages, replicas, "
                          "gpus_per_stage), mesh_dim_names=('pp', 'dp', 'tp'))")
    if mode != "training":
        raise AutoTPError("pipeline stages run training steps (tp.step); for inference "
                          "parallelize without a 'pp' dim")
    if dp_mode == "fsdp":
        raise AutoTPError("dp_mode='fsdp' with pipeline stages is not supported yet: use "
                          "dp_mode='ddp' (replicas average their gradients after each step)")
    pp, tp = mesh.size(names.index("pp")), mesh.size(names.index("tp"))
    dp = mesh.size(names.index("dp")) if "dp" in names else 1
    if pp < 2:
        raise AutoTPError("the mesh's 'pp' dim has size 1: drop it (mesh_dim_names=('dp', 'tp')) "
                          "to train without pipeline stages")
    options = PlanOptions(world_size=tp, device=device, mode=mode, objective=objective,
                          memory_budget=memory_budget, optimizer_bytes=optimizer_bytes,
                          dp_size=dp, dp_mode="ddp", pp_size=pp, microbatches=microbatches,
                          schedule=schedule, stages_per_rank=stages_per_rank)
    mb_args, mb_kwargs = microbatch_of(args, kwargs, microbatches)
    if on_meta(model) and weights is None:
        raise missing_weights_error()
    tp_group = mesh.get_group("tp")
    backend = dist.get_backend(tp_group)
    here = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    options = dataclasses.replace(options, device=get_device(device, backend))
    planned = plan_model(model, mb_args, mb_kwargs, options, plan=plan)
    if plan is None:
        planned = rank0_plan(planned, None)  # global rank 0's: every stage cuts alike
    pipe = planned.plan.pipeline
    if pipe is None or pipe.ranks != pp:
        raise AutoTPError(f"the plan runs its pipeline on {0 if pipe is None else pipe.ranks} ranks and "
                          f"the mesh's 'pp' dim has {pp}: plan with pipeline_parallel={pp}")
    source = open_weights(weights) if weights is not None else None
    stage = mesh.get_local_rank("pp")
    mine = pipe.on_rank(stage)
    others = [p for i, st in enumerate(pipe.stages) if i not in mine for p in st.layers]

    def elsewhere(names: list[str]) -> bool:  # every name in another stage's layer: not read
        return all(any(n.startswith(p + ".") for p in others) for n in names)
    full = rank_module(planned, DistComm(tp_group), weights=source, here=here, skip=elsewhere)
    return PipelinedModule(full, stage=stage, pp_group=mesh.get_group("pp"),
                           dp_group=mesh.get_group("dp") if "dp" in names else None, here=here,
                           example=(mb_args, mb_kwargs))
