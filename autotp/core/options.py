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
Schedule = Literal["1f1b", "gpipe"]

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
    ``pp_size``: pipeline stages (each a tensor-parallel group of ``world_size`` ranks) the
    layers are cut into, run over ``microbatches`` microbatches by ``schedule`` ("1f1b" or
    "gpipe"; cost/pipeline.py); the example inputs are then one microbatch.
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
                              f"Schedule1F1B, ScheduleGPipe), got {self.schedule!r}")
        if self.dp_mode not in DP_MODES:
            raise AutoTPError(f"dp_mode must be one of {DP_MODES}, got {self.dp_mode!r}")
        if self.memory_budget is not None and not self.memory_budget > 0:
            raise AutoTPError(f"memory_budget must be a positive number of bytes, got {self.memory_budget!r}")
        if not self.optimizer_bytes >= 0:
            raise AutoTPError(f"optimizer_bytes must be >= 0, got {self.optimizer_bytes!r}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise AutoTPError(f"time_limit must be positive seconds, got {self.time_limit!r}")
