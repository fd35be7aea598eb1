"""Errors raised by autotp. Every user-facing failure derives from AutoTPError."""
from __future__ import annotations


class AutoTPError(RuntimeError):
    """Base class of every error autotp raises for bad input or an impossible request."""


class CaptureError(AutoTPError):
    """torch.export could not capture the model."""


class PlanError(AutoTPError):
    """A plan does not fit the model, world size or device it is applied to."""


class InfeasiblePlanError(PlanError):
    """No plan satisfies the memory budget."""


class ProcessGroupError(AutoTPError):
    """torch.distributed is not set up the way parallelize needs it."""
