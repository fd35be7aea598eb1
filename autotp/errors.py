"""Errors raised by autotp. Every user-facing failure derives from AutoTPError."""
from __future__ import annotations


class AutoTPError(RuntimeError):
    """Base class of every error autotp raises for bad input or an impossible request."""


class CaptureError(AutoTPError):
    """torch.export could not capture the model."""


class PlanError(AutoTPError):
    """A plan does not fit the model, world size or device it is applied to."""


class InfeasiblePlanError(PlanError):
    """No plan satisfies the memory budget. ``least_bytes``: the least memory per rank any plan
    needs at this world size (a lower bound when the parameters' state alone exceeds the
    budget: then activations were not planned); ``min_world_size``: the smallest world size
    that could fit (a lower bound: memory per rank shrinks at most as 1/N)."""

    def __init__(self, message: str, least_bytes: float | None = None,
                 min_world_size: int | None = None):
        super().__init__(message)
        self.least_bytes = least_bytes
        self.min_world_size = min_world_size


class ProcessGroupError(AutoTPError):
    """torch.distributed is not set up the way parallelize needs it."""
