"""autotp: automatic tensor parallelism for PyTorch.

    plan = autotp.plan(model, (ids,), world_size=8, device="h100")     # no processes needed
    tp = autotp.parallelize(model, (ids,))                              # on every rank

Pipeline, by module: capture (torch.export -> fx graph; layers: repeated layers captured once)
-> strategies (candidate placements per node, from the rules/ registry) -> solver (one
strategy per node, priced by cost against a devices.DeviceSpec; decompose: repeated layers
solved once) -> plans (the Plan, plain data) -> rewrite (this rank's module, with
collectives' autograd Functions). pipeline runs the stages once (plan_model, rank_module) from
one options.PlanOptions; api's plan and parallelize and simulate's every-rank-in-one-process
call it; errors holds the exception hierarchy.
"""
from .calibrate import calibrate
from .api import ParallelModule, parallelize, plan
from .checkpoint import (gather_state_dict, iter_state_dict, load_checkpoint, save_checkpoint,
                         save_pretrained)
from .devices import PRESETS, DeviceSpec
from .errors import (AutoTPError, AutoTPInternalError, CaptureError, InfeasiblePlanError, PlanError,
                     ProcessGroupError, RankError)
from .options import PlanOptions
from .placements import Partial, Replicate, Shard
from .plans import Plan
from .simulate import simulate, simulated_modules
from .weights import empty_weights

__all__ = ["parallelize", "plan", "gather_state_dict", "Plan", "PlanOptions", "ParallelModule", "DeviceSpec",
           "PRESETS", "AutoTPError", "AutoTPInternalError", "RankError", "CaptureError", "PlanError", "InfeasiblePlanError",
           "ProcessGroupError", "Shard", "Replicate", "Partial", "simulate", "simulated_modules", "calibrate",
           "empty_weights", "iter_state_dict", "save_pretrained", "save_checkpoint",
           "load_checkpoint"]
