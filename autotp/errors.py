"""Errors raised by autotp. Every failure autotp raises itself derives from AutoTPError: the
subclasses below for bad input or an impossible request, AutoTPInternalError for a broken
invariant inside autotp (a bug, never the user's fault)."""
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


class RankError(AutoTPError):
    """A rank of a multi-process check (``autotp run``) failed. ``rank``: which one;
    ``trace``: that rank's own Python traceback, as text (``autotp run --debug`` prints it)."""

    def __init__(self, message: str, rank: int, trace: str = ""):
        super().__init__(message)
        self.rank = rank
        self.trace = trace


REPORT = "This is a bug in autotp, please report it (with the model, if you can)."


class AutoTPInternalError(AutoTPError):
    """An invariant inside autotp does not hold: a bug in autotp, not in the caller's input.
    Unlike ``assert``, the check survives ``python -O``. The message ends with a request to
    report it."""

    def __init__(self, message: str):
        super().__init__(f"{message.rstrip('.')}. {REPORT}")

