"""Mixture-of-experts weights through ``aten._grouped_mm`` (transformers 5.x experts in bf16:
tokens grouped by expert, one (experts, in, out) weight): its rule splits the out dim
(column) and the contracted dim (row, Partial), never tokens or experts, whose split would
move the groups' boundaries. On real gloo processes at world 2 and 3, bf16 (torch's fake
kernel of the op takes bf16 only): outputs and gradients against one device, within bf16
rounding (a row split sums two bf16 partials where one device accumulates once), and every
rank holds about 1/N of the experts with objective="memory"."""
from __future__ import annotations

import torch
from torch import nn

import autotp
from autotp.core.placements import Replicate, shard_tensor
from dist_utils import run_ranks

TOL = 2e-2  # relative to the largest element; bf16 has 8 bits of mantissa (1 ulp ~ 0.4-0.8%)


class Experts(nn.Module):
    """up (E, H, F) and down (E, F, H) experts over tokens grouped by ``offs``."""

    def __init__(self, experts: int = 4, hidden: int = 48, inner: int = 96) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.randn(experts, hidden, inner) / hidden ** 0.5)
        self.down = nn.Parameter(torch.randn(experts, inner, hidden) / inner ** 0.5)

    def forward(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        h = torch.relu(torch._grouped_mm(x, self.up, offs))
        return torch._grouped_mm(h, self.down, offs)


def _experts(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    ref = Experts().to(torch.bfloat16)
    x = torch.randn(24, 48, dtype=torch.bfloat16)
    offs = torch.tensor([5, 12, 18, 24], dtype=torch.int32)
    tp = autotp.parallelize(ref, (x, offs), objective="memory")
    got, want = tp(x, offs), ref(x, offs)
    got.float().square().sum().backward()
    want.float().square().sum().backward()
    full = dict(ref.named_parameters())
    grad = max(float((p.grad.float() - shard_tensor(full[n].grad, tp.placements[n], rank, world).float())
                     .abs().max() / full[n].grad.float().abs().max()) for n, p in tp.named_parameters())
    held = sum(p.numel() for p in tp.parameters()) / sum(p.numel() for p in ref.parameters())
    out = float((got.float() - want.float()).abs().max() / want.float().abs().max())
    return {"out": out, "grad": grad, "held": held,
            "split": sorted(n for n, pl in tp.placements.items() if not isinstance(pl, Replicate))}


def test_grouped_mm_experts_split_and_match_one_device() -> None:
    for world in (2, 3):
        for r in run_ranks(_experts, world):
            assert r["split"] == ["down", "up"], (world, r)
            assert r["held"] <= 1 / world + 0.05, (world, r)  # 96 / 3 and 48 / 3 are even
            assert r["out"] < TOL and r["grad"] < TOL, (world, r)
