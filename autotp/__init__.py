"""autotp: automatic tensor parallelism for PyTorch.

    plan = autotp.plan(model, (ids,), world_size=8, device="h100")     # no processes needed
    tp = autotp.parallelize(model, (ids,))                              # on every rank

Pipeline (one module each): capture -> strategies (rules/) -> cost -> solver -> plan -> rewrite.
"""
from .calibrate import calibrate
from .api import ParallelModule, parallelize, plan
from .checkpoint import (gather_state_dict, iter_state_dict, load_checkpoint, save_checkpoint,
                         save_pretrained)
from .devices import PRESETS, DeviceSpec
from .errors import (AutoTPError, AutoTPInternalError, CaptureError, InfeasiblePlanError, PlanError,
                     ProcessGroupError, RankError)
from .placements import Partial, Replicate, Shard
from .plans import Plan
from .simulate import simulate, simulated_modules
from .weights import empty_weights

__all__ = ["parallelize", "plan", "gather_state_dict", "Plan", "ParallelModule", "DeviceSpec",
           "PRESETS", "AutoTPError", "AutoTPInternalError", "RankError", "CaptureError", "PlanError", "InfeasiblePlanError",
           "ProcessGroupError", "Shard", "Replicate", "Partial", "simulate", "simulated_modules", "calibrate",
           "empty_weights", "iter_state_dict", "save_pretrained", "save_checkpoint",
           "load_checkpoint"]
