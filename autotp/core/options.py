"""PlanOptions: everything a plan depends on besides the model and its example inputs.

``autotp.plan``, ``autotp.parallelize`` and ``autotp.simulate`` each turn their keyword
arguments into one ``PlanOptions`` and hand it to ``pipeline.plan_model``; a new option is one
field here (plus the keyword that sets it), not a parameter threaded through every stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

from autotp.errors import AutoTPError

if TYPE_CHECKING:
    from autotp.cost.devices import DeviceSpec

Mode = Literal["training", "inference"]
Objective = Literal["time", "memory"]
DpMode = Literal["auto", "ddp", "fsdp"]
Schedule = Literal["1f1b", "gpipe", "interleaved"]

MODES: tuple[str, ...] = get_args(Mode)
OBJECTIVES: tuple[str, ...] = get_args(Objective)
DP_MODES: tuple[str, ...] = get_args(DpMode)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
ADAM_FP32_BYTES = 8.0


@dataclass(frozen=True)
class PlanOptions:
    """What to plan for.

    ``world_size``: ranks of the tensor-parallel group. ``device``: a preset name, a JSON spec
    path or a DeviceSpec (None: ``cpu-gloo``, see ``devices.get_device``). ``mode``: training
    counts the backward, gradients and optimizer state; inference the forward only.
    ``objective``: "time" (fastest plan under the memory budget) or "memory" (least parameter
    bytes per rank, then fastest). ``memory_budget``: bytes per rank (None: the device's
    memory). ``optimizer_bytes``: optimizer state per trained parameter element (8: Adam's two
    fp32 moments). ``dp_size``: data-parallel replicas of the group, whose gradient all-reduce
    counts in training. ``dp_mode``: how those replicas hold the group's shards: "ddp" (each a
    full copy of its tensor-parallel shard, gradients all-reduced), "fsdp" (FSDP2's
    ``fully_shard`` over the data-parallel dim: parameters, gradients and optimizer state
    divided across the replicas, gathered for the step), "auto" (the faster of the two that
    fits; cost/model.py prices both). ``time_limit``: seconds per MILP solve (None: the solver's default).
    ``pp_size``: pipeline ranks (each a tensor-parallel group of ``world_size`` ranks; as many
    stages as ranks, interleaved ``stages_per_rank`` times as many) the layers are cut into, run over ``microbatches`` microbatches by ``schedule`` ("1f1b",
    "gpipe", or "interleaved": interleaved 1F1B, each rank holding ``stages_per_rank`` stages
    of the cut, stage s on pipeline rank s mod pp_size; cost/pipeline.py); the example
    inputs are then one microbatch. ``stages_per_rank``: None is 2 for "interleaved", 1
    otherwise.
    """

    world_size: int
    device: "str | DeviceSpec | None" = "h100"
    mode: Mode = "training"
    objective: Objective = "time"
    memory_budget: float | None = None
    optimizer_bytes: float = ADAM_FP32_BYTES
    dp_size: int = 1
    dp_mode: DpMode = "auto"
    time_limit: float | None = None
    pp_size: int = 1
    microbatches: int = 1
    schedule: Schedule = "1f1b"
    stages_per_rank: int | None = None

    def __post_init__(self) -> None:
        def whole(name: str, v: object) -> None:
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise AutoTPError(f"{name} must be a positive int, got {v!r}")
        whole("world_size", self.world_size)
        whole("data_parallel", self.dp_size)
        if self.mode not in MODES:
            raise AutoTPError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.objective not in OBJECTIVES:
            raise AutoTPError(f"objective must be 'time' or 'memory', got {self.objective!r}")
        whole("pipeline_parallel", self.pp_size)
        whole("microbatches", self.microbatches)
        if self.schedule not in SCHEDULES:
            raise AutoTPError(f"schedule must be one of {SCHEDULES} (torch.distributed.pipelining's "
                              f"Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B), got {self.schedule!r}")
        if self.stages_per_rank is None:
            object.__setattr__(self, "stages_per_rank", 2 if self.schedule == "interleaved" else 1)
        whole("stages_per_rank", self.stages_per_rank)
        if self.schedule == "interleaved" and self.stages_per_rank < 2:
            raise AutoTPError(f"schedule='interleaved' runs several stages per rank: stages_per_rank "
                              f"must be at least 2, got {self.stages_per_rank}")
        if self.schedule != "interleaved" and self.stages_per_rank != 1:
            raise AutoTPError(f"stages_per_rank={self.stages_per_rank} needs schedule='interleaved' "
                              f"({self.schedule!r} runs one stage per rank)")
        if self.schedule == "interleaved" and self.pp_size == 1:
            raise AutoTPError("schedule='interleaved' runs several pipeline stages per rank: it needs "
                              "pipeline_parallel (the 'pp' dim) of 2 or more")
        if self.schedule == "interleaved":
            rounds = max(1, self.microbatches // self.pp_size)
            if self.microbatches % rounds:
                raise AutoTPError(
                    f"schedule='interleaved' runs the microbatches in rounds of about the pipeline's "
                    f"ranks: {self.microbatches} microbatches on {self.pp_size} pipeline ranks make "
                    f"{rounds} rounds, which {self.microbatches} is not a multiple of; use "
                    f"a multiple of {self.pp_size} (or at most {self.pp_size}) microbatches")
        if self.dp_mode not in DP_MODES:
            raise AutoTPError(f"dp_mode must be one of {DP_MODES}, got {self.dp_mode!r}")
        if self.memory_budget is not None and not self.memory_budget > 0:
            raise AutoTPError(f"memory_budget must be a positive number of bytes, got {self.memory_budget!r}")
        if not self.optimizer_bytes >= 0:
            raise AutoTPError(f"optimizer_bytes must be >= 0, got {self.optimizer_bytes!r}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise AutoTPError(f"time_limit must be positive seconds, got {self.time_limit!r}")
