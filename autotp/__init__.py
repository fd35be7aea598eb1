"""autotp: automatic tensor parallelism for PyTorch.

    plan = autotp.plan(model, (ids,), world_size=8, device="h100")     # no processes needed
    tp = autotp.parallelize(model, (ids,))                              # on every rank

The folders are the pipeline's stages in order; each imports only the ones above it
(tests/test_layering.py checks this):

    core/        shared vocabulary: placements, tensor metas, attribute paths, PlanOptions
    rules/       the op registry: per ATen op, its sharding rule and every other fact
    capture/     nn.Module + example inputs -> Captured (torch.export, repeated layers once)
    candidates   Captured -> Candidates (the strategies of every node)
    cost/        devices, the cost formulas, and evaluate (a plan's time and memory)
    solve/       Candidates -> Choice: the integer program, runs of identical layers
    plans        Choice -> Plan (plain data, JSON)
    rewrite/     Plan -> this rank's fx.GraphModule, collectives as autograd Functions
    runtime/     what a user calls and holds: pipeline, api, ParallelModule, weights,
                 checkpoints, calibration
    tools/       the CLI, checks on local processes, the in-process simulator, launch;
                 the library never imports them (this façade re-exports simulate)

errors and _compat (every private torch API, in one place) sit beside them.
"""
from autotp.core.options import PlanOptions
from autotp.core.placements import Partial, Replicate, Shard
from autotp.cost.devices import PRESETS, DeviceSpec
from autotp.errors import (AutoTPError, AutoTPInternalError, CaptureError, InfeasiblePlanError,
                           PlanError, ProcessGroupError, RankError)
from autotp.plans import Plan
from autotp.runtime.api import ParallelModule, parallelize, plan
from autotp.runtime.calibrate import calibrate
from autotp.runtime.layout import Layout, Layouts, choose_layout
from autotp.runtime.checkpoint import (gather_state_dict, iter_state_dict, load_checkpoint,
                                       save_checkpoint, save_pretrained)
from autotp.runtime.weights import empty_weights
from autotp.tools.simulate import simulate, simulated_modules

__all__ = ["parallelize", "plan", "gather_state_dict", "Plan", "PlanOptions", "ParallelModule",
           "DeviceSpec", "PRESETS", "AutoTPError", "AutoTPInternalError", "RankError",
           "CaptureError", "PlanError", "InfeasiblePlanError", "ProcessGroupError", "Shard",
           "Replicate", "Partial", "simulate", "simulated_modules", "calibrate", "empty_weights",
           "iter_state_dict", "save_pretrained", "save_checkpoint", "load_checkpoint",
           "choose_layout", "Layout", "Layouts"]
