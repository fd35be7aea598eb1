"""What a captured tensor value is: shape (ints, or sympy expressions for dynamic dims), dtype,
which dims are dynamic. Shared by every stage after capture (rules, cost, rewrite)."""
from __future__ import annotations


from dataclasses import dataclass

import torch



@dataclass(frozen=True)
class TensorMeta:
    """Shape of one global tensor at the example inputs; ``dynamic[d]`` when dim d is symbolic
    (batch, sequence): such dims are split only evenly, by sequence-parallel regions
    (rules/__init__.py), so the module stays valid at other sizes."""

    shape: tuple[int, ...]
    dynamic: tuple[bool, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def splits_dynamic(self, p: object) -> bool:
        """Whether placement ``p`` of this tensor splits a dynamic (batch/sequence) dim."""
        from autotp.core.placements import Shard
        return isinstance(p, Shard) and bool(self.shape) and self.dynamic[p.dim % len(self.shape)]

    @property
    def nbytes(self) -> int:
        return self.numel * (torch.finfo(self.dtype).bits // 8 if self.dtype.is_floating_point
                             else torch.iinfo(self.dtype).bits // 8 if self.dtype != torch.bool else 1)
